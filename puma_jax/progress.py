"""Progress of long work (margins, training, evaluation): rate and ETA on process 0."""

import time
from collections.abc import Callable

import jax
from absl import logging


def format_seconds(seconds: float) -> str:
  if seconds != seconds or seconds == float('inf'):
    return '?'
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


class Progress:
  """Logs `done/total`, rate and ETA at most every `every_s` seconds (process 0 only).

  Example:
    progress = Progress('margins', total=n, unit='examples')
    for batch in ...:
      ...
      progress.update(len(batch), extra=f'not converged: {k}')
    progress.close()
  """

  def __init__(
    self,
    name: str,
    total: int | None,
    *,
    unit: str = 'examples',
    initial: int = 0,
    every_s: float = 10.0,
    log_fn: Callable[[str], None] | None = None,
  ):
    self.name, self.total, self.unit = name, total, unit
    self.done = initial
    self._initial = initial
    self._every_s = every_s
    self._start = time.perf_counter()
    self._last_log = -float('inf')
    self._log = log_fn or (lambda msg: logging.info('%s', msg))
    self._active = jax.process_index() == 0

  @property
  def elapsed(self) -> float:
    return time.perf_counter() - self._start

  @property
  def rate(self) -> float:
    """Units per second since this object was created (resumed work not counted)."""
    elapsed = self.elapsed
    return (self.done - self._initial) / elapsed if elapsed > 0 else 0.0

  def message(self, extra: str = '') -> str:
    rate = self.rate
    total = f'/{self.total}' if self.total is not None else ''
    msg = f'{self.name}: {self.done}{total} {self.unit}, {rate:.1f} {self.unit}/s'
    if self.total is not None:
      remaining = max(self.total - self.done, 0) / rate if rate > 0 else float('inf')
      msg += f', elapsed {format_seconds(self.elapsed)}, ETA {format_seconds(remaining)}'
    if extra:
      msg += f', {extra}'
    return msg

  def update(self, n: int, *, extra: str = '', force: bool = False) -> None:
    self.done += n
    now = time.perf_counter()
    if self._active and (force or now - self._last_log >= self._every_s):
      self._last_log = now
      self._log(self.message(extra))

  def close(self, extra: str = '') -> None:
    if self._active:
      self._log(self.message(extra) + ' (done)')
