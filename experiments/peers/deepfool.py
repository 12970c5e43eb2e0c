"""DeepFool in PyTorch: the peers' own batched implementation and the torchattacks / foolbox runs.

Runs in the peer virtualenv. Every variant attacks the model's own prediction `labels`
(the examples start correctly classified) with overshoot 0.02, at most 50 iterations,
all classes as candidates and iterates clipped to [0, 1], as puma_jax's margin stage does
(`puma_jax.attacks.deepfool` with `clip=(0, 1)`), and returns the final iterates x_adv
[N,C,H,W]; the margin in the peers' definition is ||x_adv - x||_p (overshoot included).

`batched` is the update of the original code and foolbox, for L2 and L-infinity (dual
norm L1): with f'_k = f_k - f_y and w_k = grad f'_k,

    l = argmin_k |f'_l| / (||w_l||_q + 1e-8),  d = that distance + 1e-4,
    r_tot += d * u(w_l),  u(w) = w / (||w||_2 + 1e-8)  (L2)  or  sign(w)  (L-inf),
    x = clip(x0 + (1 + overshoot) * r_tot, 0, 1),

one forward pass with an input gradient and C - 1 backward passes per iteration, and the
examples that have flipped leave the batch (re-running the forward on the survivors when
many left at once, so no backward work is spent on finished examples).
"""

import contextlib

import torch


@contextlib.contextmanager
def frozen(model):
  """The parameters do not require gradients inside (backward passes to the input only)."""
  flags = [p.requires_grad for p in model.parameters()]
  for p in model.parameters():
    p.requires_grad_(False)
  try:
    yield
  finally:
    for p, f in zip(model.parameters(), flags, strict=True):
      p.requires_grad_(f)


def batched(model, x0, labels, *, norm='l2', overshoot=0.02, max_iter=50, refwd_frac=0.2):
  """Batched DeepFool; returns (x_adv f32[N,...], iterations i64[N], flipped bool[N])."""
  if norm not in ('l2', 'linf'):
    raise ValueError(f'DeepFool norm must be l2 or linf, got {norm!r}')
  n = x0.shape[0]
  x0 = x0.detach()
  x, r_tot = x0.clone(), torch.zeros_like(x0)
  iterations = torch.zeros(n, dtype=torch.long)
  flipped = torch.zeros(n, dtype=torch.bool)
  active = torch.arange(n)
  with frozen(model):
    num_classes = None
    for _ in range(max_iter):
      if active.numel() == 0:
        break
      xa = x[active].clone().requires_grad_(True)
      logits = model(xa)
      if num_classes is None:
        num_classes = logits.shape[1]
        classes = torch.arange(num_classes)
        others = torch.stack([classes[classes != c] for c in range(num_classes)])  # [K, K-1]
      still = logits.detach().argmax(1) == labels[active]
      rows = None
      if not bool(still.all()):
        flipped[active[~still]] = True
        done = int((~still).sum())
        active = active[still]
        if active.numel() == 0:
          break
        if done >= refwd_frac * still.numel():  # many left: a fresh, smaller forward pass
          xa = x[active].clone().requires_grad_(True)
          logits = model(xa)
        else:
          rows = still.nonzero().squeeze(1)
      lg = logits if rows is None else logits[rows]
      y = labels[active]
      f_diff = lg.gather(1, others[y]) - lg.gather(1, y[:, None])  # [n, K-1]
      grads = []
      for j in range(num_classes - 1):
        (g,) = torch.autograd.grad(f_diff[:, j].sum(), xa, retain_graph=j < num_classes - 2)
        grads.append(g if rows is None else g[rows])
      w = torch.stack(grads, 1).flatten(2)  # [n, K-1, D]
      w_norm = w.norm(dim=2) if norm == 'l2' else w.abs().sum(dim=2)
      dist = f_diff.detach().abs() / (w_norm + 1e-8)
      best = dist.argmin(1)
      idx = torch.arange(active.numel())
      d, w_best = dist[idx, best] + 1e-4, w[idx, best]
      if norm == 'l2':
        step = (d / (w_best.norm(dim=1) + 1e-8))[:, None] * w_best
      else:
        step = d[:, None] * w_best.sign()
      r_tot[active] += step.view(-1, *x0.shape[1:])
      x[active] = torch.clamp(x0[active] + (1.0 + overshoot) * r_tot[active], 0.0, 1.0)
      iterations[active] += 1
    if active.numel():  # max_iter reached: one last check, for the bookkeeping only
      with torch.no_grad():
        flipped[active] = model(x[active]).argmax(1) != labels[active]
  return x, iterations, flipped


def chunked(model, x0, labels, chunk, **kwargs):
  """`batched` over consecutive chunks of `chunk` examples (CPU caches favour 16-64)."""
  outs = [
    batched(model, x0[i : i + chunk], labels[i : i + chunk], **kwargs)
    for i in range(0, x0.shape[0], chunk)
  ]
  return tuple(torch.cat(t) for t in zip(*outs, strict=True))


def run_torchattacks(model, x, labels, *, norm='l2', overshoot=0.02, max_iter=50):
  """torchattacks.DeepFool (L2 only; it loops over the examples one at a time)."""
  import torchattacks

  if norm != 'l2':
    raise ValueError('torchattacks.DeepFool is L2 only')
  with frozen(model):
    return torchattacks.DeepFool(model, steps=max_iter, overshoot=overshoot)(x, labels)


def run_foolbox(model, x, labels, *, norm='l2', overshoot=0.02, max_iter=50):
  """foolbox's L2DeepFoolAttack / LinfDeepFoolAttack with every class as a candidate."""
  import foolbox

  cls = {'l2': foolbox.attacks.L2DeepFoolAttack, 'linf': foolbox.attacks.LinfDeepFoolAttack}[norm]
  with torch.no_grad():
    num_classes = model(x[:1]).shape[1]
  fmodel = foolbox.PyTorchModel(model, bounds=(0, 1), device='cpu')
  attack = cls(steps=max_iter, candidates=num_classes, overshoot=overshoot)
  with frozen(model):
    raw, _, _ = attack(fmodel, x, foolbox.criteria.Misclassification(labels), epsilons=None)
  return raw


def margins(x_adv, x, norm='l2'):
  """||x_adv - x||_p per example, float64 [N]."""
  d = (x_adv.detach() - x).flatten(1).double()
  return (d.norm(dim=1) if norm == 'l2' else d.abs().amax(dim=1)).numpy()
