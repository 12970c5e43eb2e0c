"""Small models for the attack tests: affine classifiers and a tiny MLP trained in a second."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

IMAGE_SHAPE = (8, 8, 1)


def affine(weights: np.ndarray, bias: np.ndarray):
  """logits = flatten(x) @ weights + bias, f32[B,K]."""
  w, b = jnp.asarray(weights, jnp.float32), jnp.asarray(bias, jnp.float32)
  return lambda x: x.reshape(x.shape[0], -1) @ w + b


def synthetic_images(seed: int, n: int, num_classes: int = 10, noise: float = 0.2):
  """Images f32[n,8,8,1] in [0, 1]: a random template per class plus Gaussian noise."""
  rng = np.random.default_rng(1234)  # the templates are shared by every split
  templates = rng.uniform(0.2, 0.8, size=(num_classes,) + IMAGE_SHAPE)
  rng = np.random.default_rng(seed)
  y = rng.integers(0, num_classes, size=n)
  x = np.clip(templates[y] + noise * rng.normal(size=(n,) + IMAGE_SHAPE), 0.0, 1.0)
  return x.astype(np.float32), y.astype(np.int32)


def mlp_logits(params, x):
  h = jnp.tanh(x.reshape(x.shape[0], -1) @ params['w1'] + params['b1'])
  return h @ params['w2'] + params['b2']


@functools.cache
def trained_mlp(seed: int = 0, hidden: int = 32, num_classes: int = 10, steps: int = 300):
  """A tanh MLP trained with Adam on `synthetic_images`; returns its parameters."""
  x, y = synthetic_images(seed, 1024, num_classes)
  k1, k2 = jax.random.split(jax.random.key(seed))
  dim = int(np.prod(IMAGE_SHAPE))
  params = {
    'w1': jax.random.normal(k1, (dim, hidden)) / np.sqrt(dim),
    'b1': jnp.zeros(hidden),
    'w2': jax.random.normal(k2, (hidden, num_classes)) / np.sqrt(hidden),
    'b2': jnp.zeros(num_classes),
  }
  opt = optax.adam(1e-2)

  def loss(p):
    logits = mlp_logits(p, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def train(params):
    def step(carry, _):
      p, s = carry
      g = jax.grad(loss)(p)
      u, s = opt.update(g, s)
      return (optax.apply_updates(p, u), s), None

    return jax.lax.scan(step, (params, opt.init(params)), None, length=steps)[0][0]

  return train(params)
