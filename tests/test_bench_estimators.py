"""experiments/bench_estimators.py --tiny runs end to end and reports every estimator."""

import json

import numpy as np

from experiments import bench_estimators


def test_tiny_benchmark_reports_every_estimator(tmp_path):
  out = bench_estimators.main(['--tiny', f'--out={tmp_path / "bench.json"}'])
  assert json.loads((tmp_path / 'bench.json').read_text())['metrics'] == out['metrics']
  rows = out['metrics']
  assert list(rows) == ['deepfool', 'first_order', 'fab']
  # DeepFool against itself, FAB against itself: the reference values.
  assert rows['deepfool']['spearman_vs_deepfool'] == 1.0
  assert rows['deepfool']['eps_changed_10pct'] == 0.0
  assert rows['fab']['median_ratio_to_fab'] == 1.0
  for name, r in rows.items():
    assert out['examples_per_second'][name] > 0
    assert -1.0 <= r['spearman_vs_deepfool'] <= 1.0, name
    assert 0.0 <= r['eps_changed_10pct'] <= 1.0 and 0.0 <= r['converged'] <= 1.0, name
    assert np.isfinite(r['median_ratio_to_fab']), name
  assert 'first_order' in out['table']
