"""The PyTorch side of experiments/bench_attacks.py, a worker process in the peer virtualenv.

Reads one JSON command per line on stdin and answers one JSON line on stdout, so that
the JAX benchmark can interleave its timed runs with the peers' in one session:

  {"cmd": "load", "model": "small_cnn"}   build <artifacts>/<model>/ (torch_models.load),
                                          check its logits against the JAX ones
  {"cmd": "deepfool", "model": ..., "impl": "batched"|"chunked"|"foolbox"|"torchattacks",
   "n": 256, "norm": "l2"|"linf"}         one timed DeepFool run on the first n inputs;
                                          margins ||x_adv - x||_p (and iterations)
  {"cmd": "train", "model": ..., "kind": "pgd_at"|"trades", "batch": 128}
                                          one timed train step (train_steps.py); the model
                                          copy and its SGD state persist across calls
  {"cmd": "gemm"}                         fp32 4096^3 torch.mm, GFLOP/s
  {"cmd": "quit"}

`<artifacts>` is what experiments/peers/export.py wrote: inputs.npz (x_nchw, train_labels)
and, per model, model.json, model.npz and reference.npz (the JAX logits and their argmax,
the labels that DeepFool attacks).
"""

import argparse
import copy
import functools
import json
import os
import sys
import time

import deepfool
import numpy as np
import torch
import torch_models
import train_steps


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--artifacts', required=True, help='folder written by export.py')
  ap.add_argument('--threads', type=int, default=2)
  ap.add_argument('--chunk', type=int, default=32, help='chunk size of the "chunked" DeepFool')
  args = ap.parse_args()
  torch.set_num_threads(args.threads)
  with np.load(os.path.join(args.artifacts, 'inputs.npz')) as f:
    x_nchw, y_train = torch.from_numpy(f['x_nchw']), torch.from_numpy(f['train_labels'])
  loaded, training = {}, {}

  def load(name):
    if name not in loaded:
      directory = os.path.join(args.artifacts, name)
      model, _ = torch_models.load(directory)
      with np.load(os.path.join(directory, 'reference.npz')) as f:
        labels, jax_logits = torch.from_numpy(f['labels']).long(), f['logits']
      with torch.no_grad():
        diff = float(np.abs(model(x_nchw[: len(jax_logits)]).numpy() - jax_logits).max())
      tuned = copy.deepcopy(model).to(memory_format=torch.channels_last)
      deepfool.chunked(  # warm-up
        tuned, x_nchw[:16].contiguous(memory_format=torch.channels_last), labels[:16], args.chunk
      )
      loaded[name] = (model, tuned, labels, diff)
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
      reply = {'torch': torch.__version__, 'logits_max_abs_diff': load(req['model'])[3]}
    elif cmd == 'deepfool':
      model, tuned, labels, _ = load(req['model'])
      n, impl, norm = req['n'], req['impl'], req.get('norm', 'l2')
      xs, ys = x_nchw[:n], labels[:n]
      if impl == 'chunked':
        xs = xs.contiguous(memory_format=torch.channels_last)
        fn = functools.partial(deepfool.chunked, tuned, chunk=args.chunk, norm=norm)
      elif impl == 'batched':
        fn = functools.partial(deepfool.batched, model, norm=norm)
      elif impl in ('foolbox', 'torchattacks'):
        fn = functools.partial(getattr(deepfool, f'run_{impl}'), model, norm=norm)
      else:
        raise ValueError(f'unknown DeepFool implementation {impl!r}')
      out, reply = timed(functools.partial(fn, xs, ys))
      x_adv = out[0] if isinstance(out, tuple) else out
      reply['margins'] = deepfool.margins(x_adv, x_nchw[:n], norm).tolist()
      if isinstance(out, tuple):
        reply['iterations'] = out[1].tolist()
    elif cmd == 'train':
      step = train_steps.STEPS[req['kind']]
      key = (req['model'], req['kind'], req['batch'])
      if key not in training:
        # A copy of the exported weights with its own SGD state, kept across the timed
        # steps as in a training run; one untimed step first (same shapes).
        model = copy.deepcopy(load(req['model'])[0])
        opt = train_steps.make_optimizer(model)
        xb, yb = x_nchw[: req['batch']].contiguous(), y_train[: req['batch']].long()
        torch.manual_seed(123)
        step(model, opt, xb, yb, steps=1)
        training[key] = (model, opt, xb, yb)
      model, opt, xb, yb = training[key]
      loss, reply = timed(functools.partial(step, model, opt, xb, yb))
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
