"""Datasets: TFDS array_record builders, sidecar arrays, and the grain input pipeline.

- `prepare(config.data, data_dir) -> Prepared`: builds or reuses the real and
  generated datasets (embedded MNIST + generated digits by default; CIFAR-10/100
  from the user's archives; generated data from a DM-Improves-AT .npz).
- `Split`: a handle on one split (shards, lengths, labels, random access).
- `sidecar`: per-shard arrays such as margins, with a checked manifest.
- `input_pipeline`: training batches (mixing, kept indices, per-example eps,
  resumable), evaluation batches and per-shard batches.
"""

from puma_jax.datasets import input_pipeline, sidecar
from puma_jax.datasets.errors import DataError
from puma_jax.datasets.prepared import GENERATED_KINDS, REAL_KINDS, Prepared, prepare
from puma_jax.datasets.splits import SOURCE_IDS, Split, open_split

__all__ = [
  'GENERATED_KINDS',
  'REAL_KINDS',
  'SOURCE_IDS',
  'DataError',
  'Prepared',
  'Split',
  'input_pipeline',
  'open_split',
  'prepare',
  'sidecar',
]
