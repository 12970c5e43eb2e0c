"""The grain input pipeline: batch contents, mixing, kept/eps views, sharding, resume."""

import json

import chex
import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from puma_jax.datasets import DataError, input_pipeline, testing

N_REAL, N_GEN, K = 40, 100, 10


@pytest.fixture(scope='module')
def splits(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('pipeline_data')
  real = testing.make_split(data_dir, num_examples=N_REAL, num_classes=K, num_shards=2)
  gen = testing.make_split(
    data_dir, num_examples=N_GEN, num_classes=K, num_shards=3, source='generated'
  )
  return {'real': real, 'generated': gen}


def _iterator(splits, **kwargs):
  args = dict(batch_size=20, eps=0.3, seed=0, process_index=0, process_count=1, read_threads=0)
  args.update(kwargs)
  return input_pipeline.train_iterator(splits, **args)


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_batch_contents_and_mixing_ratio(splits):
  it = _iterator(splits, batch_size=20, generated_fraction=0.7)
  for batch in _take(it, 6):
    chex.assert_shape(batch['image'], (20, 4, 4, 1))
    assert batch['image'].dtype == np.float32
    assert 0.0 <= batch['image'].min() and batch['image'].max() <= 1.0
    for key in ('label', 'index', 'source'):
      assert batch[key].dtype == np.int32, key
    assert batch['eps'].dtype == np.float32
    # Exactly round(0.7 * 20) = 14 generated rows, every batch.
    assert (batch['source'] == 1).sum() == 14
    # Each row is the example its `index` names, from the split its `source` names.
    np.testing.assert_array_equal(testing.decode_index(batch['image']), batch['index'])
    np.testing.assert_array_equal(batch['label'], batch['index'] % K)
    real = batch['source'] == 0
    assert batch['index'][real].max() < N_REAL
    np.testing.assert_allclose(batch['eps'], 0.3)


@pytest.mark.parametrize(
  'fraction, batch_size, expected', [(0.7, 128, 90), (0.5, 10, 5), (0.0, 8, 0)]
)
def test_generated_rows_are_round_fraction_times_batch(splits, fraction, batch_size, expected):
  it = _iterator(splits, batch_size=batch_size, generated_fraction=fraction)
  assert (next(it)['source'] == 1).sum() == expected


def test_each_epoch_visits_every_example_once_in_a_new_order(splits):
  # 4 real rows per batch and 40 real examples: each real epoch is exactly 10 batches.
  batches = _take(_iterator(splits, batch_size=10, generated_fraction=0.6), 30)
  per_batch = [frozenset(b['index'][b['source'] == 0].tolist()) for b in batches]
  epochs = [per_batch[e * 10 : (e + 1) * 10] for e in range(3)]
  for epoch in epochs:
    assert sorted(i for batch in epoch for i in batch) == list(range(N_REAL))
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


def test_deterministic_given_seed(splits):
  a = _take(_iterator(splits, seed=3, augment=True), 3)
  b = _take(_iterator(splits, seed=3, augment=True, read_threads=2), 3)
  c = _take(_iterator(splits, seed=4, augment=True), 3)
  chex.assert_trees_all_equal(a, b)
  assert not all(np.array_equal(x['index'], y['index']) for x, y in zip(a, c, strict=True))


def test_kept_indices_and_per_example_eps(splits):
  kept_real = np.array([3, 7, 11, 19, 23, 31])
  kept_gen = np.arange(0, N_GEN, 5)
  eps_gen = np.linspace(-0.2, 0.3, len(kept_gen)).astype(np.float32)
  it = _iterator(
    splits,
    kept={'real': kept_real, 'generated': kept_gen},
    kept_eps={'generated': eps_gen},
  )
  seen = {0: set(), 1: set()}
  for batch in _take(it, 10):
    for s in (0, 1):
      seen[s] |= set(batch['index'][batch['source'] == s].tolist())
    gen = batch['source'] == 1
    pos = np.searchsorted(kept_gen, batch['index'][gen])
    np.testing.assert_array_equal(kept_gen[pos], batch['index'][gen])
    np.testing.assert_array_equal(batch['eps'][gen], eps_gen[pos])
    np.testing.assert_allclose(batch['eps'][~gen], 0.3)  # Real: no eps array, constant.
    np.testing.assert_array_equal(testing.decode_index(batch['image']), batch['index'])
  assert seen[0] == set(kept_real.tolist())
  assert seen[1] == set(kept_gen.tolist())


def test_eps_for_whole_split_without_kept(splits):
  eps_real = np.arange(N_REAL, dtype=np.float32) / 100
  batch = next(_iterator(splits, kept_eps={'real': eps_real}))
  real = batch['source'] == 0
  np.testing.assert_allclose(batch['eps'][real], eps_real[batch['index'][real]])


@pytest.mark.parametrize(
  'kept, kept_eps, message',
  [
    ({'real': np.array([0, 40])}, {}, 'out of range'),
    ({'real': np.array([1, 1, 2])}, {}, 'duplicates'),
    ({'real': np.array([], np.int64)}, {}, 'empty'),
    ({'real': np.array([0.5, 1.5])}, {}, 'integer'),
    ({'real': np.array([1, 2, 3])}, {'real': np.zeros(2)}, 'one per kept example'),
    ({}, {'real': np.full(N_REAL, np.nan)}, 'NaN'),
    ({'other': np.array([1])}, {}, 'no split'),
  ],
)
def test_bad_views_are_refused(splits, kept, kept_eps, message):
  with pytest.raises(DataError, match=message):
    _iterator(splits, kept=kept, kept_eps=kept_eps)


def test_generated_fraction_without_generated_split_is_an_error(splits):
  with pytest.raises(DataError, match='generated_fraction'):
    _iterator({'real': splits['real']}, generated_fraction=0.7)
  batch = next(_iterator({'real': splits['real']}, generated_fraction=0.0))
  assert (batch['source'] == 0).all()


@pytest.mark.parametrize('process_count', [2, 4])
def test_processes_get_disjoint_complete_parts_of_each_global_batch(splits, process_count):
  full = _take(_iterator(splits, augment=True), 4)
  parts = [
    _take(_iterator(splits, augment=True, process_index=p, process_count=process_count), 4)
    for p in range(process_count)
  ]
  for step, global_batch in enumerate(full):
    local = [parts[p][step] for p in range(process_count)]
    assert all(len(b['index']) == 20 // process_count for b in local)
    joined = {k: np.concatenate([b[k] for b in local]) for k in global_batch}
    chex.assert_trees_all_equal(joined, global_batch)
    # Disjoint: no (source, index) pair appears in two processes' parts.
    keys = [set(zip(b['source'].tolist(), b['index'].tolist(), strict=True)) for b in local]
    assert sum(len(k) for k in keys) == len(set().union(*keys)) == 20


def test_splits_of_different_shapes_are_refused(splits, tmp_path):
  other = testing.make_split(tmp_path, num_examples=10, image_shape=(5, 5, 1), source='generated')
  with pytest.raises(DataError, match='differ in image shape'):
    _iterator({'real': splits['real'], 'generated': other})


def test_batch_size_must_divide_over_processes(splits):
  with pytest.raises(DataError, match='divisible'):
    _iterator(splits, batch_size=10, process_count=4)


@pytest.mark.parametrize('threads', [0, 2])
def test_resume_mid_epoch_equals_uninterrupted(splits, threads):
  uninterrupted = _take(_iterator(splits, augment=True, read_threads=threads), 9)
  first = _iterator(splits, augment=True, read_threads=threads)
  head = _take(first, 5)
  state = json.loads(json.dumps(first.get_state()))  # Survives a JSON round trip.
  first.close()
  resumed = _iterator(splits, augment=True, read_threads=threads)
  resumed.set_state(state)
  chex.assert_trees_all_equal(head + _take(resumed, 4), uninterrupted)
  assert resumed.get_state()['step'] == 9


def test_resume_through_an_orbax_checkpoint(splits, tmp_path):
  it = _iterator(splits, augment=True)
  _take(it, 3)
  manager = ocp.CheckpointManager(tmp_path / 'ckpt', item_names=('data_iter',))
  manager.save(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
  manager.wait_until_finished()
  expected = _take(it, 2)
  fresh = _iterator(splits, augment=True)
  manager.restore(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
  chex.assert_trees_all_equal(_take(fresh, 2), expected)
  manager.close()


def test_state_from_a_different_pipeline_is_refused(splits):
  state = _iterator(splits, seed=0).get_state()
  with pytest.raises(DataError, match='different input pipeline'):
    _iterator(splits, seed=1).set_state(state)
  with pytest.raises(DataError, match='different input pipeline'):
    _iterator(splits, kept={'real': np.arange(10)}).set_state(state)


def _naive_crop_flip(image, oy, ox, flip, pad):
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  h, w = image.shape[:2]
  out = padded[oy : oy + h, ox : ox + w]
  return out[:, ::-1] if flip else out


def test_crop_and_flip_matches_naive_implementation():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (16, 6, 5, 3), dtype=np.uint8)
  offsets = rng.integers(0, 5, (16, 2))
  flips = rng.random(16) < 0.5
  out = input_pipeline.crop_and_flip(images, offsets, flips, 2)
  for i in range(16):
    expected = _naive_crop_flip(images[i], *offsets[i], flips[i], 2)
    np.testing.assert_array_equal(out[i], expected)


def test_augmentation_changes_images_but_keeps_labels(splits):
  plain = next(_iterator(splits, augment=False))
  aug = next(_iterator(splits, augment=True, crop_padding=1))
  np.testing.assert_array_equal(plain['index'], aug['index'])
  np.testing.assert_array_equal(plain['label'], aug['label'])
  assert not np.array_equal(plain['image'], aug['image'])


@pytest.mark.parametrize('process_count', [1, 3])
def test_eval_batches_fixed_order_padded_with_mask(splits, process_count):
  split = splits['real']
  per_process = [
    list(
      input_pipeline.eval_batches(
        split,
        batch_size=9,
        process_index=p,
        process_count=process_count,
        read_threads=0,
      )
    )
    for p in range(process_count)
  ]
  assert len({len(b) for b in per_process}) == 1  # Same number of batches everywhere.
  assert len(per_process[0]) == 5  # ceil(40 / 9)
  seen = []
  for step in range(5):
    for p in range(process_count):
      b = per_process[p][step]
      assert b['mask'].dtype == bool and len(b['mask']) == 9 // process_count
      np.testing.assert_array_equal(testing.decode_index(b['image']), b['index'])
      seen.extend(b['index'][b['mask']].tolist())
  assert seen == list(range(N_REAL))  # Fixed order, each example exactly once.
  # A second pass gives the same batches.
  again = list(input_pipeline.eval_batches(split, batch_size=9, process_index=0, process_count=1))
  if process_count == 1:
    chex.assert_trees_all_equal(again, per_process[0])


def test_eval_batches_num_examples_prefix(splits):
  batches = list(
    input_pipeline.eval_batches(
      splits['real'], batch_size=8, num_examples=13, process_index=0, process_count=1
    )
  )
  assert len(batches) == 2
  assert np.concatenate([b['index'][b['mask']] for b in batches]).tolist() == list(range(13))


def test_shard_batches_cover_the_shard_in_order(splits):
  split = splits['generated']
  for shard in range(split.num_shards):
    batches = list(input_pipeline.shard_batches(split, shard, batch_size=7, read_threads=2))
    ids = np.concatenate([b['index'][b['mask']] for b in batches])
    np.testing.assert_array_equal(ids, split.shard_indices(shard))
    assert all(len(b['index']) == 7 for b in batches)
    assert (np.concatenate([b['source'] for b in batches]) == 1).all()
    for b in batches:
      np.testing.assert_array_equal(testing.decode_index(b['image']), b['index'])
