"""ImageNet-21K: a 100-class low-resolution subset for PUMA, and a 21k-class margin study.

The data arrives as a folder tree with one subfolder of JPEGs per class.
Convert it once to array_record shards (streamed, parallel, resumable;
`pip install -e '.[imagenet]'` for Pillow), then point the config at it:

  python -m tools.image_folder --src=/data/winter21_whole \\
      --data_dir=/data/tfds --name=imagenet21k_100_64 --resolution=64 \\
      --num_classes=100 --class_selection=largest --train_shards=64
  python -m puma_jax.main --config=configs/imagenet21k.py:subset100 \\
      --config.data.data_dir=/data/tfds --workdir=/tmp/in21k_100

Variants (`--config=configs/imagenet21k.py:VARIANT[,tiny]`):
  subset100  (default) the 100 largest classes at 64x64, PreAct ResNet-18,
             L-infinity 4/255, the whole PUMA pipeline.
  full       every class (winter21_whole has 19,167 after conversion; set
             model.num_classes to your conversion's count): a margin study. Run
             `--stage=margins` with a robust margin model
             (margin_model.source=checkpoint or torch_npz); DeepFool looks at the
             top margins.num_candidates classes only, so each iteration costs the
             same as for 10 classes. `--dry_run` estimates the time first.
  tiny       a seconds-long version for the tests.
"""

import ml_collections

from puma_jax import config_base

VARIANTS = ('subset100', 'full', 'tiny')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variants = set(filter(None, (arg or 'subset100').split(',')))
  if variants - set(VARIANTS) or {'subset100', 'full'} <= variants:
    raise ValueError(f'variants {sorted(variants)} of {__name__}: choose from {VARIANTS}')
  full = 'full' in variants
  c = config_base.get_base_config()

  c.data.real.kind = 'image_folder'
  c.data.real.name = 'imagenet21k_full_64' if full else 'imagenet21k_100_64'
  c.data.generated.kind = 'none'
  c.data.generated_fraction = 0.0
  c.data.augment = True
  c.data.crop_padding = 4

  c.model = ml_collections.ConfigDict()
  c.model.name = 'preact_resnet18'
  c.model.num_classes = 19_167 if full else 100
  # bfloat16 convs / matmuls on TPU / GPU (params, optimiser state, EMA, BN statistics,
  # logits and the attacks stay float32; docs/accelerators.md): several times the f32
  # matmul rate there. For a CPU run pass --config.model.dtype=float32.
  c.model.dtype = 'bfloat16'
  c.model.cpu_kernels = True  # Only affects programs lowered for CPU (models/layers.py).
  c.model.mean = (0.485, 0.456, 0.406)
  c.model.std = (0.229, 0.224, 0.225)

  c.attack.norm = 'linf'
  c.attack.eps = 4 / 255
  c.attack.num_steps = 10
  c.attack.step_size = 0.25
  c.train.trades_step_size = 0.0  # attack.step_size

  c.margins.norm = 'linf'
  c.margins.num_candidates = 10  # Top-10 classes of the initial logits, whatever K is.
  c.margins.max_iter = 50
  c.margins.batch_size = 512
  c.margins.deepfool_batch_size = 0  # Accelerators: each device's whole share of a batch at once.

  c.margin_model.source = 'train'
  c.margin_model.num_steps = 5_000

  c.prune.strategy = 'puma'
  c.prune.fraction = 0.3
  c.prune.scope = 'joint'  # No generated data: rank the real examples.
  c.prune.class_balanced = True

  c.train.loss = 'trades'
  c.train.batch_size = 512
  c.train.num_steps = 50_000
  c.train.learning_rate = 0.2
  c.train.warmup_steps = 1_250
  c.train.log_every_steps = 100
  c.train.eval_every_steps = 5_000
  c.train.checkpoint_every_steps = 1_000

  c.eval.batch_size = 512
  c.eval.num_examples = 5_000
  c.eval.pgd_steps = 20

  if full:
    c.margin_model.source = 'checkpoint'  # A robust model trained beforehand.
    c.margins.batch_size = 256

  if 'tiny' in variants:
    config_base.shrink_for_tests(c)
    c.model.name = 'small_cnn'
    c.model.dtype = 'float32'
    del c.model.mean, c.model.std
    c.model.num_classes = 4  # AutoAttack's targeted attacks need at least 4 classes.
    c.margin_model.source = 'train'
  return c
