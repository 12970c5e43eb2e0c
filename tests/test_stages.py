"""Stage markers: skip what is complete, refuse what was made with other settings."""

import json

import ml_collections
import pytest

from puma_jax import stages


def _config(**prune):
  c = ml_collections.ConfigDict()
  c.prune = ml_collections.ConfigDict({'fraction': 0.3, 'strategy': 'puma', **prune})
  c.train = ml_collections.ConfigDict({'num_steps': (1, 2)})
  return c


STAGE = stages.Stage('prune', ('prune',))


def test_marker_round_trip_and_skip(tmp_path):
  config = _config()
  assert not STAGE.is_complete(tmp_path, config, {'margins': 'abc'})
  fp = STAGE.mark_complete(tmp_path, config, {'margins': 'abc'}, outputs={'kept': 10})
  assert STAGE.is_complete(tmp_path, config, {'margins': 'abc'})
  # Fields the stage does not depend on may change freely.
  other = _config()
  other.train.num_steps = (3,)
  assert STAGE.is_complete(tmp_path, other, {'margins': 'abc'})
  marker = json.loads((tmp_path / 'prune' / 'stage.json').read_text())
  assert marker['fingerprint'] == fp and marker['outputs'] == {'kept': 10}


def test_changed_field_is_refused_with_a_way_forward(tmp_path):
  STAGE.mark_complete(tmp_path, _config(), {})
  with pytest.raises(stages.ConfigMismatchError) as e:
    STAGE.is_complete(tmp_path, _config(fraction=0.5), {})
  msg = str(e.value)
  assert 'prune.fraction: 0.3 -> 0.5' in msg and 'new --workdir' in msg


def test_changed_upstream_is_refused(tmp_path):
  STAGE.mark_complete(tmp_path, _config(), {'margins': 'abc'})
  with pytest.raises(stages.ConfigMismatchError, match='inputs changed'):
    STAGE.is_complete(tmp_path, _config(), {'margins': 'def'})


def test_corrupt_marker_is_reported(tmp_path):
  (tmp_path / 'prune').mkdir()
  (tmp_path / 'prune' / 'stage.json').write_text('{"trunc')
  with pytest.raises(stages.ConfigMismatchError, match='not valid JSON'):
    STAGE.is_complete(tmp_path, _config(), {})


def test_ignored_fields_may_change_and_may_be_absent_from_old_markers(tmp_path):
  stage = stages.Stage('prune', ('prune',), ignore=('prune.download',))
  stage.mark_complete(tmp_path, _config(), {})  # a marker written before the field existed
  assert stage.is_complete(tmp_path, _config(download=True), {})
  assert stage.is_complete(tmp_path, _config(download=False), {})
  with pytest.raises(stages.ConfigMismatchError, match='prune.fraction'):
    stage.is_complete(tmp_path, _config(fraction=0.5, download=True), {})
