"""The embedded generator: new (not copied) samples, class-conditional but imperfect, seeded."""

import numpy as np
import pytest

from puma_jax.datasets import generator, mnist, npz, sources

NUM = 2000


@pytest.fixture(scope='module')
def train():
  images, labels, _ = mnist.split_arrays('train')
  return images, labels


@pytest.fixture(scope='module')
def fitted(train):
  return sources.fitted_generator()


@pytest.fixture(scope='module')
def samples(fitted):
  return fitted.sample(NUM, seed=0)


def _flat(images):
  return images.reshape(len(images), -1).astype(np.float32) / 255.0


def _nearest(a, b):
  """Distance (L2, pixels in [0, 1]) and index of each row of `a`'s nearest row of `b`."""
  d2 = (a**2).sum(1)[:, None] + (b**2).sum(1)[None] - 2 * a @ b.T
  return np.sqrt(np.maximum(d2.min(1), 0)), d2.argmin(1)


def _ridge_classifier(x, y, num_classes=10, lam=10.0):
  a = np.c_[x, np.ones(len(x))]
  w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ np.eye(num_classes)[y])
  return lambda z: np.argmax(np.c_[z, np.ones(len(z))] @ w, 1)


def test_format_is_dm_improves_at(samples):
  images, labels = samples
  assert images.dtype == np.uint8 and images.shape == (NUM, 28, 28, 1)
  assert labels.dtype == np.int64 and labels.shape == (NUM,)
  np.testing.assert_array_equal(np.bincount(labels), [NUM // 10] * 10)  # Balanced classes.


def test_samples_are_not_copies_or_flips_of_train_images(train, samples):
  x_train = train[0]
  images, _ = samples
  banned = set()
  for im in x_train:
    banned |= {im.tobytes(), im[:, ::-1].tobytes(), im[::-1].tobytes()}
  assert not any(im.tobytes() in banned for im in images)
  dist, _ = _nearest(_flat(images), _flat(x_train))
  flipped, _ = _nearest(_flat(images), _flat(x_train[:, :, ::-1]))
  # Clearly > 0 for every sample: far more than changing a handful of pixels.
  assert dist.min() > 1.0 and flipped.min() > 1.0, (dist.min(), flipped.min())
  # Typical distances are those between distinct real digits (real test vs train).
  test_dist, _ = _nearest(_flat(mnist.split_arrays('test')[0]), _flat(x_train))
  assert 0.5 < np.median(dist) / np.median(test_dist) < 2.0


def test_class_conditional_but_imperfect(train, samples):
  images, labels = samples
  classify = _ridge_classifier(_flat(train[0]), train[1])
  x_test, y_test, _ = mnist.split_arrays('test')
  real_accuracy = (classify(_flat(x_test)) == y_test).mean()
  agreement = (classify(_flat(images)) == labels).mean()
  _, nn = _nearest(_flat(images), _flat(train[0]))
  nn_agreement = (train[1][nn] == labels).mean()
  # Most samples look like their label to classifiers fitted on real data, but not all.
  assert real_accuracy > 0.8
  assert 0.6 < agreement < 0.97, agreement
  assert 0.8 < nn_agreement < 0.99, nn_agreement
  for c in range(10):
    assert (classify(_flat(images[labels == c])) == c).mean() > 0.3, c


def test_deterministic_given_the_seed(fitted, samples):
  again = generator.ClassConditionalGenerator().fit(*mnist.split_arrays('train')[:2])
  a_images, a_labels = again.sample(NUM, seed=0)
  np.testing.assert_array_equal(a_images, samples[0])
  np.testing.assert_array_equal(a_labels, samples[1])
  b_images, _ = fitted.sample(NUM, seed=1)
  assert (b_images != samples[0]).any(axis=(1, 2, 3)).mean() > 0.99


def test_fitted_on_the_train_split_only(tmp_path, monkeypatch):
  real_split_arrays = mnist.split_arrays

  def train_only(split):
    assert split == 'train', f'the generator read the {split} split'
    return real_split_arrays(split)

  monkeypatch.setattr(mnist, 'split_arrays', train_only)
  sources.fitted_generator.cache_clear()  # Fit again, under the watch of `train_only`.
  path = sources.write_embedded_generated(tmp_path / 'g.npz', seed=0, num_examples=50)
  members = npz.inspect(path)
  assert set(members) == {'image', 'label'}
  assert members['image'].dtype == np.uint8 and members['image'].shape == (50, 28, 28, 1)
