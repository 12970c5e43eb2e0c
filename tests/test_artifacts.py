"""The artifacts layer: atomic writes, canonical JSON, fingerprints, settings checks, configs."""

import json
import os

import ml_collections
import numpy as np
import pytest

from puma_jax import artifacts


def test_atomic_write_leaves_no_temp_files(tmp_path):
  artifacts.write_json(tmp_path / 'a' / 'x.json', {'a': (1, 2)})
  assert json.loads((tmp_path / 'a' / 'x.json').read_text()) == {'a': [1, 2]}
  assert [p.name for p in (tmp_path / 'a').iterdir()] == ['x.json']


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
  path = tmp_path / 'x.npy'
  artifacts.save_npy(path, np.arange(3))
  with pytest.raises(RuntimeError, match='boom'):
    with artifacts.atomic_path(path) as tmp:
      tmp.write_bytes(b'partial')
      raise RuntimeError('boom')
  np.testing.assert_array_equal(np.load(path), np.arange(3))
  assert os.listdir(tmp_path) == ['x.npy']


def test_canonical_json_and_fingerprint_ignore_container_types_and_key_order():
  a = ml_collections.ConfigDict({'b': (1, 2), 'a': {'x': 1.0}})
  b = {'a': {'x': 1.0}, 'b': [1, 2]}
  assert artifacts.canonical(a) == artifacts.canonical(b)
  assert artifacts.fingerprint(a) == artifacts.fingerprint(b)
  assert artifacts.fingerprint(a) != artifacts.fingerprint({**b, 'b': [1, 3]})


def test_tree_fingerprint_sees_values_names_dtypes_and_shapes():
  tree = {'w': np.arange(6, dtype=np.float32).reshape(2, 3), 'b': np.zeros(3, np.float32)}
  fp = artifacts.tree_fingerprint(tree)
  assert fp.startswith('sha256:') and fp == artifacts.tree_fingerprint(dict(tree))
  changed = [
    {**tree, 'w': tree['w'] + np.float32(1e-6)},
    {'v': tree['w'], 'b': tree['b']},
    {**tree, 'w': tree['w'].astype(np.float64)},
    {**tree, 'w': tree['w'].reshape(3, 2)},
  ]
  assert len({fp, *(artifacts.tree_fingerprint(t) for t in changed)}) == 5


def test_check_same_names_every_difference_and_the_fix():
  artifacts.check_same({'a': (1,)}, {'a': [1]}, what='x', fix='f')  # canonical: equal
  with pytest.raises(artifacts.ConfigMismatchError) as e:
    artifacts.check_same(
      {'a': 1, 'b': {'c': 2}}, {'a': 1, 'b': {'c': 3}, 'd': 4}, what='thing', fix='Do X.'
    )
  msg = str(e.value)
  assert 'thing was made with other settings' in msg
  assert 'b.c: 2 -> 3' in msg and 'd: (absent) -> 4' in msg and msg.endswith('Do X.')
  with pytest.raises(ValueError):
    artifacts.check_same(1, 2, what='x', fix='f', error=ValueError)


def test_load_config_merges_over_the_schema_and_lists_unknown_fields(tmp_path):
  base = ml_collections.ConfigDict({'seed': 0, 'train': {'lr': 0.1, 'steps': 10}})
  artifacts.write_json(tmp_path / 'config.json', {'seed': 3, 'train': {'lr': 1}, 'old': 1})
  config, ignored = artifacts.load_config(tmp_path, base)
  assert config.seed == 3 and config.train.lr == 1.0 and isinstance(config.train.lr, float)
  assert config.train.steps == 10 and ignored == ['old']
  with pytest.raises(FileNotFoundError, match='config.json'):
    artifacts.load_config(tmp_path / 'nowhere', base)


def test_load_config_keeps_the_models_own_fields(tmp_path):
  base = ml_collections.ConfigDict({'model': {'name': 'x'}})
  saved = {'model': {'name': 'small_cnn', 'conv_channels': [8, 16]}, 'other': {'a': 1}}
  artifacts.write_json(tmp_path / 'config.json', saved)
  config, ignored = artifacts.load_config(tmp_path, base)
  assert config.model.conv_channels == (8, 16) and ignored == ['other']
  with pytest.raises(FileNotFoundError, match='config.json'):
    artifacts.load_config(tmp_path / 'nowhere', base)


def test_tree_checksums_name_the_damaged_leaves():
  tree = {'a': np.arange(4, dtype=np.float32), 'b': {'c': np.ones((2, 2), np.int32)}}
  recorded = artifacts.tree_checksums(tree)
  assert set(recorded) == {"['a']", "['b']['c']"}
  assert artifacts.damaged_leaves(recorded, artifacts.tree_checksums(tree)) == []
  tree['b']['c'][0, 1] = 7
  assert artifacts.damaged_leaves(recorded, artifacts.tree_checksums(tree)) == ["['b']['c']"]
  assert artifacts.damaged_leaves({**recorded, "['a']": None}, recorded) == []  # unverified
