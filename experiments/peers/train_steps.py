"""PGD-AT and TRADES training steps in PyTorch, the peers of puma_jax's train step.

Runs in the peer virtualenv. Both attack the model in eval mode with input gradients
only (parameters frozen), then take one SGD step in train mode, as Madry et al.'s and
Zhang et al.'s reference code do:

* PGD-AT: random start x + U(-eps, eps) clipped to [0, 1], `steps` signed-gradient
  steps of `alpha` on the cross-entropy, projected to the L-inf ball and [0, 1]; then
  SGD on CE(model(x_adv), y).
* TRADES: start x + 0.001 N(0, 1), `steps` signed-gradient steps on
  KL(softmax(model(x)) || softmax(model(x_adv))) (sum over the batch), projected;
  then SGD on CE(model(x), y) + beta * KL (batch mean). The clean softmax of the
  attack is computed once (the reference recomputes it at every step).

Defaults: L-inf eps 8/255, 10 steps of 2/255, beta 6; `make_optimizer`: SGD lr 0.1,
momentum 0.9, weight decay 5e-4 (on every parameter, as torch.optim.SGD does).
"""

import torch
import torch.nn.functional as F
from deepfool import frozen


def _project(x_adv, x, eps):
  return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)


def pgd_at_step(model, opt, x, y, eps=8 / 255, alpha=2 / 255, steps=10):
  """One PGD-AT step; returns the training loss (float)."""
  model.eval()
  with frozen(model):
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
      x_adv.requires_grad_(True)
      (g,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
      x_adv = _project(x_adv.detach() + alpha * g.sign(), x, eps)
  model.train()
  opt.zero_grad(set_to_none=True)
  loss = F.cross_entropy(model(x_adv), y)
  loss.backward()
  opt.step()
  return float(loss.detach())


def trades_step(model, opt, x, y, eps=8 / 255, alpha=2 / 255, steps=10, beta=6.0):
  """One TRADES step; returns the training loss (float)."""
  model.eval()
  with frozen(model):
    with torch.no_grad():
      p_clean = F.softmax(model(x), 1)
    x_adv = x + 0.001 * torch.randn_like(x)
    for _ in range(steps):
      x_adv.requires_grad_(True)
      kl = F.kl_div(F.log_softmax(model(x_adv), 1), p_clean, reduction='sum')
      (g,) = torch.autograd.grad(kl, x_adv)
      x_adv = _project(x_adv.detach() + alpha * g.sign(), x, eps)
  model.train()
  opt.zero_grad(set_to_none=True)
  logits, logits_adv = model(x), model(x_adv)
  robust = F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits, 1), reduction='batchmean')
  loss = F.cross_entropy(logits, y) + beta * robust
  loss.backward()
  opt.step()
  return float(loss.detach())


STEPS = {'pgd_at': pgd_at_step, 'trades': trades_step}


def make_optimizer(model):
  return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
