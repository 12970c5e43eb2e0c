"""The evaluator: weights are arguments of its programs, exact counts, the keys of its attacks."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from puma_jax import datasets, evaluator, model_io, parallel, steps
from puma_jax.datasets import input_pipeline

SETTINGS = evaluator.Settings(
  norm='linf',
  eps=0.1,
  pgd_steps=2,
  step_size=0.25,
  autoattack=True,
  autoattack_budgets=(
    ('apgd_steps', 2),
    ('fab_steps', 2),
    ('num_targets', 2),
    ('square_queries', 5),
  ),
  chunk_size=2,
)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  config = default.get_config('tiny')
  prepared = datasets.prepare(config.data, tmp_path_factory.mktemp('data'))
  model = model_io.create_model(config.model)
  init = lambda seed: model.init(jax.random.key(seed), np.zeros((1, 28, 28, 1), np.float32))
  mesh = parallel.make_mesh()
  (local,) = list(input_pipeline.eval_batches(prepared.real_test, batch_size=16, num_examples=14))
  batch = parallel.shard_batch(
    input_pipeline.device_fields(local, input_pipeline.EVAL_FIELDS), mesh
  )
  return model, init, mesh, batch, prepared.real_test


def _weight_constants(text: str, variables) -> list[str]:
  """Constants in a lowered program with the shape of a weight matrix or kernel."""
  shapes = {'x'.join(map(str, v.shape)) for v in jax.tree.leaves(variables) if v.ndim > 1}
  found = re.findall(r'stablehlo\.constant dense<[^>]*> : tensor<([0-9x]+)xf32>', text)
  return [s for s in found if s in shapes]


def test_programs_take_the_weights_as_arguments(setup):
  model, init, mesh, batch, _ = setup
  variables = init(0)
  ev = evaluator.Evaluator(model, SETTINGS, mesh)
  rng = jax.random.key(0)
  pgd = ev.pgd.lower(variables, batch, rng).as_text()
  aa = ev.autoattack.lower(variables, rng, batch, batch['mask']).as_text()
  assert _weight_constants(pgd, variables) == [] and _weight_constants(aa, variables) == []
  # The check sees weights captured by a closure.
  closed = jax.jit(lambda b: model.apply(variables, b['image'], train=False))
  assert _weight_constants(closed.lower(batch).as_text(), variables)


def test_other_weights_reuse_the_compiled_programs(setup):
  model, init, mesh, batch, _ = setup
  ev = evaluator.Evaluator(model, SETTINGS, mesh)
  rng, aa_rng = jax.random.key(1), jax.random.key(2)
  a, b = init(0), init(1)
  flags_a = np.asarray(ev.flags(a, batch, rng, aa_rng))
  flags_b = np.asarray(ev.flags(b, batch, rng, aa_rng))
  assert ev.pgd._cache_size() == 1 and ev.autoattack._cache_size() == 1
  fresh = evaluator.Evaluator(model, SETTINGS, mesh)
  np.testing.assert_array_equal(flags_b, np.asarray(fresh.flags(b, batch, rng, aa_rng)))
  np.testing.assert_array_equal(flags_a, np.asarray(fresh.flags(a, batch, rng, aa_rng)))
  assert not np.array_equal(flags_a, flags_b)  # the two models differ on this batch
  assert flags_a.shape == (16, len(SETTINGS.stages)) and not flags_a[14:].any()  # padding rows
  assert evaluator.get(model, SETTINGS, mesh) is evaluator.get(model, SETTINGS, mesh)


def test_accuracy_counts_each_example_once(setup):
  model, init, mesh, _, split = setup
  variables = init(0)
  settings = evaluator.Settings(norm='linf', eps=0.0, pgd_steps=2, step_size=0.25)
  ev = evaluator.Evaluator(model, settings, mesh)
  # 3 batches of 8, the last with 4 rows of padding; eps=0 leaves the inputs alone.
  result = ev.accuracy(variables, split, batch_size=8, num_examples=20, rng=jax.random.key(0))
  images, labels = input_pipeline.read_examples(split, np.arange(20))
  logits = model.apply(variables, images.astype(np.float32) / 255.0, train=False)
  expected = float(np.mean(np.argmax(logits, -1) == labels))
  assert result['num_examples'] == 20
  assert result['clean'] == result['pgd_ce'] == result['pgd_cw'] == pytest.approx(expected)
  assert 0.0 < expected < 1.0


def test_attack_keys():
  rng = jax.random.key(3)
  one = evaluator.attack_keys(rng, 1)
  assert one.shape == (1,) and jnp.array_equal(
    jax.random.key_data(one[0]), jax.random.key_data(rng)
  )
  two = evaluator.attack_keys(rng, 2)
  for j in range(2):
    expected = jax.random.key_data(jax.random.fold_in(rng, j))
    assert jnp.array_equal(jax.random.key_data(two[j]), expected)


def test_unknown_settings_are_refused():
  with pytest.raises(ValueError, match='pgd_l1'):
    evaluator.Settings(norm='linf', eps=0.1, pgd_steps=1, step_size=0.1, pgd_attacks=('pgd_l1',))
  with pytest.raises(ValueError, match='fab_restarts'):
    evaluator.Settings(
      norm='linf', eps=0.1, pgd_steps=1, step_size=0.1, autoattack_budgets=(('fab_restarts', 1),)
    )


def test_eval_step_sums_the_flags_of_its_batch(setup):
  model, init, _, batch, _ = setup
  variables, rng = init(0), jax.random.key(4)
  kw = dict(model=model, norm='linf', eps=0.3, num_steps=3, step_size=0.25)
  sums = steps.eval_step(variables, batch, rng, **kw)
  flags = np.asarray(steps.eval_flags(variables, batch, rng[None], pgd_attacks=('pgd_ce',), **kw))
  assert float(sums['count']) == 14 and not flags[14:].any()
  assert float(sums['clean_correct']) == flags[:, 0].sum() > flags[:, 1].sum()
  assert float(sums['pgd_correct']) == flags[:, 1].sum()
