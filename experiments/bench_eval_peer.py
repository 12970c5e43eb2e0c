"""The PyTorch side of experiments/bench_eval.py, run with the peer virtualenv's python.

Reads from `--dir` what bench_eval.py wrote:

  model.json   the SmallCNN's architecture (image_shape, num_classes, conv_channels,
               pool_after, dense_widths, kernel_size, mean, std)
  model.npz    its weights as a PyTorch state_dict (conv1.weight OIHW, ..., fc1.weight
               (out, in) over PyTorch's CHW flatten, ...)
  inputs.npz   x_nchw f32[N,C,H,W] in [0,1], y i64[N], jax_logits f32[N,K]

builds the model, checks that its logits equal the JAX logits (max abs difference
at most --logits_tol; otherwise it stops before attacking), then runs AutoAttack
in batches of --batch_size: `torchattacks.AutoAttack(version='standard')` as
shipped with --autoattack_class, else the same torchattacks attack classes in the
same order with the budgets given. The model's parameters are frozen, so the
attacks compute input gradients only (the peers' best configuration).

Writes --out (.npz: x_adv_nchw, clean_logits, adv_logits) and prints one JSON
line on stdout: the budgets actually run, robust counts after each attack as
torchattacks' MultiAttack records them, wall and CPU time of the attack calls,
the logits check, versions and threads. Progress goes to stderr.
"""

import argparse
import io
import json
import os
import sys
import time


def build_model(arch, torch):
  """The PyTorch SmallCNN described by `arch`, with layer names matching the state_dict."""
  nn, F = torch.nn, torch.nn.functional

  class SmallCNN(nn.Module):
    def __init__(self):
      super().__init__()
      k = arch['kernel_size']
      in_ch = arch['image_shape'][2]
      for i, ch in enumerate(arch['conv_channels']):
        setattr(self, f'conv{i + 1}', nn.Conv2d(in_ch, ch, k, padding=k // 2))
        in_ch = ch
      h, w = arch['image_shape'][:2]
      for pool in arch['pool_after']:
        if pool:
          h, w = h // 2, w // 2
      width = in_ch * h * w
      for j, out in enumerate([*arch['dense_widths'], arch['num_classes']]):
        setattr(self, f'fc{j + 1}', nn.Linear(width, out))
        width = out
      c = arch['image_shape'][2]
      mean = torch.tensor(arch['mean'] if arch['mean'] is not None else [0.0] * c)
      std = torch.tensor(arch['std'] if arch['std'] is not None else [1.0] * c)
      self.register_buffer('mean', mean.view(1, c, 1, 1), persistent=False)
      self.register_buffer('std', std.view(1, c, 1, 1), persistent=False)
      self.normalize = arch['mean'] is not None or arch['std'] is not None

    def forward(self, x):
      if self.normalize:
        x = (x - self.mean) / self.std
      for i, pool in enumerate(arch['pool_after']):
        x = F.relu(getattr(self, f'conv{i + 1}')(x))
        if pool:
          x = F.max_pool2d(x, 2)
      x = torch.flatten(x, 1)  # CHW order, as the exported fc1 expects
      num_dense = len(arch['dense_widths'])
      for j in range(num_dense):
        x = F.relu(getattr(self, f'fc{j + 1}')(x))
      return getattr(self, f'fc{num_dense + 1}')(x)

  return SmallCNN()


def make_attack(model, args, num_classes, torchattacks):
  """torchattacks' AutoAttack (standard), or its attack classes with other budgets."""
  norm, eps, seed = args.norm, args.eps, args.seed
  if args.autoattack_class:
    atk = torchattacks.AutoAttack(
      model, norm=norm, eps=eps, version='standard', n_classes=num_classes, seed=seed
    )
    multi = atk._autoattack  # the MultiAttack it runs (its records give per-attack counts)
  else:
    parts = [
      torchattacks.APGD(
        model, norm=norm, eps=eps, steps=args.apgd_steps, seed=seed, loss='ce', n_restarts=1
      ),
      torchattacks.APGDT(
        model,
        norm=norm,
        eps=eps,
        steps=args.apgd_steps,
        seed=seed,
        n_classes=num_classes,
        n_restarts=1,
      ),
      torchattacks.FAB(
        model,
        norm=norm,
        eps=eps,
        steps=args.fab_steps,
        seed=seed,
        multi_targeted=True,
        n_classes=num_classes,
        n_restarts=1,
      ),
      torchattacks.Square(
        model, norm=norm, eps=eps, n_queries=args.square_queries, seed=seed, n_restarts=1
      ),
    ]
    atk = multi = torchattacks.MultiAttack(parts)
  apgd, apgdt, fab, square = multi.attacks
  budgets = {
    'apgd_steps': apgd.steps,
    'apgdt_steps': apgdt.steps,
    'fab_steps': fab.steps,
    'num_targets': apgdt.n_target_classes,
    'fab_num_targets': fab.n_target_classes,
    'square_queries': square.n_queries,
    'attacks': [type(a).__name__ for a in multi.attacks],
  }
  return atk, multi, budgets


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--dir', required=True, help='folder with model.json, model.npz, inputs.npz')
  ap.add_argument('--out', required=True, help='.npz written here (atomically)')
  ap.add_argument('--norm', default='Linf', choices=['Linf', 'L2'])
  ap.add_argument('--eps', type=float, required=True)
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--threads', type=int, default=2)
  ap.add_argument('--batch_size', type=int, default=250)
  ap.add_argument('--logits_tol', type=float, default=1e-4)
  ap.add_argument('--autoattack_class', action='store_true', help='torchattacks.AutoAttack')
  ap.add_argument('--apgd_steps', type=int, default=100)
  ap.add_argument('--fab_steps', type=int, default=100)
  ap.add_argument('--square_queries', type=int, default=5000)
  args = ap.parse_args()

  import numpy as np
  import torch
  import torchattacks

  torch.set_num_threads(args.threads)
  with open(os.path.join(args.dir, 'model.json')) as f:
    arch = json.load(f)
  model = build_model(arch, torch)
  with np.load(os.path.join(args.dir, 'model.npz')) as f:
    state = {k: torch.from_numpy(f[k]) for k in f.files}
  model.load_state_dict(state, strict=True)
  model.eval().requires_grad_(False)
  with np.load(os.path.join(args.dir, 'inputs.npz')) as f:
    x, y, jax_logits = torch.from_numpy(f['x_nchw']), torch.from_numpy(f['y']), f['jax_logits']

  def logits_of(images):
    with torch.no_grad():
      return torch.cat([model(images[i : i + 500]) for i in range(0, len(images), 500)]).numpy()

  clean_logits = logits_of(x)
  diff = float(np.abs(clean_logits - jax_logits).max())
  print(f'[peer] max |torch - JAX logits| = {diff:.2e} on {len(x)} inputs', file=sys.stderr)
  if not diff <= args.logits_tol:
    print(
      f'[peer] the exported model does not reproduce the JAX logits (max abs diff {diff:.2e} > '
      f'--logits_tol {args.logits_tol}); not attacking. Check the layout in model.json / model.npz.',
      file=sys.stderr,
    )
    sys.exit(3)

  atk, multi, budgets = make_attack(model, args, arch['num_classes'], torchattacks)
  # MultiAttack sums its per-attack records over calls when asked to (as its save() does).
  multi._accumulate_multi_atk_records = True
  multi._multi_atk_records = [0.0] * (1 + len(multi.attacks))
  n, bs = len(x), args.batch_size
  adv = torch.empty_like(x)
  wall = cpu = 0.0
  for start in range(0, n, bs):
    xb, yb = x[start : start + bs], y[start : start + bs]
    c0, t0 = time.process_time(), time.perf_counter()
    adv[start : start + bs] = atk(xb, yb).detach()
    wall, cpu = wall + time.perf_counter() - t0, cpu + time.process_time() - c0
    done = min(start + bs, n)
    rate = done / wall if wall > 0 else 0.0
    print(
      f'[peer] torchattacks autoattack: {done}/{n} examples, {rate:.2f} examples/s, '
      f'ETA {(n - done) / max(rate, 1e-9):.0f} s, robust so far '
      f'{int(multi._multi_atk_records[-1])}/{done}',
      file=sys.stderr,
      flush=True,
    )
  records = [int(r) for r in multi._multi_atk_records]
  adv_logits = logits_of(adv)
  buf = io.BytesIO()
  np.savez(buf, x_adv_nchw=adv.numpy(), clean_logits=clean_logits, adv_logits=adv_logits)
  tmp = args.out + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(buf.getvalue())
  os.replace(tmp, args.out)
  reply = {
    'budgets': budgets,
    'autoattack_class': args.autoattack_class,
    'records': records,
    'wall_s': wall,
    'cpu_s': cpu,
    'logits_max_abs_diff': diff,
    'threads': torch.get_num_threads(),
    'torch': torch.__version__,
    'torchattacks': torchattacks.__version__,
  }
  print(json.dumps(reply), flush=True)


if __name__ == '__main__':
  main()
