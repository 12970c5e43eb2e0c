"""One shard of a conversion: decode, resize and write its images; check a written shard.

`write_shard` runs in a worker process (its `ShardTask` is pickled); it writes the
array_record file and then a meta file, each to a temporary file renamed into place, so a
shard counts as complete only when its meta file exists and agrees with the shard file
(`read_meta`).
"""

import dataclasses
import functools
import json
import math
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from puma_jax import artifacts
from puma_jax.datasets import builders
from puma_jax.datasets.errors import DataError
from tools.image_folder.planning import Plan

# A shard in which most images fail is a systematic problem (wrong files, missing codec), not a
# few bad files: stop instead of skipping everything.
SYSTEMATIC_FAILURE_MIN_IMAGES = 16
INSTALL_HINT = "pip install -e '.[imagenet]' (or pip install pillow)"
SHARD_META_DIR = '_shards'
_TMP = re.compile(
  r'^\.(?P<stem>.*)' + re.escape(artifacts.TMP_MARKER) + r'\d+-[0-9a-f]{8}(?P<suffix>.*)$'
)


@dataclasses.dataclass(frozen=True)
class ShardTask:
  """One shard to write: runs in a worker process (pickled)."""

  split: str
  index: int
  path: Path
  meta_path: Path
  src: Path
  entries: list[tuple[str, int, int]]  # (relative path, label, source index)
  resolution: int
  resample: str
  jpeg_draft: bool
  num_classes: int
  plan_id: str


def pillow():
  """Pillow's Image module, or a DataError saying how to install it."""
  try:
    from PIL import Image
  except ImportError as e:
    raise DataError(
      f'the image-folder converter needs Pillow to decode images: {INSTALL_HINT}'
    ) from e
  return Image


def load_image(
  path: str | os.PathLike, resolution: int, *, resample: str = 'box', jpeg_draft: bool = True
) -> np.ndarray:
  """Decodes one image: RGB, the shorter side resized to R, then the centre R x R crop.

  The longer side becomes round(long * R / short) and the crop starts at
  floor((long' - R) / 2), as Pillow's `resize` then `crop` would give.

  Args:
    path: the image file (any format Pillow reads; EXIF orientation is not applied).
    resolution: R.
    resample: box | bilinear | bicubic | lanczos.
    jpeg_draft: for JPEGs, decode at a reduced scale that keeps at least 2R pixels.

  Returns:
    u8[R,R,3].

  Raises:
    Whatever Pillow raises for an unreadable or corrupt file (OSError, ValueError, ...).
  """
  image_lib = pillow()
  r = resolution
  with image_lib.open(path) as im:
    if jpeg_draft and im.format == 'JPEG':
      w, h = im.size
      scale = 2 * r / min(w, h)
      if scale < 1:
        im.draft('RGB', (math.ceil(w * scale), math.ceil(h * scale)))
    im = im.convert('RGB')
  w, h = im.size
  s = min(w, h)
  nw, nh = max(r, round(w * r / s)), max(r, round(h * r / s))
  filt = getattr(image_lib.Resampling, resample.upper())
  im = im.resize((nw, nh), filt)
  left, top = (nw - r) // 2, (nh - r) // 2
  out = np.asarray(im.crop((left, top, left + r, top + r)), dtype=np.uint8)
  if out.shape != (r, r, 3):
    raise ValueError(f'decoded to shape {out.shape}, expected {(r, r, 3)}')
  return out


@functools.cache
def _serializer(image_shape: tuple[int, int, int], num_classes: int):
  from tensorflow_datasets.core import example_serializer

  features = builders.features(image_shape, num_classes)
  return features, example_serializer.ExampleSerializer(features.get_serialized_info())


def write_shard(task: ShardTask) -> dict[str, Any]:
  """Decodes the shard's images and writes its array_record file, then its meta file.

  Both are written to temporary files and renamed, the meta file last: a shard counts
  as complete only when its meta file exists (and agrees with the shard file).
  """
  from tensorflow_datasets.core import file_adapters
  from tensorflow_datasets.core import writer as writer_lib

  t0 = time.perf_counter()
  shape = (task.resolution, task.resolution, 3)
  features, serializer = _serializer(shape, task.num_classes)
  labels: list[int] = []
  source_index: list[int] = []
  corrupt: list[tuple[str, str]] = []

  def examples() -> Iterator[tuple[int, bytes]]:
    for n, (rel, label, src_index) in enumerate(task.entries, 1):
      try:
        image = load_image(
          task.src / rel, task.resolution, resample=task.resample, jpeg_draft=task.jpeg_draft
        )
      except DataError:
        raise
      except Exception as e:  # noqa: BLE001 (Pillow raises many types for a bad file)
        corrupt.append((rel, f'{type(e).__name__}: {e}'))
        if n >= SYSTEMATIC_FAILURE_MIN_IMAGES and len(corrupt) > n // 2:
          raise DataError(
            f'{task.split} shard {task.index}: {len(corrupt)} of the first {n} images failed to '
            f'decode (e.g. {task.src / corrupt[0][0]}: {corrupt[0][1]}); this is not a few '
            'corrupt files. Check that the files are images Pillow can read.'
          ) from e
        continue
      example = {'image': image, 'label': label, 'source_index': src_index}
      labels.append(label)
      source_index.append(src_index)
      yield len(labels) - 1, serializer.serialize_example(features.encode_example(example))

  writer = writer_lib.ExampleWriter(file_format=file_adapters.FileFormat.ARRAY_RECORD)
  with artifacts.atomic_path(task.path) as tmp:
    writer.write(tmp, examples())
    with open(tmp, 'rb') as f:
      os.fsync(f.fileno())  # On disk before it is renamed and recorded as complete.
  meta = {
    'plan_id': task.plan_id,
    'split': task.split,
    'shard': task.index,
    'num_examples': len(labels),
    'num_bytes': task.path.stat().st_size,
    'corrupt': corrupt,
    'seconds': time.perf_counter() - t0,
  }
  with artifacts.atomic_path(task.meta_path) as tmp:
    with open(tmp, 'wb') as f:
      np.savez(
        f,
        label=np.asarray(labels, np.int32),
        source_index=np.asarray(source_index, np.int64),
        meta=np.asarray(json.dumps(meta)),
      )
      f.flush()
      os.fsync(f.fileno())
  return {**meta, 'attempted': len(task.entries)}


def shard_template(work: Path, name: str):
  from tensorflow_datasets.core import naming

  return naming.ShardedFileTemplate(
    data_dir=work,
    template=naming.DEFAULT_FILENAME_TEMPLATE,
    dataset_name=name,
    filetype_suffix='array_record',
  )


def shard_path(work: Path, name: str, split: str, k: int, n: int) -> Path:
  return Path(
    shard_template(work, name).replace(split=split).sharded_filepath(shard_index=k, num_shards=n)
  )


def shard_meta_path(work: Path, split: str, k: int) -> Path:
  return work / SHARD_META_DIR / f'{split}-{k:05d}.npz'


def shard_task(plan: Plan, work: Path, split: str, k: int) -> ShardTask:
  listing = plan.listing
  sources = plan.shard_sources(split, k)
  entries = list(
    zip(
      listing.relpaths(sources),
      listing.class_of(sources).tolist(),
      sources.tolist(),
      strict=True,
    )
  )
  s = plan.settings
  return ShardTask(
    split=split,
    index=k,
    path=shard_path(work, plan.name, split, k, plan.num_shards[split]),
    meta_path=shard_meta_path(work, split, k),
    src=listing.src,
    entries=entries,
    resolution=s.resolution,
    resample=s.resample,
    jpeg_draft=s.jpeg_draft,
    num_classes=len(listing.classes),
    plan_id=plan.plan_id,
  )


def read_meta(plan: Plan, work: Path, split: str, k: int) -> tuple[dict | None, str]:
  """(meta, '') of a complete, consistent shard, or (None, why not)."""
  from array_record.python import array_record_module

  meta_path = shard_meta_path(work, split, k)
  path = shard_path(work, plan.name, split, k, plan.num_shards[split])
  if not meta_path.exists():
    return None, 'not written'
  try:
    with np.load(meta_path, allow_pickle=False) as z:
      meta = json.loads(str(z['meta']))
      meta['label'], meta['source_index'] = z['label'], z['source_index']
  except (OSError, ValueError, KeyError) as e:
    return None, f'unreadable meta file {meta_path} ({e})'
  if meta['plan_id'] != plan.plan_id:
    return None, 'written by a conversion with other settings or files'
  n = meta['num_examples']
  if len(meta['label']) != n or len(meta['source_index']) != n:
    return None, f'meta file {meta_path} is inconsistent'
  if not path.exists():
    return None, f'{path.name} missing'
  if path.stat().st_size != meta['num_bytes']:
    return None, f'{path.name} has {path.stat().st_size} bytes, {meta["num_bytes"]} were written'
  try:
    reader = array_record_module.ArrayRecordReader(os.fspath(path))
    got = reader.num_records()
    reader.close()
  except Exception as e:  # noqa: BLE001 (array_record raises plain RuntimeError)
    return None, f'{path.name} is unreadable ({e})'
  if got != n:
    return None, f'{path.name} has {got} records, {n} were written'
  return meta, ''


def remove_stale_tmps(work: Path, finals: set[str] | None) -> None:
  """Removes temporary files left by killed writers (of the given final names; None: all)."""
  for folder in (work, work / SHARD_META_DIR):
    if not folder.is_dir():
      continue
    for entry in os.scandir(folder):
      m = _TMP.match(entry.name)
      if m and (finals is None or m['stem'] + m['suffix'] in finals):
        logging.info('removing %s, left by an interrupted conversion', entry.path)
        Path(entry.path).unlink(missing_ok=True)
