r"""Perceptron teacher-student analysis of margin-based pruning under adversarial training.

The setting of Sorscher et al. (2022, "Beyond neural scaling laws: beating power
law scaling via data pruning") carried to adversarial training, as in PUMA
(Maroto and Frossard, arXiv 2405.06298):

- inputs x ~ N(0, I_N), a teacher T ~ N(0, I_N), labels y = sign(T.x);
- a probe (the margin model) gives every example of a pool of P_total examples
  its signed margin m_i = y_i J.x_i / ||J||_* (exactly what DeepFool returns for a
  linear classifier; negative when the probe misclassifies the example);
- `puma_jax.pruning.select`, the project's own rule, drops a fraction of the pool
  (`random`, `prune_low` = keep the easy examples, `prune_high` = keep the hard
  ones, `puma` = keep the hard ones with eps_i = clip(m_i, -eps, eps)), so that
  exactly P = alpha N examples are kept;
- a student is trained on the kept examples by linear adversarial training. The
  inner problem has a closed form for a linear classifier,
      min_{||delta|| <= eps_i} y w.(x + delta) = y w.x - eps_i ||w||_*
  (||.||_* the dual norm: l2 for l2, l1 for linf; a negative eps_i helps the
  example, as in the project's train step), so training minimises the convex
  (for eps_i >= 0) robust logistic loss
      mean_i softplus(-(y_i w.x_i - eps_i ||w||_*)) + l2_reg / 2 ||w||^2
  with L-BFGS (optax), one jitted solve per trial;
- the student is scored on the input distribution itself, in closed form:
  clean error arccos(R) / pi with R the teacher-student cosine, and robust error
  P(exists ||delta|| <= eps: sign(w.(x + delta)) != y).

Run (a few minutes on a 2-core CPU):

  python -m experiments.perceptron --out=/tmp/perceptron

writes `trials.csv` (one row per trial), `summary.csv`, `table.md`, `errors.png`
and `settings.json` into --out and prints the tables.
"""

import argparse
import dataclasses
import fractions
import functools
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import special, stats

from puma_jax import artifacts, pruning, tables

NORMS = ('l2', 'linf')
PROBES = ('robust', 'clean', 'teacher')
# The project's strategies (puma_jax.pruning); 'none' trains on alpha N fresh examples.
STRATEGIES = ('none', 'random', 'prune_low', 'prune_high', 'puma')
STRATEGY_LABELS = {
  'none': 'no pruning',
  'random': 'random',
  'prune_low': 'keep easy (prune_low)',
  'prune_high': 'keep hard (prune_high)',
  'puma': 'PUMA (keep hard, eps_i from margin)',
  'probe': 'margin model (whole pool)',
}
_SOURCE = 'generated'  # the pool plays the generated data that PUMA prunes


@dataclasses.dataclass(frozen=True)
class Settings:
  """One run of the experiment; validated on construction (errors name the flag).

  Attributes:
    dim: N, the input dimension (--dim).
    alphas: examples per dimension the student trains on, alpha = P / N (--alphas).
    fractions: shares of the pool that pruning drops, in (0, 1) (--fractions); the
      pool has P_total examples so that P_total - dropped = alpha N.
    strategies: subset of `STRATEGIES` (--strategies).
    eps: the threat model's radius, > 0 (--eps), in the units of `norm`. Margins
      y T.x / ||T||_2 are standard normal, so an l2 eps of 0.5 puts 38% of all
      inputs within eps of the teacher's boundary; in linf the same share needs
      eps ~ 0.5 sqrt(pi / (2 N)).
    norm: 'l2' or 'linf' (--norm). 'l2' is solved to float32 precision; 'linf'
      approximately (see `train_linear`).
    probe: the margin model: 'robust' (adversarially trained with eps on the whole
      pool, PUMA's choice), 'clean' (trained with eps = 0, Sorscher et al.'s probe)
      or 'teacher' (oracle margins) (--probe).
    num_seeds: independent trials (teacher and data) per point (--num_seeds).
    seed: base seed; results are a function of it (--seed).
    num_steps: L-BFGS iterations per training (--num_steps).
    l2_reg: ridge coefficient, > 0, which keeps separable problems bounded (--l2_reg).
  """

  dim: int = 100
  alphas: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
  fractions: tuple[float, ...] = (0.2, 0.5, 0.8)
  strategies: tuple[str, ...] = STRATEGIES
  eps: float = 0.5
  norm: str = 'l2'
  probe: str = 'robust'
  num_seeds: int = 5
  seed: int = 0
  num_steps: int = 100
  l2_reg: float = 1e-4

  def __post_init__(self):
    object.__setattr__(self, 'alphas', tuple(float(a) for a in self.alphas))
    object.__setattr__(self, 'fractions', tuple(float(f) for f in self.fractions))
    object.__setattr__(self, 'strategies', tuple(self.strategies))
    _check_int(self.dim, '--dim', minimum=1)
    _check_int(self.num_seeds, '--num_seeds', minimum=1)
    _check_int(self.num_steps, '--num_steps', minimum=1)
    _check_int(self.seed, '--seed', minimum=0)
    if not self.alphas or any(not (math.isfinite(a) and a > 0) for a in self.alphas):
      raise ValueError(f'--alphas must be positive numbers, got {self.alphas}')
    for a in self.alphas:
      if round(a * self.dim) < 1:
        raise ValueError(f'--alphas={a:g} with --dim={self.dim} keeps no example; raise either')
    for flag, values in (('--alphas', self.alphas), ('--fractions', self.fractions)):
      if len(set(values)) != len(values):
        raise ValueError(f'{flag} lists a value twice: {values}')
    if any(not 0 < f < 1 for f in self.fractions):
      raise ValueError(
        f'--fractions must lie in (0, 1) (the share of the pool dropped), got {self.fractions}'
      )
    unknown = [s for s in self.strategies if s not in STRATEGIES]
    if unknown or not self.strategies:
      raise ValueError(f'--strategies: unknown {unknown}; choose from {",".join(STRATEGIES)}')
    if any(s != 'none' for s in self.strategies) and not self.fractions:
      raise ValueError('--fractions is empty but --strategies has pruning strategies')
    if self.norm not in NORMS:
      raise ValueError(f'--norm={self.norm!r}; choose from {",".join(NORMS)}')
    if self.probe not in PROBES:
      raise ValueError(f'--probe={self.probe!r}; choose from {",".join(PROBES)}')
    if not (math.isfinite(self.eps) and self.eps > 0):
      raise ValueError(f'--eps must be a finite number > 0, got {self.eps}')
    if not (math.isfinite(self.l2_reg) and self.l2_reg > 0):
      raise ValueError(f'--l2_reg must be a finite number > 0, got {self.l2_reg}')

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _check_int(value: Any, flag: str, *, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f'{flag} must be an integer >= {minimum}, got {value!r}')


# ----------------------------------------------------------------------------------------
# Linear adversarial training (pure JAX).


def dual_norm(w: jax.Array, norm: str) -> jax.Array:
  """||w||_*, the dual of the threat norm: l2 for 'l2', l1 for 'linf'. f32[...,N] -> f32[...].

  The l2 norm has gradient 0 at w = 0 (a subgradient) instead of NaN.
  """
  if norm == 'l2':
    sq = jnp.sum(w * w, axis=-1)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
  if norm == 'linf':
    return jnp.sum(jnp.abs(w), axis=-1)
  raise ValueError(f'unknown norm {norm!r}; choose from {NORMS}')


def robust_margins(
  w: jax.Array, x: jax.Array, y: jax.Array, eps: jax.Array, *, norm: str
) -> jax.Array:
  """Worst-case functional margin min_{||d|| <= eps_i} y_i w.(x_i + d), in closed form.

  Args:
    w: f32[N] weights.
    x: f32[P,N] inputs.
    y: f32[P] labels in {-1, +1}.
    eps: f32[P] per-example radii; a negative eps_i gives the best case within
      |eps_i| instead (the example is moved towards its class).
    norm: the threat norm, 'l2' or 'linf'.

  Returns:
    f32[P]: y_i w.x_i - eps_i ||w||_*.
  """
  return y * (x @ w) - eps * dual_norm(w, norm)


def adversarial_loss(
  w: jax.Array,
  x: jax.Array,
  y: jax.Array,
  eps: jax.Array,
  weight: jax.Array | None = None,
  *,
  norm: str,
  l2_reg: float,
) -> jax.Array:
  """Robust logistic loss of linear adversarial training (scalar).

  sum_i weight_i softplus(-robust_margin_i) / sum_i weight_i + l2_reg / 2 ||w||_2^2.

  Args:
    w: f32[N]; x: f32[P,N]; y: f32[P] in {-1, +1}; eps: f32[P] (see `robust_margins`).
    weight: f32[P] in {0, 1}, 0 on padding rows; None weighs every row 1.
    norm: the threat norm; l2_reg: ridge coefficient.
  """
  per_example = jax.nn.softplus(-robust_margins(w, x, y, eps, norm=norm))
  if weight is None:
    data_loss = jnp.mean(per_example)
  else:
    data_loss = jnp.sum(weight * per_example) / jnp.maximum(jnp.sum(weight), 1.0)
  return data_loss + 0.5 * l2_reg * jnp.sum(w * w)


def train_linear(
  x: jax.Array,
  y: jax.Array,
  eps: jax.Array,
  weight: jax.Array | None = None,
  *,
  norm: str,
  num_steps: int,
  l2_reg: float,
  tol: float = 1e-6,
) -> dict[str, jax.Array]:
  """Linear adversarial training: minimises `adversarial_loss` with L-BFGS. Pure.

  Starts from the Hebbian direction mean_i y_i x_i and stops after `num_steps`
  iterations or once the gradient's l2 norm is below `tol`. For eps_i >= 0 the
  problem is convex, and its minimiser is w = 0 exactly when
  ||mean_i y_i x_i||_dual <= mean_i eps_i (the dual of ||.||_*: l2 for 'l2',
  linf for 'linf'): adversarial training then prefers the constant classifier.
  L-BFGS only approaches that non-smooth point, so when the condition holds the
  solution is replaced by 0 and reported as collapsed (unless, in the non-convex
  case, the solver found a clearly lower loss elsewhere). The 'linf'
  objective is non-smooth wherever a weight is 0: L-BFGS then ends near, not at,
  the minimum (within about 1e-3 of the minimal loss on the problems tested
  against an exact split-variable solve), and its final gradient need not vanish.

  Args:
    x: f32[P,N] inputs.
    y: f32[P] labels in {-1, +1}.
    eps: f32[P] per-example radii (negative ones help the example; the problem is
      then not convex and the result is a local minimum).
    weight: f32[P] in {0, 1}, 0 on padding rows; None weighs every row 1.
    norm: the threat norm, 'l2' or 'linf'.
    num_steps: the most L-BFGS iterations (each with a zoom line search).
    l2_reg: ridge coefficient > 0.
    tol: gradient-norm tolerance.

  Returns:
    dict with `w` f32[N], `loss` f32[] (at `w`), `grad_norm` f32[] (l2 norm of the
    gradient at the last iterate, before any collapse to 0), `steps` i32[] and
    `collapsed` bool[].
  """
  fun = functools.partial(
    adversarial_loss, x=x, y=y, eps=eps, weight=weight, norm=norm, l2_reg=l2_reg
  )
  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(fun)

  def cond(carry):
    _, state, step, grad_norm = carry
    return (step < num_steps) & (grad_norm > tol)

  def body(carry):
    w, state, step, _ = carry
    value, grad = value_and_grad(w, state=state)
    updates, state = solver.update(grad, state, w, value=value, grad=grad, value_fn=fun)
    return optax.apply_updates(w, updates), state, step + 1, optax.tree.norm(grad)

  w_sum = jnp.ones_like(y) if weight is None else weight
  hebb = jnp.sum((w_sum * y)[:, None] * x, axis=0) / jnp.maximum(jnp.sum(w_sum), 1.0)
  w0 = hebb / jnp.maximum(jnp.linalg.norm(hebb), 1e-12)
  init = (w0, solver.init(w0), jnp.zeros((), jnp.int32), jnp.array(jnp.inf, jnp.float32))
  w, _, steps, _ = jax.lax.while_loop(cond, body, init)
  loss, grad = jax.value_and_grad(fun)(w)
  zero_loss = fun(jnp.zeros_like(w))
  # 0 is a minimum iff no direction descends from it: ||g||_dual <= mean eps. In
  # float32 the loss cannot tell a tiny w from 0, so the condition decides; only a
  # clearly lower loss (possible when some eps_i < 0 make the problem non-convex)
  # overrides it.
  e_bar = jnp.sum(w_sum * eps) / jnp.maximum(jnp.sum(w_sum), 1.0)
  g_dual = jnp.linalg.norm(hebb) if norm == 'l2' else jnp.max(jnp.abs(hebb))
  zero_is_min = g_dual <= e_bar
  collapsed = (zero_is_min & ~(loss < zero_loss - 1e-6)) | ~jnp.all(jnp.isfinite(w))
  return {
    'w': jnp.where(collapsed, 0.0, w),
    'loss': jnp.where(collapsed, zero_loss, loss),
    'grad_norm': jnp.linalg.norm(grad),
    'steps': steps,
    'collapsed': collapsed,
  }


_train_jit = jax.jit(train_linear, static_argnames=('norm', 'num_steps', 'l2_reg', 'tol'))


def bucket_size(num: int) -> int:
  """Rows a problem of `num` examples is padded to: the next power of two, at least 64.

  One compilation per size, so few compilations in all.
  """
  return max(64, 1 << max(0, num - 1).bit_length())


def train_many(
  problems: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
  *,
  norm: str,
  num_steps: int,
  l2_reg: float,
) -> dict[str, np.ndarray]:
  """`train_linear` on independent problems (x f[P,N], y f[P], eps f[P]); P may differ.

  Each problem is padded (weight 0) to `bucket_size(P)` rows and solved by one
  jitted call: on CPU this is about 30 times faster than `jax.vmap` over the
  problems, whose batched line-search loops run in lockstep, and padding keeps
  the number of compilations to one per power of two.

  Returns:
    The fields of `train_linear` stacked over problems: `w` f32[B,N], `loss`,
    `grad_norm`, `steps`, `collapsed` [B].
  """
  outs = []
  for x, y, eps in problems:
    num = len(y)
    size = bucket_size(num)
    pad = size - num
    weight = np.concatenate([np.ones(num, np.float32), np.zeros(pad, np.float32)])
    x = np.pad(np.asarray(x, np.float32), ((0, pad), (0, 0)))
    y = np.pad(np.asarray(y, np.float32), (0, pad), constant_values=1.0)
    eps = np.pad(np.asarray(eps, np.float32), (0, pad))
    outs.append(_train_jit(x, y, eps, weight, norm=norm, num_steps=num_steps, l2_reg=l2_reg))
  outs = jax.device_get(outs)
  return {k: np.stack([o[k] for o in outs]) for k in outs[0]}


def signed_margins(w: jax.Array, x: jax.Array, y: jax.Array, *, norm: str) -> jax.Array:
  """Distance to the boundary of w in the threat norm, signed: y w.x / ||w||_*. f32[...,P].

  This is the DeepFool margin of a linear classifier (exact in one step). All
  margins are 0 when w = 0 (a collapsed probe: no example is ranked above another).

  Args:
    w: f32[...,N] weights; x: f32[...,P,N]; y: f32[...,P] in {-1, +1}.
  """
  scale = dual_norm(w, norm)[..., None]
  return jnp.where(scale > 0, y * jnp.einsum('...pn,...n->...p', x, w) / scale, 0.0)


# ----------------------------------------------------------------------------------------
# Data and errors.


def make_teacher(key: jax.Array, dim: int) -> jax.Array:
  """T ~ N(0, I_N): f32[N]."""
  return jax.random.normal(key, (dim,), jnp.float32)


def sample_data(key: jax.Array, teacher: jax.Array, num: int) -> tuple[jax.Array, jax.Array]:
  """P examples x ~ N(0, I_N) with teacher labels: (f32[P,N], f32[P] in {-1, +1})."""
  x = jax.random.normal(key, (num, teacher.shape[-1]), jnp.float32)
  y = jnp.where(x @ teacher >= 0, 1.0, -1.0)
  return x, y


def errors(w: np.ndarray, teacher: np.ndarray, *, eps: float, norm: str) -> tuple[float, float]:
  """Clean and robust test error of sign(w.x) on x ~ N(0, I_N) labelled by the teacher.

  With u = T.x / ||T||_2 and v = w.x / ||w||_2, standard normals of correlation R
  (the teacher-student cosine), the clean error is P(u v < 0) = arccos(R) / pi.
  The student is robust at x when y v >= e = eps ||w||_* / ||w||_2, so the robust
  error is 1 - 2 P(u > 0, v > e) = Phi(e) - 2 T_Owen(e, R / sqrt(1 - R^2)), which
  is arccos(R) / pi at e = 0. The constant classifier w = 0 (a collapsed student)
  errs on half of the inputs and cannot be moved by a perturbation: both errors 0.5.

  Args:
    w: f[N] student weights; teacher: f[N].
    eps: the threat model's radius; norm: 'l2' or 'linf'.

  Returns:
    (clean error, robust error), floats in [0, 1].
  """
  w, teacher = np.asarray(w, np.float64), np.asarray(teacher, np.float64)
  w_norm = np.linalg.norm(w)
  if w_norm == 0:
    return 0.5, 0.5
  r = float(np.clip(w @ teacher / (w_norm * np.linalg.norm(teacher)), -1.0, 1.0))
  dual = w_norm if norm == 'l2' else np.abs(w).sum()
  e = eps * dual / w_norm
  clean = math.acos(r) / math.pi
  if r >= 1.0:
    robust = 2 * stats.norm.cdf(e) - 1
  elif r <= -1.0:
    robust = 1.0
  else:
    robust = stats.norm.cdf(e) - 2 * special.owens_t(e, r / math.sqrt(1 - r * r))
  return clean, float(np.clip(robust, 0.0, 1.0))


# ----------------------------------------------------------------------------------------
# Pruning through the project's rule.


def pool_size(num_kept: int, fraction: float) -> int:
  """The smallest pool from which dropping `fraction` (rounded half up) keeps `num_kept`.

  Mirrors `puma_jax.pruning`: the number dropped from n is fraction * n rounded
  half up, with the fraction taken as the decimal written.
  """
  f = fractions.Fraction(repr(float(fraction)))
  half = fractions.Fraction(1, 2)
  # kept(n) = n - floor(f n + 1/2) <= n (1 - f) + 1/2, so no smaller pool can do.
  n = max(num_kept, math.floor((num_kept - half) / (1 - f)))
  while n - math.floor(f * n + half) < num_kept:
    n += 1
  return n


def prune(
  margins: np.ndarray,
  labels: np.ndarray,
  *,
  strategy: str,
  fraction: float,
  eps: float,
  seed: int,
) -> tuple[np.ndarray, np.ndarray]:
  """Kept examples and their eps by `puma_jax.pruning.select`.

  Args:
    margins: f[P] signed margins of the pool.
    labels: f[P] labels in {-1, +1}.
    strategy: a `puma_jax.pruning` strategy ('puma' uses eps_rule 'puma').
    fraction: share of the pool dropped, in [0, 1).
    eps: the threat model's radius.
    seed: seed of the 'random' strategy.

  Returns:
    (i32[P_kept] kept indices ascending, f32[P_kept] their eps).
  """
  settings = pruning.PruneSettings(
    strategy=strategy, fraction=fraction, scope='generated', eps_rule='puma', eps=eps, seed=seed
  )
  result = pruning.select(
    settings,
    labels={_SOURCE: (np.asarray(labels) > 0).astype(np.int32)},
    margins={_SOURCE: np.asarray(margins, np.float32)},
    num_classes=2,
  )
  return result.kept[_SOURCE], result.eps[_SOURCE]


# ----------------------------------------------------------------------------------------
# The experiment.


def _fold(key: jax.Array, value: float) -> jax.Array:
  """Folds a grid value (alpha, fraction) into a key, so a point's data do not depend on
  which other points the grid holds."""
  return jax.random.fold_in(key, int(round(value * 1_000_000)))


def _random_seed(seed: int, trial: int, alpha: float, fraction: float) -> int:
  """Seed of the 'random' strategy for one point, a function of the point alone."""
  entropy = [seed, trial, round(alpha * 1_000_000), round(fraction * 1_000_000)]
  return int(np.random.SeedSequence(entropy).generate_state(1)[0] >> 1)


def run(settings: Settings, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Runs every (alpha, fraction, strategy, seed) trial; returns one row per trial.

  Per seed t: a teacher; per alpha and fraction f, a pool of `pool_size(alpha N, f)`
  examples, a probe trained on it (or the teacher), its margins, and, for every
  pruning strategy, the kept examples and their eps. 'none' trains on alpha N
  fresh examples. Every point's data depend only on (seed, t, alpha, f).

  Row keys: strategy, fraction (0 for 'none'), alpha, alpha_total (pool / N),
  seed (t), clean_error, robust_error, collapsed, steps and grad_norm (of the
  solver), eps_mean (mean eps of the kept examples), eps_reduced (share of kept
  examples with eps_i < eps), teacher_robust_error (the teacher's own),
  probe_clean_error, probe_robust_error and probe_collapsed (of the margin model
  that chose the data; NaN and False for 'none' and for the teacher as probe).
  """
  s = settings
  n = s.dim
  base = jax.random.key(s.seed)
  trial_keys = [jax.random.fold_in(base, t) for t in range(s.num_seeds)]
  teachers = [np.asarray(make_teacher(jax.random.fold_in(k, 0), n)) for k in trial_keys]
  teacher_robust = [errors(t, t, eps=s.eps, norm=s.norm)[1] for t in teachers]
  train = functools.partial(train_many, norm=s.norm, num_steps=s.num_steps, l2_reg=s.l2_reg)
  pruned = [st for st in s.strategies if st != 'none']
  rows: list[dict[str, Any]] = []
  start = time.perf_counter()
  for alpha in s.alphas:
    num_kept = round(alpha * n)
    problems, metas = [], []

    def pool(t: int, fraction: float, num: int, alpha=alpha) -> tuple[np.ndarray, np.ndarray]:
      key = _fold(_fold(jax.random.fold_in(trial_keys[t], 1), alpha), fraction)
      x, y = sample_data(key, jnp.asarray(teachers[t]), num)
      return np.asarray(x), np.asarray(y)

    if 'none' in s.strategies:
      for t in range(s.num_seeds):
        x, y = pool(t, 0.0, num_kept)
        problems.append((x, y, np.full(num_kept, s.eps, np.float32)))
        metas.append(dict(strategy='none', fraction=0.0, seed=t, alpha_total=num_kept / n))
    for fraction in s.fractions if pruned else ():
      num_total = pool_size(num_kept, fraction)
      pools = [pool(t, fraction, num_total) for t in range(s.num_seeds)]
      if s.probe == 'teacher':
        probes = np.stack(teachers)
        probe_collapsed = np.zeros(s.num_seeds, bool)
      else:
        probe_eps = np.full(num_total, s.eps if s.probe == 'robust' else 0.0, np.float32)
        sol = train([(x, y, probe_eps) for x, y in pools])
        probes, probe_collapsed = sol['w'], sol['collapsed']
      for t, (x, y) in enumerate(pools):
        margins = np.asarray(signed_margins(probes[t], x, y, norm=s.norm))
        probe_clean, probe_robust = errors(probes[t], teachers[t], eps=s.eps, norm=s.norm)
        for strategy in pruned:
          kept, eps = prune(
            margins,
            y,
            strategy=strategy,
            fraction=fraction,
            eps=s.eps,
            seed=_random_seed(s.seed, t, alpha, fraction),
          )
          if len(kept) != num_kept:
            raise AssertionError(f'pruning kept {len(kept)} of {num_total}, expected {num_kept}')
          problems.append((x[kept], y[kept], eps))
          metas.append(
            dict(
              strategy=strategy,
              fraction=fraction,
              seed=t,
              alpha_total=num_total / n,
              probe_clean_error=probe_clean if s.probe != 'teacher' else float('nan'),
              probe_robust_error=probe_robust if s.probe != 'teacher' else float('nan'),
              probe_collapsed=bool(probe_collapsed[t]),
            )
          )
    sol = train(problems)
    for i, meta in enumerate(metas):
      clean, robust = errors(sol['w'][i], teachers[meta['seed']], eps=s.eps, norm=s.norm)
      eps_i = problems[i][2]
      rows.append(
        dict(
          strategy=meta['strategy'],
          fraction=meta['fraction'],
          alpha=alpha,
          alpha_total=meta['alpha_total'],
          seed=meta['seed'],
          clean_error=clean,
          robust_error=robust,
          collapsed=bool(sol['collapsed'][i]),
          steps=int(sol['steps'][i]),
          grad_norm=float(sol['grad_norm'][i]),
          eps_mean=float(eps_i.mean()),
          eps_reduced=float((eps_i < np.float32(s.eps)).mean()),
          teacher_robust_error=teacher_robust[meta['seed']],
          probe_clean_error=meta.get('probe_clean_error', float('nan')),
          probe_robust_error=meta.get('probe_robust_error', float('nan')),
          probe_collapsed=meta.get('probe_collapsed', False),
        )
      )
    log(
      f'alpha={alpha:g}: {len(metas)} students of {num_kept} examples, '
      f'{time.perf_counter() - start:.1f}s elapsed'
    )
  return rows


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Mean and standard deviation over seeds per (strategy, fraction, alpha).

  Adds strategy 'probe' (the margin model trained on the whole pool) when the
  rows carry its errors, so that a student can be compared with the model whose
  margins chose its data.
  """
  groups: dict[tuple[str, float, float], list[dict[str, Any]]] = {}
  probes: dict[tuple[float, float, int], dict[str, Any]] = {}
  for r in rows:
    groups.setdefault((r['strategy'], r['fraction'], r['alpha']), []).append(r)
    if r['strategy'] != 'none' and math.isfinite(r['probe_clean_error']):
      probes[(r['fraction'], r['alpha'], r['seed'])] = dict(
        r,
        strategy='probe',
        clean_error=r['probe_clean_error'],
        robust_error=r['probe_robust_error'],
        collapsed=r['probe_collapsed'],
        eps_reduced=0.0,
      )
  for p in probes.values():
    groups.setdefault(('probe', p['fraction'], p['alpha']), []).append(p)
  out = []
  for (strategy, fraction, alpha), g in groups.items():
    clean = np.array([r['clean_error'] for r in g])
    robust = np.array([r['robust_error'] for r in g])
    out.append(
      dict(
        strategy=strategy,
        fraction=fraction,
        alpha=alpha,
        alpha_total=g[0]['alpha_total'],
        num_seeds=len(g),
        clean_error_mean=float(clean.mean()),
        clean_error_std=float(clean.std()),
        robust_error_mean=float(robust.mean()),
        robust_error_std=float(robust.std()),
        teacher_robust_error=float(np.mean([r['teacher_robust_error'] for r in g])),
        collapsed=int(sum(r['collapsed'] for r in g)),
        eps_reduced_mean=float(np.mean([r['eps_reduced'] for r in g])),
      )
    )
  order = {st: i for i, st in enumerate(STRATEGY_LABELS)}
  out.sort(
    key=lambda r: (
      r['fraction'] if r['strategy'] != 'none' else -1,
      order[r['strategy']],
      r['alpha'],
    )
  )
  return out


# ----------------------------------------------------------------------------------------
# Tables, plot, files.


def _cell(mean: float, std: float, collapsed: int = 0) -> str:
  mark = f' ({collapsed}c)' if collapsed else ''
  return f'{mean:.3f} ± {std:.3f}{mark}'


def format_table(summary: Sequence[dict[str, Any]], metric: str) -> str:
  """Markdown table: one row per (strategy, fraction), one column per alpha.

  Cells are 'mean ± std' over seeds of `metric` ('clean_error' or 'robust_error');
  '(kc)' marks k collapsed students (w = 0) among the seeds.
  """
  alphas = sorted({r['alpha'] for r in summary})
  keys = []
  for r in summary:
    k = (r['strategy'], r['fraction'])
    if k not in keys:
      keys.append(k)
  cells = {(r['strategy'], r['fraction'], r['alpha']): r for r in summary}
  rows = []
  for strategy, fraction in keys:
    row = [STRATEGY_LABELS[strategy], '0' if strategy == 'none' else f'{fraction:g}']
    for a in alphas:
      r = cells.get((strategy, fraction, a))
      row.append(
        _cell(r[f'{metric}_mean'], r[f'{metric}_std'], r['collapsed']) if r is not None else ''
      )
    rows.append(row)
  return tables.markdown_table(['strategy', 'dropped', *(f'α={a:g}' for a in alphas)], rows)


_COLORS = {
  'none': 'black',
  'random': 'tab:gray',
  'prune_low': 'tab:blue',
  'prune_high': 'tab:red',
  'puma': 'tab:green',
  'probe': 'tab:purple',
}


def plot(summary: Sequence[dict[str, Any]], settings: Settings, path: Path) -> None:
  """Clean (top) and robust (bottom) error versus alpha, log-log, one column per fraction.

  The dotted line in the bottom row is the teacher's own robust error, for 'l2'
  the least of any linear classifier here (the robust error falls as R rises).
  """
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fracs = sorted({r['fraction'] for r in summary if r['strategy'] != 'none'}) or [0.0]
  fig, axes = plt.subplots(
    2, len(fracs), figsize=(4.2 * len(fracs), 7.4), squeeze=False, sharex=True, sharey='row'
  )
  strategies = [st for st in _COLORS if any(r['strategy'] == st for r in summary)]
  floor = float(np.mean([r['teacher_robust_error'] for r in summary]))
  for col, frac in enumerate(fracs):
    for row, metric in enumerate(('clean_error', 'robust_error')):
      ax = axes[row, col]
      for strategy in strategies:
        pts = [
          r
          for r in summary
          if r['strategy'] == strategy and (strategy == 'none' or r['fraction'] == frac)
        ]
        if not pts:
          continue
        a = np.array([r['alpha'] for r in pts])
        m = np.array([r[f'{metric}_mean'] for r in pts])
        sd = np.array([r[f'{metric}_std'] for r in pts])
        style = '--' if strategy == 'probe' else '-'
        ax.plot(a, m, 'o' + style, color=_COLORS[strategy], label=STRATEGY_LABELS[strategy], ms=4)
        ax.fill_between(a, np.maximum(m - sd, 1e-4), m + sd, color=_COLORS[strategy], alpha=0.15)
      if metric == 'robust_error':
        ax.axhline(floor, color='k', ls=':', lw=1, label='teacher')
      ax.set_xscale('log')
      ax.set_yscale('log')
      ax.grid(True, which='both', alpha=0.3)
      if row == 0:
        ax.set_title(f'dropped fraction {frac:g}')
      else:
        ax.set_xlabel('α = kept examples per dimension (P / N)')
  axes[0, 0].set_ylabel('clean error arccos(R)/π')
  axes[1, 0].set_ylabel(f'robust error ({settings.norm}, ε={settings.eps:g})')
  handles, labels = axes[1, -1].get_legend_handles_labels()
  fig.legend(handles, labels, loc='lower center', ncol=4, fontsize=8, frameon=False)
  fig.suptitle(
    f'Perceptron teacher-student under linear adversarial training: N={settings.dim}, '
    f'probe={settings.probe}, {settings.num_seeds} seeds (mean ± std)',
    fontsize=10,
  )
  fig.tight_layout(rect=(0, 0.06, 1, 1))
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=120)
  plt.close(fig)
  artifacts.write_bytes(path, buf.getvalue())


def report(settings: Settings, summary: Sequence[dict[str, Any]], command: str) -> str:
  """The markdown report: command, settings and the two tables."""
  floor = np.mean([r['teacher_robust_error'] for r in summary])
  return '\n'.join(
    [
      '# Perceptron teacher-student: pruning under linear adversarial training',
      '',
      f'Command: `{command}`',
      '',
      'Settings: ' + ', '.join(f'{k}={v}' for k, v in settings.to_dict().items()),
      '',
      'α = examples the student trains on per dimension (the pool before pruning has '
      'α / (1 - dropped) N); mean ± std over seeds; (kc): k of the seeds collapsed to w = 0.',
      '',
      '## Clean test error arccos(R)/π',
      '',
      format_table(summary, 'clean_error'),
      '',
      f'## Robust test error ({settings.norm}, ε={settings.eps:g})',
      '',
      f'The teacher itself has robust error {floor:.3f}.',
      '',
      format_table(summary, 'robust_error'),
      '',
    ]
  )


def write_outputs(
  out: str | os.PathLike,
  settings: Settings,
  rows: Sequence[dict[str, Any]],
  *,
  command: str,
) -> str:
  """Writes trials.csv, summary.csv, table.md, errors.png and settings.json; returns table.md."""
  out = Path(out)
  summary = summarise(rows)
  text = report(settings, summary, command)
  artifacts.write_csv(out / 'trials.csv', rows)
  artifacts.write_csv(out / 'summary.csv', summary)
  artifacts.write_text(out / 'table.md', text)
  artifacts.write_text(out / 'settings.json', json.dumps(settings.to_dict(), indent=2) + '\n')
  plot(summary, settings, out / 'errors.png')
  return text


# ----------------------------------------------------------------------------------------
# Command line.


def _floats(flag: str) -> Callable[[str], tuple[float, ...]]:
  def parse(text: str) -> tuple[float, ...]:
    try:
      return tuple(float(v) for v in text.split(',') if v.strip())
    except ValueError:
      raise argparse.ArgumentTypeError(
        f'{flag} takes comma-separated numbers, e.g. {flag}=0.5,1,2; got {text!r}'
      ) from None

  return parse


def parse_args(argv: Sequence[str]) -> tuple[Settings, Path]:
  """Settings and the output folder from command-line arguments (errors name the flag)."""
  d = Settings()
  p = argparse.ArgumentParser(
    prog='python -m experiments.perceptron',
    description='Perceptron teacher-student analysis of margin-based pruning (PUMA).',
  )
  p.add_argument('--out', required=True, help='folder for the tables and the plot')
  p.add_argument('--dim', type=int, default=d.dim, help='input dimension N')
  p.add_argument(
    '--alphas', type=_floats('--alphas'), default=d.alphas, help='kept examples per dimension'
  )
  p.add_argument(
    '--fractions', type=_floats('--fractions'), default=d.fractions, help='shares dropped'
  )
  p.add_argument(
    '--strategies',
    type=lambda t: tuple(v.strip() for v in t.split(',') if v.strip()),
    default=d.strategies,
    help=f'subset of {",".join(STRATEGIES)}',
  )
  p.add_argument('--eps', type=float, default=d.eps, help='threat-model radius')
  p.add_argument('--norm', default=d.norm, help='l2 | linf')
  p.add_argument('--probe', default=d.probe, help='robust | clean | teacher')
  p.add_argument('--num_seeds', type=int, default=d.num_seeds)
  p.add_argument('--seed', type=int, default=d.seed)
  p.add_argument('--num_steps', type=int, default=d.num_steps, help='L-BFGS iterations')
  p.add_argument('--l2_reg', type=float, default=d.l2_reg)
  a = p.parse_args(argv)
  try:
    settings = Settings(
      dim=a.dim,
      alphas=a.alphas,
      fractions=a.fractions,
      strategies=a.strategies,
      eps=a.eps,
      norm=a.norm,
      probe=a.probe,
      num_seeds=a.num_seeds,
      seed=a.seed,
      num_steps=a.num_steps,
      l2_reg=a.l2_reg,
    )
  except ValueError as e:
    p.error(str(e))
  return settings, Path(a.out)


def main(argv: Sequence[str] | None = None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  settings, out = parse_args(argv)
  start = time.perf_counter()
  rows = run(settings)
  command = 'python -m experiments.perceptron ' + ' '.join(argv)
  text = write_outputs(out, settings, rows, command=command)
  print(text)
  print(
    f'wrote {out}/{{trials.csv,summary.csv,table.md,errors.png,settings.json}} '
    f'in {time.perf_counter() - start:.1f}s'
  )


if __name__ == '__main__':
  main()
