"""Plans a conversion: which file goes to which split, position and shard (deterministic).

The plan is a pure function of the listing and the settings; its `plan_id` (a sha256 of
the conversion's identity) is recorded with every shard, so a resumed conversion only
keeps shards of the same plan.
"""

import dataclasses
import hashlib
import json
import math
import os
from typing import Any

import numpy as np

from puma_jax.datasets import builders
from puma_jax.datasets.errors import DataError
from tools.image_folder.listing import Listing, Settings, read_classes_file

# Bump when the same files and settings would give different examples (decoding, hashing, order).
FORMAT = 1
SPLITS = ('train', 'test')
# Automatic shard count: about this many bytes of pixels per shard, and at least this many shards.
SHARD_TARGET_BYTES = 128 << 20
MIN_AUTO_SHARDS = 32


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


def settings_spec(settings: Settings) -> dict[str, Any]:
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
    'settings': settings_spec(s),
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


def spec_diff(old: dict, new: dict) -> str:
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
