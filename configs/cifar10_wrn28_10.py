"""CIFAR-10 (or CIFAR-100) + 1M generated images, WRN-28-10 Swish: the DM-Improves-AT recipe.

The recipe of Wang et al. 2023 ("Better Diffusion Models Further Improve
Adversarial Training", 1M EDM images): WRN-28-10 with Swish, TRADES (beta 5,
label smoothing 0.1), batch 512 of which 70% generated, SGD with Nesterov
momentum, lr 0.2 with their `cosinew` schedule (OneCycleLR per epoch, 2.5% warm-up,
cycled momentum), weight decay 5e-4 on all but BatchNorm, EMA 0.995 after 2.5% of
training with BatchNorm statistics copied each epoch, L-infinity 8/255 with 10
steps of 2/255 from a uniform start (or L2 128/255 with 10 steps of 2 * eps / 10),
BatchNorm in batch mode inside the attack, 400 epochs of 50,000 examples. Every
point and its source line are in docs/recipe.md.

Data the user brings (nothing is downloaded):
  --config.data.real.archive_dir=DIR  holding cifar-10-binary.tar.gz (or cifar-100-binary.tar.gz)
  --config.data.generated.path=FILE   the 1M .npz (keys `image`, `label`) of DM-Improves-AT

Variants, comma-separated (`--config=configs/cifar10_wrn28_10.py:puma,l2`):
  baseline  no pruning: the DM-Improves-AT model (the default)
  puma      PUMA: drop 30% of the generated data by margin, per-example eps
  l2        L2 threat model, eps 128/255 (default: L-infinity 8/255)
  cifar100  CIFAR-100 and its 1M generated set
  tiny      a seconds-long version for the tests (tiny WRN, few steps)
"""

import ml_collections

from puma_jax import config_base

EPOCH_EXAMPLES = 50_000  # DM-Improves-AT counts an epoch as 50,000 examples.
NUM_EPOCHS = 400
BATCH_SIZE = 512
VARIANTS = ('baseline', 'puma', 'l2', 'cifar100', 'tiny')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variants = set(filter(None, (arg or 'baseline').split(',')))
  unknown = variants - set(VARIANTS)
  if unknown or {'baseline', 'puma'} <= variants:
    raise ValueError(
      f'variants {sorted(variants)} of {__name__}: choose from {VARIANTS}, baseline or puma'
    )
  cifar100 = 'cifar100' in variants
  c = config_base.get_base_config()
  c.seed = 1

  c.data.real.kind = 'cifar100' if cifar100 else 'cifar10'
  c.data.real.num_shards = 16
  c.data.generated.kind = 'npz'
  c.data.generated.name = 'cifar100_1m' if cifar100 else 'cifar10_1m'
  # 64 shards of 15,625 examples: divisible by 1, 2, 4, ..., 64 hosts.
  c.data.generated.num_shards = 64
  c.data.generated_fraction = 0.7
  c.data.augment = True
  c.data.crop_padding = 4

  c.model = ml_collections.ConfigDict()
  c.model.name = 'wrn'
  c.model.num_classes = 100 if cifar100 else 10
  # bfloat16 convs / matmuls (params, optimiser state, EMA, BN statistics, logits and the
  # attacks stay float32; docs/accelerators.md): TPUs and H100/A100 run bf16 matmuls at
  # several times the f32 rate, and this recipe is compute-bound there. XLA:CPU has no
  # fast bf16 convs: for a CPU run pass --config.model.dtype=float32.
  c.model.dtype = 'bfloat16'
  c.model.cpu_kernels = True  # Only affects programs lowered for CPU (models/layers.py).
  c.model.depth = 28
  c.model.width = 10
  c.model.activation = 'swish'
  c.model.mean = (0.5071, 0.4865, 0.4409) if cifar100 else (0.4914, 0.4822, 0.4465)
  c.model.std = (0.2673, 0.2564, 0.2762) if cifar100 else (0.2471, 0.2435, 0.2616)

  if 'l2' in variants:
    c.attack.norm = 'l2'
    c.attack.eps = 128 / 255
    c.attack.step_size = 15 / 128  # 15/255 per step (PGD evaluation).
    c.train.trades_step_size = 2 / 10  # DM-Improves-AT's TRADES L2 step: 2 * eps / num_steps.
  else:
    c.attack.norm = 'linf'
    c.attack.eps = 8 / 255
    c.attack.step_size = 0.25  # 2/255 per step.
    c.train.trades_step_size = 0.0  # attack.step_size: DM-Improves-AT's 2/255.
  c.attack.num_steps = 10

  steps_per_epoch = -(-EPOCH_EXAMPLES // BATCH_SIZE)
  c.train.loss = 'trades'
  c.train.trades_beta = 5.0
  c.train.label_smoothing = 0.1
  c.train.batch_size = BATCH_SIZE
  c.train.num_steps = NUM_EPOCHS * steps_per_epoch
  c.train.learning_rate = 0.2
  c.train.momentum = 0.9
  c.train.nesterov = True
  c.train.weight_decay = 5e-4
  c.train.warmup_steps = c.train.num_steps // 40  # Used by lr_schedule=warmup_cosine only.
  c.train.lr_schedule = 'cosinew'
  c.train.steps_per_epoch = steps_per_epoch
  c.train.pct_start = 0.025
  c.train.weight_decay_on = 'all_but_batchnorm'
  c.train.ema_decay = 0.995
  c.train.ema_warmup_fraction = 0.025
  c.train.ema_batch_stats = 'copy_each_epoch'
  c.train.trades_start = 'normal' if c.attack.norm == 'l2' else 'uniform'
  c.train.attack_batchnorm = 'batch'
  c.train.bn_first_batch = True
  c.train.log_every_steps = 100
  c.train.eval_every_steps = 25 * steps_per_epoch
  c.train.checkpoint_every_steps = steps_per_epoch

  # Margin model: by default a short TRADES run (40 epochs) of the same recipe on
  # the unpruned data; or a released robust checkpoint converted to .npz
  # (--config.margin_model.source=torch_npz --config.margin_model.path=FILE).
  c.margin_model.source = 'train'
  c.margin_model.num_steps = 40 * steps_per_epoch
  c.margins.norm = c.attack.norm
  c.margins.num_candidates = 10
  c.margins.batch_size = 1024
  c.margins.deepfool_batch_size = 0  # Accelerators: each device's whole share of a batch at once.

  if 'puma' in variants:
    c.prune.strategy = 'puma'
    c.prune.fraction = 0.3  # This project's default; sweep it for your data.
    c.prune.scope = 'generated'
    c.prune.eps_rule = 'puma'
  else:
    c.prune.strategy = 'none'

  c.eval.batch_size = 512
  c.eval.num_examples = 0
  c.eval.pgd_steps = 40
  c.eval.autoattack = 'standard'

  if 'tiny' in variants:
    config_base.shrink_for_tests(c)
    c.model.depth = 10
    c.model.width = 1
    c.model.dtype = 'float32'  # The tests run on CPU.
    c.train.steps_per_epoch = 5  # 4 epochs of the per-epoch schedule in 20 steps.
    c.data.generated.num_shards = 2
  return c
