r"""The evaluate stage: clean, PGD (CE and CW losses) and AutoAttack, with a report.

Per test example and stage the evaluation records whether the example is still
classified correctly: clean; PGD-k with the cross-entropy loss; PGD-k with the
CW margin loss; then AutoAttack "standard" (APGD-CE, APGD-T, FAB-T, Square, each
on the examples still robust). The report gives the accuracy after each stage,
RobustBench's fields (`clean_acc`, `autoattack_acc`, ...) and the worst case over
every attack, per example. The flags come from `evaluator.Evaluator` (the programs
that training-time evaluation runs too), which takes the weights as an argument.

Resumable: the flags of every finished batch are saved in
`<out_dir>/batches/` (atomic writes), so a killed evaluation continues where it
stopped; the settings are checked first, and results made with other settings
are refused, never mixed. Every example draws its AutoAttack randomness from a
key derived from its index, and PGD from a key derived from its batch, so a
resumed evaluation gives the same report as an uninterrupted one.

Evaluate a training workdir's EMA weights or imported PyTorch weights:

  python -m puma_jax.evaluate --config=configs/default.py --checkpoint=WORKDIR/train \
      --out=/tmp/eval
  python -m puma_jax.evaluate --config=configs/cifar10_wrn28_10.py \
      --torch_npz=wrn28_10.npz --out=/tmp/eval
"""

import io
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from puma_jax import artifacts, evaluator, parallel
from puma_jax.datasets import input_pipeline
from puma_jax.progress import Progress

PGD_STAGES = ('clean', *evaluator.PGD_ATTACKS)
STANDARD_BUDGETS = {'apgd_steps': 100, 'fab_steps': 100, 'num_targets': 9, 'square_queries': 5000}
FORMAT_VERSION = 1


def _settings(
  *,
  norm: str,
  eps: float,
  num_examples: int,
  batch_size: int,
  pgd_steps: int,
  step_size: float,
  stages: tuple[str, ...],
  seed: int,
  model_fingerprint: str,
  split_name: str,
) -> dict[str, Any]:
  return {
    'format': FORMAT_VERSION,
    'norm': norm,
    'eps': float(eps),
    'num_examples': int(num_examples),
    'batch_size': int(batch_size),
    'pgd_steps': int(pgd_steps),
    'pgd_step_size': float(step_size),
    'stages': list(stages),
    'seed': int(seed),
    'model_fingerprint': model_fingerprint,
    'split': split_name,
  }


class _BatchStore:
  """Per-batch flags on disk: `batches/<b>.npz` holding `index` i64[n] and `flags` bool[n, S]."""

  def __init__(self, out_dir: Path, settings: dict[str, Any], *, recompute: bool):
    self.dir = out_dir / 'batches'
    settings_path = out_dir / 'settings.json'
    is_main = jax.process_index() == 0
    if settings_path.exists():
      try:
        artifacts.check_same(
          artifacts.read_json(settings_path),
          settings,
          what=f'the evaluation in {out_dir}',
          fix='Use another output folder, or recompute=True (config eval.recompute) to replace it.',
          error=ValueError,
        )
      except ValueError:
        if not recompute:
          raise
        if is_main:
          for f in self.dir.glob('*.npz'):
            f.unlink()
    if is_main:
      self.dir.mkdir(parents=True, exist_ok=True)
      artifacts.write_json(settings_path, settings)

  def path(self, b: int) -> Path:
    return self.dir / f'{b:06d}.npz'

  def load(self, b: int) -> tuple[np.ndarray, np.ndarray] | None:
    return _read_batch(self.path(b))

  def save(self, b: int, index: np.ndarray, flags: np.ndarray) -> None:
    if jax.process_index() == 0:
      artifacts.write_bytes(self.path(b), _npz_bytes(index=index, flags=flags))


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
  """(index, flags) of one saved batch; None when absent or unreadable (it is recomputed)."""
  if not path.exists():
    return None
  try:
    with np.load(path) as f:
      return f['index'], f['flags']
  except (OSError, ValueError, KeyError) as e:
    logging.warning('recomputing %s: unreadable (%s)', path, e)
    return None


def load_flags(out_dir: str | Path) -> tuple[dict[str, Any], np.ndarray, np.ndarray] | None:
  """What an evaluation in `out_dir` has saved so far (e.g. `WORKDIR/evaluate/results`).

  Returns:
    (settings, index i64[n], flags bool[n, S]) over the finished batches, with
    `settings['stages']` naming the S columns; None when nothing was evaluated.
  """
  out_dir = Path(out_dir)
  settings_path = out_dir / 'settings.json'
  if not settings_path.exists():
    return None
  done = [_read_batch(f) for f in sorted((out_dir / 'batches').glob('*.npz'))]
  done = [d for d in done if d is not None]
  if not done:
    return None
  index = np.concatenate([d[0] for d in done])
  flags = np.concatenate([d[1] for d in done])
  return artifacts.read_json(settings_path), index, flags


def _npz_bytes(**arrays: np.ndarray) -> bytes:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def _robustbench_norm(norm: str) -> str:
  return {'linf': 'Linf', 'l2': 'L2'}[norm]


def summarize(
  flags: np.ndarray,
  names: tuple[str, ...],
  *,
  settings: dict[str, Any],
  model_name: str,
  dataset: str,
  num_generated: int,
  seconds: float,
) -> dict[str, Any]:
  """The report of per-example flags bool[N, S] (columns `names`)."""
  n = len(flags)
  accuracy = {name: float(flags[:, i].mean()) if n else 0.0 for i, name in enumerate(names)}
  aa_names = [s for s in names if s not in PGD_STAGES]
  # AutoAttack's stages are cumulative; its accuracy is the last stage's.
  autoattack_acc = accuracy[aa_names[-1]] if aa_names else None
  worst = float(np.all(flags, axis=1).mean()) if n else 0.0
  pct = lambda v: None if v is None else round(100.0 * v, 2)
  footnote = (
    f'Trained with {num_generated:,} generated images (not additional real data).'
    if num_generated
    else ''
  )
  return {
    # RobustBench's model-card fields (accuracies in percent, as RobustBench lists them).
    'name': model_name,
    'dataset': dataset,
    'threat_model': _robustbench_norm(settings['norm']),
    'norm': _robustbench_norm(settings['norm']),
    'eps': settings['eps'],
    'clean_acc': pct(accuracy['clean']),
    'autoattack_acc': pct(autoattack_acc),
    'additional_data': False,
    'footnote': footnote,
    'n_examples': n,
    # Beyond RobustBench: each stage, the worst case over all attacks, time.
    'accuracy_after_each_attack': {k: pct(v) for k, v in accuracy.items() if k != 'clean'},
    'pgd_ce_acc': pct(accuracy['pgd_ce']),
    'pgd_cw_acc': pct(accuracy['pgd_cw']),
    'worst_case_acc': pct(worst),
    'seconds': round(seconds, 1),
    'settings': settings,
  }


def evaluate(
  model: Any,
  variables: Any,
  split: Any,
  out_dir: str | Path,
  *,
  norm: str,
  eps: float,
  num_examples: int = 0,
  batch_size: int = 250,
  pgd_steps: int = 20,
  step_size: float = 0.25,
  use_autoattack: bool = True,
  chunk_size: int | None = None,
  seed: int = 0,
  mesh: jax.sharding.Mesh | None = None,
  model_name: str = '',
  num_generated: int = 0,
  recompute: bool = False,
  model_fingerprint: str = '',
  autoattack_budgets: Mapping[str, int] | None = None,
  on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
  """Evaluates `variables` on `split` and writes `<out_dir>/report.json`; resumable.

  Args:
    model, variables: the Flax module and the weights to evaluate (eval mode).
    split: a `datasets.Split` (the test split).
    out_dir: where the per-batch flags, settings and report go.
    norm, eps: the threat model.
    num_examples: evaluate the first N examples (0: all).
    batch_size: global batch size (a multiple of the mesh's devices).
    pgd_steps, step_size: PGD's budget (step size relative to eps).
    use_autoattack: run AutoAttack standard after PGD.
    chunk_size: AutoAttack's chunk of still-robust rows per device (None: whole slice).
    seed: randomness of the attacks.
    mesh: the ('data',) mesh (default: all devices).
    model_name, num_generated: for the report (RobustBench's name and footnote).
    recompute: replace results made with other settings instead of refusing them.
    model_fingerprint: identifies the weights in the settings (resume safety).
    autoattack_budgets: overrides of AutoAttack's budgets (`apgd_steps`, `fab_steps`,
      `num_targets`, `square_queries`) for quick looks and tests; the report's
      settings record them, and the result is then not AutoAttack "standard".
    on_batch: called after each finished batch (tests use it to interrupt).

  Returns:
    The report (also written to `report.json`).
  """
  out_dir = Path(out_dir)
  mesh = mesh or parallel.make_mesh()
  parallel.local_batch_size(batch_size, mesh)
  n = split.num_examples if not num_examples else min(num_examples, split.num_examples)
  ev = evaluator.get(
    model,
    evaluator.Settings(
      norm=norm,
      eps=eps,
      pgd_steps=pgd_steps,
      step_size=step_size,
      autoattack=use_autoattack,
      autoattack_budgets=tuple(sorted(dict(autoattack_budgets or {}).items())),
      chunk_size=chunk_size,
    ),
    mesh,
  )
  names = ev.stages
  settings = _settings(
    norm=norm,
    eps=eps,
    num_examples=n,
    batch_size=batch_size,
    pgd_steps=pgd_steps,
    step_size=step_size,
    stages=names,
    seed=seed,
    model_fingerprint=model_fingerprint,
    split_name=f'{split.name}:{split.split}',
  )
  if autoattack_budgets:
    settings['autoattack_budgets'] = dict(autoattack_budgets)
  store = _BatchStore(out_dir, settings, recompute=recompute)
  root = jax.random.key(seed)
  pgd_rng, aa_rng = jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)

  num_batches = -(-n // batch_size)
  done = [store.load(b) for b in range(num_batches)]
  # Every process follows process 0's view of what is done.
  pending_mask = np.array([d is None for d in done], bool)
  if jax.process_count() > 1:
    pending_mask = np.asarray(multihost_utils.broadcast_one_to_all(pending_mask))
  pending = [int(b) for b in np.flatnonzero(pending_mask)]
  initial = sum(len(d[0]) for b, d in enumerate(done) if d is not None and not pending_mask[b])
  progress = Progress('evaluate', n, initial=initial, every_s=30)
  start = time.perf_counter()
  batches = input_pipeline.eval_batches(
    split, batch_size=batch_size, num_examples=n, eps=eps, batch_indices=pending
  )
  for b, local in zip(pending, batches, strict=True):
    batch = parallel.shard_batch(
      input_pipeline.device_fields(local, input_pipeline.EVAL_FIELDS), mesh
    )
    flags = ev.flags(variables, batch, jax.random.fold_in(pgd_rng, b), aa_rng)
    mask = evaluator.gather(batch['mask'])
    index = evaluator.gather(batch['index'])[mask].astype(np.int64)
    flags = evaluator.gather(flags)[mask]
    store.save(b, index, flags)
    done[b] = (index, flags)
    progress.update(len(index), extra=f'worst-case robust so far {_running(done):.2%}')
    if on_batch is not None:
      on_batch(b)
  progress.close()
  flags = np.concatenate([d[1] for d in done]) if done else np.zeros((0, len(names)), bool)
  index = np.concatenate([d[0] for d in done]) if done else np.zeros(0, np.int64)
  if not np.array_equal(index, np.arange(n)):
    raise RuntimeError(f'evaluation in {out_dir} covers the wrong examples; use recompute')
  report = summarize(
    flags,
    names,
    settings=settings,
    model_name=model_name,
    dataset=split.name,
    num_generated=num_generated,
    seconds=time.perf_counter() - start,
  )
  if jax.process_index() == 0:
    artifacts.write_json(out_dir / 'report.json', report)
  return report


def _running(done: list[tuple[np.ndarray, np.ndarray] | None]) -> float:
  flags = [d[1] for d in done if d is not None]
  flags = np.concatenate(flags) if flags else np.zeros((0, 1), bool)
  return float(np.all(flags, axis=1).mean()) if len(flags) else 0.0


def evaluate_workdir(
  config: Any,
  model: Any,
  variables: Any,
  split: Any,
  out_dir: str | Path,
  *,
  mesh: jax.sharding.Mesh | None = None,
  model_name: str = '',
  num_generated: int = 0,
  model_fingerprint: str = '',
) -> dict[str, Any]:
  """`evaluate` with the settings of `config.attack` and `config.eval`."""
  ev = config.eval
  if ev.autoattack not in ('standard', 'none'):
    raise ValueError(f"eval.autoattack={ev.autoattack!r} is not 'standard' or 'none'")
  budgets = dict(ev.autoattack_budgets)
  # Only budgets that differ from AutoAttack's own are recorded as overrides.
  budgets = {k: v for k, v in budgets.items() if STANDARD_BUDGETS[k] != v}
  return evaluate(
    model,
    variables,
    split,
    out_dir,
    norm=config.attack.norm,
    eps=config.attack.eps,
    num_examples=ev.num_examples,
    batch_size=ev.batch_size,
    pgd_steps=ev.pgd_steps,
    step_size=config.attack.step_size,
    use_autoattack=ev.autoattack == 'standard',
    chunk_size=ev.autoattack_chunk_size or None,
    autoattack_budgets=budgets or None,
    recompute=ev.recompute,
    seed=config.seed,
    mesh=mesh,
    model_name=model_name,
    num_generated=num_generated,
    model_fingerprint=model_fingerprint,
  )


def _main() -> None:
  """`python -m puma_jax.evaluate`: evaluate a workdir's EMA weights or a PyTorch .npz."""
  from absl import app, flags  # noqa: PLC0415 (only for the command line)
  from ml_collections import config_flags  # noqa: PLC0415

  from puma_jax import datasets, model_io  # noqa: PLC0415

  config_flag = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
  checkpoint = flags.DEFINE_string('checkpoint', None, 'A training workdir (holding checkpoints/).')
  torch_npz = flags.DEFINE_string('torch_npz', None, 'PyTorch state_dict .npz of config.model.')
  out = flags.DEFINE_string('out', None, 'Output folder (resumable).')
  data_dir = flags.DEFINE_string('data_dir', None, 'TFDS data_dir (default: config.data.data_dir).')
  flags.mark_flags_as_required(['config', 'out'])

  def run(argv):
    del argv
    config = config_flag.value
    if bool(checkpoint.value) == bool(torch_npz.value):
      raise app.UsageError('give exactly one of --checkpoint and --torch_npz')
    ddir = data_dir.value or config.data.data_dir
    if not ddir:
      raise app.UsageError('give --data_dir or config.data.data_dir (where the test split is)')
    prepared = datasets.prepare(config.data, ddir, build=False)
    if checkpoint.value:
      model, variables = model_io.restore_ema_variables(config.model, checkpoint.value)
      name = f'{config.model.name} ({checkpoint.value})'
    else:
      model, variables = model_io.load_torch_state_dict(config.model, torch_npz.value)
      name = f'{config.model.name} ({torch_npz.value})'
    report = evaluate_workdir(
      config,
      model,
      variables,
      prepared.real_test,
      out.value,
      model_name=name,
      model_fingerprint=model_io.model_fingerprint(variables),
    )
    print(json.dumps({k: v for k, v in report.items() if k != 'settings'}, indent=2))  # noqa: T201

  app.run(run)


if __name__ == '__main__':
  _main()
