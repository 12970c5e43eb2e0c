"""The PyTorch side of experiments/bench_eval.py: one AutoAttack peer on the exported model.

Run with the peer virtualenv's python (`experiments/peers/setup_venv.sh`). Reads from
`--dir` what bench_eval.py exported (experiments/peers/export.py):

  model.json, model.npz   the model (torch_models.load)
  inputs.npz              x_nchw f32[N,C,H,W] in [0,1], y i64[N], jax_logits f32[N,K]

checks that the PyTorch logits equal the JAX logits (max abs difference at most
`--logits_tol`; otherwise it exits with code 3 before attacking), runs `--peer`
(`autoattack`: the original fra31/auto-attack; `torchattacks`: torchattacks.AutoAttack)
with the model's parameters frozen, writes `--out` (.npz: flags bool[N,5] after each
attack, x_adv_nchw, clean_logits, adv_logits) and prints one JSON line on stdout: the
budgets actually run, wall and CPU time of the attacks, the logits check, versions.
Progress goes to stderr.
"""

import argparse
import io
import json
import os
import sys
import time

import autoattack_runners
import numpy as np
import torch
import torch_models


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--dir', required=True, help='folder with model.json, model.npz, inputs.npz')
  ap.add_argument('--out', required=True, help='.npz written here (atomically)')
  ap.add_argument('--peer', default='autoattack', choices=sorted(autoattack_runners.RUNNERS))
  ap.add_argument('--norm', default='linf', choices=['linf', 'l2'])
  ap.add_argument('--eps', type=float, required=True)
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--threads', type=int, default=2)
  ap.add_argument('--batch_size', type=int, default=250)
  ap.add_argument('--logits_tol', type=float, default=1e-4)
  ap.add_argument(
    '--budgets',
    default='',
    help='JSON {apgd_steps, fab_steps, num_targets, square_queries}; empty: the peer as '
    'shipped (the original: 100/100/9/5000; torchattacks: its own "standard")',
  )
  args = ap.parse_args()
  torch.set_num_threads(args.threads)
  log = lambda msg: print(msg, file=sys.stderr, flush=True)

  model, arch = torch_models.load(args.dir)
  model.requires_grad_(False)
  with np.load(os.path.join(args.dir, 'inputs.npz')) as f:
    x, y, jax_logits = torch.from_numpy(f['x_nchw']), torch.from_numpy(f['y']), f['jax_logits']

  def logits_of(images):
    with torch.no_grad():
      return torch.cat([model(images[i : i + 500]) for i in range(0, len(images), 500)]).numpy()

  clean_logits = logits_of(x)
  diff = float(np.abs(clean_logits - jax_logits).max())
  log(f'[peer] max |torch - JAX logits| = {diff:.2e} on {len(x)} inputs')
  if not diff <= args.logits_tol:
    log(
      f'[peer] the exported model does not reproduce the JAX logits (max abs diff {diff:.2e} > '
      f'--logits_tol {args.logits_tol}); not attacking. Check the layout in model.json / model.npz.'
    )
    sys.exit(3)

  runner = autoattack_runners.RUNNERS[args.peer]
  budgets = json.loads(args.budgets) if args.budgets else None
  c0, t0 = time.process_time(), time.perf_counter()
  flags, x_adv, info = runner(
    model, x, y, norm=args.norm, eps=args.eps, seed=args.seed, bs=args.batch_size,
    budgets=budgets, log=log,
  )  # fmt: skip
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  buf = io.BytesIO()
  np.savez(
    buf,
    flags=flags.numpy(),
    x_adv_nchw=x_adv.numpy(),
    clean_logits=clean_logits,
    adv_logits=logits_of(x_adv),
  )
  with open(args.out + '.tmp', 'wb') as f:
    f.write(buf.getvalue())
  os.replace(args.out + '.tmp', args.out)
  versions = {'torch': torch.__version__}
  for name in ('torchattacks', 'autoattack'):
    module = __import__(name)
    versions[name] = getattr(module, '__version__', os.path.dirname(module.__file__))
  reply = {
    'peer': args.peer,
    'model': arch['name'],
    'budgets': info['budgets'],
    'attack_wall_s': info['attack_wall_s'],
    'wall_s': wall,
    'cpu_s': cpu,
    'logits_max_abs_diff': diff,
    'threads': torch.get_num_threads(),
    'versions': versions,
  }
  print(json.dumps(reply), flush=True)


if __name__ == '__main__':
  main()
