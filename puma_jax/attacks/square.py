"""Square Attack (Andriushchenko, Croce, Flammarion and Hein 2020), L-infinity and L2.

A score-based random search: each query changes one random square window of the
image and keeps the change if it lowers the margin z_y - max_{k != y} z_k (AutoAttack
runs the untargeted margin loss with 5,000 queries and p_init = 0.8). The window side
is round(sqrt(p h w)) with p halved at queries 10, 50, 200, 500, 1000, 2000, 4000,
6000 and 8000.

- L-infinity: the start has vertical stripes of +-eps; a query sets one window of each
  channel to +-eps (one random sign per channel).
- L2: the start is a grid of the "concentric rectangles" pattern; a query moves the
  mass of a second window into the first, adds the pattern with a random sign per
  channel, and rescales so the total norm is eps.

Each example draws its windows and signs from its own key (per example, as in the
paper), so results do not depend on the batch. An example stops once it is
misclassified; the loop ends when every active example is broken or the budget is
spent.
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from puma_jax.attacks import losses, lp

# Queries after which p is halved (AutoAttack runs the schedule without rescaling).
_P_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


class SquareResult(NamedTuple):
  """Per-example outcome of `square`.

  Attributes:
    x_adv: f32[B,...] the lowest-margin point found (the input for inactive examples).
    success: bool[B] the point is misclassified (margin <= 0).
    margin: f32[B] z_y - max_{k != y} z_k there.
    queries: i32[B] model queries spent on the example.
  """

  x_adv: jax.Array
  success: jax.Array
  margin: jax.Array
  queries: jax.Array


def window_sides(num_queries: int, p_init: float, height: int, width: int, norm: str) -> np.ndarray:
  """The side of the square changed at each query, i32[num_queries] (a static table)."""
  sides = np.empty(num_queries, np.int32)
  for i in range(num_queries):
    p = p_init / 2 ** sum(i > t for t in _P_HALVINGS)
    s = int(round(math.sqrt(p * height * width)))
    if norm == 'linf':
      s = max(s, 1)
    else:
      s = max(s, 3)
      s += 1 - s % 2  # odd, so the pattern has a centre
    sides[i] = min(s, height, width)
  return sides


def _margin(logits_fn: Callable[[jax.Array], jax.Array], z: jax.Array, y: jax.Array) -> jax.Array:
  return -losses.cw_loss(logits_fn(z), y)


def _window(height: int, width: int, top: jax.Array, left: jax.Array, side: jax.Array):
  """bool[B,H,W] masks of the windows and the local coordinates i32[B,H,W] inside them."""
  rows = jnp.arange(height)[None, :, None] - top[:, None, None]
  cols = jnp.arange(width)[None, None, :] - left[:, None, None]
  side = side[:, None, None]
  inside = (rows >= 0) & (rows < side) & (cols >= 0) & (cols < side)
  return inside, jnp.broadcast_to(rows, inside.shape), jnp.broadcast_to(cols, inside.shape)


def _rectangles(i: jax.Array, j: jax.Array, nrows: jax.Array, ncols: jax.Array, table: jax.Array):
  """The concentric-rectangles pattern of an nrows x ncols block at (i, j), unnormalised.

  Rectangle c (c = 0, 1, ...) around the centre (nrows // 2, ncols // 2) adds
  1 / (c + 1)^2, so entry (i, j) holds sum over c from max(|i - ci|, |j - cj|) to
  max(ci, cj) of 1 / (c + 1)^2, read from the prefix sums in `table`.
  """
  ci, cj = nrows // 2, ncols // 2
  first = jnp.maximum(jnp.abs(i - ci), jnp.abs(j - cj))
  return table[jnp.maximum(ci, cj) + 1] - table[first]


def _pattern(inside, i, j, side, flip):
  """L2 Square's eta(s) at each window, f32[B,H,W], unit L2 norm over the window.

  The top half of the window is one rectangles pattern, the bottom half minus another,
  each of unit norm; `flip` (bool[B]) transposes the window.
  """
  size = max(inside.shape[1:]) + 2
  table = jnp.asarray(np.r_[0.0, np.cumsum(1.0 / np.arange(1, size) ** 2)], jnp.float32)
  i, j = jnp.where(flip[:, None, None], j, i), jnp.where(flip[:, None, None], i, j)
  half = (side // 2)[:, None, None]
  full = side[:, None, None]
  top = inside & (i < half)
  bottom = inside & (i >= half)
  up = jnp.where(top, _rectangles(i, j, half, full, table), 0.0)
  down = jnp.where(bottom, _rectangles(i - half, j, full - half, full, table), 0.0)
  up = up / (jnp.sqrt(jnp.sum(up * up, axis=(1, 2), keepdims=True)) + lp.TINY)
  down = down / (jnp.sqrt(jnp.sum(down * down, axis=(1, 2), keepdims=True)) + lp.TINY)
  eta = up - down
  return eta / (jnp.sqrt(jnp.sum(eta * eta, axis=(1, 2), keepdims=True)) + lp.TINY)


def _channel_norms(v: jax.Array) -> jax.Array:
  """L2 norm of each channel over the spatial axes, f32[B,1,1,C]."""
  return jnp.sqrt(jnp.sum(v * v, axis=(1, 2), keepdims=True))


def _signs(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  return jnp.where(jax.random.bernoulli(key, 0.5, shape), 1.0, -1.0)


def square(
  logits_fn: Callable[[jax.Array], jax.Array],
  rng: jax.Array,
  x: jax.Array,
  y: jax.Array,
  eps: float | jax.Array,
  *,
  norm: str,
  num_queries: int = 5000,
  p_init: float = 0.8,
  active: jax.Array | None = None,
) -> SquareResult:
  """Square Attack with the margin loss, untargeted.

  Args:
    logits_fn: f32[B,H,W,C] -> f32[B,K], per-example independent.
    rng: a typed key, or key[B] with one key per example.
    x: f32[B,H,W,C] in [0, 1] (L2 needs H, W >= 5).
    y: i32[B] labels.
    eps: the radius, a scalar or f32[B].
    norm: 'linf' or 'l2'.
    num_queries: iterations after the start (one forward pass each).
    p_init: the initial fraction of pixels in a window.
    active: bool[B]; inactive examples are not attacked (default: all).

  Returns:
    A `SquareResult`.
  """
  lp.check_norm(norm)
  if x.ndim != 4:
    raise ValueError(f'square needs images f32[B,H,W,C], got shape {x.shape}.')
  batch, height, width, channels = x.shape
  if norm == 'l2' and min(height, width) < 5:
    raise ValueError(f'L2 square needs images of at least 5x5 pixels, got {height}x{width}.')
  x = x.astype(jnp.float32)
  eps = lp.batch_eps(eps, batch)
  e = lp.expand(eps, x)
  active = jnp.ones((batch,), bool) if active is None else active.astype(bool)
  keys = lp.example_keys(rng, batch)
  sides = jnp.asarray(window_sides(max(num_queries, 1), p_init, height, width, norm))

  init_keys, query_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
  if norm == 'linf':
    stripes = jax.vmap(lambda k: _signs(k, (1, width, channels)))(init_keys)
    x_start = jnp.clip(x + e * stripes, 0.0, 1.0)
  else:
    x_start = jnp.clip(x + e * lp.normalize(_l2_start(init_keys, x), 'l2'), 0.0, 1.0)
  x_start = jnp.where(lp.expand(active, x), x_start, x)

  def live(s):
    return active & (s['margin'] > 0)

  def cond(s):
    return (s['n'] <= num_queries) & jnp.any(live(s))

  # Each iteration evaluates one point (the start, then query n) and proposes the next,
  # so the compiled loop holds a single copy of the model.
  def body(s):
    upd = live(s)
    margin = _margin(logits_fn, s['z'], y)
    improved = upd & (margin < s['margin'])
    x_best = jnp.where(lp.expand(improved, x), s['z'], s['x_best'])
    margin = jnp.where(improved, margin, s['margin'])

    query = jnp.minimum(s['n'], max(num_queries - 1, 0))
    side = sides[query]
    # All random numbers of a query from one draw of bits per example: two corners,
    # a transposition and a sign per channel (the modulo bias is below 1e-7).
    bits = jax.vmap(lambda kk: jax.random.bits(kk, (5 + channels,)))(
      lp.fold_in_each(query_keys, query)
    )
    span_h = (height - side + 1).astype(jnp.uint32)
    span_w = (width - side + 1).astype(jnp.uint32)
    top, left = (bits[:, 0] % span_h).astype(jnp.int32), (bits[:, 1] % span_w).astype(jnp.int32)
    top2, left2 = (bits[:, 2] % span_h).astype(jnp.int32), (bits[:, 3] % span_w).astype(jnp.int32)
    flip = (bits[:, 4] & 1) == 1
    signs = jnp.where((bits[:, 5:] & 1) == 1, 1.0, -1.0)[:, None, None, :]
    x_new = propose(
      x,
      x_best,
      eps,
      norm=norm,
      side=jnp.broadcast_to(side, (batch,)),
      corners=(top, left, top2, left2),
      flip=flip,
      signs=signs,
    )
    return dict(
      n=s['n'] + 1,
      z=jnp.where(lp.expand(upd, x), x_new, s['z']),
      x_best=x_best,
      margin=margin,
      queries=s['queries'] + upd,
    )

  state = dict(
    n=jnp.zeros((), jnp.int32),
    z=x_start,
    x_best=x_start,
    margin=jnp.full((batch,), jnp.inf),
    queries=jnp.zeros((batch,), jnp.int32),
  )
  s = jax.lax.while_loop(cond, body, state)
  return SquareResult(
    x_adv=s['x_best'],
    success=active & (s['margin'] <= 0),
    margin=s['margin'],
    queries=s['queries'],
  )


def eta_pattern(side: int) -> np.ndarray:
  """L2 Square's eta(s), f64[s, s] of unit L2 norm, built rectangle by rectangle.

  The top s // 2 rows hold the concentric-rectangles pattern of that block, the
  bottom rows minus the pattern of theirs, each half of unit norm before the whole is
  normalised. The reference for the traced version used inside the attack.
  """

  def rectangles(nrows, ncols):
    out = np.zeros((nrows, ncols))
    ci, cj = nrows // 2, ncols // 2
    for c in range(max(ci, cj) + 1):
      out[max(ci - c, 0) : ci + c + 1, max(cj - c, 0) : cj + c + 1] += 1.0 / (c + 1) ** 2
    norm = np.sqrt(np.sum(out**2))
    return out / norm if norm > 0 else out

  eta = np.concatenate([rectangles(side // 2, side), -rectangles(side - side // 2, side)])
  return eta / np.sqrt(np.sum(eta**2))


def propose(
  x: jax.Array,
  x_best: jax.Array,
  eps: jax.Array,
  *,
  norm: str,
  side: jax.Array,
  corners: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
  flip: jax.Array,
  signs: jax.Array,
) -> jax.Array:
  """One Square query: the candidate built from the current best point, f32[B,H,W,C].

  Args:
    x: f32[B,H,W,C] clean images.
    x_best: f32[B,H,W,C] the current best points.
    eps: f32[B] radii.
    norm: 'linf' or 'l2'.
    side: i32[B] the window side.
    corners: i32[B] top and left of the window, then of the second window (L2 only).
    flip: bool[B] transpose the L2 pattern.
    signs: f32[B,1,1,C] +-1 per channel.
  """
  batch, height, width, channels = x.shape
  e = lp.expand(eps, x)
  top, left, top2, left2 = corners
  inside, i, j = _window(height, width, top, left, side)
  if norm == 'linf':
    return jnp.clip(jnp.where(inside[..., None], x + e * signs, x_best), 0.0, 1.0)
  eta = _pattern(inside, i, j, side, flip)[..., None]
  inside = inside[..., None]
  inside2 = _window(height, width, top2, left2, side)[0][..., None]
  delta = x_best - x
  total = lp.expand(lp.lp_norm(delta, 'l2'), x)
  old = jnp.where(inside, delta, 0.0)
  new = eta * signs + old / (_channel_norms(old) + lp.TINY)
  # The window takes its own and the second window's mass plus an equal share of what
  # is left of the budget eps^2 - |delta|^2; the second window is emptied.
  budget = jnp.maximum(e * e - total * total, 0.0) / channels
  mass = _channel_norms(jnp.where(inside | inside2, delta, 0.0)) ** 2
  new = new / (_channel_norms(jnp.where(inside, new, 0.0)) + lp.TINY) * jnp.sqrt(budget + mass)
  delta = jnp.where(inside, new, jnp.where(inside2, 0.0, delta))
  return jnp.clip(x + e * lp.normalize(delta, 'l2'), 0.0, 1.0)


def _l2_start(keys: jax.Array, x: jax.Array) -> jax.Array:
  """The L2 start: a grid of (h // 5)-pixel eta patterns with random signs, f32[B,H,W,C].

  Each window has its own random transposition of the pattern and its own sign per
  channel.
  """
  batch, height, width, channels = x.shape
  side = height // 5
  offset = (height - 5 * side) // 2
  grid_rows, grid_cols = height // side, width // side
  # Static maps: the grid window of every pixel (-1 outside the grid) and its pattern.
  window = np.full((height, width), -1)
  pattern = np.zeros((2, height, width))
  eta = eta_pattern(side)
  for a in range(grid_rows):
    for b in range(grid_cols):
      r0, c0 = offset + a * side, offset + b * side
      rows = slice(r0, min(r0 + side, height))
      cols = slice(c0, min(c0 + side, width))
      window[rows, cols] = a * grid_cols + b
      nr, nc = rows.stop - r0, cols.stop - c0
      pattern[0, rows, cols] = eta[:nr, :nc]
      pattern[1, rows, cols] = eta.T[:nr, :nc]
  num_windows = grid_rows * grid_cols
  k = jax.vmap(lambda kk: jax.random.split(kk))(keys)
  flip = jax.vmap(lambda kk: jax.random.bernoulli(kk, 0.5, (num_windows,)))(k[:, 0])
  signs = jax.vmap(lambda kk: _signs(kk, (num_windows, channels)))(k[:, 1])
  where = jnp.asarray(np.maximum(window, 0))
  on_grid = jnp.asarray(window >= 0)[None, :, :, None]
  pattern = jnp.asarray(pattern, jnp.float32)
  values = jnp.where(flip[:, where], pattern[1][None], pattern[0][None])
  return jnp.where(on_grid, values[..., None] * signs[:, where], 0.0)
