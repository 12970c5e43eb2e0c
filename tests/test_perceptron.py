"""The perceptron experiment at tiny sizes: closed forms, solver, pruning, end to end."""

import csv
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from experiments import perceptron as perc

# Shared by every solve here, so the jitted solver compiles once per padded size
# (64 or 128 rows of DIM inputs).
DIM, STEPS, REG = 16, 60, 1e-4


def _train(x, y, eps):
  out = perc.train_many([(x, y, eps)], norm='l2', num_steps=STEPS, l2_reg=REG)
  return {k: v[0] for k, v in out.items()}


def _random_problem(rng, dim, num_examples):
  w = rng.normal(size=dim)
  x = rng.normal(size=(num_examples, dim))
  y = rng.choice([-1.0, 1.0], size=num_examples)
  eps = rng.uniform(-0.5, 0.8, size=num_examples)  # both signs: attacked and helped
  return w, x, y, eps


def _sphere(dim, num, rng):
  if dim == 2:
    t = np.linspace(0, 2 * np.pi, num, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], axis=1)
  d = rng.normal(size=(num, dim))
  return d / np.linalg.norm(d, axis=1, keepdims=True)


@pytest.mark.parametrize('dim', [2, 3])
def test_l2_closed_form_equals_brute_force_inner_minimisation(dim):
  rng = np.random.default_rng(dim)
  w, x, y, eps = _random_problem(rng, dim, 12)
  closed = np.asarray(perc.robust_margins(jnp.asarray(w), jnp.asarray(x), y, eps, norm='l2'))
  deltas = _sphere(dim, 200_000, rng)  # a linear function is extremal on the sphere
  for i in range(len(y)):
    values = y[i] * (x[i] + abs(eps[i]) * deltas) @ w
    brute = values.min() if eps[i] >= 0 else values.max()
    # No sampled perturbation beats the closed form, and sampling gets close to it.
    if eps[i] >= 0:
      assert brute >= closed[i] - 1e-4
    else:
      assert brute <= closed[i] + 1e-4
    np.testing.assert_allclose(brute, closed[i], atol=2e-3 * np.linalg.norm(w))


@pytest.mark.parametrize('dim', [2, 3])
def test_linf_closed_form_equals_vertex_enumeration(dim):
  rng = np.random.default_rng(10 + dim)
  w, x, y, eps = _random_problem(rng, dim, 12)
  closed = np.asarray(perc.robust_margins(jnp.asarray(w), jnp.asarray(x), y, eps, norm='linf'))
  vertices = np.array(list(itertools.product([-1.0, 1.0], repeat=dim)))
  inside = rng.uniform(-1, 1, size=(5000, dim))
  for i in range(len(y)):
    values = y[i] * (x[i] + abs(eps[i]) * vertices) @ w  # extremes of a linear function
    brute = values.min() if eps[i] >= 0 else values.max()
    np.testing.assert_allclose(closed[i], brute, rtol=1e-5, atol=1e-5)
    interior = y[i] * (x[i] + abs(eps[i]) * inside) @ w
    assert (interior >= brute - 1e-9).all() if eps[i] >= 0 else (interior <= brute + 1e-9).all()


def test_adversarial_loss_is_the_loss_at_the_worst_perturbation():
  rng = np.random.default_rng(0)
  w, x, y, eps = _random_problem(rng, 2, 20)
  deltas = _sphere(2, 100_000, rng)
  worst = []
  for i in range(len(y)):
    losses = np.logaddexp(0.0, -y[i] * (x[i] + abs(eps[i]) * deltas) @ w)
    worst.append(losses.max() if eps[i] >= 0 else losses.min())
  loss = perc.adversarial_loss(jnp.asarray(w), jnp.asarray(x), y, eps, norm='l2', l2_reg=0.0)
  np.testing.assert_allclose(float(loss), np.mean(worst), rtol=1e-4)


@pytest.mark.parametrize('norm', ['l2', 'linf'])
def test_errors_match_monte_carlo(norm):
  rng = np.random.default_rng(1)
  dim, num, eps = 8, 400_000, 0.4 if norm == 'l2' else 0.1
  teacher = rng.normal(size=dim)
  w = teacher + 0.8 * rng.normal(size=dim)
  clean, robust = perc.errors(w, teacher, eps=eps, norm=norm)
  x = rng.normal(size=(num, dim))
  y = np.sign(x @ teacher)
  dual = np.linalg.norm(w) if norm == 'l2' else np.abs(w).sum()
  mc_clean = np.mean(y * (x @ w) < 0)
  mc_robust = np.mean(y * (x @ w) < eps * dual)  # some ||delta|| <= eps flips the sign
  tol = 4 * math.sqrt(0.25 / num)
  assert abs(clean - mc_clean) < tol and abs(robust - mc_robust) < tol
  assert 0.05 < clean < robust < 0.95  # a non-degenerate case


def test_errors_special_cases():
  t = np.array([1.0, -2.0, 0.5])
  assert perc.errors(t, t, eps=0.3, norm='l2')[0] == 0.0
  np.testing.assert_allclose(perc.errors(t, t, eps=0.3, norm='l2')[1], math.erf(0.3 / 2**0.5))
  np.testing.assert_allclose(perc.errors(-t, t, eps=0.3, norm='l2'), (1.0, 1.0))
  assert perc.errors(np.zeros(3), t, eps=0.3, norm='l2') == (0.5, 0.5)  # a constant classifier


def test_solver_reaches_the_minimum_of_the_convex_problem():
  rng = np.random.default_rng(2)
  dim, num = DIM, 50
  teacher = rng.normal(size=dim)
  x = rng.normal(size=(num, dim))
  y = np.sign(x @ teacher)
  eps = np.full(num, 0.3)
  sol = _train(x.astype(np.float32), y, eps)  # 50 rows padded to 64: padding must not count

  def objective(w):
    margin = y * (x @ w) - eps * np.linalg.norm(w)
    return np.mean(np.logaddexp(0.0, -margin)) + 0.5 * REG * w @ w

  ref = optimize.minimize(objective, np.ones(dim), method='BFGS', options={'gtol': 1e-10})
  assert not sol['collapsed']
  assert objective(sol['w'].astype(np.float64)) <= ref.fun + 1e-6
  np.testing.assert_allclose(sol['w'], ref.x, rtol=1e-3, atol=1e-3)


def test_linf_solver_is_close_to_an_exact_reference():
  # ||w||_1 is not smooth, so L-BFGS only gets close. The reference splits
  # w = u - v with u, v >= 0 (exact for eps >= 0) and runs SciPy's L-BFGS-B.
  rng = np.random.default_rng(4)
  dim, num, eps = DIM, 50, 0.1
  x = rng.normal(size=(num, dim))
  y = np.sign(x @ rng.normal(size=dim))
  e = np.full(num, eps)
  out = perc.train_many([(x, y, e)], norm='linf', num_steps=STEPS, l2_reg=REG)
  w = out['w'][0].astype(np.float64)

  def objective(w):
    return np.mean(np.logaddexp(0.0, -(y * (x @ w) - e * np.abs(w).sum()))) + 0.5 * REG * w @ w

  def split(z):
    u, v = z[:dim], z[dim:]
    margin = y * (x @ (u - v)) - e * (u + v).sum()
    s = -1.0 / (1.0 + np.exp(margin))  # d softplus(-m) / dm
    g_w, g_e = (s * y) @ x / num, -(s * e).sum() / num
    val = np.mean(np.logaddexp(0.0, -margin)) + 0.5 * REG * (u - v) @ (u - v)
    return val, np.concatenate([g_w + g_e + REG * (u - v), -g_w + g_e - REG * (u - v)])

  ref = optimize.minimize(
    split,
    np.ones(2 * dim),
    jac=True,
    method='L-BFGS-B',
    bounds=[(0, None)] * (2 * dim),
    options={'maxiter': 10_000, 'ftol': 1e-14, 'gtol': 1e-10},
  )
  assert not out['collapsed'][0]
  assert ref.fun - 1e-6 <= objective(w) <= ref.fun + 2e-3


@pytest.mark.parametrize('ratio, collapsed', [(1.1, True), (0.9, False)])
def test_collapse_exactly_when_zero_is_the_minimum(ratio, collapsed):
  # With eps_i >= 0 the minimiser is w = 0 iff ||mean_i y_i x_i||_2 <= mean_i eps_i;
  # an independent float64 solve confirms which side each case is on.
  rng = np.random.default_rng(3)
  x = rng.normal(size=(40, DIM))
  y = np.sign(x @ rng.normal(size=DIM))
  g = np.linalg.norm(np.mean(y[:, None] * x, axis=0))
  eps = np.full(40, ratio * g)

  def objective(w):
    margin = y * (x @ w) - eps * np.linalg.norm(w)
    return np.mean(np.logaddexp(0.0, -margin)) + 0.5 * REG * w @ w

  ref = optimize.minimize(objective, np.ones(DIM), method='BFGS', options={'gtol': 1e-10})
  assert (ref.fun < objective(np.zeros(DIM)) - 1e-6) != collapsed
  sol = _train(x.astype(np.float32), y.astype(np.float32), eps.astype(np.float32))
  assert bool(sol['collapsed']) == collapsed
  assert (np.linalg.norm(sol['w']) == 0) == collapsed
  if not collapsed:
    np.testing.assert_allclose(objective(sol['w'].astype(np.float64)), ref.fun, atol=1e-5)


def test_clean_training_on_separable_data_reaches_low_error():
  # alpha = 8: the Hebbian start errs about 0.13 here, a trained student about 0.06.
  teacher = perc.make_teacher(jax.random.key(0), DIM)
  errs = []
  for s in range(4):
    x, y = perc.sample_data(jax.random.key(s + 1), teacher, 8 * DIM)
    sol = _train(np.asarray(x), np.asarray(y), np.zeros(8 * DIM, np.float32))
    errs.append(perc.errors(sol['w'], np.asarray(teacher), eps=0.1, norm='l2')[0])
  assert np.mean(errs) < 0.09, errs


def test_error_decreases_with_alpha_without_pruning():
  settings = perc.Settings(
    dim=DIM, alphas=(0.5, 2.0, 8.0), strategies=('none',), num_seeds=3, num_steps=STEPS, eps=0.25
  )
  summary = perc.summarise(perc.run(settings, log=lambda _: None))
  clean = [r['clean_error_mean'] for r in summary]
  robust = [r['robust_error_mean'] for r in summary]
  assert clean[0] > clean[1] > clean[2], clean
  assert robust[0] > robust[1] > robust[2], robust


def test_prune_keeps_the_right_examples_with_the_project_rule():
  margins = np.array([0.9, -0.3, 0.1, 2.0, 0.4, -1.5, 0.7, 0.05])
  y = np.where(np.arange(8) % 2 == 0, 1.0, -1.0)
  kw = dict(fraction=0.5, eps=0.5, seed=0)
  kept, eps = perc.prune(margins, y, strategy='prune_high', **kw)  # keep the hard half
  np.testing.assert_array_equal(kept, [1, 2, 5, 7])
  np.testing.assert_array_equal(eps, np.float32([0.5] * 4))
  kept, _ = perc.prune(margins, y, strategy='prune_low', **kw)  # keep the easy half
  np.testing.assert_array_equal(kept, [0, 3, 4, 6])
  kept, eps = perc.prune(margins, y, strategy='puma', **kw)
  np.testing.assert_array_equal(kept, [1, 2, 5, 7])
  np.testing.assert_allclose(eps, [-0.3, 0.1, -0.5, 0.05], rtol=1e-6)  # clip(m, -eps, eps)
  a, _ = perc.prune(margins, y, strategy='random', **kw)
  b, _ = perc.prune(margins, y, strategy='random', fraction=0.5, eps=0.5, seed=1)
  assert len(a) == len(b) == 4 and len(set(a) | set(b)) > 4


def _num_kept(pool, fraction):
  margins = np.arange(pool, dtype=np.float32)
  kept, _ = perc.prune(margins, np.ones(pool), strategy='random', fraction=fraction, eps=1, seed=0)
  return len(kept)


@pytest.mark.parametrize('fraction', [0.2, 0.25, 0.35, 0.5, 0.8, 0.9])
def test_pool_size_is_the_smallest_pool_that_keeps_the_requested_number(fraction):
  for num_kept in [1, 7, 50, 63, 100, 333]:
    n = perc.pool_size(num_kept, fraction)
    assert _num_kept(n, fraction) == num_kept
    assert n == num_kept or _num_kept(n - 1, fraction) < num_kept


def test_keep_hard_collapses_where_puma_does_not():
  # The oracle probe and much data: the hardest 20% of examples lie within eps/2 of
  # the boundary, so with the full eps adversarial training prefers w = 0 (the
  # mechanism behind the paper's claim); PUMA's margin-sized eps keeps learning.
  settings = perc.Settings(
    dim=DIM,
    alphas=(8.0,),
    fractions=(0.8,),
    strategies=('prune_high', 'puma'),
    probe='teacher',
    num_seeds=2,
    num_steps=STEPS,
  )
  rows = perc.run(settings, log=lambda _: None)
  hard = [r for r in rows if r['strategy'] == 'prune_high']
  puma = [r for r in rows if r['strategy'] == 'puma']
  assert all(r['collapsed'] and r['clean_error'] == 0.5 for r in hard)
  assert all(not r['collapsed'] and r['clean_error'] < 0.1 for r in puma)
  assert all(r['eps_reduced'] > 0.9 for r in puma)  # the eps rule did apply


def test_main_writes_tables_and_plot_deterministically(tmp_path, capsys):
  args = [
    f'--dim={DIM}',
    '--alphas=1,2',
    '--fractions=0.5',
    '--num_seeds=2',
    f'--num_steps={STEPS}',
  ]
  perc.main([f'--out={tmp_path / "a"}', *args])
  printed = capsys.readouterr().out
  assert '| keep hard (prune_high) | 0.5 |' in printed and 'Robust test error' in printed
  for name in ['trials.csv', 'summary.csv', 'table.md', 'errors.png', 'settings.json']:
    assert (tmp_path / 'a' / name).stat().st_size > 0
  assert (tmp_path / 'a' / 'errors.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  rows = list(csv.DictReader((tmp_path / 'a' / 'trials.csv').open()))
  assert len(rows) == 5 * 2 * 2  # (none + 4 pruning strategies) x alphas x seeds
  perc.main([f'--out={tmp_path / "b"}', *args])
  assert (tmp_path / 'a' / 'trials.csv').read_bytes() == (
    tmp_path / 'b' / 'trials.csv'
  ).read_bytes()


@pytest.mark.parametrize(
  'argv, flag',
  [
    (['--fractions=0.5,1'], '--fractions'),
    (['--norm=l3'], '--norm'),
    (['--alphas=0.001'], '--alphas'),
    (['--strategies=none,keep_hard'], '--strategies'),
    (['--alphas=1,x'], '--alphas'),
  ],
)
def test_bad_flags_fail_with_a_message_naming_the_flag(argv, flag, capsys):
  with pytest.raises(SystemExit):
    perc.parse_args(['--out=/tmp/unused', *argv])
  assert flag in capsys.readouterr().err
