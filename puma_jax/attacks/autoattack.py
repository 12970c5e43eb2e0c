"""AutoAttack (Croce and Hein 2020), the "standard" version, in JAX.

The clean check, then APGD-CE, APGD-T (9 targets), FAB-T (9 targets) and Square
(5,000 queries) run in order, each on the examples that are still robust only; an
example counts as broken by an attack once the attack returns a point inside the
eps-ball and [0, 1] that the model misclassifies (checked again here with one more
forward pass). The robust accuracy after the last attack is AutoAttack's number.

Fixed shapes for XLA. Before every attack (and every target round) the still-robust
examples are moved to the front, in their batch order, and attacked in chunks of
`chunk_size` rows; a `lax.while_loop` runs only as many chunks as there are robust
examples, so work shrinks with robust accuracy. Inside a chunk every attack freezes
the examples it has broken and stops when all are broken. Each example draws its
randomness from its own key, so its outcome does not depend on its chunk or batch:
run `attack_batch` under `jax.shard_map` (`parallel.per_device(..., num_batched_args=4)`,
or `run_standard(..., map_fn=...)`) and each device runs its own loops and stops on
its own, with the same results as one device.

    result = jax.jit(functools.partial(run_standard, logits_fn, norm='linf', eps=8 / 255))(
      jax.random.key(0), x, y)
    result.accuracy  # f32[5]: clean, after APGD-CE, APGD-T, FAB-T, Square
"""

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from puma_jax.attacks import lp
from puma_jax.attacks.apgd import apgd, target_classes
from puma_jax.attacks.fab import fab
from puma_jax.attacks.square import square

STANDARD = ('apgd-ce', 'apgd-t', 'fab-t', 'square')
# Every attack has its own random stream: fold_in(key_i, id), whatever attacks run.
ATTACK_IDS = {'apgd-ce': 1, 'apgd-dlr': 2, 'apgd-t': 3, 'fab-t': 4, 'square': 5}
_TARGETED = ('apgd-t', 'fab-t')


class AutoAttackResult(NamedTuple):
  """The outcome on one batch; stages are ('clean',) + attacks.

  Attributes:
    x_adv: f32[B,...] the adversarial example of every broken example (of the attack
      that broke it), the clean input elsewhere.
    robust: bool[B, S] still correctly classified after each stage (column 0: clean).
      False on padding rows.
    num_robust: i32[S] robust examples after each stage, padding excluded.
    num_examples: i32[] real (non-padding) examples.
    accuracy: f32[S] num_robust / num_examples.
  """

  x_adv: jax.Array
  robust: jax.Array
  num_robust: jax.Array
  num_examples: jax.Array
  accuracy: jax.Array


def stage_names(attacks: Sequence[str] = STANDARD) -> tuple[str, ...]:
  """Names of the columns of `AutoAttackResult.robust`."""
  return ('clean',) + tuple(attacks)


def _check_attacks(attacks: Sequence[str]) -> tuple[str, ...]:
  attacks = tuple(attacks)
  unknown = [a for a in attacks if a not in ATTACK_IDS]
  if unknown or len(set(attacks)) != len(attacks):
    raise ValueError(
      f'attacks {attacks} must be distinct names from {tuple(ATTACK_IDS)}; '
      f'the standard version is {STANDARD}.'
    )
  return attacks


def attack_batch(
  logits_fn: Callable[[jax.Array], jax.Array],
  keys: jax.Array,
  x: jax.Array,
  y: jax.Array,
  mask: jax.Array,
  *,
  norm: str,
  eps: float,
  attacks: Sequence[str] = STANDARD,
  chunk_size: int | None = None,
  apgd_steps: int = 100,
  fab_steps: int = 100,
  num_targets: int = 9,
  square_queries: int = 5000,
) -> tuple[jax.Array, jax.Array]:
  """The per-example core of `run_standard`: every input and output is batched.

  Args:
    logits_fn: f32[B,...] -> f32[B,K], per-example independent (eval mode).
    keys: key[B], one per example.
    x: f32[B,...] in [0, 1].
    y: i32[B] labels.
    mask: bool[B], False on padding rows (never attacked, never robust).
    norm: 'linf' or 'l2'.
    eps: the radius.
    attacks: names from ATTACK_IDS, run in this order.
    chunk_size: rows attacked together (default: the whole batch).
    apgd_steps, fab_steps: iterations of each APGD / FAB run (per target round).
    num_targets: target classes of APGD-T and FAB-T (capped at K - 1).
    square_queries: Square's query budget.

  Returns:
    x_adv f32[B,...] and robust bool[B, 1 + len(attacks)] as in `AutoAttackResult`.
  """
  attacks = _check_attacks(attacks)
  lp.check_norm(norm)
  batch = x.shape[0]
  x = x.astype(jnp.float32)
  mask = mask.astype(bool)
  logits = logits_fn(x).astype(jnp.float32)
  robust = (jnp.argmax(logits, axis=-1) == y) & mask
  targets = target_classes(logits, num_targets)
  chunk = batch if chunk_size is None else max(1, min(int(chunk_size), batch))
  eps_b = lp.batch_eps(eps, chunk)

  def run(name, r, stream, idx, valid):
    xs, ys, ks = x[idx], y[idx], lp.fold_in_each(stream[idx], r)
    if name in ('apgd-ce', 'apgd-dlr'):
      loss = 'ce' if name == 'apgd-ce' else 'dlr'
      out = apgd(
        logits_fn, ks, xs, ys, eps_b, norm=norm, loss=loss, num_steps=apgd_steps, active=valid
      )
      return out.success, out.x_adv
    if name == 'apgd-t':
      out = apgd(
        logits_fn,
        ks,
        xs,
        ys,
        eps_b,
        norm=norm,
        loss='dlr_targeted',
        target=targets[idx, r],
        num_steps=apgd_steps,
        active=valid,
      )
      return out.success, out.x_adv
    if name == 'fab-t':
      out = fab(
        logits_fn, xs, ys, targets[idx, r], eps_b, norm=norm, num_steps=fab_steps, active=valid
      )
      return out.success, out.x_adv
    out = square(logits_fn, ks, xs, ys, eps_b, norm=norm, num_queries=square_queries, active=valid)
    return out.success, out.x_adv

  def attack_chunk(name, r, stream, idx, valid):
    success, x_new = run(name, r, stream, idx, valid)
    # Count only points that are verifiably adversarial and inside the threat model.
    wrong = jnp.argmax(logits_fn(x_new), axis=-1) != y[idx]
    inside = lp.lp_norm(x_new - x[idx], norm) <= eps_b + 1e-6
    in_box = jnp.all((x_new >= 0) & (x_new <= 1), axis=tuple(range(1, x.ndim)))
    return valid & success & wrong & inside & in_box, x_new

  flags, x_adv = [robust], x
  for name in attacks:
    stream = lp.fold_in_each(keys, ATTACK_IDS[name])
    rounds = targets.shape[1] if name in _TARGETED else 1

    def round_(r, carry, name=name, stream=stream):
      fn = functools.partial(attack_chunk, name, r, stream)
      return _attack_compacted(fn, *carry, chunk)

    robust, x_adv = jax.lax.fori_loop(0, rounds, round_, (robust, x_adv))
    flags.append(robust)
  return x_adv, jnp.stack(flags, axis=1)


def _attack_compacted(
  attack_chunk: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]],
  robust: jax.Array,
  x_adv: jax.Array,
  chunk: int,
) -> tuple[jax.Array, jax.Array]:
  """Attacks the robust rows in chunks of `chunk` rows, as many chunks as needed.

  `attack_chunk(idx i32[C], valid bool[C]) -> (broken bool[C], x_new f32[C,...])`;
  the broken rows are marked not robust and take x_new.
  """
  batch = robust.shape[0]
  padded = -(-batch // chunk) * chunk
  order = jnp.argsort(~robust, stable=True)  # robust rows first, in batch order
  order = jnp.concatenate([order, jnp.zeros((padded - batch,), order.dtype)])
  count = jnp.sum(robust)

  def body(c, carry):
    rob, xa = carry
    idx = jax.lax.dynamic_slice(order, (c * chunk,), (chunk,))
    valid = c * chunk + jnp.arange(chunk) < count
    broken, x_new = attack_chunk(idx, valid)
    write = jnp.where(broken, idx, batch)  # out of range: dropped
    return rob.at[write].set(False, mode='drop'), xa.at[write].set(x_new, mode='drop')

  return jax.lax.fori_loop(0, (count + chunk - 1) // chunk, body, (robust, x_adv))


def run_standard(
  logits_fn: Callable[[jax.Array], jax.Array],
  rng: jax.Array,
  x: jax.Array,
  y: jax.Array,
  *,
  norm: str,
  eps: float,
  mask: jax.Array | None = None,
  attacks: Sequence[str] = STANDARD,
  chunk_size: int | None = None,
  apgd_steps: int = 100,
  fab_steps: int = 100,
  num_targets: int = 9,
  square_queries: int = 5000,
  map_fn: Callable[[Callable], Callable] | None = None,
) -> AutoAttackResult:
  """AutoAttack on one batch: clean check, then each attack on the still-robust examples.

  Deterministic given `rng`; jit it with the static choices bound by
  `functools.partial`.

  Args:
    logits_fn: f32[B,...] -> f32[B,K], per-example independent (eval mode).
    rng: a typed key (split into one key per example) or key[B].
    x: f32[B,...] in [0, 1].
    y: i32[B] labels.
    norm: 'linf' or 'l2'.
    eps: the radius (a positive scalar).
    mask: bool[B], False on padding rows (default: all real).
    attacks: the sequence to run (default: the standard version).
    chunk_size: rows attacked together (per device under `map_fn`); smaller chunks
      skip more of the work on broken examples at lower hardware utilisation.
    apgd_steps, fab_steps, num_targets, square_queries: AutoAttack's budgets.
    map_fn: wraps the per-example core `attack_batch(keys, x, y, mask)`, e.g.
      `functools.partial(parallel.per_device, mesh=mesh, num_batched_args=4)` so that
      every device attacks its own slice and stops on its own (the batch must then
      divide evenly over the devices; pad it and pass `mask`).

  Returns:
    An `AutoAttackResult`.
  """
  attacks = _check_attacks(attacks)
  if isinstance(eps, int | float) and not eps > 0:
    raise ValueError(f'eps must be positive, got {eps}.')
  batch = x.shape[0]
  mask = jnp.ones((batch,), bool) if mask is None else mask.astype(bool)
  keys = lp.example_keys(rng, batch)
  core = functools.partial(
    attack_batch,
    logits_fn,
    norm=norm,
    eps=eps,
    attacks=attacks,
    chunk_size=chunk_size,
    apgd_steps=apgd_steps,
    fab_steps=fab_steps,
    num_targets=num_targets,
    square_queries=square_queries,
  )
  if map_fn is not None:
    core = map_fn(core)
  x_adv, robust = core(keys, x, y, mask)
  num_robust = jnp.sum(robust & mask[:, None], axis=0, dtype=jnp.int32)
  num_examples = jnp.sum(mask, dtype=jnp.int32)
  return AutoAttackResult(
    x_adv=x_adv,
    robust=robust,
    num_robust=num_robust,
    num_examples=num_examples,
    accuracy=num_robust / jnp.maximum(num_examples, 1),
  )
