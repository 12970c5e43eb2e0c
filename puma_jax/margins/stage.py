"""The margin stage: score every example of the training splits, shard by shard, resumably.

See the package docstring for devices, hosts, batches, overlap and resume.
"""

import collections
import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging

from puma_jax import margin_report, multihost, parallel
from puma_jax.datasets import input_pipeline, sidecar
from puma_jax.datasets.splits import Split
from puma_jax.margins import engine, store
from puma_jax.margins import settings as settings_mod
from puma_jax.margins.settings import (
  DTYPES,
  QUANTITIES,
  MarginSettings,
  default_tag,
  sidecar_settings,
  sidecar_tags,
)
from puma_jax.progress import Progress


@dataclasses.dataclass
class MarginResult:
  """What `compute_margins` returns (the same on every process, except `run`).

  Attributes:
    settings: the manifest settings of the margin tag (for `sidecar.load`).
    margins: per split key, f32[N] signed margins in global order.
    iterations: per split key, i32[N] the estimator's steps (DeepFool's iterations).
    converged: per split key, bool[N].
    summary: the summary (also written as JSON by process 0 when `summary_dir` is set).
    run: this process's work: shards computed and skipped, timings, compilations.
  """

  settings: dict[str, Any]
  margins: dict[str, np.ndarray]
  iterations: dict[str, np.ndarray]
  converged: dict[str, np.ndarray]
  summary: dict[str, Any]
  run: dict[str, Any]


def _score_shards(
  runner: engine.MarginEngine,
  work: list[tuple[str, Split, int]],
  *,
  tags: dict[str, str],
  root: Any,
  read_threads: int,
  prefetch_batches: int,
  progress: Progress,
  results: dict[tuple[str, int], dict[str, np.ndarray]],
) -> dict[str, Any]:
  """Scores the shards in `work`, writes their sidecars and adds their values to `results`.

  Returns:
    Counters: batches, files, shards, examples, not_converged.
  """
  counters = {'batches': 0, 'files': 0, 'shards': 0, 'examples': 0, 'not_converged': 0}
  buffers: dict[tuple[str, int], store.ShardBuffer] = {}
  pending: collections.deque = collections.deque()

  def finish(buf: store.ShardBuffer) -> None:
    values = {'margin': buf.margin, 'iterations': buf.iterations, 'converged': buf.converged}
    # The margin goes last: a shard counts as complete only when all three are there.
    for quantity in ('iterations', 'converged', 'margin'):
      sidecar.write_shard(
        buf.split, tags[quantity], buf.shard_id, values[quantity], root, dtype=DTYPES[quantity]
      )
      counters['files'] += 1
    counters['shards'] += 1
    results[(buf.key, buf.shard_id)] = values

  def collect() -> None:
    key, split, k, index, mask, out = pending.popleft()
    host = tuple(np.asarray(a) for a in out)
    buf = buffers.setdefault((key, k), store.ShardBuffer.create(key, split, k))
    n = buf.add(index, mask, host)
    counters['batches'] += 1
    counters['examples'] += n
    counters['not_converged'] += int(np.sum(~host[2][mask]))
    progress.update(n, extra=f'not converged: {counters["not_converged"]}')
    if buf.complete:
      finish(buffers.pop((key, k)))

  batches = input_pipeline.shards_batches(
    [(split, k) for _, split, k in work],
    batch_size=runner.batch_size,
    read_threads=read_threads,
    prefetch_batches=max(2, prefetch_batches),
  )
  for batch in batches:
    key, split, k = work[int(batch['part'])]
    out = runner.dispatch(batch['image'], batch['label'])
    pending.append((key, split, k, batch['index'], batch['mask'], out))
    if len(pending) > 1:  # batch t+1 is queued on the devices before t is pulled back
      collect()
  while pending:
    collect()
  if buffers:
    left = ', '.join(f'{key} shard {k}' for key, k in buffers)
    raise RuntimeError(f'incomplete shards after reading all batches: {left}')
  return counters


def compute_margins(
  model: nn.Module,
  variables: Any,
  splits: Mapping[str, Split] | Sequence[Split] | Split,
  *,
  settings: MarginSettings,
  batch_size: int,
  deepfool_batch_size: int = 0,
  mesh: jax.sharding.Mesh | None = None,
  tag: str | None = None,
  sidecar_root: str | os.PathLike | None = None,
  recompute: bool = False,
  summary_dir: str | os.PathLike | None = None,
  read_threads: int = 4,
  prefetch_batches: int = 4,
  progress_every_s: float = 30.0,
) -> MarginResult:
  """Computes (or resumes) the signed margin of every example of `splits`.

  The estimator is the one `settings` name (`DeepFoolSettings`, or
  `EstimatorSettings` for first_order and fab; `settings_from_config(c.margins)`).

  Every process calls it; see the module docstring for devices, hosts and resume.

  Args:
    model: Flax module; `model.apply(variables, x, train=False)` maps f32[B,H,W,C]
      images in [0, 1] to logits f32[B,K] with K the splits' number of classes.
    variables: its weights (replicated or host arrays).
    splits: the splits to score, e.g. `prepared.train_splits` ({'real': ...,
      'generated': ...}); a sequence is keyed by source name ('real', 'generated').
    settings: the estimator and its settings (`settings_from_config(config.margins)`).
    batch_size: examples per batch on this process (a multiple of its local devices).
    deepfool_batch_size: the estimator's `batch_size` per device: examples iterated at
      once (0: the device's whole share of the batch); under DeepFool finished examples
      free their slot for the next, so a batch does not wait for its slowest example.
      A speed setting: margins do not depend on it beyond float rounding, and it is not
      recorded in the manifest.
    mesh: a 1-D ('data',) mesh of this process's devices (default: all local devices).
    tag: sidecar tag of the margins (plus `<tag>_iterations`, `<tag>_converged`);
      None: the estimator's own (`default_tag`: 'margins' for DeepFool, 'margins_<name>').
    sidecar_root: write sidecars under this root instead of beside the shards.
    recompute: replace sidecars whose manifest disagrees instead of refusing them.
    summary_dir: if set, process 0 writes `summary.json` and `margins_by_source.png` there.
    read_threads: grain threads decoding records.
    prefetch_batches: batches read ahead.
    progress_every_s: seconds between progress lines on process 0.

  Returns:
    A `MarginResult` with the complete arrays of every split (after all processes finished).

  Raises:
    sidecar.SidecarError: sidecars made with another model, settings or dataset
      (without `recompute`), or sidecars that fail to load at the end.
    ValueError: a bad argument (batch size, mesh, model outputs), naming it.
  """
  named = store.named_splits(splits)
  mesh = engine.local_mesh(mesh)
  engine.check_batch_size(batch_size, parallel.num_devices(mesh))
  engine.check_deepfool_batch_size(deepfool_batch_size)
  engine.check_model(model, variables, named)
  start = time.perf_counter()
  tag = default_tag(settings.estimator) if tag is None else tag
  fingerprint = settings_mod.model_fingerprint(variables)
  tags = sidecar_tags(tag)
  expected = {
    q: sidecar_settings(model, settings, fingerprint=fingerprint, quantity=q) for q in QUANTITIES
  }
  for key, split in named.items():
    for q, t in tags.items():
      store.check_existing(split, t, expected[q], sidecar_root, recompute, key)
  store.write_manifests(named, tags, expected, sidecar_root, recompute)
  work, skipped, local = store.plan(named, tags, sidecar_root)
  total = sum(s.shard_lengths[k] for s in named.values() for k in store.owned(s))
  done_before = sum(named[key].shard_lengths[k] for key, ks in skipped.items() for k in ks)
  pi, pc = jax.process_index(), jax.process_count()
  logging.info(
    'margins (%s, %s): process %d/%d scores %d shards (%d skipped, already complete) on %d devices',
    settings.estimator,
    tag,
    pi,
    pc,
    len(work),
    sum(len(v) for v in skipped.values()),
    parallel.num_devices(mesh),
  )

  progress = Progress(
    f'margins ({tag}, process {pi})', total, initial=done_before, every_s=progress_every_s
  )
  counters = {'batches': 0, 'files': 0, 'shards': 0, 'examples': 0, 'not_converged': 0}
  compile_seconds, compilations = 0.0, 0
  compute_start = time.perf_counter()
  error = None
  try:
    if work:
      runner = engine.MarginEngine(
        model, variables, settings, mesh, batch_size, deepfool_batch_size
      )
      counters = _score_shards(
        runner,
        work,
        tags=tags,
        root=sidecar_root,
        read_threads=read_threads,
        prefetch_batches=prefetch_batches,
        progress=progress,
        results=local,
      )
      compile_seconds, compilations = runner.compile_seconds, runner.compilations
  except Exception as e:  # noqa: BLE001 (re-raised after telling the other processes)
    error = e
  compute_seconds = time.perf_counter() - compute_start
  progress.close(extra=f'not converged: {counters["not_converged"]}')
  multihost.all_ok(error is None, 'computing margins')
  if error is not None:
    raise error
  multihost.barrier('puma_jax.margins.done')

  arrays = store.assemble(named, tags, sidecar_root, local)
  run = {
    'process_index': pi,
    'process_count': pc,
    'devices': parallel.num_devices(mesh),
    'device_kind': mesh.devices.flat[0].device_kind,
    'batch_size': batch_size,
    'shards_computed': {key: [k for kk, _, k in work if kk == key] for key in named},
    'shards_skipped': skipped,
    'examples_computed': counters['examples'],
    'not_converged_computed': counters['not_converged'],
    'compilations': compilations,
    'compile_seconds': compile_seconds,
    'compute_seconds': compute_seconds,
    'examples_per_second': (
      counters['examples'] / max(compute_seconds - compile_seconds, 1e-9)
      if counters['examples']
      else None
    ),
    'total_seconds': time.perf_counter() - start,
  }
  summary = margin_report.summarize(
    arrays,
    {key: s.labels() for key, s in named.items()},
    {key: s.num_classes for key, s in named.items()},
    settings=expected['margin'],
  )
  summary['estimator'] = settings.estimator
  summary['tag'] = tag
  summary['splits'] = {key: f'{s.name}:{s.split}' for key, s in named.items()}
  summary['run'] = run  # this process's (the file is written by process 0)
  if summary_dir is not None and pi == 0:
    margin_report.write_report(
      summary,
      {k: a['margin'] for k, a in arrays.items()},
      summary_dir,
      norm=settings.norm,
      converged={k: a['converged'] for k, a in arrays.items()},
    )
  return MarginResult(
    settings=expected['margin'],
    margins={k: a['margin'] for k, a in arrays.items()},
    iterations={k: a['iterations'] for k, a in arrays.items()},
    converged={k: a['converged'] for k, a in arrays.items()},
    summary=summary,
    run=run,
  )


def load_margins(
  model: nn.Module,
  variables: Any,
  splits: Mapping[str, Split] | Sequence[Split] | Split,
  *,
  settings: MarginSettings,
  tag: str | None = None,
  sidecar_root: str | os.PathLike | None = None,
  fingerprint: str | None = None,
  quantity: str = 'margin',
) -> dict[str, np.ndarray]:
  """The stored margins of each split (f32[N], global order), checked against model and settings.

  `quantity` 'iterations' (i32[N]) or 'converged' (bool[N]) reads those sidecars instead.
  `tag` None reads the estimator's own tag (`default_tag(settings.estimator)`).

  Give the margin model's `variables`, or (variables=None) its `fingerprint`
  (`model_fingerprint`, e.g. as the margin stage recorded it), which saves
  restoring and hashing the weights.

  Raises:
    sidecar.SidecarError: missing, incomplete, damaged or differently computed margins.
  """
  expected = sidecar_settings(
    model, settings, variables=variables, fingerprint=fingerprint, quantity=quantity
  )
  tag = sidecar_tags(default_tag(settings.estimator) if tag is None else tag)[quantity]
  return {
    key: sidecar.load(split, tag, expected, sidecar_root)
    for key, split in store.named_splits(splits).items()
  }
