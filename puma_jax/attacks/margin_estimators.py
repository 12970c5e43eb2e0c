"""Margin estimators behind one signature, and the registry `c.margins.estimator` names.

Every estimator is a pure function

  estimate(logits_fn, x, y, *, norm, num_candidates, clip, batch_size=None, **settings)
      -> MarginEstimate(margin f32[N], converged bool[N], iterations i32[N])

of N examples (x f32[N,...] in [0, 1], labels y i32[N]). The margin is signed as
DeepFool's: positive, the distance to the boundary of the label's region, when
the model predicts y; negative, minus the distance to that region, when it does
not. Each example's result depends only on that example, so the functions run
under jit and per device inside `shard_map` (`parallel.per_device`) exactly as
`attacks.deepfool` does in the margin stage. `batch_size` bounds the rows the
model sees at once (DeepFool's slots; the others process the examples in chunks
of that size).

  deepfool     `attacks.deepfool`: iterated linearisations until the prediction
               flips (settings: overshoot, max_iter). The default.
  first_order  `attacks.first_order`: DeepFool's first linearisation at x, one
               forward and one batched backward pass, no loop (no settings).
               Exact for affine models, like DeepFool.
  fab          `attacks.fab_margin`: the smallest successful perturbation found
               by untargeted FAB with restarts (settings: num_steps, restarts,
               alpha_max, eta, beta, seed). An upper bound on the distance, for
               ablations; it needs clip = (0, 1).

`settings_from_config(c.margins)` gives the name and the keyword settings the
config selects, so callers write
`ESTIMATORS[name](logits_fn, x, y, norm=..., num_candidates=..., clip=..., **settings)`.
"""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from puma_jax.attacks.deepfool import deepfool as _deepfool
from puma_jax.attacks.fab_margin import fab_margin
from puma_jax.attacks.first_order import first_order_margin

LogitsFn = Callable[[jax.Array], jax.Array]


class MarginEstimate(NamedTuple):
  """Per-example output of every estimator, for N examples.

  Attributes:
    margin: f32[N] signed margin (negative: misclassified); +-inf where fab found nothing.
    converged: bool[N] the estimator's success (deepfool: the prediction flipped;
      first_order: the linearisation could move the example; fab: a successful
      point was found).
    iterations: i32[N] steps spent (deepfool), 1 (first_order), or the FAB step
      that found the margin (0: none).
  """

  margin: jax.Array
  converged: jax.Array
  iterations: jax.Array


def _in_chunks(fn: Callable, batch_size: int | None, x: jax.Array, y: jax.Array):
  """fn(x, y) on chunks of `batch_size` rows (padding the last with copies of row 0)."""
  n = x.shape[0]
  if batch_size is None or batch_size >= n:
    return fn(x, y)
  if batch_size < 1:
    raise ValueError(f'margin estimators: batch_size must be >= 1, got {batch_size}')
  chunks = -(-n // batch_size)
  pad = chunks * batch_size - n
  take = jnp.concatenate([jnp.arange(n), jnp.zeros((pad,), jnp.int32)])
  xs = x[take].reshape(chunks, batch_size, *x.shape[1:])
  ys = y[take].reshape(chunks, batch_size)
  out = jax.lax.map(lambda xy: fn(*xy), (xs, ys))
  return jax.tree.map(lambda a: a.reshape(chunks * batch_size, *a.shape[2:])[:n], out)


def _chunked_estimate(
  margin_fn: Callable[..., Any],
  logits_fn: LogitsFn,
  x: jax.Array,
  y: jax.Array,
  batch_size: int | None,
  **settings: Any,
) -> MarginEstimate:
  """`margin_fn(logits_fn, x, y, **settings)` in chunks of `batch_size`, as a MarginEstimate.

  `margin_fn` returns per-example `margin` and `converged` (and `iterations` if it
  counts them; 1 otherwise) for a batch f32[B,...], i32[B].
  """
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)

  def run(xc, yc):
    res = margin_fn(logits_fn, xc, yc, **settings)
    iterations = getattr(res, 'iterations', None)
    return MarginEstimate(
      res.margin, res.converged, jnp.ones_like(yc) if iterations is None else iterations
    )

  return _in_chunks(run, batch_size, x, y)


def deepfool(
  logits_fn: LogitsFn,
  x: jax.Array,
  y: jax.Array,
  *,
  norm: str,
  num_candidates: int,
  clip: tuple[float, float] | None,
  batch_size: int | None = None,
  overshoot: float = 0.02,
  max_iter: int = 50,
) -> MarginEstimate:
  """DeepFool's signed margins (`attacks.deepfool`; `batch_size` is its slot count)."""
  res = _deepfool(
    logits_fn,
    x,
    y,
    norm=norm,
    num_candidates=num_candidates,
    overshoot=overshoot,
    max_iter=max_iter,
    clip=clip,
    batch_size=batch_size,
  )
  return MarginEstimate(res.margin, res.converged, res.iterations)


def first_order(
  logits_fn: LogitsFn,
  x: jax.Array,
  y: jax.Array,
  *,
  norm: str,
  num_candidates: int,
  clip: tuple[float, float] | None,
  batch_size: int | None = None,
) -> MarginEstimate:
  """First-order signed margins (`attacks.first_order`), in chunks of `batch_size`."""
  return _chunked_estimate(
    first_order_margin,
    logits_fn,
    x,
    y,
    batch_size,
    norm=norm,
    num_candidates=num_candidates,
    clip=clip,
  )


def fab(
  logits_fn: LogitsFn,
  x: jax.Array,
  y: jax.Array,
  *,
  norm: str,
  num_candidates: int,
  clip: tuple[float, float] | None,
  batch_size: int | None = None,
  num_steps: int = 20,
  restarts: int = 2,
  alpha_max: float = 0.1,
  eta: float = 1.05,
  beta: float = 0.9,
  seed: int = 0,
) -> MarginEstimate:
  """Untargeted FAB's signed minimum-norm margins (`attacks.fab_margin`), in chunks."""
  if clip is None or tuple(clip) != (0.0, 1.0):
    raise ValueError(
      f'the fab margin estimator works in the image box [0, 1] (FAB projects onto it), got '
      f'clip={clip}; set c.margins.clip=True or use c.margins.estimator=deepfool/first_order.'
    )
  return _chunked_estimate(
    fab_margin,
    logits_fn,
    x,
    y,
    batch_size,
    norm=norm,
    num_candidates=num_candidates,
    num_steps=num_steps,
    restarts=restarts,
    alpha_max=alpha_max,
    eta=eta,
    beta=beta,
    seed=seed,
  )


ESTIMATORS: dict[str, Callable[..., MarginEstimate]] = {
  'deepfool': deepfool,
  'first_order': first_order,
  'fab': fab,
}
# The config fields of each estimator's settings: c.margins.<field> for deepfool (its
# historical place), c.margins.<name>.<field> for the others.
SETTINGS = {
  'deepfool': ('overshoot', 'max_iter'),
  'first_order': (),
  'fab': ('num_steps', 'restarts', 'alpha_max', 'eta', 'beta', 'seed'),
}


def check_name(name: str) -> str:
  """Returns `name` if it is a registered estimator, else a ValueError naming the choices."""
  if name not in ESTIMATORS:
    raise ValueError(
      f'c.margins.estimator={name!r} is not a margin estimator; use one of {tuple(ESTIMATORS)}'
    )
  return name


def settings_from_config(margins_config: Any) -> tuple[str, dict[str, Any]]:
  """(estimator name, its keyword settings) from `config.margins`.

  `c.margins.estimator` names the estimator ('deepfool' when the field is
  absent); deepfool reads c.margins.overshoot and c.margins.max_iter, fab reads
  c.margins.fab.*, first_order has no settings.
  """
  name = check_name(margins_config.get('estimator', 'deepfool'))
  source: Mapping[str, Any] = margins_config if name == 'deepfool' else margins_config.get(name, {})
  missing = [f for f in SETTINGS[name] if f not in source]
  if missing:
    where = 'c.margins' if name == 'deepfool' else f'c.margins.{name}'
    raise ValueError(f'{where} lacks {missing}; see puma_jax/config_base.py for the fields')
  settings = {f: source[f] for f in SETTINGS[name]}
  for f in ('max_iter', 'num_steps', 'restarts'):
    if f in settings and (int(settings[f]) != settings[f] or settings[f] < 1):
      raise ValueError(f'c.margins setting {f}={settings[f]!r}: need an integer >= 1')
  return name, settings
