r"""The figures of docs/tutorial.md, made with the tutorial's recipe on more digits.

The same small CNN, trained clean for 150 steps of 64 digits from the same root
key, then:

- `tutorial_pgd_digits.png`: test digits, their L-infinity PGD inputs and the
  perturbations, for eps = +0.3 (correctly classified digits, the attack) and
  eps = -0.3 (misclassified digits, PUMA's helpful perturbation);
- `tutorial_margins.png`: DeepFool L-infinity margins of real and generated
  digits, by source;
- `tutorial_eps.png`: the attack radii after PUMA (30% of the generated pool
  pruned, eps 0.1) of those digits, by source.

The study's plots (`docs/img/study_*.png`) are not made here:
`experiments/study.py` makes them (docs/experiments.md).

  PYTHONPATH=$PWD python docs/make_tutorial_figures.py                 # docs/img/
  PYTHONPATH=$PWD python docs/make_tutorial_figures.py --fast --out=/tmp/figs

`--fast` trains 10 steps and scores 32 digits per source (a check that the
script runs; its figures mean nothing).
"""

import argparse
import io
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from puma_jax import models, pruning
from puma_jax.attacks import deepfool, losses, pgd
from puma_jax.datasets import generator, mnist

FIGURES = ('tutorial_pgd_digits.png', 'tutorial_margins.png', 'tutorial_eps.png')
SOURCE_COLORS = {'real': 'tab:blue', 'generated': 'tab:orange'}


def _save(fig: Figure, path: Path) -> None:
  """Writes the figure as a PNG atomically (a temporary file, then a rename)."""
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=110)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.')
  with os.fdopen(fd, 'wb') as f:
    f.write(buf.getvalue())
  os.chmod(tmp, 0o644)  # mkstemp makes it private
  os.replace(tmp, path)


def train_clean_cnn(x_train: np.ndarray, y_train: np.ndarray, *, num_steps: int):
  """The tutorial's CNN, trained clean as in its section 2; returns (model, variables)."""
  init_key, data_key, _, _ = jax.random.split(jax.random.key(0), 4)
  model = models.create('small_cnn', num_classes=10, conv_channels=(8, 16), dense_widths=(64,))
  params = jax.jit(model.init, static_argnames='train')(init_key, x_train[:1], train=False)
  params = params['params']
  tx = optax.adam(2e-3)

  @jax.jit
  def step(params, opt_state, x, y):
    def mean_loss(p):
      return jnp.mean(losses.cross_entropy(model.apply({'params': p}, x, train=True), y))

    grads = jax.grad(mean_loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  order = np.asarray(jax.random.permutation(data_key, len(x_train)))
  opt_state = tx.init(params)
  for i in range(num_steps):
    rows = order[(i % 62) * 64 : (i % 62 + 1) * 64]
    params, opt_state = step(params, opt_state, x_train[rows], y_train[rows])
  return model, {'params': params}


def plot_digits(x, x_pos, x_neg, labels, preds, path: Path, eps: float) -> None:
  """Clean / PGD input / perturbation for the eps > 0 and the eps < 0 examples.

  Args:
    x: f32[2,N,28,28,1] clean digits (row 0: attacked with +eps, row 1: with -eps).
    x_pos, x_neg: f32[N,28,28,1] the PGD inputs of x[0] and x[1].
    labels: i32[2,N] true labels; preds: i32[2,2,N] predictions (clean, PGD).
  """
  n = x.shape[1]
  fig = Figure(figsize=(1.3 * n * 2 + 0.4, 4.6))
  FigureCanvasAgg(fig)
  subfigs = fig.subfigures(1, 2, wspace=0.04)
  titles = (f'eps = +{eps:g}: PGD ascends the loss', f'eps = -{eps:g}: PGD descends it')
  for g, (sub, x_adv) in enumerate(zip(subfigs, (x_pos, x_neg), strict=True)):
    sub.suptitle(titles[g], fontsize=10)
    axes = sub.subplots(3, n)
    for j in range(n):
      delta = x_adv[j, ..., 0] - x[g, j, ..., 0]
      panels = (
        (x[g, j, ..., 0], 'gray', 0.0, 1.0, f'y={labels[g, j]} pred {preds[g, 0, j]}'),
        (x_adv[j, ..., 0], 'gray', 0.0, 1.0, f'pred {preds[g, 1, j]}'),
        (delta, 'RdBu_r', -eps, eps, 'x_adv - x'),
      )
      for r, (img, cmap, lo, hi, title) in enumerate(panels):
        ax = axes[r, j]
        ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi)
        ax.set_title(title, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    for r, name in enumerate(('clean x', 'PGD input', 'perturbation')):
      axes[r, 0].set_ylabel(name, fontsize=8)
  _save(fig, path)


def plot_margins(margins: dict[str, np.ndarray], path: Path, eps: float) -> None:
  """Histogram of the DeepFool margins of each source, with 0 and the PUMA eps marked."""
  fig = Figure(figsize=(7, 3.4))
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  lo = min(float(m.min()) for m in margins.values())
  hi = max(float(m.max()) for m in margins.values())
  bins = np.linspace(lo, hi, 41)
  for source, m in margins.items():
    ax.hist(m, bins=bins, alpha=0.55, color=SOURCE_COLORS[source], label=f'{source} ({len(m)})')
  ax.axvline(0.0, color='black', lw=1)
  ax.axvline(eps, color='tab:green', ls='--', lw=1, label=f'eps = {eps:g}')
  ax.set_xlabel('DeepFool L-inf margin (negative: misclassified)')
  ax.set_ylabel('digits')
  ax.set_title('Margins of the clean CNN, by source', fontsize=10)
  ax.legend(fontsize=8)
  fig.tight_layout()
  _save(fig, path)


def plot_eps(result: pruning.PruneResult, path: Path, eps: float) -> None:
  """Histogram of the kept examples' radii after PUMA, by source."""
  fig = Figure(figsize=(7, 3.4))
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  bins = np.linspace(-eps, eps, 41)
  for source, e in result.eps.items():
    full, negative = int(np.sum(e >= np.float32(eps))), int(np.sum(e < 0))
    label = f'{source}: {len(e)} kept, {full} at +eps, {negative} negative'
    # float32 radii: 0.1 is 0.10000000149, which would miss the last bin.
    values = np.clip(e.astype(np.float64), -eps, eps)
    ax.hist(values, bins=bins, alpha=0.55, color=SOURCE_COLORS[source], label=label)
  ax.set_yscale('log')  # the full-eps bin holds many more digits than the others
  ax.set_xlabel(f'eps_i = clip(margin_i, -{eps:g}, {eps:g})')
  ax.set_ylabel('kept digits (log scale)')
  pruned = result.stats['pruned']['generated']
  ax.set_title(f'Radii after PUMA ({pruned} generated digits pruned)', fontsize=10)
  ax.legend(fontsize=8)
  fig.tight_layout()
  _save(fig, path)


def make_figures(out: Path, *, fast: bool = False) -> list[Path]:
  """Computes everything and writes the three figures into `out`; returns their paths."""
  out.mkdir(parents=True, exist_ok=True)
  images, labels, _ = mnist.split_arrays('train')
  x_train, y_train = images.astype(np.float32) / 255.0, labels.astype(np.int32)
  test_images, test_labels, _ = mnist.split_arrays('test')
  x_test, y_test = test_images.astype(np.float32) / 255.0, test_labels.astype(np.int32)
  model, variables = train_clean_cnn(x_train, y_train, num_steps=10 if fast else 150)

  def logits_fn(v):
    return model.apply(variables, v, train=False)

  def loss_fn(v, y):
    return losses.cross_entropy(logits_fn(v), y)

  predict = jax.jit(lambda v: jnp.argmax(logits_fn(v), -1))
  attack_key = jax.random.split(jax.random.key(0), 4)[2]

  # Digits: 5 that the model gets right (eps > 0) and 5 it gets wrong (eps < 0).
  eps_digits, n = 0.3, 5
  pred = np.asarray(predict(x_test))
  right, wrong = np.flatnonzero(pred == y_test)[:n], np.flatnonzero(pred != y_test)[:n]
  rows = np.concatenate([right, wrong])
  eps = np.concatenate([np.full(n, eps_digits), np.full(n, -eps_digits)]).astype(np.float32)
  x_adv = np.asarray(
    jax.jit(pgd, static_argnums=0, static_argnames=('norm', 'num_steps', 'step_size'))(
      loss_fn, attack_key, x_test[rows], y_test[rows], eps, norm='linf', num_steps=10,
      step_size=0.25,
    )
  )  # fmt: skip
  adv_pred = np.asarray(predict(x_adv))
  plot_digits(
    x_test[rows].reshape(2, n, 28, 28, 1),
    x_adv[:n],
    x_adv[n:],
    y_test[rows].reshape(2, n),
    np.stack([pred[rows], adv_pred]).reshape(2, 2, n).transpose(1, 0, 2),
    out / FIGURES[0],
    eps_digits,
  )

  # Margins of real and generated digits, then PUMA at eps 0.1.
  per_source = 32 if fast else 500
  gen = generator.ClassConditionalGenerator().fit(images[:500], labels[:500])
  gen_images, gen_labels = gen.sample(per_source, seed=0)
  x_gen, y_gen = gen_images.astype(np.float32) / 255.0, gen_labels.astype(np.int32)
  x_both = np.concatenate([x_train[:per_source], x_gen])
  y_both = np.concatenate([y_train[:per_source], y_gen])
  margin = jax.jit(lambda x, y: deepfool(logits_fn, x, y, norm='linf', clip=(0.0, 1.0)).margin)
  m = np.asarray(margin(x_both, y_both))
  margins = {'real': m[:per_source], 'generated': m[per_source:]}
  eps_prune = 0.1
  plot_margins(margins, out / FIGURES[1], eps_prune)
  settings = pruning.PruneSettings(
    strategy='puma', fraction=0.3, scope='generated', eps_rule='puma', eps=eps_prune
  )
  result = pruning.select(
    settings, labels={'real': y_train[:per_source], 'generated': y_gen}, margins=margins
  )
  plot_eps(result, out / FIGURES[2], eps_prune)
  return [out / name for name in FIGURES]


def main(argv: Sequence[str] | None = None) -> list[Path]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', type=Path, default=Path(__file__).resolve().parent / 'img')
  parser.add_argument('--fast', action='store_true', help='a quick run (tests)')
  args = parser.parse_args(argv)
  paths = make_figures(args.out, fast=args.fast)
  for p in paths:
    print(p)
  return paths


if __name__ == '__main__':
  main(sys.argv[1:])
