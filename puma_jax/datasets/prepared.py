"""`prepare(data_config, data_dir)`: the data stage, the one call the main job makes.

It builds what the config names, reuses what is already built (after checking
that it was built from the same source, with the same shard count), and returns
`Split` handles. Layout under the TFDS data_dir:

  <data_dir>/puma_real/<kind>/1.0.0/             mnist_embedded, cifar10 or cifar100
  <data_dir>/puma_generated/<name>/1.0.0/        data.generated.name
  <data_dir>/<data.real.name>/...                image_folder: built by the converter

A build writes into TFDS's `incomplete.*` folder and renames it when complete,
so an interrupted build leaves no dataset behind; the next call starts over.
"""

import dataclasses
import os
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds
from absl import logging

from puma_jax.datasets import builders, download, sources, splits
from puma_jax.datasets.errors import DataError

REAL_KINDS = ('mnist_embedded', 'cifar10', 'cifar100', 'image_folder')
DOWNLOADS = 'downloads'  # Folder under data_dir that keeps downloaded files.
GENERATED_KINDS = ('none', 'embedded', 'npz')


@dataclasses.dataclass(frozen=True)
class Prepared:
  """Handles on the prepared data.

  Attributes:
    real_train: the real training split (source 0).
    real_test: the real test split (evaluation).
    generated: the generated training split (source 1), or None.
    data_dir: the TFDS data_dir.
    sidecar_root: where margin sidecars go (None: beside the shards).
    built: names of the datasets built by this call (the others were reused).
  """

  real_train: splits.Split
  real_test: splits.Split
  generated: splits.Split | None
  data_dir: Path
  sidecar_root: Path | None = None
  built: tuple[str, ...] = ()

  @property
  def train_splits(self) -> dict[str, splits.Split]:
    """{'real': ..., 'generated': ...} (without 'generated' when there is none)."""
    out = {'real': self.real_train}
    if self.generated is not None:
      out['generated'] = self.generated
    return out

  def summary(self) -> str:
    lines = [f'data_dir {self.data_dir}']
    for role, s in (('real train', self.real_train), ('real test', self.real_test)) + (
      (('generated', self.generated),) if self.generated else ()
    ):
      state = 'built' if s.name in self.built else 'reused'
      lines.append(
        f'  {role:10s} {s.name}:{s.split} {s.num_examples} examples, {s.num_classes} classes, '
        f'{s.image_shape}, {s.num_shards} shards ({state})'
      )
    return '\n'.join(lines)


@dataclasses.dataclass
class _Plan:
  builder: str
  config_name: str
  spec: dict[str, Any] | None  # identity of the source + shard count (None: source gone)
  num_shards: int
  make_source: Callable[[], sources.Source]
  field: str  # config field(s) to mention in errors
  fix: str  # how to use a different dataset instead
  gone: dict[str, Any] | None = None  # What identifies a source file that no longer exists.


def prepare(data_config: Any, data_dir: str | os.PathLike, *, build: bool = True) -> Prepared:
  """Builds (or reuses) the datasets named by `data_config` and returns their handles.

  Args:
    data_config: the `config.data` section (see configs/default.py).
    data_dir: TFDS data_dir to use when `data_config.data_dir` is empty
      (the main job passes `<workdir>/data`).
    build: if False, only open datasets that are already built (for processes
      other than 0 in a multi-host run, after process 0 has prepared them).

  Returns:
    `Prepared` with the real train/test splits and the generated split (or None).

  Raises:
    DataError: a bad config field, a missing or bad input file, or a built dataset
      that disagrees with the config (the message says how to proceed).
  """
  t0 = time.perf_counter()
  data_dir = Path(data_config.data_dir or data_dir).expanduser()
  data_dir.mkdir(parents=True, exist_ok=True)
  built: list[str] = []
  real_cfg, gen_cfg = data_config.real, data_config.generated
  # Check the cheap things before a long build.
  if gen_cfg.kind not in GENERATED_KINDS:
    raise DataError(
      f'data.generated.kind={gen_cfg.kind!r} is not one of {GENERATED_KINDS}; fix the config.'
    )
  if gen_cfg.kind != 'none':
    builders.check_config_name(gen_cfg.name, 'data.generated.name')

  if real_cfg.kind == 'image_folder':
    real_dir = _image_folder_dir(data_dir, real_cfg.name)
  else:
    plan = _real_plan(real_cfg, data_dir)
    real_dir = _ensure(plan, data_dir, build, built)
  real_train = splits.open_split(real_dir, 'train', source_id=0, data_dir=data_dir)
  real_test = splits.open_split(real_dir, 'test', source_id=0, data_dir=data_dir)

  generated = None
  if gen_cfg.kind != 'none':
    plan = _generated_plan(gen_cfg, real_cfg, real_train, data_dir)
    gen_dir = _ensure(plan, data_dir, build, built)
    generated = splits.open_split(gen_dir, 'train', source_id=1, data_dir=data_dir)
    if generated.image_shape != real_train.image_shape:
      raise DataError(
        f'{generated.name}: images {generated.image_shape} differ from the real data '
        f'{real_train.image_shape}; use a generated set made for {real_train.name}.'
      )
    if generated.num_classes != real_train.num_classes:
      raise DataError(
        f'{generated.name}: {generated.num_classes} classes, the real data has '
        f'{real_train.num_classes}; use a generated set made for {real_train.name}.'
      )

  sidecar_root = Path(data_config.sidecar_dir) if data_config.sidecar_dir else None
  prepared = Prepared(real_train, real_test, generated, data_dir, sidecar_root, tuple(built))
  logging.info('prepared data in %.1fs:\n%s', time.perf_counter() - t0, prepared.summary())
  return prepared


def _real_plan(cfg: Any, data_dir: Path) -> _Plan:
  kind = cfg.kind
  if kind == 'mnist_embedded':
    spec, make = sources.mnist_spec(), sources.mnist_source
  elif kind in ('cifar10', 'cifar100'):
    spec = sources.cifar_spec(kind)
    # Offline (download=False) without archive_dir stays an error that names the field.
    archive_dir = cfg.archive_dir or (os.fspath(data_dir / DOWNLOADS) if cfg.download else '')

    def make():
      return sources.cifar_source(kind, archive_dir, download=cfg.download)
  else:
    raise DataError(f'data.real.kind={kind!r} is not one of {REAL_KINDS}; fix the config.')
  return _Plan(
    builder='puma_real',
    config_name=kind,
    spec={**spec, 'num_shards': cfg.num_shards},
    num_shards=cfg.num_shards,
    make_source=make,
    field='data.real',
    fix='set data.data_dir to another folder',
  )


def _generated_plan(gen_cfg: Any, real_cfg: Any, real: splits.Split, data_dir: Path) -> _Plan:
  name = builders.check_config_name(gen_cfg.name, 'data.generated.name')
  gone = None
  if gen_cfg.kind == 'embedded':
    if real_cfg.kind != 'mnist_embedded':
      raise DataError(
        f'data.generated.kind=embedded generates MNIST-like digits from the embedded MNIST; '
        f'with data.real.kind={real_cfg.kind} use data.generated.kind=npz (your generated '
        'file) or none.'
      )
    if gen_cfg.num_examples < 1:
      raise DataError(f'data.generated.num_examples={gen_cfg.num_examples}: must be >= 1')
    spec = sources.embedded_generated_spec(gen_cfg.seed, gen_cfg.num_examples)

    def make():
      return _embedded_source(gen_cfg, real, data_dir, spec)

    field = 'data.generated (kind=embedded: seed, num_examples)'
  elif gen_cfg.url:
    url, sha256 = gen_cfg.url, gen_cfg.sha256.strip().lower()
    if len(sha256) != 64 or any(c not in '0123456789abcdef' for c in sha256):
      raise DataError(
        f"data.generated.url needs data.generated.sha256, the 64 hex digits of the file's "
        f'sha256 (now {gen_cfg.sha256!r}); `sha256sum FILE` prints it.'
      )
    if gen_cfg.path:
      path = Path(gen_cfg.path).expanduser()
    else:
      path = data_dir / DOWNLOADS / (Path(urllib.parse.urlparse(url).path).name or 'generated.npz')
    spec = sources.npz_url_spec(url, sha256, path)

    def make():
      download.fetch(
        url,
        path,
        sha256=sha256,
        by_hand=(
          f'Or download it by hand (sha256 {sha256}) and place it at {path} '
          "(data.generated.path), or set data.generated.url to '' and data.generated.path "
          'to the file.'
        ),
      )
      return sources.npz_source(
        path, num_classes=real.num_classes, image_shape=real.image_shape, spec=spec
      )

    field = f'data.generated.url ({url})'
  else:
    if not gen_cfg.path:
      raise DataError(
        'data.generated.kind=npz needs data.generated.path (the .npz with `image` and `label`), '
        'or data.generated.url with data.generated.sha256 to download it.'
      )
    path = Path(gen_cfg.path).expanduser()
    # A missing file is fine only if this very file was built already (checked in _ensure).
    spec = sources.npz_spec(path) if path.exists() else None
    if not path.exists():
      gone = {'kind': 'npz', 'path': os.fspath(path.resolve()), 'num_shards': gen_cfg.num_shards}

    def make():
      if not path.exists():
        raise DataError(f'{path}: no such file (data.generated.path)')
      return sources.npz_source(path, num_classes=real.num_classes, image_shape=real.image_shape)

    field = f'data.generated.path ({path})'
  return _Plan(
    builder='puma_generated',
    config_name=name,
    spec=None if spec is None else {**spec, 'num_shards': gen_cfg.num_shards},
    num_shards=gen_cfg.num_shards,
    make_source=make,
    field=field,
    gone=gone,
    fix='choose a new data.generated.name to build it beside the old one',
  )


def _embedded_source(
  gen_cfg: Any, real: splits.Split, data_dir: Path, spec: dict
) -> sources.Source:
  tmp = tempfile.TemporaryDirectory(dir=data_dir, prefix='.generating-')
  path = Path(tmp.name) / f'{gen_cfg.name}.npz'
  t0 = time.perf_counter()
  sources.write_embedded_generated(path, seed=gen_cfg.seed, num_examples=gen_cfg.num_examples)
  logging.info(
    'generated %d examples (seed %d) in %.1fs',
    gen_cfg.num_examples,
    gen_cfg.seed,
    time.perf_counter() - t0,
  )
  source = sources.npz_source(
    path, num_classes=real.num_classes, image_shape=real.image_shape, spec=spec
  )
  close = source.cleanup

  def cleanup():
    close()
    tmp.cleanup()

  source.cleanup = cleanup
  return source


def _ensure(plan: _Plan, data_dir: Path, build: bool, built: list[str]) -> Path:
  """Returns the folder of the dataset `plan` describes, building it if needed."""
  ddir = builders.dataset_dir(data_dir, plan.builder, plan.config_name)
  name = f'{plan.builder}/{plan.config_name}'
  if (ddir / 'dataset_info.json').exists():
    existing = splits.open_split(ddir, 'train', source_id=0, data_dir=data_dir)
    old = existing.metadata.get('puma', {})
    if plan.spec is None:
      if any(old.get(k) != v for k, v in (plan.gone or {}).items()):
        raise DataError(
          f'{plan.field} does not exist, and {ddir} was built from another source '
          f'({_describe(old)}). Fix the path, or {plan.fix}.'
        )
      logging.warning('%s: its source (%s) is gone; reusing the built dataset', name, plan.field)
    elif not sources.same_spec(old, plan.spec):
      raise DataError(
        f'{ddir} was built from a different source than {plan.field} now names:\n'
        f'  built from: {_describe(old)}\n  config now: {_describe(plan.spec)}\n'
        f'Either restore the config, {plan.fix}, or delete {ddir} to rebuild it '
        '(margins computed on the old data are then invalid).'
      )
    for s in _split_names(ddir):
      splits.open_split(ddir, s, source_id=0, data_dir=data_dir).verify()
    logging.info('%s: reusing %s', name, ddir)
    return ddir
  if not build:
    raise DataError(f'{ddir}: {name} is not prepared yet; run prepare on process 0 first.')
  # Left by a build that was killed (an exception cleans up after itself).
  stale = [*ddir.parent.glob(f'incomplete.*_{ddir.name}'), *data_dir.glob('.generating-*')]
  for path in [*stale, *data_dir.glob('.tfds-downloads-*')]:
    logging.warning('removing %s, left by an interrupted build', path)
    shutil.rmtree(path, ignore_errors=True)
  t0 = time.perf_counter()
  source = plan.make_source()
  try:
    logging.info('%s: building %d shards into %s', name, plan.num_shards, ddir)
    builders.build(
      plan.builder,
      plan.config_name,
      data_dir=data_dir,
      arrays=source.arrays,
      image_shape=source.image_shape,
      num_classes=source.num_classes,
      class_names=source.class_names,
      num_shards=plan.num_shards,
      build_spec=source.spec | {'num_shards': plan.num_shards},
    )
  finally:
    if source.cleanup is not None:
      source.cleanup()
  for s in source.arrays:
    splits.open_split(ddir, s, source_id=0, data_dir=data_dir).verify()
  n = {s: a.num_examples for s, a in source.arrays.items()}
  logging.info('%s: built %s in %.1fs', name, n, time.perf_counter() - t0)
  built.append(name)
  return ddir


def _split_names(ddir: Path) -> list[str]:
  return list(tfds.builder_from_directory(os.fspath(ddir)).info.splits.keys())


def _describe(spec: dict) -> str:
  keep = {k: v for k, v in spec.items() if k != 'arrays'}
  if 'arrays' in spec:
    keep['arrays'] = {
      k: f'crc32={v["crc32"]} shape={v["shape"]}' for k, v in spec['arrays'].items()
    }
  return str(keep)


def _version_key(name: str) -> tuple:
  try:
    return tuple(int(x) for x in name.split('.'))
  except ValueError:
    return ()


def _image_folder_dir(data_dir: Path, name: str) -> Path:
  """The newest version folder of a dataset written by the image-folder converter."""
  if not name:
    raise DataError('data.real.kind=image_folder needs data.real.name (the converted dataset).')
  root = data_dir / name
  found = sorted(root.glob('**/dataset_info.json'), key=lambda p: _version_key(p.parent.name))
  if not found:
    raise DataError(
      f'{root}: no converted dataset {name!r} under data_dir {data_dir}; run the image-folder '
      'converter first (python -m tools.image_folder, from a checkout; data.real.name must '
      'match its --name).'
    )
  return found[-1].parent
