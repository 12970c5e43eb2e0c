"""Metrics of a run as JSON lines (`metrics.jsonl`) and TensorBoard event files.

One JSON object per line, `{"step": 100, "loss": 0.52, ...}`, flushed as soon as
it is written, so the file can be followed while a run is going and read after a
crash. TensorBoard event files go to the same folder through tensorboardX (no
TensorFlow needed). Only process 0 writes; on other processes the writer does
nothing.

Resuming: a run restored from the checkpoint of step r opens the writer with
`resume_step=r`. Lines with a step > r (written after that checkpoint, and about
to be written again) are dropped from `metrics.jsonl` and TensorBoard is told to
purge its events after step r, so the resumed run has no duplicated steps. A
fresh start (`resume_step=None`) drops every earlier line the same way.
"""

import json
import numbers
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging

from puma_jax import artifacts

METRICS_FILE = 'metrics.jsonl'


class MetricWriter:
  """Writes scalar metrics per step to `workdir/metrics.jsonl` and TensorBoard.

  Args:
    workdir: the run's folder (created if missing).
    resume_step: the step the run was restored from; None for a fresh start.
    tensorboard: also write TensorBoard event files.
  """

  def __init__(
    self,
    workdir: str | os.PathLike,
    *,
    resume_step: int | None = None,
    tensorboard: bool = True,
  ):
    self.path = Path(workdir) / METRICS_FILE
    self._active = jax.process_index() == 0
    self._file = None
    self._tb = None
    self._last_step = resume_step
    if not self._active:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    dropped = truncate_after(self.path, -1 if resume_step is None else resume_step)
    if dropped:
      since = 'a fresh start' if resume_step is None else f'resuming at step {resume_step}'
      logging.info('dropped %d lines of %s (%s)', dropped, self.path, since)
    self._file = open(self.path, 'a', encoding='utf-8')
    if tensorboard:
      from tensorboardX import SummaryWriter  # noqa: PLC0415 (heavy import, process 0 only)

      purge = 0 if resume_step is None else resume_step + 1
      self._tb = SummaryWriter(logdir=str(self.path.parent), purge_step=purge)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Appends `{"step": step, **scalars}` as one line and to TensorBoard.

    Args:
      step: the training step; not lower than the previous call's.
      scalars: name -> number (Python, NumPy or a jax scalar array). A further
        call at the same step (e.g. evaluation after training metrics) adds
        another line; `read_metrics(merge=True)` joins them.
    """
    step = int(step)
    if self._last_step is not None and step < self._last_step:
      raise ValueError(f'metrics of step {step} come after step {self._last_step}')
    self._last_step = step
    if not self._active:
      return
    values = {name: _to_number(name, v) for name, v in scalars.items()}
    if 'step' in values:
      raise ValueError("'step' is reserved for the step number")
    self._file.write(json.dumps({'step': step, **values}) + '\n')
    self._file.flush()
    if self._tb is not None:
      for name, v in values.items():
        self._tb.add_scalar(name, v, global_step=step)

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()
      os.fsync(self._file.fileno())
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._file is not None:
      self.flush()
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> 'MetricWriter':
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


def _to_number(name: str, value: Any) -> int | float | bool:
  if isinstance(value, jax.Array | np.ndarray | np.generic):
    if np.ndim(value) != 0:
      raise ValueError(f'metric {name!r} is not a scalar (shape {np.shape(value)})')
    value = np.asarray(value).item()
  if isinstance(value, bool | int):
    return value
  if isinstance(value, numbers.Real):
    return float(value)
  raise TypeError(f'metric {name!r} is a {type(value).__name__}, not a number')


def _parse(path: Path) -> tuple[list[dict[str, Any]], int]:
  """The objects of a JSON-lines file, and the number of unreadable trailing lines.

  A run killed while writing can leave a partial last line; only that is
  tolerated. An unreadable line followed by good ones is an error.
  """
  records, bad = [], 0
  with open(path, encoding='utf-8') as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        if not isinstance(record, dict) or not isinstance(record.get('step'), int):
          raise ValueError('not an object with an integer "step"')
      except ValueError as e:
        bad += 1
        bad_line = (lineno, e)
        continue
      if bad:
        raise ValueError(f'{path}:{bad_line[0]}: unreadable metrics line ({bad_line[1]})')
      records.append(record)
  return records, bad


def read_metrics(path: str | os.PathLike, *, merge: bool = False) -> list[dict[str, Any]]:
  """The metrics written by `MetricWriter`, in order.

  Args:
    path: a `metrics.jsonl` file, or the folder holding one.
    merge: join lines of the same step into one object (later values win).

  Returns:
    A list of `{"step": int, name: number, ...}` dicts, one per line (or per
    step with `merge`). A partial last line (a run killed mid-write) is skipped.
  """
  path = Path(path)
  if path.is_dir():
    path = path / METRICS_FILE
  records, bad = _parse(path)
  if bad:
    logging.warning('%s: skipped a partial last line', path)
  if not merge:
    return records
  merged: dict[int, dict[str, Any]] = {}
  for r in records:
    merged.setdefault(r['step'], {}).update(r)
  return [merged[s] for s in sorted(merged)]


def truncate_after(path: str | os.PathLike, step: int) -> int:
  """Drops the lines of `path` with a step > `step` (and a partial last line), atomically.

  Returns:
    The number of lines dropped; the file is rewritten only if that is > 0.
  """
  path = Path(path)
  if not path.exists():
    return 0
  records, bad = _parse(path)
  keep = [r for r in records if r['step'] <= step]
  dropped = len(records) - len(keep) + bad
  if dropped:
    artifacts.write_text(path, ''.join(json.dumps(r) + '\n' for r in keep))
  return dropped
