"""The margin stage: the signed DeepFool margin of every training example, at scale.

`compute_margins(model, variables, splits, settings=..., batch_size=...)` scores
every example of the given splits (real and generated training data) with
`attacks.deepfool` on the margin model and stores, beside each TFDS shard (or
under `sidecar_root`), three sidecars (`datasets.sidecar`, each with a sha256
checksum file), in shard order:

  <shard>.<tag>.npy              f32: the signed margin (negative: the model misclassifies it)
  <shard>.<tag>_iterations.npy   i32: DeepFool steps taken
  <shard>.<tag>_converged.npy    bool: whether the prediction flipped within max_iter

with one manifest per split and tag whose `settings` hold the DeepFool settings,
the margin model's fingerprint (`model_fingerprint`: sha256 over the variables'
names, dtypes, shapes and bytes) and a description of the module. The manifest
also records the shards and a fingerprint of the labels (the dataset).

How the work is organised:

- Devices: each batch is split over a 1-D ('data',) mesh of this process's
  local devices with `parallel.per_device` (`jax.shard_map`), and every device
  runs its own DeepFool `while_loop`, so a device stops when its own examples
  have converged. The function is compiled ahead of time once per batch shape
  (usually once for the whole run), not per shard.
- Hosts: under `jax.distributed`, shard k of a split belongs to process
  k mod P; each process writes only its own shards, then all processes meet at
  a barrier and load the complete arrays. Choose the number of shards as a
  multiple of the host count so that every host has equal work.
- Batches: the last batch of a shard is padded and masked, never dropped; every
  example gets exactly one margin (checked).
- Overlap: grain threads read and decode ahead (`shard_batches`), a reader
  thread moves on to the next shard while this one computes, and batch t+1 is
  dispatched to the devices before the results of batch t are pulled back.
- Resume: a shard whose three sidecars are complete under a matching manifest
  and pass their checksums is skipped (a damaged one is recomputed, with a
  warning); sidecars are written atomically (temp file + rename), the margin
  last, so a shard killed at any point is simply recomputed. This process's
  arrays stay in memory: only the shards of other processes are read back. Computation is
  deterministic, so a killed and resumed run ends with the same arrays as an
  uninterrupted one (same batch size and devices; other batch sizes or device
  counts change margins by float rounding, which can rarely change an example's
  DeepFool path).
- A manifest that disagrees (model, DeepFool settings, dataset) is refused,
  naming the difference, unless `recompute=True`, which replaces it and deletes
  the old sidecars. Batch size and device count are not settings.

`estimate_margin_cost` times a short probe on the current devices and projects
the wall time, device-hours and cost of N examples on D devices (the main
job's `--dry_run`).
"""

import collections
import dataclasses
import functools
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from puma_jax import artifacts, margin_report, parallel
from puma_jax.attacks.deepfool import NORMS, deepfool
from puma_jax.datasets import input_pipeline, sidecar
from puma_jax.datasets.splits import SOURCE_IDS, Split
from puma_jax.progress import Progress, format_seconds

# The quantities stored per example, the suffix of their sidecar tag, and their dtype.
QUANTITIES = {'margin': '', 'iterations': '_iterations', 'converged': '_converged'}
DTYPES = {'margin': np.float32, 'iterations': np.int32, 'converged': np.bool_}
_SOURCE_NAMES = {v: k for k, v in SOURCE_IDS.items()}


@dataclasses.dataclass(frozen=True)
class DeepFoolSettings:
  """How margins are measured (recorded in every manifest).

  Attributes:
    norm: 'linf' or 'l2' (the threat model's norm, so margins are in eps units).
    num_candidates: classes considered per DeepFool step, the label included;
      bounds the per-step cost for 21k-class models.
    overshoot: the iterate is x + (1 + overshoot) * (sum of steps).
    max_iter: DeepFool steps per example at most.
    clip: (lo, hi) box every iterate is clipped to (images: (0, 1)), or None.
  """

  norm: str = 'linf'
  num_candidates: int = 10
  overshoot: float = 0.02
  max_iter: int = 50
  clip: tuple[float, float] | None = (0.0, 1.0)

  def __post_init__(self):
    if self.norm not in NORMS:
      raise ValueError(f'margins.norm={self.norm!r}: use one of {NORMS}')
    if int(self.num_candidates) != self.num_candidates or self.num_candidates < 2:
      raise ValueError(
        f'margins.num_candidates={self.num_candidates}: need an integer >= 2 '
        '(the label and at least one other class)'
      )
    if int(self.max_iter) != self.max_iter or self.max_iter < 1:
      raise ValueError(f'margins.max_iter={self.max_iter}: need an integer >= 1')
    if not (math.isfinite(self.overshoot) and self.overshoot >= 0):
      raise ValueError(f'margins.overshoot={self.overshoot}: need a finite number >= 0')
    if self.clip is not None:
      lo, hi = self.clip
      object.__setattr__(self, 'clip', (float(lo), float(hi)))
      if not lo < hi:
        raise ValueError(f'margins clip bounds {self.clip}: need lo < hi')

  def as_dict(self) -> dict[str, Any]:
    """JSON-able settings, as recorded in the manifests."""
    return {
      'norm': self.norm,
      'num_candidates': int(self.num_candidates),
      'overshoot': float(self.overshoot),
      'max_iter': int(self.max_iter),
      'clip': None if self.clip is None else list(self.clip),
    }


def settings_from_config(margins_config: Any) -> DeepFoolSettings:
  """`DeepFoolSettings` from `config.margins` (`clip=True` clips to the image box [0, 1])."""
  return DeepFoolSettings(
    norm=margins_config.norm,
    num_candidates=margins_config.num_candidates,
    overshoot=margins_config.overshoot,
    max_iter=margins_config.max_iter,
    clip=(0.0, 1.0) if margins_config.get('clip', True) else None,
  )


def model_fingerprint(variables: Any) -> str:
  """'sha256:<hex>' over the variables' key paths, dtypes, shapes and bytes.

  `artifacts.tree_fingerprint`: stable across processes, devices and runs.
  Arrays sharded across processes must be fully replicated (as margin-model
  weights are) so that every process can read them.
  """
  return artifacts.tree_fingerprint(variables)


def describe_module(model: nn.Module) -> dict[str, Any]:
  """The module's class and its simple fields (numbers, strings, dtypes), for the manifest.

  Fields such as the normalisation statistics or the activation change margins
  without changing the weights, so they are recorded too. Values that have no
  stable text form are recorded by type name only.
  """
  fields = {}
  for f in dataclasses.fields(model):
    if f.name in ('parent', 'name'):
      continue
    fields[f.name] = _describe_value(getattr(model, f.name))
  return {'class': type(model).__name__, 'fields': fields}


def _describe_value(v: Any) -> Any:
  if v is None or isinstance(v, bool | int | float | str):
    return v
  if isinstance(v, list | tuple):
    return [_describe_value(x) for x in v]
  if isinstance(v, np.ndarray | jax.Array) and v.size <= 64:
    return np.asarray(v).tolist()
  try:
    return np.dtype(v).name
  except (TypeError, ValueError):
    pass
  if callable(v) and hasattr(v, '__name__'):
    return f'{getattr(v, "__module__", "")}.{v.__qualname__}'
  return f'<{type(v).__name__}>'


def sidecar_tags(tag: str = 'margins') -> dict[str, str]:
  """{'margin': tag, 'iterations': tag + '_iterations', 'converged': tag + '_converged'}."""
  return {q: tag + suffix for q, suffix in QUANTITIES.items()}


def sidecar_settings(
  model: nn.Module,
  settings: DeepFoolSettings,
  *,
  variables: Any = None,
  fingerprint: str | None = None,
  quantity: str = 'margin',
) -> dict[str, Any]:
  """The manifest settings of a quantity ('margin', 'iterations', 'converged').

  Pass these as `expected_settings` to `datasets.sidecar.load` to read margins
  that must come from this model and these settings. Give `variables` or their
  precomputed `fingerprint`.
  """
  if quantity not in QUANTITIES:
    raise ValueError(f'unknown quantity {quantity!r}; known: {sorted(QUANTITIES)}')
  if fingerprint is None:
    if variables is None:
      raise ValueError('sidecar_settings: give variables or fingerprint')
    fingerprint = model_fingerprint(variables)
  return {
    'quantity': quantity,
    'deepfool': settings.as_dict(),
    'model_fingerprint': fingerprint,
    'model': describe_module(model),
  }


@dataclasses.dataclass
class MarginResult:
  """What `compute_margins` returns (the same on every process, except `run`).

  Attributes:
    settings: the manifest settings of the margin tag (for `sidecar.load`).
    margins: per split key, f32[N] signed margins in global order.
    iterations: per split key, i32[N] DeepFool steps.
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


def _named_splits(splits: Mapping[str, Split] | Sequence[Split] | Split) -> dict[str, Split]:
  if isinstance(splits, Split):
    splits = [splits]
  if isinstance(splits, Mapping):
    named = dict(splits)
  else:
    splits = list(splits)
    sources = [s.source_id for s in splits]
    named = {}
    for s in splits:
      unique = sources.count(s.source_id) == 1 and s.source_id in _SOURCE_NAMES
      named[_SOURCE_NAMES[s.source_id] if unique else f'{s.name}:{s.split}'] = s
  if not named:
    raise ValueError('compute_margins: no splits given')
  seen = {}
  for key, s in named.items():
    if not isinstance(s, Split):
      raise TypeError(f'splits[{key!r}] is a {type(s).__name__}, not a datasets.Split')
    ident = (os.fspath(s.dataset_dir), s.split)
    if ident in seen:
      raise ValueError(f'splits {seen[ident]!r} and {key!r} are the same split {s!r}')
    seen[ident] = key
  return named


def _local_mesh(mesh: jax.sharding.Mesh | None) -> jax.sharding.Mesh:
  if mesh is None:
    return parallel.make_mesh(jax.local_devices())
  if mesh.axis_names != (parallel.DATA_AXIS,):
    raise ValueError(f'the margin mesh must be 1-D over {parallel.DATA_AXIS!r}, got {mesh}')
  pi = jax.process_index()
  remote = [d for d in mesh.devices.flat if d.process_index != pi]
  if remote:
    raise ValueError(
      f'the margin mesh holds devices of other processes ({remote[:2]}...): every process '
      'scores its own shards, so give a mesh of jax.local_devices() (or mesh=None)'
    )
  return mesh


def _check_batch_size(batch_size: int, num_devices: int) -> None:
  if int(batch_size) != batch_size or batch_size < 1 or batch_size % num_devices:
    raise ValueError(
      f'margins.batch_size={batch_size}: need a positive multiple of the {num_devices} local '
      f'devices (e.g. {num_devices * max(1, int(batch_size) // num_devices)})'
    )


def _check_deepfool_batch_size(deepfool_batch_size: int) -> int:
  if int(deepfool_batch_size) != deepfool_batch_size or deepfool_batch_size < 0:
    raise ValueError(
      f'margins.deepfool_batch_size={deepfool_batch_size}: need an integer >= 0 (the '
      'examples DeepFool iterates at once per device; 0 runs the whole per-device batch)'
    )
  return int(deepfool_batch_size)


def _check_model(model: nn.Module, variables: Any, splits: Mapping[str, Split]) -> None:
  for key, s in splits.items():
    x = jax.ShapeDtypeStruct((1, *s.image_shape), jnp.float32)
    try:
      out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    except Exception as e:  # noqa: BLE001 (Flax raises many types for wrong shapes)
      raise ValueError(
        f'the margin model cannot take the images of {key} split {s!r} '
        f'(shape {s.image_shape}): {type(e).__name__}: {e}'
      ) from e
    if out.shape != (1, s.num_classes):
      raise ValueError(
        f'the margin model returns logits of shape {out.shape[1:]} but {key} split {s!r} has '
        f'{s.num_classes} classes; use a margin model with {s.num_classes} outputs'
      )


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _all_ok(ok: bool, what: str) -> None:
  """Raises on every process if `ok` is False on any process (no process waits forever)."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils

  flags = np.asarray(multihost_utils.process_allgather(np.asarray([ok], np.int32))).reshape(-1)
  failed = [i for i, f in enumerate(flags) if not f]
  if failed:
    raise RuntimeError(f'{what} failed on process(es) {failed}; see their logs')


def _check_existing(
  split: Split, tag: str, expected: dict[str, Any], root: Any, recompute: bool, key: str
) -> None:
  """Refuses sidecars made differently (every process runs this, so all fail alike)."""
  path = sidecar.manifest_path(split, tag, root)
  hint = (
    'To replace them, rerun with recompute=True (main job: --config.margins.recompute=True); '
    'to keep them, choose another tag or data.sidecar_dir.'
  )
  if path.exists():
    try:
      sidecar.check_manifest(sidecar.read_manifest(split, tag, root), split, expected, path=path)
    except sidecar.SidecarError as e:
      if not recompute:
        raise sidecar.SidecarError(f'{key} margins: {e}\n{hint}') from e
  elif not recompute:
    stale = [
      k for k in range(split.num_shards) if sidecar.sidecar_path(split, tag, k, root).exists()
    ]
    if stale:
      raise sidecar.SidecarError(
        f'{sidecar.sidecar_path(split, tag, stale[0], root)}: {len(stale)} {tag!r} sidecars of '
        f'{split!r} exist without a manifest, so what they hold is unknown. {hint}'
      )


class _Prefetch:
  """Iterates `make_items()` in a background thread, at most `depth` items ahead.

  Exceptions in the thread are re-raised in the consumer; `close` stops the thread.
  """

  _END = object()

  def __init__(self, make_items: Callable[[], Iterator[Any]], depth: int):
    self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._work, args=(make_items,), daemon=True)
    self._thread.start()

  def _put(self, item: Any) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _work(self, make_items: Callable[[], Iterator[Any]]) -> None:
    try:
      for item in make_items():
        if not self._put(item):
          return
      self._put(self._END)
    except BaseException as e:  # noqa: BLE001 (re-raised in the consumer)
      self._put(_Failure(e))

  def __iter__(self) -> Iterator[Any]:
    while True:
      item = self._queue.get()
      if item is self._END:
        return
      if isinstance(item, _Failure):
        raise item.error
      yield item

  def close(self) -> None:
    self._stop.set()
    self._thread.join(timeout=30)


@dataclasses.dataclass
class _Failure:
  error: BaseException


@dataclasses.dataclass
class _ShardBuffer:
  """One shard's results as they arrive, batch by batch."""

  key: str
  split: Split
  shard_id: int
  margin: np.ndarray
  iterations: np.ndarray
  converged: np.ndarray
  seen: np.ndarray

  @classmethod
  def create(cls, key: str, split: Split, shard_id: int) -> '_ShardBuffer':
    n = split.shard_lengths[shard_id]
    return cls(
      key,
      split,
      shard_id,
      np.zeros(n, np.float32),
      np.zeros(n, np.int32),
      np.zeros(n, bool),
      np.zeros(n, bool),
    )

  def add(self, index: np.ndarray, mask: np.ndarray, out: tuple[np.ndarray, ...]) -> int:
    rows = index[mask].astype(np.int64) - self.split.shard_offsets[self.shard_id]
    if len(rows) and (rows.min() < 0 or rows.max() >= len(self.seen) or self.seen[rows].any()):
      raise RuntimeError(
        f'{self.key} shard {self.shard_id}: a batch holds examples outside the shard or twice'
      )
    margin, iterations, converged = out
    self.seen[rows] = True
    self.margin[rows] = margin[mask]
    self.iterations[rows] = iterations[mask]
    self.converged[rows] = converged[mask]
    return len(rows)

  @property
  def complete(self) -> bool:
    return bool(self.seen.all())


def _margin_program(
  model: nn.Module,
  settings: DeepFoolSettings,
  mesh: jax.sharding.Mesh,
  deepfool_batch_size: int = 0,
):
  """jit(shard_map(DeepFool)): (x f32[B,...], y i32[B], variables) -> (margin, iterations, converged).

  `deepfool_batch_size` > 0 runs each device's examples through that many DeepFool
  slots (`attacks.deepfool`'s `batch_size`): a finished example frees its slot for the
  next, so the loop does not wait for the batch's slowest example.
  """

  def per_device(x, y, variables):
    per = x.shape[0]
    res = deepfool(
      lambda v: model.apply(variables, v, train=False),
      x,
      y,
      norm=settings.norm,
      num_candidates=settings.num_candidates,
      overshoot=settings.overshoot,
      max_iter=settings.max_iter,
      clip=settings.clip,
      batch_size=min(deepfool_batch_size, per) if deepfool_batch_size else None,
    )
    return res.margin, res.iterations, res.converged

  return jax.jit(parallel.per_device(per_device, mesh, num_batched_args=2))


@functools.lru_cache(maxsize=16)
def _compile(
  model: nn.Module,
  settings: DeepFoolSettings,
  mesh: jax.sharding.Mesh,
  batch_size: int,
  image_shape: tuple[int, ...],
  variables_struct: tuple[Any, tuple[tuple[tuple[int, ...], str], ...]],
  deepfool_batch_size: int = 0,
) -> tuple[Any, float]:
  """The compiled margin program for one batch shape (cached across calls), and its compile time."""
  start = time.perf_counter()
  treedef, leaves = variables_struct
  sharding = parallel.data_sharding(mesh)
  rep = parallel.replicated(mesh)
  variables = jax.tree.unflatten(
    treedef, [jax.ShapeDtypeStruct(shape, dtype, sharding=rep) for shape, dtype in leaves]
  )
  x = jax.ShapeDtypeStruct((batch_size, *image_shape), jnp.float32, sharding=sharding)
  y = jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sharding)
  compiled = (
    _margin_program(model, settings, mesh, deepfool_batch_size).lower(x, y, variables).compile()
  )
  return compiled, time.perf_counter() - start


class MarginEngine:
  """DeepFool margins of batches on a mesh of local devices: what the stage runs per batch.

  `dispatch(image, label)` places a batch (f32[B,H,W,C], i32[B]) on the mesh and
  starts the per-device DeepFool program, returning its device outputs
  (margin f32[B], iterations i32[B], converged bool[B]) without waiting for them.
  Programs are compiled ahead of time once per image shape and cached across
  engines with the same model, settings, mesh, batch size and variable shapes
  (`compile_seconds` and `compilations` count only this engine's cache misses).
  """

  def __init__(
    self,
    model: nn.Module,
    variables: Any,
    settings: DeepFoolSettings,
    mesh: jax.sharding.Mesh,
    batch_size: int,
    deepfool_batch_size: int = 0,
  ):
    self.model, self.settings = model, settings
    self.mesh, self.batch_size, self.deepfool_batch_size = (
      mesh,
      batch_size,
      _check_deepfool_batch_size(deepfool_batch_size),
    )
    self.sharding = parallel.data_sharding(mesh)
    host = jax.tree.map(artifacts.to_host, variables)
    self.variables = parallel.replicate(host, mesh)
    leaves, treedef = jax.tree.flatten(host)
    self._struct = (treedef, tuple((tuple(a.shape), a.dtype.name) for a in leaves))
    self._compiled: dict[tuple[int, ...], Any] = {}
    self.compile_seconds = 0.0
    self.compilations = 0

  def compiled(self, image_shape: tuple[int, ...]):
    if image_shape not in self._compiled:
      misses = _compile.cache_info().misses
      fn, seconds = _compile(
        self.model,
        self.settings,
        self.mesh,
        self.batch_size,
        image_shape,
        self._struct,
        self.deepfool_batch_size,
      )
      if _compile.cache_info().misses > misses:
        self.compilations += 1
        self.compile_seconds += seconds
      self._compiled[image_shape] = fn
    return self._compiled[image_shape]

  def dispatch(self, image: np.ndarray, label: np.ndarray) -> tuple[jax.Array, ...]:
    """Starts DeepFool on a batch; returns the (not yet computed) device outputs."""
    fn = self.compiled(tuple(image.shape[1:]))
    x = jax.device_put(np.asarray(image, np.float32), self.sharding)
    y = jax.device_put(np.asarray(label, np.int32), self.sharding)
    out = fn(x, y, self.variables)
    for a in out:
      a.copy_to_host_async()
    return out


def _clean_temporaries(split: Split, shard_id: int, tags: Sequence[str], root: Any) -> None:
  """Removes temp files a killed writer of this shard left (only this process writes it)."""
  for tag in tags:
    path = sidecar.sidecar_path(split, tag, shard_id, root)
    for tmp in path.parent.glob(f'.{path.stem}{artifacts.TMP_MARKER}*{path.suffix}'):
      tmp.unlink(missing_ok=True)


def _score_shards(
  engine: MarginEngine,
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

  def items() -> Iterator[tuple[str, Split, int, dict[str, np.ndarray]]]:
    for key, split, k in work:
      for batch in input_pipeline.shard_batches(
        split,
        k,
        batch_size=engine.batch_size,
        read_threads=read_threads,
        prefetch_batches=prefetch_batches,
      ):
        yield key, split, k, batch

  buffers: dict[tuple[str, int], _ShardBuffer] = {}
  pending: collections.deque = collections.deque()

  def finish(buf: _ShardBuffer) -> None:
    values = {'margin': buf.margin, 'iterations': buf.iterations, 'converged': buf.converged}
    # The margin goes last: a shard counts as complete only when all three are there.
    for quantity in ('iterations', 'converged', 'margin'):
      sidecar.write_shard(buf.split, tags[quantity], buf.shard_id, values[quantity], root)
      counters['files'] += 1
    counters['shards'] += 1
    results[(buf.key, buf.shard_id)] = values

  def collect() -> None:
    key, split, k, index, mask, out = pending.popleft()
    host = tuple(np.asarray(a) for a in out)
    buf = buffers.setdefault((key, k), _ShardBuffer.create(key, split, k))
    n = buf.add(index, mask, host)
    counters['batches'] += 1
    counters['examples'] += n
    counters['not_converged'] += int(np.sum(~host[2][mask]))
    progress.update(n, extra=f'not converged: {counters["not_converged"]}')
    if buf.complete:
      finish(buffers.pop((key, k)))

  for _, split, _ in work:
    _ = split.data_source  # Open the readers here, not in the reader or grain threads.
  reader = _Prefetch(items, depth=max(2, prefetch_batches))
  try:
    for key, split, k, batch in reader:
      out = engine.dispatch(batch['image'], batch['label'])
      pending.append((key, split, k, batch['index'], batch['mask'], out))
      if len(pending) > 1:  # batch t+1 is queued on the devices before t is pulled back
        collect()
    while pending:
      collect()
  finally:
    reader.close()
  if buffers:
    left = ', '.join(f'{key} shard {k}' for key, k in buffers)
    raise RuntimeError(f'incomplete shards after reading all batches: {left}')
  return counters


def _owned(split: Split) -> list[int]:
  """The shards of `split` this process scores: k with k mod P = p."""
  pi, pc = jax.process_index(), jax.process_count()
  return [k for k in range(split.num_shards) if k % pc == pi]


def _write_manifests(
  named: Mapping[str, Split],
  tags: Mapping[str, str],
  expected: Mapping[str, dict[str, Any]],
  root: Any,
  recompute: bool,
) -> None:
  """Process 0 writes the manifests; every process learns whether that worked, then syncs."""
  error = None
  if jax.process_index() == 0:
    try:
      for split in named.values():
        for q, t in tags.items():
          sidecar.write_manifest(
            split, t, expected[q], dtype=DTYPES[q], root=root, overwrite=recompute
          )
    except Exception as e:  # noqa: BLE001 (re-raised after telling the other processes)
      error = e
  _all_ok(error is None, 'writing the margin manifests')
  if error is not None:
    raise error
  _barrier('puma_jax.margins.manifests')


def _plan(
  named: Mapping[str, Split], tags: Mapping[str, str], root: Any
) -> tuple[list[tuple[str, Split, int]], dict[str, list[int]], dict[tuple[str, int], Any]]:
  """This process's shards still to score, and the complete ones (skipped) with their values.

  A complete shard is read and checked against its checksums here, once; a
  damaged one is scored again. Temporaries of killed writers are removed.

  Returns:
    (work, skipped, values): work as (key, split, shard id); skipped per key;
    values[(key, shard id)] = {quantity: array} of the skipped shards.
  """
  work, skipped, values = [], {}, {}
  for key, split in named.items():
    missing = set()
    for t in tags.values():
      missing.update(sidecar.missing_shards(split, t, root))
    skipped[key] = []
    for k in _owned(split):
      if k not in missing:
        try:
          values[(key, k)] = {q: sidecar.load_shard(split, t, k, root) for q, t in tags.items()}
          skipped[key].append(k)
          continue
        except sidecar.SidecarDamagedError as e:
          logging.warning('%s shard %d: %s Recomputing it.', key, k, e)
      elif sidecar.sidecar_path(split, tags['margin'], k, root).exists():
        logging.warning('%s shard %d: sidecars incomplete or corrupt; recomputing', key, k)
      _clean_temporaries(split, k, list(tags.values()), root)
      work.append((key, split, k))
  return work, skipped, values


def _assemble(
  named: Mapping[str, Split],
  tags: Mapping[str, str],
  root: Any,
  local: Mapping[tuple[str, int], Mapping[str, np.ndarray]],
) -> dict[str, dict[str, np.ndarray]]:
  """Per split key, {quantity: [N] in global order}: this process's values, others' read back."""
  arrays = {}
  for key, split in named.items():
    out = {q: np.empty(split.num_examples, DTYPES[q]) for q in tags}
    for k, offset in enumerate(split.shard_offsets):
      values = local.get((key, k))
      if values is None:  # another process's shard
        values = {q: sidecar.load_shard(split, t, k, root) for q, t in tags.items()}
      for q in tags:
        out[q][offset : offset + split.shard_lengths[k]] = values[q]
    arrays[key] = out
  return arrays


def compute_margins(
  model: nn.Module,
  variables: Any,
  splits: Mapping[str, Split] | Sequence[Split] | Split,
  *,
  settings: DeepFoolSettings,
  batch_size: int,
  deepfool_batch_size: int = 0,
  mesh: jax.sharding.Mesh | None = None,
  tag: str = 'margins',
  sidecar_root: str | os.PathLike | None = None,
  recompute: bool = False,
  summary_dir: str | os.PathLike | None = None,
  read_threads: int = 4,
  prefetch_batches: int = 4,
  progress_every_s: float = 30.0,
) -> MarginResult:
  """Computes (or resumes) the signed DeepFool margin of every example of `splits`.

  Every process calls it; see the module docstring for devices, hosts and resume.

  Args:
    model: Flax module; `model.apply(variables, x, train=False)` maps f32[B,H,W,C]
      images in [0, 1] to logits f32[B,K] with K the splits' number of classes.
    variables: its weights (replicated or host arrays).
    splits: the splits to score, e.g. `prepared.train_splits` ({'real': ...,
      'generated': ...}); a sequence is keyed by source name ('real', 'generated').
    settings: DeepFool settings (`settings_from_config(config.margins)`).
    batch_size: examples per batch on this process (a multiple of its local devices).
    deepfool_batch_size: DeepFool's `batch_size` per device: examples iterated at once
      (0: the device's whole share of the batch); finished examples free their slot for the next, so a batch does not
      wait for its slowest example. A speed setting: margins do not depend on it
      beyond float rounding, and it is not recorded in the manifest.
    mesh: a 1-D ('data',) mesh of this process's devices (default: all local devices).
    tag: sidecar tag of the margins (plus `<tag>_iterations`, `<tag>_converged`).
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
  named = _named_splits(splits)
  mesh = _local_mesh(mesh)
  _check_batch_size(batch_size, parallel.num_shards(mesh))
  _check_deepfool_batch_size(deepfool_batch_size)
  _check_model(model, variables, named)
  start = time.perf_counter()
  fingerprint = model_fingerprint(variables)
  tags = sidecar_tags(tag)
  expected = {
    q: sidecar_settings(model, settings, fingerprint=fingerprint, quantity=q) for q in QUANTITIES
  }
  for key, split in named.items():
    for q, t in tags.items():
      _check_existing(split, t, expected[q], sidecar_root, recompute, key)
  _write_manifests(named, tags, expected, sidecar_root, recompute)
  work, skipped, local = _plan(named, tags, sidecar_root)
  total = sum(s.shard_lengths[k] for s in named.values() for k in _owned(s))
  done_before = sum(named[key].shard_lengths[k] for key, ks in skipped.items() for k in ks)
  pi, pc = jax.process_index(), jax.process_count()
  logging.info(
    'margins (%s): process %d/%d scores %d shards (%d skipped, already complete) on %d devices',
    tag,
    pi,
    pc,
    len(work),
    sum(len(v) for v in skipped.values()),
    parallel.num_shards(mesh),
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
      engine = MarginEngine(model, variables, settings, mesh, batch_size, deepfool_batch_size)
      counters = _score_shards(
        engine,
        work,
        tags=tags,
        root=sidecar_root,
        read_threads=read_threads,
        prefetch_batches=prefetch_batches,
        progress=progress,
        results=local,
      )
      compile_seconds, compilations = engine.compile_seconds, engine.compilations
  except Exception as e:  # noqa: BLE001 (re-raised after telling the other processes)
    error = e
  compute_seconds = time.perf_counter() - compute_start
  progress.close(extra=f'not converged: {counters["not_converged"]}')
  _all_ok(error is None, 'computing margins')
  if error is not None:
    raise error
  _barrier('puma_jax.margins.done')

  arrays = _assemble(named, tags, sidecar_root, local)
  run = {
    'process_index': pi,
    'process_count': pc,
    'devices': parallel.num_shards(mesh),
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
  settings: DeepFoolSettings,
  tag: str = 'margins',
  sidecar_root: str | os.PathLike | None = None,
  fingerprint: str | None = None,
) -> dict[str, np.ndarray]:
  """The stored margins of each split (f32[N], global order), checked against model and settings.

  Give the margin model's `variables`, or (variables=None) its `fingerprint`
  (`model_fingerprint`, e.g. as the margin stage recorded it), which saves
  restoring and hashing the weights.

  Raises:
    sidecar.SidecarError: missing, incomplete, damaged or differently computed margins.
  """
  expected = sidecar_settings(model, settings, variables=variables, fingerprint=fingerprint)
  return {
    key: sidecar.load(split, tag, expected, sidecar_root)
    for key, split in _named_splits(splits).items()
  }


# --------------------------------------------------------------------------- cost estimate


@dataclasses.dataclass(frozen=True)
class CostEstimate:
  """A projection of the margin stage's cost from a timed probe.

  Attributes:
    settings: the DeepFool settings probed.
    batch_size: examples per probe batch.
    probe_batches: batches timed (after one warm-up batch).
    probe_devices: devices the probe ran on; device_kind: their kind.
    probe_seconds: time of the timed batches.
    compile_seconds: one-off compilation time (not in the projection).
    mean_iterations: mean DeepFool steps per probed example (cost grows with it).
    probe_data: 'dataset' (first batches of the first split) or 'random'.
    num_examples: N to project for; num_devices: D to project for.
    price_per_device_hour: price of one device for one hour (0: no price given).
  """

  settings: DeepFoolSettings
  batch_size: int
  probe_batches: int
  probe_devices: int
  device_kind: str
  probe_seconds: float
  compile_seconds: float
  mean_iterations: float
  probe_data: str
  num_examples: int
  num_devices: int
  price_per_device_hour: float = 0.0

  @property
  def examples_per_second_per_device(self) -> float:
    return self.batch_size * self.probe_batches / self.probe_seconds / self.probe_devices

  def device_hours(self, num_examples: int | None = None) -> float:
    n = self.num_examples if num_examples is None else num_examples
    return n / self.examples_per_second_per_device / 3600.0

  def hours(self, num_examples: int | None = None, num_devices: int | None = None) -> float:
    d = self.num_devices if num_devices is None else num_devices
    return self.device_hours(num_examples) / d

  def cost(self, num_examples: int | None = None) -> float:
    return self.device_hours(num_examples) * self.price_per_device_hour

  def table(self) -> str:
    """A plain-text report: the probe, then a table of projected time and cost."""
    s = self.settings
    lines = [
      f'Margin stage estimate: DeepFool {s.norm}, {s.num_candidates} candidates, '
      f'max_iter {s.max_iter}, overshoot {s.overshoot}, clip {s.clip}',
      f'probe: {self.probe_batches} batches of {self.batch_size} ({self.probe_data} inputs) on '
      f'{self.probe_devices} x {self.device_kind}: '
      f'{self.examples_per_second_per_device:,.1f} examples/s per device, '
      f'{self.mean_iterations:.2f} DeepFool steps per example; '
      f'compile {self.compile_seconds:.1f} s once per batch shape (not included)',
      '',
    ]
    header = ['examples', 'devices', 'wall time', 'device-hours']
    if self.price_per_device_hour:
      header.append(f'cost at {self.price_per_device_hour:g}/device-hour')
    rows = []
    devices = sorted({self.probe_devices, self.num_devices})
    for d in devices:
      row = [
        f'{self.num_examples:,}',
        str(d),
        format_seconds(self.hours(num_devices=d) * 3600.0),
        f'{self.device_hours():,.2f}',
      ]
      if self.price_per_device_hour:
        row.append(f'{self.cost():,.2f}')
      rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = lambda cells: (
      '| ' + ' | '.join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + ' |'
    )
    lines += [fmt(header), '|' + '|'.join('-' * (w + 2) for w in widths) + '|']
    lines += [fmt(r) for r in rows]
    lines += [
      '',
      'Assumes devices of the probed kind, linear scaling over devices and hosts (each host '
      'scores its own shards), input reading hidden behind compute, and the probed number of '
      'DeepFool steps per example (a more robust margin model takes more steps).',
    ]
    return '\n'.join(lines)


def _probe_batches(
  splits: Mapping[str, Split] | None,
  image_shape: tuple[int, ...] | None,
  batch_size: int,
  count: int,
  model: nn.Module,
  variables: Any,
  seed: int,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
  if splits:
    split = next(iter(splits.values()))
    out = []
    for k in range(split.num_shards):
      for batch in input_pipeline.shard_batches(split, k, batch_size=batch_size):
        out.append((batch['image'], batch['label']))
        if len(out) == count:
          return out, 'dataset'
    base = list(out)
    while len(out) < count:  # a split smaller than the probe: reuse its batches
      out.append(base[len(out) % len(base)])
    return out, 'dataset'
  if image_shape is None:
    raise ValueError('estimate_margin_cost: give splits or image_shape')
  rng = np.random.default_rng(seed)
  apply = jax.jit(lambda v, x: jnp.argmax(model.apply(v, x, train=False), axis=1))
  out = []
  for _ in range(count):
    x = rng.random((batch_size, *image_shape), np.float32)
    out.append((x, np.asarray(apply(variables, x), np.int32)))
  return out, 'random'


def estimate_margin_cost(
  model: nn.Module,
  variables: Any,
  *,
  settings: DeepFoolSettings,
  batch_size: int,
  deepfool_batch_size: int = 0,
  splits: Mapping[str, Split] | Sequence[Split] | Split | None = None,
  image_shape: tuple[int, int, int] | None = None,
  num_examples: int | None = None,
  num_devices: int | None = None,
  price_per_device_hour: float = 0.0,
  probe_batches: int = 3,
  mesh: jax.sharding.Mesh | None = None,
  seed: int = 0,
) -> CostEstimate:
  """Times DeepFool on a few batches here and projects the cost of N examples on D devices.

  The probe runs the same compiled program as `compute_margins` (per-device
  DeepFool on this process's devices) on the first batches of the first split
  (or, without splits, on uniform random images of `image_shape` labelled with
  the model's own predictions, which usually converge faster than real data).
  One warm-up batch is run first; compilation is timed separately.

  Args:
    model, variables, settings, batch_size, deepfool_batch_size, mesh: as for `compute_margins`.
    splits: probe data; also the default N (their total number of examples).
    image_shape: (H, W, C) for random probe images when no splits are given.
    num_examples: N (default: the splits' total).
    num_devices: D (default: all devices of the job, `jax.device_count()`).
    price_per_device_hour: price of one device-hour (0: no cost column).
    probe_batches: batches timed.
    seed: seed of the random probe images.

  Returns:
    A `CostEstimate`; print `estimate.table()`.
  """
  named = _named_splits(splits) if splits is not None else None
  if num_examples is None:
    if named is None:
      raise ValueError('estimate_margin_cost: give num_examples (or splits to count)')
    num_examples = sum(s.num_examples for s in named.values())
  num_devices = jax.device_count() if num_devices is None else num_devices
  if int(num_examples) != num_examples or num_examples < 1:
    raise ValueError(f'estimate: number of examples {num_examples} must be a positive integer')
  if int(num_devices) != num_devices or num_devices < 1:
    raise ValueError(f'estimate: number of devices {num_devices} must be a positive integer')
  if not (math.isfinite(price_per_device_hour) and price_per_device_hour >= 0):
    raise ValueError(f'estimate: price per device-hour {price_per_device_hour} must be >= 0')
  if probe_batches < 1:
    raise ValueError(f'estimate: probe_batches={probe_batches} must be >= 1')
  mesh = _local_mesh(mesh)
  _check_batch_size(batch_size, parallel.num_shards(mesh))
  _check_deepfool_batch_size(deepfool_batch_size)
  if named is not None:
    _check_model(model, variables, named)
  batches, kind = _probe_batches(
    named, image_shape, batch_size, probe_batches + 1, model, variables, seed
  )
  engine = MarginEngine(model, variables, settings, mesh, batch_size, deepfool_batch_size)
  jax.block_until_ready(engine.dispatch(*batches[0]))  # compile (if not cached) and warm up
  device_batches = [
    (jax.device_put(x, engine.sharding), jax.device_put(y, engine.sharding)) for x, y in batches[1:]
  ]
  fn = engine.compiled(tuple(batches[0][0].shape[1:]))
  start = time.perf_counter()
  outs = [fn(x, y, engine.variables) for x, y in device_batches]
  jax.block_until_ready(outs)
  seconds = time.perf_counter() - start
  iterations = np.concatenate([np.asarray(o[1]) for o in outs])
  return CostEstimate(
    settings=settings,
    batch_size=batch_size,
    probe_batches=probe_batches,
    probe_devices=parallel.num_shards(mesh),
    device_kind=mesh.devices.flat[0].device_kind,
    probe_seconds=seconds,
    compile_seconds=engine.compile_seconds,
    mean_iterations=float(iterations.mean()),
    probe_data=kind,
    num_examples=int(num_examples),
    num_devices=int(num_devices),
    price_per_device_hour=float(price_per_device_hour),
  )


def estimate_from_config(
  margins_config: Any,
  model: nn.Module,
  variables: Any,
  splits: Mapping[str, Split] | Sequence[Split] | Split | None = None,
  *,
  image_shape: tuple[int, int, int] | None = None,
) -> CostEstimate:
  """`estimate_margin_cost` with `config.margins` (settings, batch size, `estimate.*`)."""
  est = margins_config.estimate
  return estimate_margin_cost(
    model,
    variables,
    settings=settings_from_config(margins_config),
    batch_size=margins_config.batch_size,
    deepfool_batch_size=margins_config.deepfool_batch_size,
    splits=splits,
    image_shape=image_shape,
    num_examples=est.num_examples or None,
    num_devices=est.num_devices or None,
    price_per_device_hour=est.price_per_device_hour,
    probe_batches=est.probe_batches,
  )


def write_estimate(estimate: CostEstimate, path: str | os.PathLike) -> Path:
  """Writes the estimate as JSON (atomic), for records of planned runs."""
  data = dataclasses.asdict(estimate)
  data['settings'] = estimate.settings.as_dict()
  data.update(
    examples_per_second_per_device=estimate.examples_per_second_per_device,
    hours=estimate.hours(),
    device_hours=estimate.device_hours(),
    cost=estimate.cost(),
  )
  return artifacts.write_json(path, data)
