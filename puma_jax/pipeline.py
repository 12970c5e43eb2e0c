"""The PUMA pipeline: prepare -> margin_model -> margins -> prune -> train -> evaluate -> report.

Each stage writes its outputs under the workdir and, when they are complete,
a marker (`stages.py`) recording the config fields it depends on. A rerun
skips complete stages, resumes an interrupted one (training from its last
checkpoint, margins shard by shard, evaluation batch by batch), and refuses a
stage whose saved settings disagree with the config, saying how to proceed.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import app, logging

from puma_jax import (
  artifacts,
  config_base,
  datasets,
  margins,
  model_io,
  models,
  multihost,
  parallel,
  pruning,
  report,
  stages,
  steps,
  train,
)
from puma_jax.datasets import sidecar

STAGES = ('prepare', 'margin_model', 'margins', 'prune', 'train', 'evaluate', 'report')
MARGIN_MODEL_SOURCES = ('train', 'checkpoint', 'torch_npz')

# The config fields each stage's output depends on (performance knobs such as
# batch sizes of the margin stage, reader threads or logging intervals are left
# out: changing them does not change the results).
_DATA_FIELDS = ('data.data_dir', 'data.real', 'data.generated')
_TRAIN_FIELDS = (
  'seed',
  'model',
  'attack',
  'data.generated_fraction',
  'data.augment',
  'data.crop_padding',
  'train.loss',
  'train.trades_beta',
  'train.label_smoothing',
  'train.batch_size',
  'train.num_steps',
  'train.learning_rate',
  'train.momentum',
  'train.nesterov',
  'train.weight_decay',
  'train.warmup_steps',
  'train.lr_schedule',
  'train.steps_per_epoch',
  'train.pct_start',
  'train.weight_decay_on',
  'train.ema_decay',
  'train.ema_warmup_fraction',
  'train.ema_batch_stats',
  'train.trades_start',
  'train.trades_step_size',
  'train.attack_batchnorm',
  'train.bn_first_batch',
)


def margin_fields(config: Any) -> tuple[str, ...]:
  """The margin stage's estimator fields: the estimator's name and its own settings.

  DeepFool (the default) records c.margins.overshoot and c.margins.max_iter and
  not the estimator's name, so markers made before other estimators existed stay
  valid; the others record c.margins.estimator and c.margins.<estimator> (fab).
  """
  name = config.margins.get('estimator', 'deepfool')
  if name == 'deepfool':
    return ('margins.overshoot', 'margins.max_iter')
  out = ('margins.estimator',)
  return out + ((f'margins.{name}',) if name in config.margins else ())


def refresh_fields(config: Any) -> tuple[str, ...]:
  """The train stage's refresh field, recorded only when refreshing is on (markers made
  before the option existed stay valid)."""
  return ('train.refresh_margins_every',) if config.train.get('refresh_margins_every', 0) else ()


STAGE_DEFS = {
  # Whether a missing archive may be downloaded does not change the data (its sha256 is checked).
  'prepare': stages.Stage('prepare', _DATA_FIELDS, ignore=('data.real.download',)),
  'margin_model': stages.Stage(
    'margin_model', ('margin_model',) + tuple(f for f in _TRAIN_FIELDS if f != 'train.num_steps')
  ),
  'margins': stages.Stage(
    'margins',
    ('margins.norm', 'margins.num_candidates', 'margins.clip'),
    config_fields=margin_fields,
  ),
  'prune': stages.Stage('prune', ('prune', 'attack.eps', 'seed')),
  'train': stages.Stage('train', _TRAIN_FIELDS, config_fields=refresh_fields),
  'evaluate': stages.Stage(
    'evaluate',
    ('attack.norm', 'attack.eps', 'eval.num_examples', 'eval.pgd_steps', 'eval.autoattack'),
  ),
  'report': stages.Stage('report', ()),
}
# Which stages each stage reads from (their fingerprints chain into its own).
UPSTREAM = {
  'prepare': (),
  'margin_model': ('prepare',),
  'margins': ('prepare', 'margin_model'),
  'prune': ('margins',),
  'train': ('prepare', 'prune'),
  'evaluate': ('train',),
  'report': ('margins', 'prune', 'train', 'evaluate'),
}


class Context:
  """What the stages share in one run: config, workdir, mesh, prepared data, fingerprints."""

  def __init__(self, config: Any, workdir: Path, *, dry_run: bool = False):
    self.config = config
    self.workdir = workdir
    self.dry_run = dry_run
    self.mesh = parallel.make_mesh()
    self.fingerprints: dict[str, str] = {}
    self._prepared: datasets.Prepared | None = None
    self._margin_model: tuple[Any, Any] | None = None
    self.margin_result: margins.MarginResult | None = None  # this run's margin stage

  @property
  def data_dir(self) -> Path:
    return Path(self.config.data.data_dir or self.workdir / 'data')

  def prepared(self, *, build: bool = False) -> datasets.Prepared:
    """The datasets; process 0 builds when asked, the others open what it built."""
    if self._prepared is None:
      if build and jax.process_count() > 1:
        if jax.process_index() == 0:
          self._prepared = datasets.prepare(self.config.data, self.data_dir, build=True)
        multihost.barrier('puma_jax.prepare')
      if self._prepared is None:
        self._prepared = datasets.prepare(self.config.data, self.data_dir, build=build)
    return self._prepared

  def upstream(self, name: str) -> dict[str, str]:
    return {u: self.fingerprints[u] for u in UPSTREAM[name] if u in self.fingerprints}

  def stage_dir(self, name: str) -> Path:
    return STAGE_DEFS[name].directory(self.workdir)


def margins_needed(config: Any) -> bool:
  return pruning.settings_from_config(config).needs_margins


def _check_choice(value: Any, known: tuple, field: str) -> None:
  if value not in known:
    raise config_base.ConfigError(f'{field}={value!r} is not one of {known}; fix the config.')


def _check_config(config: Any) -> None:
  """Cheap checks of the config's values before any work (ConfigError names the field)."""
  _check_choice(config.data.real.kind, datasets.REAL_KINDS, 'data.real.kind')
  _check_choice(config.data.generated.kind, datasets.GENERATED_KINDS, 'data.generated.kind')
  _check_choice(config.model.name, tuple(models.REGISTRY), 'model.name')
  _check_choice(config.model.dtype, tuple(models.DTYPES), 'model.dtype')
  _check_choice(config.attack.norm, ('linf', 'l2'), 'attack.norm')
  _check_choice(config.train.loss, steps.LOSSES, 'train.loss')
  try:
    pruning.settings_from_config(config)
  except ValueError as e:
    raise config_base.ConfigError(str(e)) from e
  if config.margin_model.source not in MARGIN_MODEL_SOURCES:
    raise config_base.ConfigError(
      f'margin_model.source={config.margin_model.source!r} is not one of {MARGIN_MODEL_SOURCES}'
    )
  if config.margin_model.source != 'train' and not config.margin_model.path:
    raise config_base.ConfigError(
      f'margin_model.source={config.margin_model.source!r} needs margin_model.path '
      '(a training workdir with checkpoints/, or a PyTorch state_dict .npz or .safetensors)'
    )
  if config.eval.autoattack == 'standard' and config.model.num_classes < 4:
    raise config_base.ConfigError(
      f'eval.autoattack=standard needs at least 4 classes (APGD-T and FAB-T use the targeted '
      f'DLR loss), the model has model.num_classes={config.model.num_classes}; '
      'set --config.eval.autoattack=none to evaluate with clean and PGD accuracy only.'
    )
  if margins_needed(config):
    try:
      estimator = margins.settings_from_config(config.margins).estimator
    except ValueError as e:
      raise config_base.ConfigError(str(e)) from e
    if estimator == 'fab' and not config.margins.clip:
      raise config_base.ConfigError(
        'margins.estimator=fab works in the image box [0, 1] and needs margins.clip=True; '
        'set it, or use margins.estimator=deepfool or first_order.'
      )
  if config.train.get('refresh_margins_every', 0):
    try:
      margins.refresh.check_every(config.train.refresh_margins_every)
    except ValueError as e:
      raise config_base.ConfigError(str(e)) from e
    if pruning.settings_from_config(config).effective_eps_rule == 'constant':
      raise config_base.ConfigError(
        f'train.refresh_margins_every={config.train.refresh_margins_every} refreshes '
        'margin-based eps, but prune.strategy/eps_rule give a constant eps; use '
        "prune.strategy=puma with prune.eps_rule='puma' or 'clip0', or set it to 0."
      )
  if margins_needed(config) and config.margins.norm != config.attack.norm:
    raise config_base.ConfigError(
      f'margins.norm={config.margins.norm!r} differs from attack.norm={config.attack.norm!r}: '
      'per-example radii from margins only make sense in the norm of the attack; set both alike.'
    )


# ----------------------------------------------------------------------------- stages


def run_prepare(ctx: Context) -> dict[str, Any]:
  prepared = ctx.prepared(build=True)
  logging.info('datasets:\n%s', prepared.summary())
  return {
    name: {'dataset': split.name, 'examples': split.num_examples, 'shards': split.num_shards}
    for name, split in {**prepared.train_splits, 'test': prepared.real_test}.items()
  }


def margin_model(ctx: Context) -> tuple[Any, Any]:
  """The margin model's module and weights, as the config names them (loaded once)."""
  if ctx._margin_model is None:
    ctx._margin_model = _load_margin_model(ctx)
  return ctx._margin_model


def _load_margin_model(ctx: Context) -> tuple[Any, Any]:
  cfg = ctx.config
  source, path = cfg.margin_model.source, cfg.margin_model.path
  if source == 'train':
    return model_io.restore_ema_variables(cfg.model, ctx.stage_dir('margin_model'), mesh=ctx.mesh)
  if source == 'checkpoint':
    return model_io.restore_ema_variables(cfg.model, Path(path), mesh=ctx.mesh)
  return model_io.load_torch_state_dict(cfg.model, path)


def run_margin_model(ctx: Context) -> dict[str, Any]:
  cfg = ctx.config
  if cfg.margin_model.source == 'train':
    _, result = train.train_and_evaluate(
      cfg,
      ctx.stage_dir('margin_model'),
      prepared=ctx.prepared(),
      num_steps=cfg.margin_model.num_steps,
      mesh=ctx.mesh,
    )
  else:
    result = {}
  _, variables = margin_model(ctx)
  return {'model_fingerprint': model_io.model_fingerprint(variables), 'eval': result}


def run_margins(ctx: Context) -> dict[str, Any]:
  cfg = ctx.config
  model, variables = margin_model(ctx)
  prepared = ctx.prepared()
  if ctx.dry_run:
    estimate = margins.estimate_from_config(cfg.margins, model, variables, prepared.train_splits)
    margins.write_estimate(estimate, ctx.stage_dir('margins') / 'estimate.json')
    print(estimate.table())  # noqa: T201 (the dry run's answer)
    return {}
  result = margins.compute_margins(
    model,
    variables,
    prepared.train_splits,
    settings=margins.settings_from_config(cfg.margins),
    batch_size=cfg.margins.batch_size,
    deepfool_batch_size=cfg.margins.deepfool_batch_size,
    sidecar_root=prepared.sidecar_root,
    recompute=cfg.margins.recompute,
    summary_dir=ctx.stage_dir('margins'),
    read_threads=cfg.data.read_threads,
    prefetch_batches=cfg.data.prefetch_batches,
  )
  ctx.margin_result = result
  overall = result.summary['overall']
  return {
    'estimator': result.summary['estimator'],
    'tag': result.summary['tag'],
    'summary': str(ctx.stage_dir('margins') / 'summary.json'),
    'examples': overall['count'],
    'not_converged': overall['not_converged'],
    'model_fingerprint': result.settings['model_fingerprint'],
  }


def _load_margins(ctx: Context, quantity: str = 'margin') -> dict[str, np.ndarray]:
  """A quantity the prune stage reads ('margin' or 'converged'): this run's, or the sidecars.

  The margin stage's marker names the margin model's fingerprint; the sidecars
  are checked against it (and the estimator's settings; the estimator's own
  tag is read, `margins.default_tag`), so the weights are not
  restored again. Damaged sidecars are recomputed (an error naming the fix
  where their folder is read-only).
  """
  if ctx.margin_result is not None:
    return getattr(ctx.margin_result, _RESULT_FIELDS[quantity])
  marker = STAGE_DEFS['margins'].read_marker(ctx.workdir) or {}
  fingerprint = marker.get('outputs', {}).get('model_fingerprint')
  if fingerprint is None:
    raise RuntimeError(
      f'{ctx.stage_dir("margins") / stages.MARKER} does not name the margin model; '
      f'delete {ctx.stage_dir("margins")} to recompute the margins.'
    )
  prepared = ctx.prepared()
  try:
    return margins.load_margins(
      model_io.create_model(ctx.config.model),
      None,
      prepared.train_splits,
      settings=margins.settings_from_config(ctx.config.margins),
      sidecar_root=prepared.sidecar_root,
      fingerprint=fingerprint,
      quantity=quantity,
    )
  except sidecar.SidecarDamagedError as e:
    logging.warning('%s Recomputing the damaged margin shards.', e)
    run_margins(ctx)  # scores only the shards whose sidecars fail their checksums
    return getattr(ctx.margin_result, _RESULT_FIELDS[quantity])


_RESULT_FIELDS = {'margin': 'margins', 'converged': 'converged'}


def run_prune(ctx: Context) -> dict[str, Any]:
  cfg = ctx.config
  settings = pruning.settings_from_config(cfg)
  prepared = ctx.prepared()
  labels = {name: split.labels() for name, split in prepared.train_splits.items()}
  margin_arrays = _load_margins(ctx) if settings.needs_margins else None
  result = pruning.select(
    settings,
    labels=labels,
    margins=margin_arrays,
    converged=_load_margins(ctx, 'converged') if settings.needs_margins else None,
    num_classes=prepared.real_train.num_classes,
    provenance={'margin_stage': ctx.fingerprints.get('margins')},
  )
  if jax.process_index() == 0:
    result.save(ctx.stage_dir('prune'))
  multihost.barrier('puma_jax.prune')
  return {name: int(len(idx)) for name, idx in result.kept.items()}


def load_prune_result(ctx: Context) -> pruning.PruneResult:
  return pruning.PruneResult.load(ctx.stage_dir('prune'))


def run_train(ctx: Context) -> dict[str, Any]:
  result = load_prune_result(ctx)
  _, metrics = train.train_and_evaluate(
    ctx.config,
    ctx.stage_dir('train'),
    prepared=ctx.prepared(),
    kept=result.kept,
    kept_eps=result.eps,
    mesh=ctx.mesh,
  )
  return {'eval': metrics}


def run_evaluate(ctx: Context) -> dict[str, Any]:
  from puma_jax import evaluate  # noqa: PLC0415 (AutoAttack compiles lazily)

  cfg = ctx.config
  model, variables = model_io.restore_ema_variables(
    cfg.model, ctx.stage_dir('train'), mesh=ctx.mesh
  )
  rep = evaluate.evaluate_workdir(
    cfg,
    model,
    variables,
    ctx.prepared().real_test,
    ctx.stage_dir('evaluate') / 'results',
    mesh=ctx.mesh,
    model_name=cfg.model.name,
    num_generated=_num_generated_used(ctx),
    model_fingerprint=model_io.model_fingerprint(variables),
  )
  if jax.process_index() == 0:
    artifacts.write_json(ctx.stage_dir('evaluate') / 'report.json', rep)
  keys = ('clean_acc', 'pgd_ce_acc', 'pgd_cw_acc', 'autoattack_acc', 'worst_case_acc')
  return {k: rep[k] for k in keys}


def _num_generated_used(ctx: Context) -> int:
  prune_dir = ctx.stage_dir('prune')
  if not (prune_dir / 'kept.npz').exists():
    return 0
  return int(len(load_prune_result(ctx).kept.get('generated', ())))


def run_report(ctx: Context) -> dict[str, Any]:
  if jax.process_index() == 0:
    paths = report.write_report(ctx.config, ctx.workdir)
  else:
    paths = {}
  multihost.barrier('puma_jax.report')
  return {k: str(v) for k, v in paths.items()}


RUNNERS: dict[str, Callable[[Context], dict[str, Any]]] = {
  'prepare': run_prepare,
  'margin_model': run_margin_model,
  'margins': run_margins,
  'prune': run_prune,
  'train': run_train,
  'evaluate': run_evaluate,
  'report': run_report,
}


def _skipped(config: Any, name: str) -> bool:
  """Stages with nothing to do for this config (no margins for strategies without them)."""
  return name in ('margin_model', 'margins') and not margins_needed(config)


def _write_config(config: Any, workdir: Path) -> None:
  if jax.process_index() == 0:
    artifacts.write_config(workdir, config)


def run(config: Any, workdir: str | Path, *, stage: str = 'all', dry_run: bool = False) -> None:
  """Runs the pipeline (or one stage) in `workdir`; reruns resume and skip finished stages."""
  workdir = Path(workdir).expanduser()
  _check_config(config)  # Before anything is written.
  workdir.mkdir(parents=True, exist_ok=True)
  if dry_run and stage not in ('all', 'margins'):
    raise app.UsageError(
      '--dry_run applies to the margins stage; use --stage=margins or no --stage'
    )
  ctx = Context(config, workdir, dry_run=dry_run)
  wanted = STAGES if stage == 'all' else (stage,)
  # Check every finished stage's settings before doing any work.
  for name in STAGES:
    if _skipped(config, name):
      continue
    defn = STAGE_DEFS[name]
    if defn.is_complete(workdir, config, ctx.upstream(name)):
      ctx.fingerprints[name] = defn.expected(config, ctx.upstream(name))['fingerprint']
    elif name not in wanted:
      if stage != 'all' and UPSTREAM.get(stage) and name in UPSTREAM[stage]:
        raise app.UsageError(
          f'stage {stage!r} needs stage {name!r}, which is not complete in {workdir}; '
          f'run it first (--stage={name}) or run the whole pipeline (no --stage).'
        )
  _write_config(config, workdir)
  for name in wanted:
    if _skipped(config, name):
      logging.info('stage %s: not needed for prune.strategy=%s', name, config.prune.strategy)
      continue
    defn = STAGE_DEFS[name]
    upstream = ctx.upstream(name)
    if name in ctx.fingerprints and not (dry_run and name == 'margins'):
      logging.info('stage %s: complete, skipped', name)
      continue
    logging.info('stage %s: running', name)
    outputs = RUNNERS[name](ctx)
    if dry_run:
      return
    multihost.barrier(f'puma_jax.stage.{name}')
    if jax.process_index() == 0:
      ctx.fingerprints[name] = defn.mark_complete(workdir, config, upstream, outputs)
    else:
      ctx.fingerprints[name] = defn.expected(config, upstream)['fingerprint']
    logging.info('stage %s: done', name)
