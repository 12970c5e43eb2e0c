r"""An offline tool, run from a checkout of puma_jax (not installed with the package).

Converts a folder of class subfolders of images (the ImageNet-21K layout) to a TFDS dataset.

  python -m tools.image_folder --src=/data/winter21_whole --data_dir=/data/tfds \
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

Modules: `listing` (the class folders and the classes kept), `planning` (which file goes
to which split, position and shard), `shards` (decoding and writing one shard, checking a
written one), `conversion` (`convert`: resumable, parallel, multi-host), `__main__` (the
command line). The pipeline opens the result with `puma_jax.datasets.prepare`; it needs
none of this.
"""

from tools.image_folder.conversion import (
  CONVERSION_FILE,
  CORRUPT_FILE,
  convert,
  dataset_dir,
  incomplete_dir,
)
from tools.image_folder.listing import Listing, Settings, list_source, read_classes_file
from tools.image_folder.planning import Plan, make_plan
from tools.image_folder.shards import load_image

__all__ = [
  'CONVERSION_FILE',
  'CORRUPT_FILE',
  'Listing',
  'Plan',
  'Settings',
  'convert',
  'dataset_dir',
  'incomplete_dir',
  'list_source',
  'load_image',
  'make_plan',
  'read_classes_file',
]
