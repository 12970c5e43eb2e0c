"""Lp-ball geometry and per-example randomness shared by the AutoAttack attacks.

Perturbations live in the intersection of an Lp ball around the clean input
(`'linf'` or `'l2'`) and the image box [0, 1]. Every function works on a batch
f32[B,...] and treats each example on its own.
"""

import jax
import jax.numpy as jnp

NORMS = ('linf', 'l2')


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


def expand(v: jax.Array, like: jax.Array) -> jax.Array:
  """Reshapes per-example f32[B] so it broadcasts against `like` f32[B,...]."""
  return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def normalize(v: jax.Array, norm: str) -> jax.Array:
  """v / (||v|| + 1e-12) per example; zero rows stay zero."""
  return v / expand(lp_norm(v, norm) + 1e-12, v)


def batch_eps(eps: float | jax.Array, batch_size: int) -> jax.Array:
  """A scalar or per-example radius as f32[B]."""
  eps = jnp.asarray(eps, jnp.float32)
  if eps.ndim > 1 or (eps.ndim == 1 and eps.shape[0] != batch_size):
    raise ValueError(f'eps must be a scalar or f32[{batch_size}], got shape {eps.shape}.')
  return jnp.broadcast_to(eps, (batch_size,))


def project(x_adv: jax.Array, x: jax.Array, eps: jax.Array, norm: str) -> jax.Array:
  """Projects onto {z : ||z - x|| <= eps} and then clips to [0, 1].

  Clipping after the ball projection keeps the norm bound: x is in [0, 1], so the
  clip moves no coordinate further from x.

  Args:
    x_adv: f32[B,...] points to project.
    x: f32[B,...] in [0, 1], the centres.
    eps: f32[B] radii.
    norm: 'linf' or 'l2'.
  """
  delta = x_adv - x
  if check_norm(norm) == 'linf':
    e = expand(eps, x)
    delta = jnp.clip(delta, -e, e)
  else:
    n = lp_norm(delta, 'l2')
    delta = delta * expand(jnp.minimum(eps, n) / (n + 1e-12), x)
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


def random_in_ball(keys: jax.Array, x: jax.Array, eps: jax.Array, norm: str) -> jax.Array:
  """A random start on the sphere of radius eps around x, clipped to [0, 1] (f32[B,...]).

  L-infinity: a uniform direction in [-1, 1]^d scaled so its largest coordinate is
  eps; L2: a Gaussian direction of norm eps (the starting points of APGD).
  """
  shape = x.shape[1:]
  if check_norm(norm) == 'linf':
    t = jax.vmap(lambda k: jax.random.uniform(k, shape, minval=-1.0, maxval=1.0))(keys)
  else:
    t = jax.vmap(lambda k: jax.random.normal(k, shape))(keys)
  return jnp.clip(x + expand(eps, x) * normalize(t, norm), 0.0, 1.0)
