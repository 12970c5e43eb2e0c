r"""The image-folder converter's command line (run from a checkout of puma_jax):

  python -m tools.image_folder --src=/data/winter21_whole --data_dir=/data/tfds \
    --name=imagenet21k_64px --resolution=64 --num_classes=100 --class_selection=largest

See `tools/image_folder/__init__.py` for what it writes, and `--help` for the flags.
"""

import dataclasses
import sys
from collections.abc import Sequence

from puma_jax.datasets.errors import DataError
from tools.image_folder.conversion import convert
from tools.image_folder.listing import CLASS_SELECTIONS, RESAMPLE, Settings


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
  run()
