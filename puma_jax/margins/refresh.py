"""Refreshed margins: the kept examples' margins and eps, recomputed with the model being trained.

PUMA computes every example's margin once, with the margin model, and keeps
those eps for the whole run. With `c.train.refresh_margins_every = N > 0` the
train loop calls a `MarginRefresher` every N steps: it scores the kept examples
(only those; the pruning decision stays the margin model's) with the EMA
weights of the model being trained, on the devices, with the same engine
program as the margin stage (`engine.MarginEngine`: the estimator and settings
of `c.margins`, per device under `shard_map`), and turns the margins into eps
with the prune stage's rule (`pruning.compute_eps` with `c.prune.eps_rule` and
`c.attack.eps`). A refreshed margin that did not converge follows
`c.prune.unconverged` as far as a fixed kept set allows (`refreshed_eps`):
keep_distance uses it, infinite gives the full eps (+-eps by its sign), and
exclude, which cannot drop the example mid-run, keeps its previous eps. Nothing
is written to the sidecar store: the refreshed eps
live in the train loop's input pipeline and in its checkpoints (item
'kept_eps'), so a resumed run continues with exactly the eps it had.

The EMA weights are used, not the live ones: they are what the run evaluates
and exports, they are what the margin stage scores (a margin model's EMA
weights), and they move smoothly, so the eps do not follow one noisy step.

Every process scores all kept examples on its own devices (the same arrays
everywhere, so each process's input pipeline gets the same eps); a multi-host
job repeats that work on every host.
"""

import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from puma_jax import pruning
from puma_jax.datasets import input_pipeline
from puma_jax.datasets.splits import Split
from puma_jax.margins import engine
from puma_jax.margins.settings import MarginSettings, settings_from_config
from puma_jax.progress import Progress

CHECKPOINT_ITEM = 'kept_eps'


def refreshed_eps(
  margins: np.ndarray,
  converged: np.ndarray,
  previous: np.ndarray,
  *,
  eps: float,
  eps_rule: str,
  unconverged: str,
) -> np.ndarray:
  """f32[M] eps from refreshed margins, with `c.prune.unconverged` for unconverged ones.

  Args:
    margins: f32[M] refreshed margins; converged: bool[M], whether each converged.
    previous: f32[M] the eps the examples trained with so far.
    eps, eps_rule: the threat model's radius and the prune stage's rule.
    unconverged: keep_distance (use the margin, a lower bound) | infinite (+-inf: the full
      eps, by the margin's sign) | exclude (the kept set is fixed: keep `previous`).
  """
  if unconverged not in pruning.UNCONVERGED:
    raise ValueError(f'c.prune.unconverged={unconverged!r}: use one of {pruning.UNCONVERGED}')
  margins, converged = np.asarray(margins, np.float32), np.asarray(converged, bool)
  if unconverged == 'infinite':
    margins = pruning.unconverged_as_infinite(margins, ~converged)
  out = pruning.compute_eps(margins, eps, eps_rule)
  if unconverged == 'exclude':
    out = np.where(converged, out, np.asarray(previous, np.float32))
  return out.astype(np.float32)


def check_every(every: Any) -> int:
  if int(every) != every or every < 0:
    raise ValueError(
      f'train.refresh_margins_every={every!r}: need an integer >= 0 (steps between '
      "refreshes of the kept examples' margins; 0 is off)"
    )
  return int(every)


class MarginRefresher:
  """Recomputes the eps of the kept examples from the margins of given weights.

  Args:
    model: the Flax module being trained.
    splits: source -> Split (the training splits).
    kept: source -> i64[M] kept global ids (the prune stage's output).
    settings: the margin estimator and its settings (`settings_from_config(c.margins)`).
    eps: the threat model's radius (c.attack.eps).
    eps_rule: 'puma' or 'clip0' (the prune stage's rule, c.prune.eps_rule).
    unconverged: c.prune.unconverged, applied by `refreshed_eps`.
    every: refresh after every `every` steps (> 0).
    mesh: a 1-D ('data',) mesh of this process's devices.
    batch_size: examples per engine batch (a multiple of the mesh's devices).
    deepfool_batch_size: the estimator's rows per device at once (speed only).
  """

  def __init__(
    self,
    model: Any,
    splits: Mapping[str, Split],
    kept: Mapping[str, np.ndarray],
    *,
    settings: MarginSettings,
    eps: float,
    eps_rule: str,
    every: int,
    mesh: jax.sharding.Mesh,
    unconverged: str = 'keep_distance',
    batch_size: int,
    deepfool_batch_size: int = 0,
  ):
    if eps_rule not in ('puma', 'clip0'):
      raise ValueError(
        f'train.refresh_margins_every={every} refreshes margin-based eps, but the prune stage '
        f'gives a constant eps (rule {eps_rule!r}); use prune.strategy=puma with '
        "prune.eps_rule='puma' or 'clip0', or set train.refresh_margins_every=0."
      )
    self.every = check_every(every)
    self.model, self.settings, self.eps, self.eps_rule = model, settings, float(eps), eps_rule
    self.unconverged = unconverged
    self.mesh = engine.local_mesh(mesh)
    engine.check_batch_size(batch_size, self.mesh.size)
    self.batch_size = int(batch_size)
    self.deepfool_batch_size = engine.check_deepfool_batch_size(deepfool_batch_size)
    self.splits = {k: splits[k] for k in kept}
    self.kept = {k: np.asarray(v, np.int64) for k, v in kept.items()}
    self.last_seconds = 0.0

  def due(self, step: int, total: int) -> bool:
    """Whether to refresh after `step` (never after the last step: nothing trains on it)."""
    return step % self.every == 0 and step < total

  def margins(self, variables: Any) -> dict[str, np.ndarray]:
    """source -> f32[M] margins of the kept examples (aligned with `kept`) under `variables`."""
    return {k: m for k, (m, _) in self.scores(variables).items()}

  def scores(self, variables: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """source -> (f32[M] margins, bool[M] converged) of the kept examples under `variables`."""
    runner = engine.MarginEngine(
      self.model, variables, self.settings, self.mesh, self.batch_size, self.deepfool_batch_size
    )
    total = sum(len(ids) for ids in self.kept.values())
    progress = Progress('refresh margins', total, every_s=30)

    def pull(margins, converged, lo: int, n: int, res: tuple[jax.Array, ...]) -> None:
      margins[lo : lo + n] = np.asarray(res[0])[:n]
      converged[lo : lo + n] = np.asarray(res[2])[:n]
      progress.update(n)

    out = {}
    for name, ids in self.kept.items():
      split, margins = self.splits[name], np.empty(len(ids), np.float32)
      converged = np.empty(len(ids), bool)
      pending = []
      for lo in range(0, len(ids), self.batch_size):
        chunk = ids[lo : lo + self.batch_size]
        padded = np.concatenate([chunk, np.full(self.batch_size - len(chunk), chunk[0])])
        images, labels = input_pipeline.read_examples(split, padded)
        pending.append((lo, len(chunk), runner.dispatch(images.astype(np.float32) / 255, labels)))
        if len(pending) > 1:  # the next batch is queued before this one is pulled back
          pull(margins, converged, *pending.pop(0))
      for args in pending:
        pull(margins, converged, *args)
      out[name] = (margins, converged)
    progress.close()
    return out

  def __call__(self, variables: Any, previous: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """source -> f32[M] eps of the kept examples from their margins under `variables`.

    `previous`: source -> f32[M] the eps they trained with so far (kept for unconverged
    margins under `c.prune.unconverged=exclude`).
    """
    start = time.perf_counter()
    scores = self.scores(variables)
    self.last_seconds = time.perf_counter() - start
    logging.info(
      'refreshed the margins of the kept examples in %.1f s (not converged: %s; rule %s)',
      self.last_seconds,
      ', '.join(f'{k} {int((~c).sum())}' for k, (_, c) in scores.items()),
      self.unconverged,
    )
    return {
      k: refreshed_eps(
        m,
        c,
        previous[k],
        eps=self.eps,
        eps_rule=self.eps_rule,
        unconverged=self.unconverged,
      )
      for k, (m, c) in scores.items()
    }


def from_config(
  config: Any,
  model: Any,
  splits: Mapping[str, Split],
  kept: Mapping[str, np.ndarray] | None,
  mesh: jax.sharding.Mesh,
) -> MarginRefresher | None:
  """The refresher `config.train.refresh_margins_every` asks for, or None (off, or no pruning).

  Runs without a pruning output (the margin model's own run) never refresh.
  Under several processes the refresh runs on each process's local devices.
  """
  every = check_every(config.train.get('refresh_margins_every', 0))
  if not every or not kept:
    return None
  prune = pruning.settings_from_config(config)
  if jax.process_count() > 1:
    mesh = engine.local_mesh(None)
  logging.info(
    'refreshing the eps of %d kept examples every %d steps (%s margins of the EMA weights)',
    sum(len(v) for v in kept.values()),
    every,
    config.margins.get('estimator', 'deepfool'),
  )
  return MarginRefresher(
    model,
    splits,
    kept,
    settings=settings_from_config(config.margins),
    eps=config.attack.eps,
    eps_rule=prune.effective_eps_rule,
    unconverged=prune.unconverged,
    every=every,
    mesh=mesh,
    batch_size=config.margins.batch_size,
    deepfool_batch_size=config.margins.deepfool_batch_size,
  )
