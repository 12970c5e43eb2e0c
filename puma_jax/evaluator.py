"""The evaluator: which test examples a model classifies correctly, clean and under attack.

One evaluator serves both evaluations of the library:

- training-time evaluation (`train.py`): clean and PGD-CE accuracy of the EMA
  weights on the test split, `Evaluator.accuracy`;
- the evaluate stage (`evaluate.py`): per example, clean, PGD-CE, PGD-CW and
  AutoAttack "standard", `Evaluator.flags` on each batch, with resume and a report
  around it.

Its programs are plain `jax.jit`s whose first argument is the model's variables:
`pgd` (`steps.eval_flags`: the clean and PGD flags) and `autoattack`
(`autoattack.attack_batch` on each device's slice, `parallel.per_device`). A program
is compiled once per model architecture, settings and batch shape and then runs any
weights of that architecture (the EMA weights at every evaluation of a run, other
checkpoints, imported models); no weights are baked into a program as constants.
`get` keeps the evaluators made so far, so the stages of one run share them.

Randomness: a batch's PGD attacks draw their random starts from the batch's key
(`attack_keys`), and every example its AutoAttack randomness from
`fold_in(rng, index)`, so results do not depend on which batches ran before.
"""

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from puma_jax import parallel, steps
from puma_jax.attacks import autoattack
from puma_jax.datasets import input_pipeline

PGD_ATTACKS = ('pgd_ce', 'pgd_cw')  # the PGD attacks of `steps.eval_flags`, by loss
AUTOATTACK_BUDGETS = ('apgd_steps', 'fab_steps', 'num_targets', 'square_queries')


@dataclasses.dataclass(frozen=True)
class Settings:
  """What an evaluation computes (hashable: evaluators are kept per settings).

  Attributes:
    norm, eps: the threat model.
    pgd_steps, step_size: PGD's budget (step size relative to eps).
    pgd_attacks: PGD attacks by loss, from `PGD_ATTACKS`, each on every example.
    autoattack: run AutoAttack "standard" after PGD on the examples correct clean.
    autoattack_budgets: (name, value) overrides of AutoAttack's budgets
      (`AUTOATTACK_BUDGETS`); empty for the standard ones.
    chunk_size: AutoAttack's chunk of still-robust rows per device (None: the slice).
  """

  norm: str
  eps: float
  pgd_steps: int
  step_size: float
  pgd_attacks: tuple[str, ...] = PGD_ATTACKS
  autoattack: bool = False
  autoattack_budgets: tuple[tuple[str, int], ...] = ()
  chunk_size: int | None = None

  def __post_init__(self):
    unknown = [a for a in self.pgd_attacks if a not in PGD_ATTACKS]
    unknown += [k for k, _ in self.autoattack_budgets if k not in AUTOATTACK_BUDGETS]
    if unknown:
      raise ValueError(
        f'unknown evaluation settings {unknown}; PGD attacks are {PGD_ATTACKS}, '
        f'AutoAttack budgets {AUTOATTACK_BUDGETS}'
      )

  @property
  def stages(self) -> tuple[str, ...]:
    """Names of the columns of `Evaluator.flags`: 'clean', the PGD attacks, AutoAttack's."""
    aa = autoattack.stage_names()[1:] if self.autoattack else ()
    return ('clean', *self.pgd_attacks, *aa)


def training_settings(config: Any) -> Settings:
  """Training-time evaluation: clean and PGD-CE (`config.attack`, `config.eval.pgd_steps`)."""
  return Settings(
    norm=config.attack.norm,
    eps=config.attack.eps,
    pgd_steps=config.eval.pgd_steps,
    step_size=config.attack.step_size,
    pgd_attacks=('pgd_ce',),
  )


def attack_keys(rng: jax.Array, num_attacks: int) -> jax.Array:
  """key[num_attacks]: the random starts of a batch's PGD attacks from the batch's key.

  One attack starts from `rng` itself; with several, attack j from `fold_in(rng, j)`.
  """
  if num_attacks == 1:
    return jnp.expand_dims(rng, 0)
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, jnp.arange(num_attacks))


def _pgd_flags(variables, batch, rng, *, model, settings: Settings) -> jax.Array:
  return steps.eval_flags(
    variables,
    batch,
    attack_keys(rng, len(settings.pgd_attacks)),
    model=model,
    norm=settings.norm,
    eps=settings.eps,
    num_steps=settings.pgd_steps,
    step_size=settings.step_size,
    pgd_attacks=settings.pgd_attacks,
  )


def _autoattack_robust(
  variables, rng, batch, still, *, model, settings: Settings, mesh
) -> jax.Array:
  """bool[B, 4]: robust after APGD-CE, APGD-T, FAB-T, Square; only `still` rows are attacked."""
  keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(batch['index'])

  def core(keys, x, y, mask, variables):
    return autoattack.attack_batch(
      lambda v: model.apply(variables, v, train=False),
      keys,
      x,
      y,
      mask,
      norm=settings.norm,
      eps=settings.eps,
      chunk_size=settings.chunk_size,
      **dict(settings.autoattack_budgets),
    )

  per_device = parallel.per_device(core, mesh, num_batched_args=4)
  _, robust = per_device(keys, batch['image'], batch['label'], still, variables)
  return robust[:, 1:]


def gather(x: jax.Array) -> np.ndarray:
  """A globally sharded array on the host (every process gets all of it)."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


class Evaluator:
  """The compiled evaluation programs of one model architecture and `Settings` on a mesh.

  Args:
    model: the Flax module (eval mode: `apply(variables, x, train=False)`).
    settings: what to compute.
    mesh: the ('data',) mesh; batches are split over it (default: all devices).

  Attributes:
    pgd: jit((variables, batch, rng) -> bool[B, 1 + len(pgd_attacks)]), `steps.eval_flags`
      with the keys `attack_keys(rng, ...)`.
    autoattack: jit((variables, rng, batch, still) -> bool[B, 4]) (with `settings.autoattack`).
  """

  def __init__(self, model: nn.Module, settings: Settings, mesh: jax.sharding.Mesh | None = None):
    self.model, self.settings = model, settings
    self.mesh = mesh = mesh or parallel.make_mesh()
    repl, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
    self.pgd = jax.jit(
      functools.partial(_pgd_flags, model=model, settings=settings),
      in_shardings=(repl, data, repl),
      out_shardings=data,
    )
    self.autoattack = None
    if settings.autoattack:
      self.autoattack = jax.jit(
        functools.partial(_autoattack_robust, model=model, settings=settings, mesh=mesh),
        in_shardings=(repl, repl, data, data),
        out_shardings=data,
      )

  @property
  def stages(self) -> tuple[str, ...]:
    return self.settings.stages

  def flags(
    self,
    variables: Any,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    autoattack_rng: jax.Array | None = None,
  ) -> jax.Array:
    """bool[B, S], columns `stages`: still classified correctly after each stage.

    Args:
      variables: the weights to evaluate.
      batch: a batch on the mesh (`parallel.shard_batch`) with `image`, `label`,
        `index` and `mask` (False on padding rows, which are False everywhere).
      rng: the batch's key (its PGD starts, `attack_keys`).
      autoattack_rng: the key every example's AutoAttack key is folded from
        (`fold_in(autoattack_rng, index)`); needed with `settings.autoattack`.
    """
    flags = self.pgd(variables, batch, rng)
    if self.autoattack is not None:
      if autoattack_rng is None:
        raise ValueError('Evaluator.flags: AutoAttack needs autoattack_rng')
      robust = self.autoattack(variables, autoattack_rng, batch, flags[:, 0])
      flags = jnp.concatenate([flags, robust], axis=1)
    return flags

  def accuracy(
    self,
    variables: Any,
    split: Any,
    *,
    batch_size: int,
    num_examples: int,
    rng: jax.Array,
    autoattack_rng: jax.Array | None = None,
  ) -> dict[str, float]:
    """Accuracy after each stage on the first `num_examples` of `split` (0: all).

    Exact with a padded last batch. Batch i's PGD attacks draw their keys from
    `fold_in(rng, i)` (`attack_keys`); AutoAttack as in `flags`.

    Returns:
      `num_examples` and, per stage name, the fraction still classified correctly.
    """
    batches = input_pipeline.eval_batches(
      split, batch_size=batch_size, num_examples=num_examples, eps=self.settings.eps
    )
    flags = []
    for i, batch in enumerate(batches):
      batch = parallel.shard_batch(
        input_pipeline.device_fields(batch, input_pipeline.EVAL_FIELDS), self.mesh
      )
      f = self.flags(variables, batch, jax.random.fold_in(rng, i), autoattack_rng)
      flags.append((f, batch['mask']))
    counts = np.zeros(len(self.stages), np.int64)
    n = 0
    for f, mask in flags:
      counts += gather(f).sum(axis=0)
      n += int(gather(mask).sum())
    result = {'num_examples': n}
    result.update({name: int(c) / max(n, 1) for name, c in zip(self.stages, counts, strict=True)})
    return result


@functools.lru_cache(maxsize=8)
def get(model: nn.Module, settings: Settings, mesh: jax.sharding.Mesh) -> Evaluator:
  """The `Evaluator` of (model, settings, mesh), made once per process and then reused."""
  return Evaluator(model, settings, mesh)
