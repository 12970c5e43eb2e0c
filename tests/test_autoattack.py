"""AutoAttack standard: monotone stages, the worst case over attacks, the threat model,
determinism, and sharded / chunked / padded runs equal to one device."""

import functools
import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attack_models import mlp_logits, synthetic_images, trained_mlp

from puma_jax import parallel
from puma_jax.attacks import autoattack, lp

EPS = {'linf': 0.12, 'l2': 0.8}  # the tiny MLP is robust on about half the examples


@pytest.fixture(scope='module')
def data():
  x, y = synthetic_images(7, 32)
  y[[3, 17]] = (y[[3, 17]] + 1) % 10  # two misclassified inputs
  return functools.partial(mlp_logits, trained_mlp()), jnp.asarray(x), jnp.asarray(y)


@functools.cache
def _runner(logits_fn, norm, **kwargs):
  """The jitted run_standard; cached so that tests with equal settings share one compile."""
  return jax.jit(
    functools.partial(autoattack.run_standard, logits_fn, norm=norm, eps=EPS[norm], **kwargs)
  )


@pytest.fixture(scope='module', params=['linf', 'l2'])
def standard(request, data):
  """AutoAttack standard with its default budgets on the 32 examples."""
  logits_fn, x, y = data
  norm = request.param
  run = _runner(logits_fn, norm)
  return norm, run, run(jax.random.key(0), x, y)


def test_defaults_are_autoattack_standard():
  params = inspect.signature(autoattack.run_standard).parameters
  assert params['attacks'].default == ('apgd-ce', 'apgd-t', 'fab-t', 'square')
  budgets = {k: params[k].default for k in ('apgd_steps', 'fab_steps', 'num_targets')}
  assert budgets == {'apgd_steps': 100, 'fab_steps': 100, 'num_targets': 9}
  assert params['square_queries'].default == 5000
  assert autoattack.stage_names() == ('clean', 'apgd-ce', 'apgd-t', 'fab-t', 'square')


def test_stages_never_increase_robust_accuracy(standard, data):
  norm, _, res = standard
  logits_fn, x, y = data
  robust = np.asarray(res.robust)
  assert robust.shape == (32, 5)
  np.testing.assert_array_equal(robust[:, 0], np.asarray(jnp.argmax(logits_fn(x), -1) == y))
  assert not robust[3, 0] and not robust[17, 0]
  # Once broken, broken for good; counts and accuracies follow the flags.
  assert np.all(robust[:, 1:] <= robust[:, :-1])
  np.testing.assert_array_equal(res.num_robust, robust.sum(axis=0))
  assert np.all(np.diff(np.asarray(res.num_robust)) <= 0)
  np.testing.assert_allclose(res.accuracy, robust.mean(axis=0))
  assert int(res.num_examples) == 32
  # The radius is chosen so that the attacks have work to do and leave some robust.
  assert res.num_robust[1] < res.num_robust[0] and res.num_robust[-1] > 0


def test_adversarial_examples_respect_the_threat_model(standard, data):
  norm, _, res = standard
  logits_fn, x, y = data
  final = np.asarray(res.robust[:, -1])
  clean = np.asarray(res.robust[:, 0])
  assert float(jnp.max(lp.lp_norm(res.x_adv - x, norm))) <= EPS[norm] + 1e-6
  assert float(jnp.min(res.x_adv)) >= 0.0 and float(jnp.max(res.x_adv)) <= 1.0
  wrong = np.asarray(jnp.argmax(logits_fn(res.x_adv), -1) != y)
  np.testing.assert_array_equal(wrong, ~final)  # the worst case is misclassified iff broken
  # Robust and clean-misclassified examples keep their input.
  keep = final | ~clean
  chex.assert_trees_all_equal(res.x_adv[keep], x[keep])
  assert not np.array_equal(np.asarray(res.x_adv[~keep]), np.asarray(x[~keep]))


def test_worst_case_is_the_minimum_over_attacks(data):
  """Each attack alone (same seed) breaks a superset of what it breaks in the sequence.

  Every example draws its randomness from its own key and stream per attack, so the
  final robust flag is exactly clean AND (not broken by attack a alone) for all a.
  """
  logits_fn, x, y = data
  rng = jax.random.key(0)
  full = _runner(logits_fn, 'linf')(rng, x, y)
  alone = [_runner(logits_fn, 'linf', attacks=(a,))(rng, x, y) for a in autoattack.STANDARD]
  expected = np.asarray(full.robust[:, 0])
  for a, res in zip(autoattack.STANDARD, alone, strict=True):
    np.testing.assert_array_equal(res.robust[:, 0], full.robust[:, 0])
    expected = expected & np.asarray(res.robust[:, 1])
    if a != 'apgd-ce':
      # Each later attack alone breaks something on this model, so the test has teeth.
      assert int(res.num_robust[1]) < int(res.num_robust[0]), a
  np.testing.assert_array_equal(full.robust[:, -1], expected)


def test_deterministic_given_the_seed(standard, data):
  norm, run, res = standard
  _, x, y = data
  chex.assert_trees_all_equal(res, run(jax.random.key(0), x, y))
  other = run(jax.random.key(1), x, y)
  assert not np.array_equal(np.asarray(other.x_adv), np.asarray(res.x_adv))


def test_sharded_chunked_and_padded_equal_one_device(data):
  """4 devices each stopping on their own, 3-row chunks and padding rows change nothing."""
  logits_fn, x, y = data
  rng = jax.random.key(0)
  single = _runner(logits_fn, 'linf')(rng, x, y)
  mesh = parallel.make_mesh()
  assert parallel.num_devices(mesh) == 4
  map_fn = functools.partial(parallel.per_device, mesh=mesh, num_batched_args=4)
  mask = jnp.arange(32) < 28  # the last four rows are padding
  keys = jax.random.split(rng, 32)
  sharded = _runner(logits_fn, 'linf', chunk_size=3, map_fn=map_fn)(keys, x, y, mask=mask)
  np.testing.assert_array_equal(sharded.robust[:28], single.robust[:28])
  assert not np.any(sharded.robust[28:])
  np.testing.assert_array_equal(sharded.num_robust, np.asarray(single.robust[:28]).sum(0))
  assert int(sharded.num_examples) == 28
  np.testing.assert_allclose(sharded.x_adv[:28], single.x_adv[:28], atol=1e-6)
  chex.assert_trees_all_equal(sharded.x_adv[28:], x[28:])


def test_bad_inputs_are_named(data):
  logits_fn, x, y = data
  rng = jax.random.key(0)
  with pytest.raises(ValueError, match="must be distinct names from .*'apgd-ce'"):
    autoattack.run_standard(logits_fn, rng, x, y, norm='linf', eps=0.1, attacks=('fab',))
  with pytest.raises(ValueError, match='eps must be positive'):
    autoattack.run_standard(logits_fn, rng, x, y, norm='linf', eps=0.0)
  with pytest.raises(ValueError, match="unknown norm 'L2'"):
    autoattack.run_standard(logits_fn, rng, x, y, norm='L2', eps=0.5)
