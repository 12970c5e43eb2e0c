"""A seeded class-conditional image generator: the embedded stand-in for diffusion data.

PUMA's training data is real data plus many generated examples (Wang et al. 2023
use 1M-50M diffusion samples for CIFAR). To run the whole pipeline offline, this
module fits a small generative model on the embedded MNIST *train* split (never
the test split) and samples a generated set in the same .npz format as the
DM-Improves-AT files (`image` u8[N,H,W,C], `label` int64[N]).

Method (per sample of class c), all seeded:
1. Latent sampling: each class gets a PCA (mean + `num_components` directions)
   of its train images. A train code z_a of class c is interpolated with one of
   its `neighbours` nearest same-class codes z_b (z = l z_a + (1 - l) z_b,
   l ~ U(0, 1)), plus Gaussian noise of `latent_noise` times the per-direction
   spread, and decoded. Truncating to a few components and mixing neighbours
   gives new shapes, never copies.
2. Ambiguity: a fraction `ambiguous_fraction` of samples is blended with a
   decoded sample of another class (weight w ~ U(*ambiguous_weight), w < 0.5),
   keeping label c, like the off-manifold samples a diffusion model produces.
3. Stroke contrast: a sigmoid curve (`sharpen`) restores the near-binary strokes
   that the PCA reconstruction blurs.
4. Geometry: a random small rotation, scale and shift plus a smooth elastic
   displacement field (a few random low-frequency waves of `elastic_px` pixels),
   applied by bilinear resampling.
5. Pixel noise (`pixel_noise`), rounding to uint8.

Samples are produced in chunks of `CHUNK` from generators seeded by
(seed, chunk index), so the output depends only on the seed and the count.
"""

import dataclasses
import os
from pathlib import Path

import numpy as np

from puma_jax import artifacts

VERSION = 'pca_interp_elastic_v1'
CHUNK = 4096


@dataclasses.dataclass(frozen=True)
class Settings:
  """Generator hyperparameters (see the module docstring for each step)."""

  num_components: int = 24
  neighbours: int = 5
  latent_noise: float = 0.3
  ambiguous_fraction: float = 0.1
  ambiguous_weight: tuple[float, float] = (0.25, 0.45)
  sharpen: float = 6.0
  max_rotation: float = 0.15  # radians
  scale_range: tuple[float, float] = (0.92, 1.08)
  max_shift_px: float = 0.75
  elastic_px: float = 0.8
  pixel_noise: float = 0.02


@dataclasses.dataclass(frozen=True)
class _ClassModel:
  mean: np.ndarray  # f32[D]
  components: np.ndarray  # f32[k, D]
  codes: np.ndarray  # f32[n_c, k] latent codes of the train images
  spread: np.ndarray  # f32[k] std of the codes
  neighbours: np.ndarray  # i32[n_c, m] nearest other codes of the same class


class ClassConditionalGenerator:
  """Fit on real images, then sample new labelled images.

  Example:
    gen = ClassConditionalGenerator().fit(train_images, train_labels)
    images, labels = gen.sample(40_000, seed=0)
  """

  def __init__(self, settings: Settings = Settings()):
    self.settings = settings
    self._models: list[_ClassModel] = []
    self.image_shape: tuple[int, ...] = ()

  @property
  def num_classes(self) -> int:
    return len(self._models)

  def fit(self, images: np.ndarray, labels: np.ndarray) -> 'ClassConditionalGenerator':
    """Fits one PCA per class.

    Args:
      images: u8[N,H,W,C] real train images.
      labels: int[N] in [0, K); every class needs more than `num_components` images.
    """
    s = self.settings
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
      raise ValueError(f'images must be u8[N,H,W,C], got {images.dtype}{list(images.shape)}')
    self.image_shape = images.shape[1:]
    x = images.reshape(len(images), -1).astype(np.float32) / 255.0
    labels = np.asarray(labels)
    self._models = []
    for c in range(int(labels.max()) + 1):
      xc = x[labels == c]
      if len(xc) <= max(s.num_components, s.neighbours):
        raise ValueError(f'class {c} has {len(xc)} images; need more than {s.num_components}')
      mean = xc.mean(0)
      comps = _principal_directions(xc - mean, s.num_components)
      codes = (xc - mean) @ comps.T
      d2 = ((codes[:, None, :] - codes[None, :, :]) ** 2).sum(-1)
      np.fill_diagonal(d2, np.inf)
      nbrs = np.argsort(d2, axis=1)[:, : s.neighbours].astype(np.int32)
      self._models.append(_ClassModel(mean, comps, codes, codes.std(0), nbrs))
    return self

  def _decode(self, c: int, rng: np.random.Generator, m: int) -> np.ndarray:
    """f32[m, D]: m latent samples of class c, decoded to pixels (unclipped)."""
    s, cm = self.settings, self._models[c]
    a = rng.integers(0, len(cm.codes), m)
    b = cm.neighbours[a, rng.integers(0, s.neighbours, m)]
    lam = rng.uniform(0.0, 1.0, (m, 1)).astype(np.float32)
    z = lam * cm.codes[a] + (1 - lam) * cm.codes[b]
    z += s.latent_noise * cm.spread * rng.standard_normal(z.shape).astype(np.float32)
    return cm.mean + z @ cm.components

  def _sample_chunk(self, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    s = self.settings
    n, k = len(labels), self.num_classes
    h, w = self.image_shape[:2]
    x = np.empty((n, int(np.prod(self.image_shape))), np.float32)
    for c in range(k):
      idx = np.flatnonzero(labels == c)
      if len(idx):
        x[idx] = self._decode(c, rng, len(idx))
    # Ambiguous samples: blend in a sample of another class, keep the label.
    amb = np.flatnonzero(rng.random(n) < s.ambiguous_fraction)
    other = (labels[amb] + rng.integers(1, k, len(amb))) % k
    weight = rng.uniform(*s.ambiguous_weight, (len(amb), 1)).astype(np.float32)
    for c in range(k):
      sel = np.flatnonzero(other == c)
      if len(sel):
        x[amb[sel]] = (1 - weight[sel]) * x[amb[sel]] + weight[sel] * self._decode(c, rng, len(sel))
    x = np.clip(x, 0.0, 1.0)
    if s.sharpen > 0:
      lo, hi = _sigmoid(-s.sharpen * 0.5), _sigmoid(s.sharpen * 0.5)
      x = (_sigmoid(s.sharpen * (x - 0.5)) - lo) / (hi - lo)
    x = _warp(x.reshape(n, h, w, -1), rng, s)
    x += s.pixel_noise * rng.standard_normal(x.shape).astype(np.float32)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)

  def sample(self, num_examples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Samples `num_examples` images with balanced labels.

    Returns:
      images u8[N,H,W,C] and labels i64[N] (classes in a seeded random order,
      each class `num_examples // K` or one more times).
    """
    if not self._models:
      raise ValueError('call fit() before sample()')
    k = self.num_classes
    labels = np.random.default_rng([seed, 0]).permutation(np.arange(num_examples) % k)
    images = np.empty((num_examples, *self.image_shape), np.uint8)
    for i, a in enumerate(range(0, num_examples, CHUNK)):
      b = min(num_examples, a + CHUNK)
      images[a:b] = self._sample_chunk(labels[a:b], np.random.default_rng([seed, 1, i]))
    return images, labels.astype(np.int64)


def _principal_directions(x: np.ndarray, k: int) -> np.ndarray:
  """f32[k, D]: the top-k principal directions of centred rows x (f32[n, D]), unit norm.

  Uses the eigendecomposition of the smaller Gram/covariance matrix rather than an
  SVD: the same directions, and much faster with a multithreaded BLAS on a busy host.
  """
  x = x.astype(np.float64)
  if len(x) <= x.shape[1]:
    vals, vecs = np.linalg.eigh(x @ x.T)  # ascending
    vals, vecs = vals[::-1][:k], vecs[:, ::-1][:, :k]
    dirs = (vecs.T @ x) / np.sqrt(np.maximum(vals, 1e-12))[:, None]
  else:
    _, vecs = np.linalg.eigh(x.T @ x)
    dirs = vecs[:, ::-1][:, :k].T
  return np.ascontiguousarray(dirs, dtype=np.float32)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _warp(x: np.ndarray, rng: np.random.Generator, s: Settings) -> np.ndarray:
  """Random affine + smooth elastic resampling of f32[n,H,W,C] images (bilinear, zero fill)."""
  n, h, w, _ = x.shape
  gy, gx = np.meshgrid(
    np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing='ij'
  )
  cy, cx = (h - 1) / 2, (w - 1) / 2
  gy, gx = gy - cy, gx - cx

  def per_image(v):
    return v.astype(np.float32)[:, None, None]

  theta = per_image(rng.uniform(-s.max_rotation, s.max_rotation, n))
  scale = per_image(rng.uniform(*s.scale_range, n))
  ty, tx = (per_image(rng.uniform(-s.max_shift_px, s.max_shift_px, n)) for _ in range(2))
  cos, sin = np.cos(theta), np.sin(theta)
  sy = (cos * gy - sin * gx) / scale + cy + ty
  sx = (sin * gy + cos * gx) / scale + cx + tx
  # Elastic field: three random plane waves per axis with periods of ~1/2 to 1 image.
  for grid in (sy, sx):
    for _ in range(3):
      fy, fx = (per_image(rng.uniform(-2.0, 2.0, n)) * np.pi / h for _ in range(2))
      phase = per_image(rng.uniform(0, 2 * np.pi, n))
      amp = per_image(rng.normal(0, s.elastic_px / np.sqrt(3), n))
      grid += amp * np.sin(fy * gy + fx * gx + phase)
  # Bilinear taps into a zero-padded copy, so that out-of-image taps read zeros.
  sy = np.clip(sy, -1.0, h - 1e-3)
  sx = np.clip(sx, -1.0, w - 1e-3)
  y0, x0 = np.floor(sy), np.floor(sx)
  wy, wx = (sy - y0)[..., None], (sx - x0)[..., None]
  pw = w + 2
  base = ((y0.astype(np.int32) + 1) * pw + x0.astype(np.int32) + 1).reshape(n, -1)
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(n, (h + 2) * pw, -1)

  def tap(offset):
    return np.take_along_axis(padded, (base + offset)[..., None], axis=1).reshape(x.shape)

  t00, t01, t10, t11 = tap(0), tap(1), tap(pw), tap(pw + 1)
  top = t00 + wx * (t01 - t00)
  bottom = t10 + wx * (t11 - t10)
  return top + wy * (bottom - top)


def write_npz(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray) -> Path:
  """Atomically writes `image` and `label` in the DM-Improves-AT .npz format (np.savez)."""
  with artifacts.atomic_path(path) as tmp:
    np.savez(tmp, image=images, label=labels)
  return Path(path)
