"""Converts a listed, planned image folder to a TFDS dataset: resumable, parallel, multi-host.

`convert` lists the source (`listing`), plans the splits and shards (`planning`), writes
the shards this process owns (`shards`, in a pool of worker processes) into
`<data_dir>/<name>.incomplete/<version>`, and, once every shard of every process is
complete, writes the dataset info and renames the folder to `<data_dir>/<name>/<version>`.
"""

import concurrent.futures
import json
import multiprocessing
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from puma_jax import artifacts, progress
from puma_jax.datasets import builders, splits
from puma_jax.datasets.errors import DataError
from tools.image_folder import shards
from tools.image_folder.listing import Settings, check_settings, list_source
from tools.image_folder.planning import FORMAT, SPLITS, Plan, make_plan, settings_spec, spec_diff

VERSION = builders.VERSION
CORRUPT_FILE = 'corrupt_images.json'
CONVERSION_FILE = 'conversion.json'
INCOMPLETE_SUFFIX = '.incomplete'
_PLAN_FILE = 'plan.json'
_NAME = re.compile(r'^[A-Za-z]\w*$')


def dataset_dir(data_dir: str | os.PathLike, name: str) -> Path:
  """Where the converted dataset is: `<data_dir>/<name>/<version>`."""
  return Path(data_dir) / name / VERSION


def incomplete_dir(data_dir: str | os.PathLike, name: str) -> Path:
  """Where a conversion in progress writes: `<data_dir>/<name>.incomplete/<version>`.

  Outside `<data_dir>/<name>`, so that `prepare` never opens an unfinished dataset.
  """
  return Path(data_dir) / f'{name}{INCOMPLETE_SUFFIX}' / VERSION


def _check_plan_file(plan: Plan, work: Path) -> None:
  """Records the plan of a new conversion, or checks that it is the one being resumed."""
  path = work / _PLAN_FILE
  info = {'src': os.fspath(plan.listing.src.resolve()), 'classes_file': plan.settings.classes_file}
  if not path.exists():
    artifacts.write_json(path, {'plan_id': plan.plan_id, 'spec': plan.spec, 'info': info})
  old = json.loads(path.read_text(encoding='utf-8'))
  if old['plan_id'] == plan.plan_id:
    return
  raise DataError(
    f'{work} holds an interrupted conversion with other settings or source files '
    f'({spec_diff(old["spec"], plan.spec)}; it read {old["info"]["src"]}). Rerun with the '
    f'settings it was started with to finish it, or delete {work.parent} to start over.'
  )


def _existing(final: Path, settings: Settings, name: str) -> Path | None:
  """The finished dataset if it was converted with these settings; DataError if with others."""
  if not final.exists():
    return None
  if not (final / 'dataset_info.json').exists():
    raise DataError(
      f'{final} exists but holds no dataset (no dataset_info.json); move it away or delete it.'
    )
  info_path = final / CONVERSION_FILE
  try:
    old = json.loads(info_path.read_text(encoding='utf-8'))['spec']
  except (OSError, ValueError, KeyError) as e:
    raise DataError(
      f'{final} exists but was not written by this converter ({info_path}: {e}); choose another '
      '--name or move it away.'
    ) from e
  new = settings_spec(settings)
  if old['settings'] != new or old.get('format') != FORMAT:
    diff = spec_diff(
      {'settings': old['settings'], 'format': old.get('format')},
      {'settings': new, 'format': FORMAT},
    )
    raise DataError(
      f'{final}: dataset {name!r} was converted with other settings ({diff}). Choose another '
      f'--name, or delete {final} to convert it again (margins computed on it become invalid).'
    )
  return final


def convert(
  src: str | os.PathLike,
  data_dir: str | os.PathLike,
  name: str,
  settings: Settings = Settings(),  # noqa: B008 (frozen, immutable)
  *,
  workers: int | None = None,
  process_index: int = 0,
  process_count: int = 1,
  listing_threads: int = 16,
) -> Path | None:
  """Converts `src` (one subfolder of images per class) to `<data_dir>/<name>/1.0.0`.

  Safe to rerun: a finished dataset with the same settings is returned as is (the source
  is not read again); an interrupted conversion resumes. Every process of a multi-host
  conversion runs this with its own `process_index`; whichever finishes the last shard
  writes the dataset.

  Args:
    src: the folder of class folders.
    data_dir: the TFDS data_dir (`data.data_dir` of the config).
    name: the dataset name (`data.real.name`): a letter, then letters, digits or `_`.
    settings: what to write (see `Settings`).
    workers: decoding processes on this host (default: all CPU cores; 0: in this process).
    process_index: this process's index among `process_count` sharing the work.
    process_count: processes (hosts) sharing the work.
    listing_threads: threads listing class folders (helps on network filesystems).

  Returns:
    The dataset folder, or None if shards of other processes are still missing.

  Raises:
    DataError: bad settings or source folder (the message names the flag or file and
      the fix), Pillow missing, or a conversion in progress with other settings.
  """
  t0 = time.perf_counter()
  if not _NAME.match(name or ''):
    raise DataError(
      f'--name={name!r}: a dataset name is a letter followed by letters, digits or "_" '
      '(e.g. imagenet21k_64px); it is also data.real.name in the config.'
    )
  if process_count < 1 or not 0 <= process_index < process_count:
    raise DataError(
      f'--process_index={process_index} --process_count={process_count}: need '
      '0 <= process_index < process_count.'
    )
  workers = (os.cpu_count() or 1) if workers is None else workers
  if workers < 0:
    raise DataError(f'--workers={workers}: must be >= 0 (0 decodes in this process)')
  check_settings(settings)
  shards.pillow()
  data_dir = Path(data_dir).expanduser()
  final, work = dataset_dir(data_dir, name), incomplete_dir(data_dir, name)
  if _existing(final, settings, name):
    logging.info('%s: already converted with these settings; nothing to do', final)
    shutil.rmtree(final / shards.SHARD_META_DIR, ignore_errors=True)
    return final

  listing = list_source(src, settings, threads=listing_threads)
  plan = make_plan(listing, settings, name)
  logging.info(
    '%s: %d classes, %d images (%d train in %d shards, %d test in %d shards), %d ignored files',
    name,
    len(listing.classes),
    listing.num_files,
    len(plan.order['train']),
    plan.num_shards['train'],
    len(plan.order['test']),
    plan.num_shards['test'],
    len(listing.ignored),
  )
  work.mkdir(parents=True, exist_ok=True)
  (work / shards.SHARD_META_DIR).mkdir(exist_ok=True)
  _check_plan_file(plan, work)

  mine = [sk for t, sk in enumerate(plan.shards()) if t % process_count == process_index]
  todo, done_images = [], 0
  for split, k in mine:
    meta, why = shards.read_meta(plan, work, split, k)
    if meta is not None:
      done_images += len(plan.shard_sources(split, k))
      continue
    if why != 'not written':
      logging.warning('%s shard %d: %s; writing it again', split, k, why)
    shards.shard_meta_path(work, split, k).unlink(missing_ok=True)
    todo.append((split, k))
  finals = {shards.shard_path(work, name, s, k, plan.num_shards[s]).name for s, k in todo}
  finals |= {shards.shard_meta_path(work, s, k).name for s, k in todo}
  shards.remove_stale_tmps(work, finals)
  logging.info(
    'process %d/%d: %d of its %d shards to write (%d already complete)',
    process_index,
    process_count,
    len(todo),
    len(mine),
    len(mine) - len(todo),
  )
  _run(plan, work, todo, workers, done_images)

  missing = [sk for sk in plan.shards() if not shards.shard_meta_path(work, *sk).exists()]
  if missing:
    logging.info(
      '%d shards of other processes are not written yet (e.g. %s shard %d); the process that '
      'writes the last one writes the dataset (or rerun with the same flags to finish it).',
      len(missing),
      *missing[0],
    )
    return None
  out = _finalize(plan, work, final)
  logging.info('%s: converted in %.1fs', out, time.perf_counter() - t0)
  return out


def _run(plan: Plan, work: Path, todo: list[tuple[str, int]], workers: int, done: int) -> None:
  """Writes the shards `todo`, in a process pool unless workers == 0, with progress."""
  if not todo:
    return
  sizes = {sk: len(plan.shard_sources(*sk)) for sk in todo}
  tracker = progress.Progress(
    f'converting {plan.name}', total=done + sum(sizes.values()), unit='images', initial=done
  )
  tasks = (shards.shard_task(plan, work, *sk) for sk in todo)
  corrupt = 0

  def record(result: dict) -> None:
    nonlocal corrupt
    for rel, reason in result['corrupt']:
      logging.warning('skipped %s: %s', plan.listing.src / rel, reason)
    corrupt += len(result['corrupt'])
    tracker.update(result['attempted'], extra=f'{corrupt} corrupt images skipped')

  if workers == 0:
    for task in tasks:
      record(shards.write_shard(task))
  else:
    for result in _pool_map(shards.write_shard, tasks, min(workers, len(todo))):
      record(result)
  tracker.close(extra=f'{corrupt} corrupt images skipped')


def _pool_map(fn, tasks: Iterator, workers: int) -> Iterator:
  """fn(task) for each task in worker processes, results as they finish.

  At most 2 tasks per worker are queued, so tasks are built lazily. A worker that dies
  (killed, out of memory) stops the conversion with BrokenProcessPool instead of hanging.
  Workers fork from a server that imported `shards` once, not from this process, whose
  threads (JAX, grain) must not be forked; a script calling `convert` with workers therefore
  needs the usual `if __name__ == '__main__':` guard.
  """
  ctx = multiprocessing.get_context('forkserver')
  ctx.set_forkserver_preload([shards.__name__])
  pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx)
  pending: set[concurrent.futures.Future] = set()
  try:
    for task in tasks:
      if len(pending) >= 2 * workers:
        done, pending = concurrent.futures.wait(
          pending, return_when=concurrent.futures.FIRST_COMPLETED
        )
        yield from (f.result() for f in done)
      pending.add(pool.submit(fn, task))
    for f in concurrent.futures.as_completed(pending):
      yield f.result()
  except BaseException:
    pool.shutdown(wait=False, cancel_futures=True)
    raise
  pool.shutdown()


def _finalize(plan: Plan, work: Path, final: Path) -> Path:
  """Merges the shard metas and writes the dataset info; then renames `work` to `final`."""
  try:
    return _write_dataset(plan, work, final)
  except (OSError, DataError):
    if (final / 'dataset_info.json').exists():  # Another process finished it meanwhile.
      logging.info('%s: written by another process', final)
      shards.remove_stale_tmps(final, None)  # Ours, if we were writing when it renamed the folder.
      return final
    raise


def _write_dataset(plan: Plan, work: Path, final: Path) -> Path:
  listing, name = plan.listing, plan.name
  split_infos, corrupt, counts = [], [], {}
  template = shards.shard_template(work, name)
  for split in SPLITS:
    labels, sources, lengths, num_bytes = [], [], [], 0
    for k in range(plan.num_shards[split]):
      meta, why = shards.read_meta(plan, work, split, k)
      if meta is None:
        raise DataError(f'{work}: {split} shard {k}: {why}; rerun the conversion to write it again')
      labels.append(meta['label'])
      sources.append(meta['source_index'])
      lengths.append(meta['num_examples'])
      num_bytes += meta['num_bytes']
      corrupt += [{'split': split, 'path': p, 'reason': r} for p, r in meta['corrupt']]
    labels, sources = np.concatenate(labels), np.concatenate(sources)
    if not len(labels):
      raise DataError(f'{listing.src}: every image of the {split} split failed to decode')
    artifacts.save_npy(work / f'{name}-{split}{splits.LABELS_SUFFIX}', labels.astype(np.int32))
    with artifacts.atomic_path(work / f'{name}-{split}.files.txt') as tmp:
      with open(tmp, 'w', encoding='utf-8', errors='surrogateescape') as f:
        f.writelines(f'{rel}\n' for rel in listing.relpaths(sources))
    counts[split] = np.bincount(labels, minlength=len(listing.classes))
    split_infos.append(
      tfds.core.SplitInfo(
        name=split,
        shard_lengths=lengths,
        num_bytes=num_bytes,
        filename_template=template.replace(split=split),
      )
    )
  empty = [listing.classes[c] for c in np.flatnonzero(counts['train'] == 0)]
  if empty:
    logging.warning('%d classes have no train images (e.g. %s)', len(empty), empty[:5])
  artifacts.write_json(work / CORRUPT_FILE, corrupt)
  stats = {
    'num_examples': {s: int(c.sum()) for s, c in counts.items()},
    'corrupt_images': len(corrupt),
    'ignored_files': len(listing.ignored),
    'ignored_files_examples': listing.ignored[:100],
    'dropped_classes': listing.dropped,
    'classes_without_train_images': empty,
  }
  info = {'src': os.fspath(listing.src.resolve()), 'classes_file': plan.settings.classes_file}
  artifacts.write_json(
    work / CONVERSION_FILE,
    {'plan_id': plan.plan_id, 'spec': plan.spec, 'info': info, 'stats': stats},
  )
  puma = {k: v for k, v in plan.spec.items() if k not in ('classes', 'images_per_class')}
  tfds.folder_dataset.write_metadata(
    data_dir=work,
    features=builders.features(plan.image_shape, len(listing.classes), listing.classes),
    split_infos=split_infos,
    filename_template=template,
    check_data=False,
    description=(
      f'{len(listing.classes)} classes of {listing.src}, {plan.settings.resolution}px, converted '
      'by tools.image_folder'
    ),
    disable_shuffling=True,
    metadata=tfds.core.MetadataDict(puma={**puma, 'plan_id': plan.plan_id}),
  )
  shards.remove_stale_tmps(work, None)
  final.parent.mkdir(parents=True, exist_ok=True)
  os.rename(work, final)
  # Bookkeeping of the conversion; conversion.json keeps what it recorded.
  shutil.rmtree(final / shards.SHARD_META_DIR, ignore_errors=True)
  (final / _PLAN_FILE).unlink(missing_ok=True)
  try:
    work.parent.rmdir()
  except OSError:
    pass
  for split in SPLITS:
    splits.open_split(final, split, source_id=0, data_dir=final.parents[1]).verify()
  logging.info(
    '%s: %s examples, %d corrupt images skipped (listed in %s)',
    final,
    stats['num_examples'],
    len(corrupt),
    final / CORRUPT_FILE,
  )
  return final
