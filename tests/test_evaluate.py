"""The evaluation driver: stages, worst case, report fields, resume, settings checks."""

import jax
import numpy as np
import pytest

from configs import default
from puma_jax import datasets, evaluate, train

BUDGETS = {'apgd_steps': 5, 'fab_steps': 3, 'num_targets': 2, 'square_queries': 20}


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  config = default.get_config('tiny')
  prepared = datasets.prepare(config.data, tmp_path_factory.mktemp('data'))
  model = train.create_model(config.model)
  variables = model.init(jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))
  return model, variables, prepared.real_test


def _run(setup, out, **kw):
  model, variables, split = setup
  args = dict(
    norm='linf',
    eps=0.02,
    num_examples=20,
    batch_size=8,
    pgd_steps=3,
    use_autoattack=True,
    autoattack_budgets=BUDGETS,
    model_name='tiny',
    num_generated=123,
  )
  args.update(kw)
  return evaluate.evaluate(model, variables, split, out, **args)


def test_report_stages_and_worst_case(setup, tmp_path):
  report = _run(setup, tmp_path)
  assert report['n_examples'] == 20  # 3 batches of 8, the last padded.
  stages = report['accuracy_after_each_attack']
  assert list(stages) == ['pgd_ce', 'pgd_cw', 'apgd-ce', 'apgd-t', 'fab-t', 'square']
  aa = [stages[k] for k in ('apgd-ce', 'apgd-t', 'fab-t', 'square')]
  assert all(a >= b for a, b in zip([report['clean_acc']] + aa, aa, strict=False))
  assert report['autoattack_acc'] == stages['square']
  assert report['worst_case_acc'] <= min(report['autoattack_acc'], report['pgd_ce_acc'])
  assert report['additional_data'] is False and '123 generated' in report['footnote']
  assert report['norm'] == 'Linf' and report['eps'] == pytest.approx(0.02)
  flags = np.concatenate(
    [np.load(p)['flags'] for p in sorted((tmp_path / 'batches').glob('*.npz'))]
  )
  assert flags.shape == (20, 7)
  # Accuracy columns come from the flags; the worst case is the per-example AND.
  assert report['clean_acc'] == round(100 * flags[:, 0].mean(), 2)
  assert report['worst_case_acc'] == round(100 * flags.all(axis=1).mean(), 2)
  # An example broken clean is never counted robust later.
  assert not np.any(flags[~flags[:, 0]][:, 1:])


class _Stop(Exception):
  pass


def test_resume_gives_the_same_report(setup, tmp_path):
  full = _run(setup, tmp_path / 'full')

  def stop_after_first(b):
    if b == 0:
      raise _Stop

  with pytest.raises(_Stop):
    _run(setup, tmp_path / 'resumed', on_batch=stop_after_first)
  assert len(list((tmp_path / 'resumed' / 'batches').glob('*.npz'))) == 1
  settings, index, flags = evaluate.load_flags(tmp_path / 'resumed')  # the finished batch
  assert flags.shape == (len(index), len(settings['stages'])) and flags.dtype == bool
  assert evaluate.load_flags(tmp_path / 'nothing') is None
  resumed = _run(setup, tmp_path / 'resumed')
  _, index_all, flags_all = evaluate.load_flags(tmp_path / 'resumed')
  assert np.array_equal(flags_all[: len(index)], flags) and len(index_all) > len(index)
  for key in ('seconds',):
    full.pop(key), resumed.pop(key)
  assert full == resumed


def test_other_settings_are_refused_unless_recompute(setup, tmp_path):
  _run(setup, tmp_path, use_autoattack=False)
  with pytest.raises(ValueError, match='other settings'):
    _run(setup, tmp_path, use_autoattack=False, eps=0.03)
  report = _run(setup, tmp_path, use_autoattack=False, eps=0.03, recompute=True)
  assert report['eps'] == pytest.approx(0.03) and report['autoattack_acc'] is None
