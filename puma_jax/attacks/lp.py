"""Lp-ball geometry, signed radii and per-example randomness shared by every attack.

Perturbations live in the intersection of an Lp ball around the clean input
(`'linf'` or `'l2'`) and the image box [0, 1]. Every function works on a batch
f32[B,...] and treats each example on its own.

PUMA gives every example a signed radius eps_i; `split_eps` is the one place
that says what its sign means. `TINY` is the one guard against dividing by a zero
norm.
"""

import jax
import jax.numpy as jnp

NORMS = ('linf', 'l2')
# Added to (or the floor of) a norm before dividing by it: far below any radius or
# step in [0, 1] images, so it changes no result except to keep zero vectors zero.
TINY = 1e-12


def check_norm(norm: str) -> str:
  """Returns `norm` if it is supported, else raises a ValueError naming the choices."""
  if norm not in NORMS:
    raise ValueError(f'unknown norm {norm!r}; use one of {NORMS}.')
  return norm


def lp_norm(v: jax.Array, norm: str) -> jax.Array:
  """Per-example norm of f32[B,...] over all non-batch axes, f32[B]."""
  flat = v.reshape(v.shape[0], -1).astype(jnp.float32)
  if check_norm(norm) == 'linf':
    return jnp.max(jnp.abs(flat), axis=-1)
  return jnp.sqrt(jnp.sum(flat * flat, axis=-1))


def dual_norm(v: jax.Array, norm: str) -> jax.Array:
  """Per-example dual norm of f32[B,...], f32[B]: L1 for 'linf', L2 for 'l2'.

  The linearised distance to a hyperplane w.z = b is |w.x - b| / dual_norm(w).
  """
  flat = v.reshape(v.shape[0], -1).astype(jnp.float32)
  if check_norm(norm) == 'linf':
    return jnp.sum(jnp.abs(flat), axis=-1)
  return jnp.sqrt(jnp.sum(flat * flat, axis=-1))


def expand(v: jax.Array, like: jax.Array) -> jax.Array:
  """Reshapes per-example f32[B] so it broadcasts against `like` f32[B,...]."""
  return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def normalize(v: jax.Array, norm: str) -> jax.Array:
  """v / max(||v||, TINY) per example: unit norm for any nonzero row, zero rows stay zero."""
  return v / expand(jnp.maximum(lp_norm(v, norm), TINY), v)


def steepest_ascent(g: jax.Array, norm: str) -> jax.Array:
  """The unit-norm direction of steepest ascent for gradient g f32[B,...]: sign(g) or g/||g||_2."""
  if check_norm(norm) == 'linf':
    return jnp.sign(g)
  return normalize(g, 'l2')


def batch_eps(eps: float | jax.Array, batch_size: int) -> jax.Array:
  """A scalar or per-example radius as f32[B]."""
  eps = jnp.asarray(eps, jnp.float32)
  if eps.ndim > 1 or (eps.ndim == 1 and eps.shape[0] != batch_size):
    raise ValueError(f'eps must be a scalar or f32[{batch_size}], got shape {eps.shape}.')
  return jnp.broadcast_to(eps, (batch_size,))


def split_eps(eps: jax.Array, *, helpful: bool = True) -> tuple[jax.Array, jax.Array]:
  """What a signed per-example radius means: (radius f32[B], direction f32[B]).

  * eps_i > 0: radius eps_i, direction +1: an adversarial example (raise the loss);
  * eps_i < 0: radius |eps_i|, direction -1: a helpful perturbation (lower the loss;
    PUMA gives negative radii to examples its margin model misclassifies). An
    objective with no helpful direction passes `helpful=False`: TRADES' KL term is
    minimised by x itself, so such an example gets radius 0 and direction 0;
  * eps_i = 0: radius 0, direction 0: the example stays clean, x_i exactly.

  An attack perturbs example i only where `radius_i > 0` (equivalently
  `direction_i != 0`); a loss trains example i on its clean input otherwise.

  Args:
    eps: f32[B] signed radii.
    helpful: whether a negative radius asks for a helpful perturbation (True) or
      for the clean input (False).
  """
  eps = jnp.asarray(eps, jnp.float32)
  radius, direction = jnp.abs(eps), jnp.sign(eps)
  if not helpful:
    attacked = direction > 0
    radius = jnp.where(attacked, radius, 0.0)
    direction = jnp.where(attacked, direction, 0.0)
  return radius, direction


def project(x_adv: jax.Array, x: jax.Array, eps: jax.Array, norm: str) -> jax.Array:
  """Projects onto {z : ||z - x|| <= eps} and then clips to [0, 1].

  L2 scales delta by min(1, eps / ||delta||_2), so a point inside the ball is kept
  bit for bit. Clipping after the ball projection keeps the norm bound: x is in
  [0, 1], so the clip moves no coordinate further from x.

  Args:
    x_adv: f32[B,...] points to project.
    x: f32[B,...] in [0, 1], the centres.
    eps: f32[B] radii (>= 0).
    norm: 'linf' or 'l2'.
  """
  delta = x_adv - x
  e = expand(eps, x)
  if check_norm(norm) == 'linf':
    delta = jnp.clip(delta, -e, e)
  else:
    n = expand(lp_norm(delta, 'l2'), x)
    delta = delta * jnp.minimum(1.0, e / jnp.maximum(n, TINY))
  return jnp.clip(x + delta, 0.0, 1.0)


def example_keys(rng: jax.Array, batch_size: int) -> jax.Array:
  """One typed key per example, key[B].

  `rng` is a single key (split into `batch_size` keys) or already key[B]. Drawing
  each example's randomness from its own key makes an example's attack independent
  of the batch it sits in, so sharded, chunked and single-device runs agree.
  """
  if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    raise TypeError(
      f'rng must be a typed key from jax.random.key (got dtype {rng.dtype}); '
      'wrap a raw key with jax.random.wrap_key_data.'
    )
  if rng.ndim == 0:
    return jax.random.split(rng, batch_size)
  if rng.shape != (batch_size,):
    raise ValueError(f'rng must be one key or key[{batch_size}], got key{list(rng.shape)}.')
  return rng


def fold_in_each(keys: jax.Array, data: int | jax.Array) -> jax.Array:
  """fold_in(key_i, data) for every key of key[B]."""
  return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, data)


def random_start(rng: jax.Array, x: jax.Array, radius: jax.Array, norm: str) -> jax.Array:
  """PGD's random start: a perturbation f32[B,...] (not yet clipped to the box).

  L-infinity: uniform in the ball [-radius_i, radius_i]^d. L2: a uniformly random
  direction at a length drawn uniformly in [0, radius_i]. One key `rng` draws the
  whole batch.
  """
  r = expand(radius, x)
  if check_norm(norm) == 'linf':
    return r * jax.random.uniform(rng, x.shape, jnp.float32, -1.0, 1.0)
  k_dir, k_len = jax.random.split(rng)
  d = normalize(jax.random.normal(k_dir, x.shape, jnp.float32), 'l2')
  return d * r * expand(jax.random.uniform(k_len, radius.shape), x)


def random_on_sphere(keys: jax.Array, x: jax.Array, eps: jax.Array, norm: str) -> jax.Array:
  """APGD's random start: x plus a random point of the eps-sphere, clipped to [0, 1] (f32[B,...]).

  L-infinity: a uniform direction in [-1, 1]^d scaled so its largest coordinate is
  eps; L2: a Gaussian direction of norm eps. Example i draws from keys[i] (key[B]).
  """
  shape = x.shape[1:]
  if check_norm(norm) == 'linf':
    t = jax.vmap(lambda k: jax.random.uniform(k, shape, minval=-1.0, maxval=1.0))(keys)
  else:
    t = jax.vmap(lambda k: jax.random.normal(k, shape))(keys)
  return jnp.clip(x + expand(eps, x) * normalize(t, norm), 0.0, 1.0)
