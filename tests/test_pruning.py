"""Pruning strategies and eps rules on hand-made margins."""

import json

import numpy as np
import pytest

from configs import default
from puma_jax import pruning
from puma_jax.pruning import PruneSettings

EPS = 0.25  # exactly representable, so the boundaries m = +-eps are exact


def _settings(**kwargs) -> PruneSettings:
  return PruneSettings(**{'eps': EPS, **kwargs})


def _select(settings, real_m, gen_m, real_y=None, gen_y=None):
  real_m, gen_m = np.asarray(real_m, np.float32), np.asarray(gen_m, np.float32)
  labels = {
    'real': np.zeros(len(real_m), np.int32) if real_y is None else np.asarray(real_y),
    'generated': np.zeros(len(gen_m), np.int32) if gen_y is None else np.asarray(gen_y),
  }
  return pruning.select(settings, labels=labels, margins={'real': real_m, 'generated': gen_m})


REAL = [1.0, -0.5, 0.1]
GEN = [0.3, -0.1, 0.5, 0.0, 0.2]


def test_prune_high_drops_the_highest_generated_margins():
  r = _select(_settings(strategy='prune_high', fraction=0.4), REAL, GEN)
  np.testing.assert_array_equal(r.kept['generated'], [1, 3, 4])  # 0.5 and 0.3 dropped
  np.testing.assert_array_equal(r.kept['real'], [0, 1, 2])
  # Baselines train with the constant eps.
  np.testing.assert_array_equal(r.eps['generated'], np.float32([EPS] * 3))
  assert r.stats['kept'] == {'real': 3, 'generated': 3}
  assert r.stats['pruned'] == {'real': 0, 'generated': 2}
  assert r.kept['generated'].dtype == np.int32 and r.eps['generated'].dtype == np.float32


def test_prune_low_drops_the_lowest():
  r = _select(_settings(strategy='prune_low', fraction=0.4), REAL, GEN)
  np.testing.assert_array_equal(r.kept['generated'], [0, 2, 4])  # -0.1 and 0.0 dropped


def test_puma_prunes_high_and_sets_eps_from_margins():
  r = _select(_settings(strategy='puma', fraction=0.4, eps_rule='puma'), REAL, GEN)
  np.testing.assert_array_equal(r.kept['generated'], [1, 3, 4])
  np.testing.assert_array_equal(r.eps['generated'], np.float32([-0.1, 0.0, 0.2]))
  np.testing.assert_array_equal(r.eps['real'], np.float32([EPS, -EPS, 0.1]))
  stats = r.stats['eps']['all']
  assert (stats['count'], stats['reduced'], stats['negative'], stats['zero'], stats['full']) == (
    6,
    5,
    2,
    1,
    1,
  )
  clip0 = _select(_settings(strategy='puma', fraction=0.4, eps_rule='clip0'), REAL, GEN)
  np.testing.assert_array_equal(clip0.eps['generated'], np.float32([0.0, 0.0, 0.2]))
  np.testing.assert_array_equal(clip0.eps['real'], np.float32([EPS, 0.0, 0.1]))


def test_puma_with_fraction_zero_only_adapts_eps():
  r = _select(_settings(strategy='puma', fraction=0.0), REAL, GEN)
  np.testing.assert_array_equal(r.kept['generated'], np.arange(5))
  np.testing.assert_array_equal(r.eps['generated'], np.float32([EPS, -0.1, EPS, 0.0, 0.2]))


def test_none_keeps_everything_without_margins():
  r = pruning.select(
    _settings(strategy='none'),
    labels={'real': np.zeros(3, np.int32), 'generated': np.ones(4, np.int32)},
  )
  assert r.stats['kept'] == {'real': 3, 'generated': 4}
  assert 'margins' not in r.stats


def test_eps_rule_boundaries():
  f32 = np.float32
  below = np.nextafter(f32(EPS), f32(0))
  above = np.nextafter(f32(EPS), f32(1))
  m = np.array(
    [-np.inf, -0.5, -EPS, -below, -1e-9, 0.0, 1e-9, below, EPS, above, 0.5, np.inf], np.float32
  )
  puma = pruning.compute_eps(m, EPS, 'puma')
  want = np.array(
    [-EPS, -EPS, -EPS, -below, f32(-1e-9), 0.0, f32(1e-9), below, EPS, EPS, EPS, EPS], np.float32
  )
  np.testing.assert_array_equal(puma, want)
  clip0 = pruning.compute_eps(m, EPS, 'clip0')
  np.testing.assert_array_equal(clip0, np.maximum(want, 0))
  np.testing.assert_array_equal(pruning.compute_eps(m, EPS, 'constant'), np.full(12, EPS, f32))
  assert puma.dtype == np.float32


def test_eps_rule_at_a_non_representable_eps():
  eps = 8 / 255
  m = np.array([np.float32(eps), 1.0], np.float32)
  out = pruning.compute_eps(m, eps, 'puma')
  np.testing.assert_array_equal(out, np.float32([eps, eps]))
  r = pruning.select(
    PruneSettings(strategy='puma', fraction=0.0, eps=eps),
    labels={'real': np.zeros(2, np.int32)},
    margins={'real': m},
  )
  assert r.stats['eps']['all']['full'] == 2 and r.stats['eps']['all']['reduced'] == 0


def test_ties_break_on_source_then_index():
  ties = [0.1] * 4
  r = _select(_settings(strategy='prune_high', fraction=0.5), [], ties)
  np.testing.assert_array_equal(r.kept['generated'], [0, 1])
  r = _select(_settings(strategy='prune_low', fraction=0.5), [], ties)
  np.testing.assert_array_equal(r.kept['generated'], [2, 3])
  # Jointly, at equal margins the generated example (source 1) ranks above the real one.
  r = _select(_settings(strategy='prune_high', fraction=0.5, scope='joint'), [0.1, 0.1], [0.1, 0.1])
  np.testing.assert_array_equal(r.kept['real'], [0, 1])
  assert len(r.kept['generated']) == 0


def test_joint_and_generated_scope():
  real, gen = [0.9, 0.1], [0.5, 0.4, 0.3, 0.2]
  r = _select(_settings(strategy='prune_high', fraction=0.5, scope='generated'), real, gen)
  np.testing.assert_array_equal(r.kept['real'], [0, 1])
  np.testing.assert_array_equal(r.kept['generated'], [2, 3])
  r = _select(_settings(strategy='prune_high', fraction=0.5, scope='joint'), real, gen)
  np.testing.assert_array_equal(r.kept['real'], [1])  # 0.9 ranks first jointly
  np.testing.assert_array_equal(r.kept['generated'], [2, 3])


def test_class_balanced_drops_the_same_fraction_per_class():
  gen = [0.9, 0.8, 0.7, 0.6, 0.1, 0.2, 0.3, 0.4]
  y = [0, 0, 0, 0, 1, 1, 1, 1]
  r = _select(_settings(strategy='prune_high', fraction=0.5), [], gen, gen_y=y)
  np.testing.assert_array_equal(r.kept['generated'], [4, 5, 6, 7])  # all of class 0 dropped
  r = _select(_settings(strategy='prune_high', fraction=0.5, class_balanced=True), [], gen, gen_y=y)
  np.testing.assert_array_equal(r.kept['generated'], [2, 3, 4, 5])
  assert r.stats['kept_per_class']['generated'] == [2, 2]
  r = _select(_settings(strategy='prune_low', fraction=0.5, class_balanced=True), [], gen, gen_y=y)
  np.testing.assert_array_equal(r.kept['generated'], [0, 1, 6, 7])


def test_class_balanced_joint_counts_classes_across_sources():
  # Class 0: real 0.9, gen 0.8 / class 1: real 0.1, gen 0.2; fraction 0.5 drops one of each.
  r = _select(
    _settings(strategy='prune_high', fraction=0.5, scope='joint', class_balanced=True),
    [0.9, 0.1],
    [0.8, 0.2],
    real_y=[0, 1],
    gen_y=[0, 1],
  )
  np.testing.assert_array_equal(r.kept['real'], [1])
  np.testing.assert_array_equal(r.kept['generated'], [0])


def test_rounding_is_half_up_and_class_quotas_add_up():
  assert pruning._quota(0.35, np.array([10]))[0] == 4  # 3.5 -> 4 (0.35 is not exact in binary)
  assert pruning._quota(0.25, np.array([10]))[0] == 3
  assert pruning._quota(0.3, np.array([7]))[0] == 2
  assert pruning._quota(0.3, np.array([10]))[0] == 3
  # 1.5, 1.5, 2.0 -> 1, 1, 2 plus one for the largest remainder, the lower class first.
  np.testing.assert_array_equal(pruning._class_quotas(0.5, np.array([3, 3, 4])), [2, 1, 2])


def test_random_is_seeded_and_class_balanced():
  n = 1000
  labels = {'generated': np.arange(n) % 4, 'real': np.zeros(10, np.int64)}

  def run(seed, balanced=False):
    s = _settings(strategy='random', fraction=0.3, seed=seed, class_balanced=balanced)
    return pruning.select(s, labels=labels)

  a, b, c = run(0), run(0), run(1)
  np.testing.assert_array_equal(a.kept['generated'], b.kept['generated'])
  assert len(a.kept['generated']) == 700 and len(a.kept['real']) == 10
  assert not np.array_equal(a.kept['generated'], c.kept['generated'])
  assert run(0, balanced=True).stats['kept_per_class']['generated'] == [175, 175, 175, 175]


def test_deterministic_on_a_larger_random_problem():
  rng = np.random.default_rng(0)
  m = {'real': rng.normal(size=500).astype(np.float32), 'generated': rng.normal(size=3000)}
  m['generated'][::7] = 0.5  # many ties
  labels = {'real': rng.integers(0, 10, 500), 'generated': rng.integers(0, 10, 3000)}
  s = _settings(strategy='puma', fraction=0.3, scope='joint', class_balanced=True)
  a = pruning.select(s, labels=labels, margins=m)
  b = pruning.select(s, labels=labels, margins=m)
  for src in ('real', 'generated'):
    np.testing.assert_array_equal(a.kept[src], b.kept[src])
    np.testing.assert_array_equal(a.eps[src], b.eps[src])
  assert sum(a.stats['pruned'].values()) == round(0.3 * 3500)
  # Within every class, no kept example has a higher margin than a pruned one.
  for c in range(10):
    kept_m, pruned_m = [], []
    for src in ('real', 'generated'):
      keep = np.zeros(len(m[src]), bool)
      keep[a.kept[src]] = True
      in_c = labels[src] == c
      kept_m.append(m[src][keep & in_c])
      pruned_m.append(m[src][~keep & in_c])
    assert np.concatenate(kept_m).max() <= np.concatenate(pruned_m).min()


def test_save_load_round_trip(tmp_path):
  r = _select(_settings(strategy='puma', fraction=0.4), REAL, GEN)
  r = pruning.PruneResult(**{**r.__dict__, 'provenance': {'margins': 'manifest-abc'}})
  r.save(tmp_path / 'prune')
  assert sorted(p.name for p in (tmp_path / 'prune').iterdir()) == ['kept.npz', 'prune.json']
  back = pruning.PruneResult.load(tmp_path / 'prune')
  assert back.settings == r.settings
  assert back.num_examples == {'real': 3, 'generated': 5}
  assert back.stats == json.loads(json.dumps(r.stats))
  assert back.provenance == {'margins': 'manifest-abc'}
  for src in ('real', 'generated'):
    np.testing.assert_array_equal(back.kept[src], r.kept[src])
    np.testing.assert_array_equal(back.eps[src], r.eps[src])
  meta = json.loads((tmp_path / 'prune' / 'prune.json').read_text())
  assert meta['settings']['strategy'] == 'puma' and meta['effective_eps_rule'] == 'puma'

  # A kept.npz that does not belong to prune.json is refused.
  other = _select(_settings(strategy='prune_low', fraction=0.4), REAL, GEN)
  other.save(tmp_path / 'other')
  (tmp_path / 'other' / 'kept.npz').replace(tmp_path / 'prune' / 'kept.npz')
  with pytest.raises(ValueError, match='checksum'):
    pruning.PruneResult.load(tmp_path / 'prune')


def test_settings_from_the_default_config():
  c = default.get_config()
  s = pruning.settings_from_config(c)
  assert (s.strategy, s.fraction, s.scope, s.eps_rule, s.eps, s.unconverged) == (
    c.prune.strategy,
    c.prune.fraction,
    c.prune.scope,
    c.prune.eps_rule,
    c.attack.eps,
    c.prune.unconverged,
  )


@pytest.mark.parametrize(
  'kwargs,field',
  [
    ({'fraction': 1.0}, 'c.prune.fraction'),
    ({'fraction': -0.1}, 'c.prune.fraction'),
    ({'strategy': 'prune_easy'}, 'c.prune.strategy'),
    ({'eps_rule': 'linear'}, 'c.prune.eps_rule'),
    ({'scope': 'real'}, 'c.prune.scope'),
    ({'eps': 0.0}, 'c.attack.eps'),
  ],
)
def test_bad_settings_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field.replace('.', r'\.')):
    _settings(**kwargs)


def test_bad_inputs_get_clear_errors():
  s = _settings(strategy='puma', fraction=0.4)
  with pytest.raises(ValueError, match='NaN.*c.margins.recompute'):
    _select(s, REAL, [0.1, np.nan, 0.2])
  with pytest.raises(ValueError, match='shape.*stale'):
    pruning.select(
      s,
      labels={'real': np.zeros(3, np.int32)},
      margins={'real': np.zeros(4, np.float32)},
    )
  with pytest.raises(ValueError, match='no margins'):
    pruning.select(s, labels={'real': np.zeros(3, np.int32)})
  with pytest.raises(ValueError, match="c.prune.scope='generated'"):
    pruning.select(
      s, labels={'real': np.zeros(3, np.int32)}, margins={'real': np.zeros(3, np.float32)}
    )


def _select_unconverged(rule, strategy='puma', fraction=0.4):
  # generated: margins 0.3, -0.1, 0.5, 0.0, 0.2; DeepFool did not converge on 1 (a small
  # distance reached so far) and 4 (misclassified, -0.05 reached so far).
  gen = np.float32([0.3, 0.01, 0.5, 0.0, -0.05])
  converged = {'real': np.ones(3, bool), 'generated': np.array([1, 0, 1, 1, 0], bool)}
  return pruning.select(
    _settings(strategy=strategy, fraction=fraction, unconverged=rule),
    labels={'real': np.zeros(3, np.int32), 'generated': np.zeros(5, np.int32)},
    margins={'real': np.float32(REAL), 'generated': gen},
    converged=converged,
  )


def test_unconverged_keep_distance_uses_the_distance_reached():
  r = _select_unconverged('keep_distance')
  np.testing.assert_array_equal(r.kept['generated'], [1, 3, 4])  # 0.5 and 0.3 dropped
  np.testing.assert_array_equal(r.eps['generated'], np.float32([0.01, 0.0, -0.05]))
  assert r.stats['unconverged'] == {
    'rule': 'keep_distance',
    'count': {'real': 0, 'generated': 2},
    'excluded': {'real': 0, 'generated': 0},
  }


def test_unconverged_infinite_is_pruned_first_and_gets_the_full_eps():
  r = _select_unconverged('infinite')
  # +inf (example 1) is dropped first, then 0.5; -inf (example 4) is kept with -eps.
  np.testing.assert_array_equal(r.kept['generated'], [0, 3, 4])
  np.testing.assert_array_equal(r.eps['generated'], np.float32([EPS, 0.0, -EPS]))
  assert r.stats['unconverged']['count'] == {'real': 0, 'generated': 2}
  # Kept, an unconverged correctly classified example trains at the full eps.
  r = _select_unconverged('infinite', fraction=0.0)
  np.testing.assert_array_equal(r.eps['generated'][[1, 4]], np.float32([EPS, -EPS]))


def test_unconverged_exclude_removes_them_before_ranking():
  r = _select_unconverged('exclude')
  # Pool of 3 (0.3, 0.5, 0.0): 40% of 3 rounds to 1, 0.5 dropped.
  np.testing.assert_array_equal(r.kept['generated'], [0, 3])
  np.testing.assert_array_equal(r.eps['generated'], np.float32([EPS, 0.0]))
  assert r.stats['kept'] == {'real': 3, 'generated': 2}
  assert r.stats['pruned'] == {'real': 0, 'generated': 1}
  assert r.stats['unconverged']['excluded'] == {'real': 0, 'generated': 2}


def test_unconverged_rule_only_matters_for_margin_strategies():
  for rule in pruning.UNCONVERGED:
    r = _select_unconverged(rule, strategy='random')
    assert r.stats['kept']['generated'] == 3
    assert r.stats['unconverged']['excluded'] == {'real': 0, 'generated': 0}
  with pytest.raises(ValueError, match=r'c\.prune\.unconverged'):
    _settings(unconverged='drop')


@pytest.mark.parametrize(
  'field, arrays, match',
  [
    ('margins', {'real': np.zeros(3, np.float32)}, "margins of source 'generated' are missing"),
    ('margins', {'real': np.zeros(3), 'generated': np.zeros(2)}, "margins of 'generated' have"),
    ('converged', {'real': np.ones(3, bool)}, "converged flags of source 'generated' are missing"),
    ('converged', {'real': np.ones(2, bool), 'generated': np.ones(5, bool)}, 'shape \\(2,\\)'),
  ],
)
def test_missing_or_stale_per_source_arrays_are_named(field, arrays, match):
  labels = {'real': np.zeros(3, np.int32), 'generated': np.zeros(5, np.int32)}
  margins = {'real': np.zeros(3, np.float32), 'generated': np.zeros(5, np.float32)}
  kwargs = {'margins': margins, field: arrays}
  with pytest.raises(ValueError, match=match):
    pruning.select(_settings(strategy='puma', fraction=0.5), labels=labels, **kwargs)
