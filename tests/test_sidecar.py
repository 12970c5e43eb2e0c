"""Sidecar arrays beside the shards: round trip, redirect, and every detected corruption."""

import json
import os

import numpy as np
import pytest

from puma_jax.datasets import sidecar, splits, testing
from puma_jax.datasets.sidecar import SidecarError

SETTINGS = {'norm': 'linf', 'num_candidates': 10, 'overshoot': 0.02, 'model_sha256': 'ab12'}


@pytest.fixture
def split(tmp_path):
  return testing.make_split(tmp_path / 'data', num_examples=23, num_shards=3)


def _values(split):
  return np.linspace(-1.0, 2.0, split.num_examples).astype(np.float32)


def _write_all(split, root=None, tag='margins'):
  sidecar.write_manifest(split, tag, SETTINGS, root=root)
  values = _values(split)
  for k, offset in enumerate(split.shard_offsets):
    sidecar.write_shard(split, tag, k, values[offset : offset + split.shard_lengths[k]], root=root)
  return values


def test_round_trip_in_global_order(split):
  values = _write_all(split)
  np.testing.assert_array_equal(sidecar.load(split, 'margins', SETTINGS), values)
  assert sidecar.load(split, 'margins').dtype == np.float32
  for k, shard in enumerate(split.shard_paths):
    path = sidecar.sidecar_path(split, 'margins', k)
    assert path == shard.with_name(shard.name + '.margins.npy')
    assert len(np.load(path)) == split.shard_lengths[k]
  manifest = json.loads(sidecar.manifest_path(split, 'margins').read_text())
  assert manifest['settings'] == SETTINGS
  assert [s['length'] for s in manifest['shards']] == list(split.shard_lengths)
  assert manifest['labels_fingerprint'] == split.labels_fingerprint()
  # No temporary files left behind.
  assert not [p for p in split.dataset_dir.iterdir() if '.tmp-' in p.name]


def test_root_redirect_mirrors_layout_and_leaves_data_dir_untouched(split, tmp_path):
  before = sorted(os.listdir(split.dataset_dir))
  root = tmp_path / 'sidecars'
  values = _write_all(split, root=root)
  assert sorted(os.listdir(split.dataset_dir)) == before
  rel = split.dataset_dir.relative_to(split.data_dir)
  assert sidecar.manifest_path(split, 'margins', root).parent == root / rel
  np.testing.assert_array_equal(sidecar.load(split, 'margins', root=root), values)
  with pytest.raises(SidecarError, match='no .margins. manifest'):
    sidecar.load(split, 'margins')


def test_is_complete_per_shard(split):
  assert sidecar.missing_shards(split, 'margins') == [0, 1, 2]
  sidecar.write_manifest(split, 'margins', SETTINGS)
  assert sidecar.missing_shards(split, 'margins') == [0, 1, 2]
  sidecar.write_shard(split, 'margins', 1, np.zeros(split.shard_lengths[1]))
  assert sidecar.is_complete(split, 'margins', 1)
  assert sidecar.missing_shards(split, 'margins') == [0, 2]
  # Truncated sidecar: not complete.
  path = sidecar.sidecar_path(split, 'margins', 1)
  path.write_bytes(path.read_bytes()[:-3])
  assert not sidecar.is_complete(split, 'margins', 1)


def test_missing_shard_is_named(split):
  _write_all(split)
  path = sidecar.sidecar_path(split, 'margins', 2)
  path.unlink()
  with pytest.raises(SidecarError, match=f'{path.name}.*missing'):
    sidecar.load(split, 'margins')


@pytest.mark.parametrize(
  'corrupt, message',
  [
    (lambda p: np.save(p, np.zeros(3, np.float32)), 'expected float32'),
    (lambda p: np.save(p, np.zeros(8, np.float64)), 'expected float32'),
    (lambda p: p.write_bytes(p.read_bytes()[:-5]), 'truncated'),
    (lambda p: p.write_bytes(b'not an npy file at all'), 'not a valid .npy'),
  ],
  ids=['wrong_length', 'wrong_dtype', 'truncated', 'garbage'],
)
def test_corrupt_sidecar_is_named(split, corrupt, message):
  _write_all(split)
  path = sidecar.sidecar_path(split, 'margins', 0)
  corrupt(path)
  with pytest.raises(SidecarError, match=message) as e:
    sidecar.load(split, 'margins')
  assert str(path) in str(e.value)
  assert not sidecar.is_complete(split, 'margins', 0)
  assert sidecar.is_complete(split, 'margins', 1)


def _edit_manifest(split, edit):
  path = sidecar.manifest_path(split, 'margins')
  m = json.loads(path.read_text())
  edit(m)
  path.write_text(json.dumps(m))


@pytest.mark.parametrize(
  'edit, message',
  [
    (lambda m: m.update(labels_fingerprint='sha256:00'), 'labels'),
    (lambda m: m['shards'][0].update(length=5), 'shard files or lengths'),
    (lambda m: m['shards'][1].update(file='other-shard'), 'shard files or lengths'),
    (lambda m: m.update(dataset='puma_real/other'), 'dataset'),
  ],
  ids=['fingerprint', 'shard_length', 'shard_name', 'dataset'],
)
def test_manifest_that_disagrees_with_the_dataset(split, edit, message):
  _write_all(split)
  _edit_manifest(split, edit)
  with pytest.raises(SidecarError, match=message) as e:
    sidecar.load(split, 'margins')
  assert 'manifest.json' in str(e.value)
  assert sidecar.missing_shards(split, 'margins') == [0, 1, 2]


def test_labels_of_a_rebuilt_dataset_change_the_fingerprint(tmp_path):
  a = testing.make_split(tmp_path / 'a', num_examples=23, num_shards=3, name='x')
  labels = np.arange(23) % 10
  labels[5] = 9
  b = testing.make_split(tmp_path / 'b', num_examples=23, num_shards=3, name='x', labels=labels)
  assert a.labels_fingerprint() != b.labels_fingerprint()
  _write_all(a)
  # Copy a's sidecars over b's dataset, as if b were a rebuild of a.
  for k in range(3):
    src = sidecar.sidecar_path(a, 'margins', k)
    sidecar.sidecar_path(b, 'margins', k).write_bytes(src.read_bytes())
  sidecar.manifest_path(b, 'margins').write_text(sidecar.manifest_path(a, 'margins').read_text())
  with pytest.raises(SidecarError, match='labels'):
    sidecar.load(b, 'margins')


def test_settings_mismatch_lists_the_keys(split):
  _write_all(split)
  with pytest.raises(SidecarError, match='other settings') as e:
    sidecar.load(split, 'margins', {**SETTINGS, 'num_candidates': 20, 'model_sha256': 'ff'})
  assert 'num_candidates: 10 -> 20' in str(e.value)
  assert "model_sha256: 'ab12' -> 'ff'" in str(e.value)
  assert 'norm' not in str(e.value)


def test_missing_or_corrupt_manifest(split):
  with pytest.raises(SidecarError, match='no .margins. manifest'):
    sidecar.load(split, 'margins')
  _write_all(split)
  sidecar.manifest_path(split, 'margins').write_text('{not json')
  with pytest.raises(SidecarError, match='unreadable manifest'):
    sidecar.load(split, 'margins')


def test_write_manifest_refuses_different_settings_unless_overwrite(split):
  _write_all(split)
  assert sidecar.write_manifest(split, 'margins', SETTINGS)['settings'] == SETTINGS  # Same: ok.
  other = {**SETTINGS, 'norm': 'l2'}
  with pytest.raises(SidecarError, match='norm'):
    sidecar.write_manifest(split, 'margins', other)
  assert sidecar.missing_shards(split, 'margins') == []  # Old sidecars untouched.
  sidecar.write_manifest(split, 'margins', other, overwrite=True)
  assert sidecar.missing_shards(split, 'margins') == [0, 1, 2]  # Old sidecars deleted.
  assert sidecar.read_manifest(split, 'margins')['settings'] == other


def test_sidecars_without_manifest_are_refused(split):
  sidecar.write_manifest(split, 'margins', SETTINGS)
  sidecar.write_shard(split, 'margins', 0, np.zeros(split.shard_lengths[0]))
  sidecar.manifest_path(split, 'margins').unlink()
  with pytest.raises(SidecarError, match='without a manifest'):
    sidecar.write_manifest(split, 'margins', SETTINGS)
  sidecar.write_manifest(split, 'margins', SETTINGS, overwrite=True)
  assert sidecar.missing_shards(split, 'margins') == [0, 1, 2]


def test_write_shard_checks_length(split):
  assert split.shard_lengths == (7, 8, 8)
  with pytest.raises(ValueError, match='shard 1 has 8 examples'):
    sidecar.write_shard(split, 'margins', 1, np.zeros(7))


def test_failed_write_keeps_the_old_file_and_no_temporary(split, monkeypatch):
  _write_all(split)
  path = sidecar.sidecar_path(split, 'margins', 0)
  before = path.read_bytes()

  def fail(*args, **kwargs):
    raise OSError('disk full')

  monkeypatch.setattr(np, 'save', fail)
  with pytest.raises(OSError, match='disk full'):
    sidecar.write_shard(split, 'margins', 0, np.ones(split.shard_lengths[0]))
  assert path.read_bytes() == before
  assert not [p for p in path.parent.iterdir() if '.tmp-' in p.name]


def test_labels_are_saved_at_build_time_and_recomputed_if_absent(split):
  assert split.labels_path.exists()
  expected = np.arange(23) % 10
  np.testing.assert_array_equal(split.labels(), expected)
  split.labels_path.unlink()
  fresh = splits.open_split(split.dataset_dir, 'train', source_id=0, data_dir=split.data_dir)
  np.testing.assert_array_equal(fresh.labels(), expected)  # Decoded from the records...
  assert fresh.labels_path.exists()  # ...and cached.


def test_bad_tag(split):
  with pytest.raises(ValueError, match='tag'):
    sidecar.sidecar_path(split, 'a.b', 0)


@pytest.mark.parametrize('dtype', [np.int32, np.bool_, np.uint8])
def test_values_keep_their_natural_dtype(split, dtype):
  sidecar.write_manifest(split, 'flags', SETTINGS, dtype=dtype)
  values = (np.arange(split.num_examples) % 3).astype(dtype)
  for k, offset in enumerate(split.shard_offsets):
    sidecar.write_shard(split, 'flags', k, values[offset : offset + split.shard_lengths[k]])
  got = sidecar.load(split, 'flags', SETTINGS)
  assert got.dtype == dtype
  np.testing.assert_array_equal(got, values)
  with pytest.raises(ValueError, match='hold'):
    sidecar.write_shard(split, 'flags', 0, np.full(split.shard_lengths[0], 0.5))


def test_flipped_bytes_are_found_by_the_checksum(split):
  values = _write_all(split)
  path = sidecar.sidecar_path(split, 'margins', 1)
  data = bytearray(path.read_bytes())
  data[-8:-4] = bytes(b ^ 0xFF for b in data[-8:-4])  # one float of the values, not the header
  path.write_bytes(bytes(data))
  assert sidecar.is_complete(split, 'margins', 1)  # the cheap check cannot see it...
  with pytest.raises(sidecar.SidecarDamagedError, match=f'{path}.*damaged'):
    sidecar.load(split, 'margins')  # ...reading does
  sidecar.write_shard(split, 'margins', 1, values[7:15])  # recomputed
  np.testing.assert_array_equal(sidecar.load(split, 'margins'), values)


def test_a_shard_without_its_checksum_is_incomplete(split):
  _write_all(split)
  sidecar.checksum_path(sidecar.sidecar_path(split, 'margins', 2)).unlink()
  assert sidecar.missing_shards(split, 'margins') == [2]


def test_read_only_folder_gives_a_clear_error(split, monkeypatch):
  sidecar.write_manifest(split, 'margins', SETTINGS)

  def read_only(*args, **kwargs):
    raise PermissionError(30, 'Read-only file system')

  monkeypatch.setattr(sidecar.artifacts, 'write_bytes', read_only)
  with pytest.raises(SidecarError, match='Read-only.*sidecar_dir'):
    sidecar.write_shard(split, 'margins', 0, np.zeros(split.shard_lengths[0]))


def test_format_1_manifests_ask_for_a_recompute(split):
  _write_all(split)
  _edit_manifest(split, lambda m: m.update(format=1))
  with pytest.raises(SidecarError, match='format 1.*recompute=True'):
    sidecar.load(split, 'margins')
