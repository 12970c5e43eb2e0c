r"""Converts a folder of class subfolders of images (the ImageNet-21K layout) to a TFDS dataset.

  python -m puma_jax.datasets.image_folder --src=/data/winter21_whole --data_dir=/data/tfds \
    --name=imagenet21k_64px --resolution=64 --num_classes=100 --class_selection=largest

reads `<src>/<class>/<image>` (e.g. `winter21_whole/n01440764/n01440764_10026.JPEG`) and
writes `<data_dir>/<name>/1.0.0/`, a TFDS array_record dataset with `train` and `test`
splits that `datasets.prepare` opens with `data.real.kind=image_folder`,
`data.real.name=<name>` (and `tfds.data_source(<name>, data_dir=...)` opens too). Its
features are those of every dataset of this package (`builders.features`): `image`
u8[R,R,3] (RGB, the shorter side resized to R, then the centre R x R crop), `label` (the
index of the class in the sorted list of kept classes; the class names are the label's
names) and `source_index` (the file's position in the sorted listing of the kept classes,
class by class). Beside the shards: `<name>-<split>.labels.npy` (i32, global order),
`<name>-<split>.files.txt` (line i: the file of example i, relative to `src`),
`corrupt_images.json` (files that could not be decoded, with the reason) and
`conversion.json` (settings, classes, counts).

- Classes: all subfolders, a list file (`classes_file`), or K of them (`num_classes`):
  the first K in sorted order, the K largest, or K at random (`class_seed`).
- Test split (ImageNet-21K has none): `test_per_class` images per class (those with the
  smallest hash of their path) or a `test_fraction` of each class (by the same hash:
  adding files never moves an existing file between splits). Within each split, the
  examples are ordered by a second hash of their path, which mixes the classes, so
  the first N examples are a fair sample (evaluation on `eval.num_examples`).
- Streamed and parallel: each shard is one task (decode, resize, write) for a pool of
  worker processes, written to a temporary file and renamed; a worker holds one image
  and the writer's buffer. Several hosts share the work with `process_index` /
  `process_count` (shard t goes to process t mod count) on a shared filesystem.
- Resumable: a killed conversion keeps its completed shards (each checked against its
  record count and size) and redoes the others; the dataset appears, by one rename of
  `<data_dir>/<name>.incomplete/1.0.0`, only when every shard is written. Whichever
  process completes the last shard writes it.
- Corrupt or unreadable images are logged, listed in `corrupt_images.json` and skipped.

Pillow is an optional dependency: `pip install -e '.[imagenet]'`.
"""

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from puma_jax import artifacts as fileio  # atomic writes (the converter moves to tools/)
from puma_jax import progress
from puma_jax.datasets import builders, splits
from puma_jax.datasets.errors import DataError

VERSION = builders.VERSION
# Bump when the same files and settings would give different examples (decoding, hashing, order).
FORMAT = 1
IMAGE_EXTENSIONS = ('.jpeg', '.jpg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')
RESAMPLE = ('box', 'bilinear', 'bicubic', 'lanczos')
CLASS_SELECTIONS = ('first', 'largest', 'random')
SPLITS = ('train', 'test')
# Automatic shard count: about this many bytes of pixels per shard, and at least this many shards.
SHARD_TARGET_BYTES = 128 << 20
MIN_AUTO_SHARDS = 32
# A shard in which most images fail is a systematic problem (wrong files, missing codec), not a
# few bad files: stop instead of skipping everything.
SYSTEMATIC_FAILURE_MIN_IMAGES = 16
INSTALL_HINT = "pip install -e '.[imagenet]' (or pip install pillow)"
CORRUPT_FILE = 'corrupt_images.json'
CONVERSION_FILE = 'conversion.json'
INCOMPLETE_SUFFIX = '.incomplete'
_SHARD_META_DIR = '_shards'
_PLAN_FILE = 'plan.json'
_NAME = re.compile(r'^[A-Za-z]\w*$')
_TMP = re.compile(
  r'^\.(?P<stem>.*)' + re.escape(fileio.TMP_MARKER) + r'\d+-[0-9a-f]{8}(?P<suffix>.*)$'
)
_TAR_HINT = (
  'cd {src} && for f in *.tar; do mkdir -p "${{f%.tar}}" && tar -xf "$f" -C "${{f%.tar}}"; done'
)


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a conversion writes; the same settings on the same files write the same dataset.

  Attributes:
    resolution: R, the side of the square uint8 RGB images.
    resample: Pillow filter for the resize: box | bilinear | bicubic | lanczos (all antialiased).
    jpeg_draft: let libjpeg decode JPEGs at 1/2, 1/4 or 1/8 scale when that still leaves at
      least 2R pixels on the shorter side (faster; pixels differ slightly from a full decode).
    classes_file: a text file of class folder names to keep (one per line, `#` comments).
    num_classes: keep K classes (0: all, or those of `classes_file`).
    class_selection: with num_classes: first (sorted) | largest (most images) | random.
    class_seed: seed of class_selection=random.
    min_images_per_class: skip classes with fewer images (0: an empty class is an error).
    test_per_class: test images per class (at most all but one of the class's images).
    test_fraction: if > 0, instead of test_per_class: each image whose path hash falls
      below it is a test image.
    split_seed: seed of the hashes that choose the test images and order the examples.
    train_shards: shards of the train split (0: about 128 MiB of pixels each, at least 32).
    test_shards: shards of the test split (0: likewise).
  """

  resolution: int = 64
  resample: str = 'box'
  jpeg_draft: bool = True
  classes_file: str = ''
  num_classes: int = 0
  class_selection: str = 'first'
  class_seed: int = 0
  min_images_per_class: int = 0
  test_per_class: int = 50
  test_fraction: float = 0.0
  split_seed: int = 0
  train_shards: int = 0
  test_shards: int = 0


@dataclasses.dataclass
class Listing:
  """The image files of the kept classes.

  Attributes:
    src: the source folder.
    classes: the kept class folder names, sorted (label = position).
    files: per kept class, its image file names (bytes, sorted).
    ignored: relative paths of files that are not images (by extension), in kept classes
      and at the top level.
    dropped: classes skipped for having fewer than `min_images_per_class` images.
  """

  src: Path
  classes: tuple[str, ...]
  files: list[np.ndarray]
  ignored: list[str]
  dropped: list[str]

  @functools.cached_property
  def offsets(self) -> np.ndarray:
    """i64[K+1]: source index of the first file of each class (and the total)."""
    return np.concatenate([[0], np.cumsum([len(f) for f in self.files])]).astype(np.int64)

  @property
  def num_files(self) -> int:
    return int(self.offsets[-1])

  def class_of(self, sources: np.ndarray) -> np.ndarray:
    """i64[n]: the class (label) of each source index."""
    return np.searchsorted(self.offsets, sources, side='right') - 1

  def relpaths(self, sources: np.ndarray) -> list[str]:
    """The files with these source indices, relative to `src` ('class/file')."""
    offsets = self.offsets
    return [
      f'{self.classes[c]}/{os.fsdecode(self.files[c][i - offsets[c]])}'
      for i, c in zip(sources.tolist(), self.class_of(sources).tolist(), strict=True)
    ]


@dataclasses.dataclass
class Plan:
  """Which file goes to which split, shard and position (a pure function of the listing).

  Attributes:
    listing: the files.
    settings: the settings.
    name: the dataset name.
    order: split -> i64[n]: source indices in the split's global order.
    num_shards: split -> shard count.
    spec: JSON identity of the conversion (settings, classes, listing hash, counts).
    plan_id: sha256 of `spec`, recorded with every shard.
  """

  listing: Listing
  settings: Settings
  name: str
  order: dict[str, np.ndarray]
  num_shards: dict[str, int]
  spec: dict[str, Any]
  plan_id: str

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.settings.resolution, self.settings.resolution, 3)

  def shards(self) -> list[tuple[str, int]]:
    """Every (split, shard index), train first; task t of this list goes to process t mod P."""
    return [(s, k) for s in SPLITS for k in range(self.num_shards[s])]

  def shard_sources(self, split: str, k: int) -> np.ndarray:
    a, b = builders.shard_bounds(len(self.order[split]), self.num_shards[split])[k]
    return self.order[split][a:b]


@dataclasses.dataclass(frozen=True)
class _ShardTask:
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


# ------------------------------------------------------------------ decoding


def _pil():
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
  image_lib = _pil()
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


def _write_shard(task: _ShardTask) -> dict[str, Any]:
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
  with fileio.atomic_path(task.path) as tmp:
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
  with fileio.atomic_path(task.meta_path) as tmp:
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


# ------------------------------------------------------------------ listing


def _check_settings(settings: Settings) -> None:
  s = settings
  if not isinstance(s.resolution, int) or s.resolution < 1:
    raise DataError(f'--resolution={s.resolution}: must be a positive number of pixels')
  if s.resample not in RESAMPLE:
    raise DataError(f'--resample={s.resample!r}: must be one of {RESAMPLE}')
  if s.class_selection not in CLASS_SELECTIONS:
    raise DataError(f'--class_selection={s.class_selection!r}: must be one of {CLASS_SELECTIONS}')
  for field in ('num_classes', 'min_images_per_class', 'test_per_class', 'train_shards'):
    if getattr(s, field) < 0:
      raise DataError(f'--{field}={getattr(s, field)}: must be >= 0')
  if s.test_shards < 0:
    raise DataError(f'--test_shards={s.test_shards}: must be >= 0')
  if s.classes_file and s.num_classes:
    raise DataError(
      f'--classes_file={s.classes_file} and --num_classes={s.num_classes} both choose classes; '
      'use one of them.'
    )
  if not 0.0 <= s.test_fraction < 1.0:
    raise DataError(f'--test_fraction={s.test_fraction}: must be in [0, 1)')
  if not s.test_fraction and not s.test_per_class:
    raise DataError(
      'the dataset needs a test split (evaluation reads it): set --test_per_class (e.g. 50) '
      'or --test_fraction (e.g. 0.02).'
    )


def read_classes_file(path: str | os.PathLike) -> list[str]:
  """The class folder names listed in a text file: one per line, `#` starts a comment."""
  path = Path(path).expanduser()
  try:
    text = path.read_text(encoding='utf-8')
  except OSError as e:
    raise DataError(f'--classes_file={path}: cannot read it ({e})') from e
  names = [line.split('#', 1)[0].strip() for line in text.splitlines()]
  names = [n for n in names if n]
  if not names:
    raise DataError(f'--classes_file={path}: lists no classes (one class folder name per line)')
  seen, twice = set(), []
  for n in names:
    if n in seen:
      twice.append(n)
    seen.add(n)
  if twice:
    raise DataError(f'--classes_file={path}: {twice[:5]} listed more than once; list each once.')
  return sorted(names)


def _list_class(folder: Path) -> tuple[list[bytes], list[str]]:
  """(image file names, other entries) of one class folder, each sorted; hidden names skipped."""
  images, other = [], []
  with os.scandir(os.fsencode(folder)) as it:
    for entry in it:
      name = entry.name
      if name.startswith(b'.'):
        continue
      is_image = os.path.splitext(name)[1].lower().decode('ascii', 'replace') in IMAGE_EXTENSIONS
      if is_image and entry.is_file() and b'\n' not in name and b'\r' not in name:
        images.append(name)
      else:
        other.append(os.fsdecode(name))
  return sorted(images), sorted(other)


def _list_many(src: Path, names: Sequence[str], threads: int) -> Iterator[tuple[str, list, list]]:
  """Lists class folders with a thread pool, in the order given, a chunk at a time (lazily)."""
  chunk = max(64, 4 * threads)
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    for a in range(0, len(names), chunk):
      part = names[a : a + chunk]
      for name, (images, other) in zip(
        part, pool.map(lambda n: _list_class(src / n), part), strict=True
      ):
        yield name, images, other


def list_source(src: str | os.PathLike, settings: Settings, *, threads: int = 16) -> Listing:
  """Lists the class folders of `src` and chooses the classes `settings` asks for.

  Raises:
    DataError: `src` missing or not a folder of class folders, a listed class missing,
      an empty kept class, no images at all, or too few eligible classes.
  """
  _check_settings(settings)
  src = Path(src).expanduser()
  if not src.exists():
    raise DataError(f'--src={src}: no such folder')
  if not src.is_dir():
    raise DataError(f'--src={src} is a file; give the folder that holds one subfolder per class')
  dirs, top_files = [], []
  with os.scandir(src) as it:
    for entry in it:
      if entry.name.startswith('.'):
        continue
      (dirs if entry.is_dir() else top_files).append(entry.name)
  dirs.sort()
  top_files.sort()
  if not dirs:
    tars = [n for n in top_files if n.endswith('.tar')]
    if tars:
      raise DataError(
        f'--src={src} holds {len(tars)} .tar archives (e.g. {tars[0]}) and no class folders. '
        'Extract each class archive into a folder of its own name first:\n  '
        + _TAR_HINT.format(src=src)
      )
    raise DataError(
      f'--src={src} has no subfolders; it must hold one folder of images per class '
      f'(e.g. {src}/n01440764/n01440764_10026.JPEG).'
    )
  if top_files:
    logging.info(
      '%s: ignoring %d files outside class folders (e.g. %s)', src, len(top_files), top_files[0]
    )
  s = settings
  listed: dict[str, tuple[list, list]] = {}
  dropped: list[str] = []
  min_images = max(1, s.min_images_per_class)
  # The total is known unless K classes are picked in order until K have enough images.
  some = s.num_classes and s.class_selection != 'largest'
  total = len(read_classes_file(s.classes_file)) if s.classes_file else None if some else len(dirs)
  tracker = progress.Progress('listing classes', total=total, unit='classes', every_s=30.0)

  def eligible(name, images):
    if len(images) >= min_images:
      return True
    if s.min_images_per_class == 0 and not s.classes_file:
      return True  # Empty: an error below, unless no class has images at all.
    dropped.append(name)
    return False

  if s.classes_file:
    wanted = read_classes_file(s.classes_file)
    have = set(dirs)
    missing = [n for n in wanted if n not in have]
    if missing:
      raise DataError(
        f'--classes_file={s.classes_file}: {len(missing)} of its {len(wanted)} classes have no '
        f'folder in {src} (e.g. {missing[:5]}); fix the list or --src.'
      )
    for name, images, other in _list_many(src, wanted, threads):
      tracker.update(1)
      if len(images) < min_images:
        raise DataError(
          f'{src / name}: {len(images)} images (class listed in --classes_file), fewer than '
          f'{min_images}{_others(other)}; remove it from the list.'
        )
      listed[name] = (images, other)
  elif s.num_classes and s.class_selection in ('first', 'random'):
    candidates = list(dirs)
    if s.class_selection == 'random':
      perm = np.random.default_rng(s.class_seed).permutation(len(dirs))
      candidates = [dirs[i] for i in perm]
    for name, images, other in _list_many(src, candidates, threads):
      tracker.update(1)
      if eligible(name, images):
        listed[name] = (images, other)
        if len(listed) == s.num_classes:
          break
  else:
    for name, images, other in _list_many(src, dirs, threads):
      tracker.update(1)
      if eligible(name, images):
        listed[name] = (images, other)
    if s.num_classes:  # largest
      by_size = sorted(listed, key=lambda n: (-len(listed[n][0]), n))
      listed = {n: listed[n] for n in by_size[: s.num_classes]}
  tracker.close()
  if not any(images for images, _ in listed.values()):
    if dropped and not listed:
      raise DataError(
        f'--src={src}: no class folder has at least --min_images_per_class={min_images} images.'
      )
    raise DataError(
      f'--src={src}: no images in any of the {len(listed)} class folders read (looked for files '
      f'ending in {", ".join(IMAGE_EXTENSIONS)}, any case).'
    )
  for name, (images, other) in listed.items():
    if not images:
      raise DataError(
        f'{src / name}: class folder has no images{_others(other)}. Remove it, leave it out '
        'with --classes_file, or pass --min_images_per_class=1 to skip classes with fewer images.'
      )
  if s.num_classes and len(listed) < s.num_classes:
    raise DataError(
      f'--num_classes={s.num_classes}: only {len(listed)} class folders of {src} have at least '
      f'{min_images} images; ask for fewer classes.'
    )
  if dropped:
    logging.warning(
      'skipped %d classes with fewer than %d images (e.g. %s)',
      len(dropped),
      min_images,
      dropped[:5],
    )
  classes = tuple(sorted(listed))
  ignored = [f'{c}/{o}' for c in classes for o in listed[c][1]] + top_files
  if ignored:
    logging.warning('ignoring %d files that are not images (e.g. %s)', len(ignored), ignored[:5])
  files = [np.array(listed[c][0], dtype=bytes) for c in classes]
  return Listing(src, classes, files, ignored, dropped)


def _others(other: list[str]) -> str:
  return f' (only {len(other)} other entries, e.g. {other[0]!r})' if other else ''


# ------------------------------------------------------------------ planning


def _settings_spec(settings: Settings) -> dict[str, Any]:
  """The settings that identify a conversion (the classes file by its content, not its path)."""
  spec = dataclasses.asdict(settings)
  if settings.test_fraction:
    spec['test_per_class'] = 0  # Not used.
  path = spec.pop('classes_file')
  spec['classes_listed'] = read_classes_file(path) if path else None
  return spec


def _hashes(listing: Listing, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
  """Per file (source order): split hash u64[N], order hash u64[N], and the listing's sha256."""
  digests = bytearray()
  listing_hash = hashlib.sha256()
  key = f'puma-image-folder:{seed}'.encode()
  for cls, names in zip(listing.classes, listing.files, strict=True):
    prefix = os.fsencode(cls) + b'/'
    listing_hash.update(prefix + b'\n')
    for name in names.tolist():
      path = prefix + name
      listing_hash.update(path + b'\n')
      digests += hashlib.blake2b(path, digest_size=16, key=key).digest()
  h = np.frombuffer(digests, dtype='<u8').reshape(-1, 2)
  return h[:, 0], h[:, 1], 'sha256:' + listing_hash.hexdigest()


def make_plan(listing: Listing, settings: Settings, name: str) -> Plan:
  """Assigns every file to a split, a position and a shard (deterministic, see module doc)."""
  s = settings
  h_split, h_order, listing_sha = _hashes(listing, s.split_seed)
  offsets = listing.offsets
  is_test = np.zeros(listing.num_files, bool)
  if s.test_fraction:
    # The top 53 bits as a float in [0, 1): each file decides alone, so adding files never
    # moves another file between splits.
    is_test = (h_split >> np.uint64(11)).astype(np.float64) / 2.0**53 < s.test_fraction
  else:
    for c in range(len(listing.classes)):
      a, b = int(offsets[c]), int(offsets[c + 1])
      k = min(s.test_per_class, b - a - 1)
      is_test[a + np.argsort(h_split[a:b], kind='stable')[:k]] = True
  order = {}
  for split, mask in (('train', ~is_test), ('test', is_test)):
    idx = np.flatnonzero(mask)
    order[split] = idx[np.lexsort((idx, h_order[idx]))].astype(np.int64)
    if not len(idx):
      raise DataError(
        f'the {split} split would be empty ({listing.num_files} images in '
        f'{len(listing.classes)} classes); '
        + ('lower' if split == 'train' else 'raise')
        + ' --test_per_class or --test_fraction.'
      )
  image_bytes = 3 * s.resolution**2
  num_shards = {}
  for split, flag in (('train', s.train_shards), ('test', s.test_shards)):
    n = len(order[split])
    if flag > n:
      raise DataError(f'--{split}_shards={flag}: the {split} split has only {n} images')
    auto = max(math.ceil(n * image_bytes / SHARD_TARGET_BYTES), min(MIN_AUTO_SHARDS, n))
    num_shards[split] = flag or min(auto, n)
  labels = np.repeat(np.arange(len(listing.classes)), np.diff(offsets))
  spec = {
    'kind': 'image_folder',
    'format': FORMAT,
    'name': name,
    'settings': _settings_spec(s),
    'classes': list(listing.classes),
    'num_files': listing.num_files,
    'listing_sha256': listing_sha,
    'num_images': {k: len(v) for k, v in order.items()},
    'num_shards': num_shards,
    'image_shape': [s.resolution, s.resolution, 3],
    'images_per_class': {
      k: np.bincount(labels[v], minlength=len(listing.classes)).tolist() for k, v in order.items()
    },
  }
  plan_id = 'sha256:' + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
  return Plan(listing, s, name, order, num_shards, spec, plan_id)


# ------------------------------------------------------------------ conversion


def dataset_dir(data_dir: str | os.PathLike, name: str) -> Path:
  """Where the converted dataset is: `<data_dir>/<name>/<version>`."""
  return Path(data_dir) / name / VERSION


def incomplete_dir(data_dir: str | os.PathLike, name: str) -> Path:
  """Where a conversion in progress writes: `<data_dir>/<name>.incomplete/<version>`.

  Outside `<data_dir>/<name>`, so that `prepare` never opens an unfinished dataset.
  """
  return Path(data_dir) / f'{name}{INCOMPLETE_SUFFIX}' / VERSION


def _template(work: Path, name: str):
  from tensorflow_datasets.core import naming

  return naming.ShardedFileTemplate(
    data_dir=work,
    template=naming.DEFAULT_FILENAME_TEMPLATE,
    dataset_name=name,
    filetype_suffix='array_record',
  )


def _shard_path(work: Path, name: str, split: str, k: int, n: int) -> Path:
  return Path(
    _template(work, name).replace(split=split).sharded_filepath(shard_index=k, num_shards=n)
  )


def _meta_path(work: Path, split: str, k: int) -> Path:
  return work / _SHARD_META_DIR / f'{split}-{k:05d}.npz'


def _task(plan: Plan, work: Path, split: str, k: int) -> _ShardTask:
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
  return _ShardTask(
    split=split,
    index=k,
    path=_shard_path(work, plan.name, split, k, plan.num_shards[split]),
    meta_path=_meta_path(work, split, k),
    src=listing.src,
    entries=entries,
    resolution=s.resolution,
    resample=s.resample,
    jpeg_draft=s.jpeg_draft,
    num_classes=len(listing.classes),
    plan_id=plan.plan_id,
  )


def _read_meta(plan: Plan, work: Path, split: str, k: int) -> tuple[dict | None, str]:
  """(meta, '') of a complete, consistent shard, or (None, why not)."""
  from array_record.python import array_record_module

  meta_path = _meta_path(work, split, k)
  path = _shard_path(work, plan.name, split, k, plan.num_shards[split])
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


def _remove_stale_tmps(work: Path, finals: set[str] | None) -> None:
  """Removes temporary files left by killed writers (of the given final names; None: all)."""
  for folder in (work, work / _SHARD_META_DIR):
    if not folder.is_dir():
      continue
    for entry in os.scandir(folder):
      m = _TMP.match(entry.name)
      if m and (finals is None or m['stem'] + m['suffix'] in finals):
        logging.info('removing %s, left by an interrupted conversion', entry.path)
        Path(entry.path).unlink(missing_ok=True)


def _check_plan_file(plan: Plan, work: Path) -> None:
  """Records the plan of a new conversion, or checks that it is the one being resumed."""
  path = work / _PLAN_FILE
  info = {'src': os.fspath(plan.listing.src.resolve()), 'classes_file': plan.settings.classes_file}
  if not path.exists():
    fileio.write_json(path, {'plan_id': plan.plan_id, 'spec': plan.spec, 'info': info})
  old = json.loads(path.read_text(encoding='utf-8'))
  if old['plan_id'] == plan.plan_id:
    return
  raise DataError(
    f'{work} holds an interrupted conversion with other settings or source files '
    f'({_spec_diff(old["spec"], plan.spec)}; it read {old["info"]["src"]}). Rerun with the '
    f'settings it was started with to finish it, or delete {work.parent} to start over.'
  )


def _spec_diff(old: dict, new: dict) -> str:
  diffs = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if a == b:
      continue
    if key == 'settings':
      diffs += [
        f'{k}: {a.get(k)!r} then, {b.get(k)!r} now' for k in sorted(a) if a.get(k) != b.get(k)
      ]
    elif key == 'listing_sha256':
      diffs.append(
        f'the source folder changed ({old.get("num_files")} files then, {new.get("num_files")} now)'
      )
    elif key not in ('num_files', 'images_per_class', 'num_images', 'num_shards', 'classes'):
      diffs.append(f'{key}: {a!r} then, {b!r} now')
    elif key == 'classes':
      diffs.append(f'classes: {len(a or [])} then, {len(b or [])} now')
  return '; '.join(diffs) or 'derived counts differ'


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
  new = _settings_spec(settings)
  if old['settings'] != new or old.get('format') != FORMAT:
    diff = _spec_diff(
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
  settings: Settings = Settings(),
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
  _check_settings(settings)
  _pil()
  data_dir = Path(data_dir).expanduser()
  final, work = dataset_dir(data_dir, name), incomplete_dir(data_dir, name)
  if _existing(final, settings, name):
    logging.info('%s: already converted with these settings; nothing to do', final)
    shutil.rmtree(final / _SHARD_META_DIR, ignore_errors=True)
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
  (work / _SHARD_META_DIR).mkdir(exist_ok=True)
  _check_plan_file(plan, work)

  mine = [sk for t, sk in enumerate(plan.shards()) if t % process_count == process_index]
  todo, done_images = [], 0
  for split, k in mine:
    meta, why = _read_meta(plan, work, split, k)
    if meta is not None:
      done_images += len(plan.shard_sources(split, k))
      continue
    if why != 'not written':
      logging.warning('%s shard %d: %s; writing it again', split, k, why)
    _meta_path(work, split, k).unlink(missing_ok=True)
    todo.append((split, k))
  finals = {_shard_path(work, name, s, k, plan.num_shards[s]).name for s, k in todo}
  finals |= {_meta_path(work, s, k).name for s, k in todo}
  _remove_stale_tmps(work, finals)
  logging.info(
    'process %d/%d: %d of its %d shards to write (%d already complete)',
    process_index,
    process_count,
    len(todo),
    len(mine),
    len(mine) - len(todo),
  )
  _run(plan, work, todo, workers, done_images)

  missing = [sk for sk in plan.shards() if not _meta_path(work, *sk).exists()]
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
  tasks = (_task(plan, work, *sk) for sk in todo)
  corrupt = 0

  def record(result: dict) -> None:
    nonlocal corrupt
    for rel, reason in result['corrupt']:
      logging.warning('skipped %s: %s', plan.listing.src / rel, reason)
    corrupt += len(result['corrupt'])
    tracker.update(result['attempted'], extra=f'{corrupt} corrupt images skipped')

  if workers == 0:
    for task in tasks:
      record(_write_shard(task))
  else:
    for result in _pool_map(_write_shard, tasks, min(workers, len(todo))):
      record(result)
  tracker.close(extra=f'{corrupt} corrupt images skipped')


def _pool_map(fn, tasks: Iterator, workers: int) -> Iterator:
  """fn(task) for each task in worker processes, results as they finish.

  At most 2 tasks per worker are queued, so tasks are built lazily. A worker that dies
  (killed, out of memory) stops the conversion with BrokenProcessPool instead of hanging.
  Workers fork from a server that imported this module once, not from this process, whose
  threads (JAX, grain) must not be forked; a script calling `convert` with workers therefore
  needs the usual `if __name__ == '__main__':` guard.
  """
  ctx = multiprocessing.get_context('forkserver')
  ctx.set_forkserver_preload([__name__])
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
      _remove_stale_tmps(final, None)  # Ours, if we were writing when it renamed the folder.
      return final
    raise


def _write_dataset(plan: Plan, work: Path, final: Path) -> Path:
  listing, name = plan.listing, plan.name
  split_infos, corrupt, counts = [], [], {}
  template = _template(work, name)
  for split in SPLITS:
    labels, sources, lengths, num_bytes = [], [], [], 0
    for k in range(plan.num_shards[split]):
      meta, why = _read_meta(plan, work, split, k)
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
    fileio.save_npy(work / f'{name}-{split}{splits.LABELS_SUFFIX}', labels.astype(np.int32))
    with fileio.atomic_path(work / f'{name}-{split}.files.txt') as tmp:
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
  fileio.write_json(work / CORRUPT_FILE, corrupt)
  stats = {
    'num_examples': {s: int(c.sum()) for s, c in counts.items()},
    'corrupt_images': len(corrupt),
    'ignored_files': len(listing.ignored),
    'ignored_files_examples': listing.ignored[:100],
    'dropped_classes': listing.dropped,
    'classes_without_train_images': empty,
  }
  info = {'src': os.fspath(listing.src.resolve()), 'classes_file': plan.settings.classes_file}
  fileio.write_json(
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
      'by puma_jax.datasets.image_folder'
    ),
    disable_shuffling=True,
    metadata=tfds.core.MetadataDict(puma={**puma, 'plan_id': plan.plan_id}),
  )
  _remove_stale_tmps(work, None)
  final.parent.mkdir(parents=True, exist_ok=True)
  os.rename(work, final)
  # Bookkeeping of the conversion; conversion.json keeps what it recorded.
  shutil.rmtree(final / _SHARD_META_DIR, ignore_errors=True)
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


# ------------------------------------------------------------------ command line


def _define_flags() -> None:
  from absl import flags

  f = flags
  d = Settings()
  f.DEFINE_string('src', None, 'Folder with one subfolder of images per class.')
  f.DEFINE_string('data_dir', None, 'TFDS data_dir to write to (data.data_dir).')
  f.DEFINE_string('name', None, 'Dataset name (data.real.name), e.g. imagenet21k_64px.')
  f.DEFINE_integer('resolution', d.resolution, 'Side R of the square RGB images.')
  f.DEFINE_enum('resample', d.resample, RESAMPLE, 'Resize filter.')
  f.DEFINE_boolean('jpeg_draft', d.jpeg_draft, 'Decode JPEGs at reduced scale when >= 2R remain.')
  f.DEFINE_string('classes_file', d.classes_file, 'Text file of class folder names to keep.')
  f.DEFINE_integer('num_classes', d.num_classes, 'Keep this many classes (0: all).')
  f.DEFINE_enum('class_selection', d.class_selection, CLASS_SELECTIONS, 'Which num_classes.')
  f.DEFINE_integer('class_seed', d.class_seed, 'Seed of --class_selection=random.')
  f.DEFINE_integer('min_images_per_class', d.min_images_per_class, 'Skip smaller classes.')
  f.DEFINE_integer('test_per_class', d.test_per_class, 'Test images per class.')
  f.DEFINE_float('test_fraction', d.test_fraction, 'Or this fraction of each class as test.')
  f.DEFINE_integer('split_seed', d.split_seed, 'Seed of the split and order hashes.')
  f.DEFINE_integer('train_shards', d.train_shards, 'Train shards (0: ~128 MiB each, >= 32).')
  f.DEFINE_integer('test_shards', d.test_shards, 'Test shards (0: ~128 MiB each, >= 32).')
  f.DEFINE_integer('workers', None, 'Decoding processes (default: CPU cores; 0: in-process).')
  f.DEFINE_integer('process_index', 0, 'This host among --process_count sharing the work.')
  f.DEFINE_integer('process_count', 1, 'Hosts sharing the work (same flags on each).')
  f.DEFINE_integer('listing_threads', 16, 'Threads listing class folders.')
  flags.mark_flags_as_required(['src', 'data_dir', 'name'])


def _main(argv: Sequence[str]) -> None:
  import jax
  from absl import app, flags

  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # The converter only decodes images; never take an accelerator from a training job.
  jax.config.update('jax_platforms', 'cpu')
  v = flags.FLAGS
  settings = Settings(**{f.name: v[f.name].value for f in dataclasses.fields(Settings)})
  try:
    out = convert(
      v.src,
      v.data_dir,
      v.name,
      settings,
      workers=v.workers,
      process_index=v.process_index,
      process_count=v.process_count,
      listing_threads=v.listing_threads,
    )
  except DataError as e:
    sys.exit(f'error: {e}')
  if out is None:
    print(f'this process wrote its shards; the last process to finish writes {v.name}')
  else:
    print(
      f'dataset written: {out}\nuse it with --config.data.real.kind=image_folder '
      f'--config.data.real.name={v.name} --config.data.data_dir={v.data_dir}'
    )


def run() -> None:
  """The command line (see the module docstring and `--help`)."""
  from absl import app

  _define_flags()
  app.run(_main)


if __name__ == '__main__':
  # Run as the importable module, so that pool workers unpickle its functions by that name.
  from puma_jax.datasets import image_folder

  image_folder.run()
