"""Lists a folder of class folders of images and chooses the classes a conversion keeps.

`Settings` is what a conversion writes; `list_source` reads `<src>/<class>/<image>` and
returns the `Listing` of the kept classes' image files (sorted, so the same folder gives
the same listing).
"""

import concurrent.futures
import dataclasses
import functools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from absl import logging

from puma_jax import progress
from puma_jax.datasets.errors import DataError

IMAGE_EXTENSIONS = ('.jpeg', '.jpg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')
RESAMPLE = ('box', 'bilinear', 'bicubic', 'lanczos')
CLASS_SELECTIONS = ('first', 'largest', 'random')
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


def check_settings(settings: Settings) -> None:
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
  check_settings(settings)
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
