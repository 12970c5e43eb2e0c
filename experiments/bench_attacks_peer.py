"""The PyTorch side of experiments/bench_attacks.py, run inside the peer virtualenv.

Reads one JSON command per line on stdin and answers one JSON line on stdout, so
the JAX benchmark can interleave its runs with the peers' in the same session:

  {"cmd": "load", "model": "small_cnn"}             load weights_<model>.npz
  {"cmd": "deepfool", "model": ..., "impl": "clean_tuned"|"clean"|"foolbox", "n": 256}
  {"cmd": "train", "model": ..., "kind": "pgd_at"|"trades", "batch": 128}
                                                    one timed step of the peers' own
                                                    pgd_at_step / trades_step (model and
                                                    SGD state kept across calls)
  {"cmd": "gemm"}                                   fp32 4096^3 torch.mm GFLOP/s
  {"cmd": "quit"}

It imports the models and DeepFool implementations from the peers' own
peer_bench.py (--peers-dir), so the code timed here is exactly theirs.
"""

import argparse
import copy
import functools
import json
import os
import sys
import time

import numpy as np


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--peers-dir', required=True, help='folder holding peer_bench.py')
  ap.add_argument('--artifacts', required=True, help='output folder of peer_bench.py')
  ap.add_argument('--threads', type=int, default=2)
  ap.add_argument('--chunk', type=int, default=32, help='chunk size of clean_tuned')
  args = ap.parse_args()
  sys.path.insert(0, args.peers_dir)
  import peer_bench as pb
  import torch

  torch.set_num_threads(args.threads)
  x_nchw = torch.from_numpy(np.load(os.path.join(args.artifacts, 'inputs.npz'))['x_nchw'])
  y_train = torch.from_numpy(np.load(os.path.join(args.artifacts, 'inputs.npz'))['train_labels'])
  loaded = {}
  training = {}

  def load(name):
    if name not in loaded:
      model = {'small_cnn': pb.SmallCNN, 'preact_resnet18': pb.PreActResNet18}[name]()
      weights = np.load(os.path.join(args.artifacts, f'weights_{name}.npz'))
      state = {k: torch.from_numpy(weights[k]) for k in weights.files}
      missing, unexpected = model.load_state_dict(state, strict=False)
      if unexpected or any(not k.endswith('num_batches_tracked') for k in missing):
        raise ValueError(f'weights_{name}.npz does not fit: {missing} {unexpected}')
      model.eval()
      labels = torch.from_numpy(np.load(os.path.join(args.artifacts, f'labels_{name}.npy')))
      tuned = copy.deepcopy(model).to(memory_format=torch.channels_last)
      loaded[name] = (model, tuned, labels)
      # Warm-up, as peer_bench does.
      pb.deepfool_chunked(
        tuned, x_nchw[:16].contiguous(memory_format=torch.channels_last), labels[:16], args.chunk
      )
    return loaded[name]

  def timed(fn):
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return out, {'wall_s': wall, 'cpu_util': cpu / (wall * torch.get_num_threads())}

  for line in sys.stdin:
    req = json.loads(line)
    cmd = req['cmd']
    if cmd == 'quit':
      break
    if cmd == 'load':
      load(req['model'])
      reply = {'ok': True, 'torch': torch.__version__}
    elif cmd == 'deepfool':
      model, tuned, labels = load(req['model'])
      n, impl = req['n'], req['impl']
      xs, ys = x_nchw[:n], labels[:n]
      if impl == 'clean_tuned':
        xs = xs.contiguous(memory_format=torch.channels_last)
        fn = functools.partial(lambda m, x, y: pb.deepfool_chunked(m, x, y, args.chunk)[0], tuned)
      elif impl == 'clean':
        fn = functools.partial(lambda m, x, y: pb.deepfool_clean(m, x, y)[0], model)
      elif impl == 'foolbox':
        fn = functools.partial(pb.run_foolbox, model)
      else:
        raise ValueError(f'unknown DeepFool implementation {impl!r}')
      x_adv, reply = timed(functools.partial(fn, xs, ys))
      reply['margins'] = pb.l2_norms(x_adv, x_nchw[:n]).tolist()
    elif cmd == 'train':
      step = {'pgd_at': pb.pgd_at_step, 'trades': pb.trades_step}[req['kind']]
      key = (req['model'], req['kind'], req['batch'])
      if key not in training:
        # A copy of the exported weights and its own SGD state, kept across the timed
        # steps like a training run's; warmed up once, as peer_bench does.
        m = copy.deepcopy(load(req['model'])[0])
        opt = pb.make_opt(m)
        xb, yb = x_nchw[: req['batch']].contiguous(), y_train[: req['batch']].contiguous()
        torch.manual_seed(123)
        step(m, opt, xb, yb, steps=1)  # warm-up with the same shapes
        training[key] = (m, opt, xb, yb)
      m, opt, xb, yb = training[key]
      loss, reply = timed(functools.partial(step, m, opt, xb, yb))
      reply['loss'] = loss
    elif cmd == 'gemm':
      a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
      torch.mm(a, b)
      ts = []
      for _ in range(3):
        t0 = time.perf_counter()
        torch.mm(a, b)
        ts.append(time.perf_counter() - t0)
      reply = {'gflops': 2 * 4096**3 / sorted(ts)[1] / 1e9}
    else:
      raise ValueError(f'unknown command {cmd!r}')
    print(json.dumps(reply), flush=True)


if __name__ == '__main__':
  main()
