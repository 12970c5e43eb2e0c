"""The complete config schema, with the embedded default's values.

Every file in configs/ starts from `get_base_config()` and changes values, so
all configs have the same fields (documented here), serialise to
`workdir/config.json` and take `--config.x.y=v` overrides. Configs are data:
numbers, strings and names only; code maps names to functions.
"""

import ml_collections


class ConfigError(ValueError):
  """A config field with a bad value (or bad combination); the message names it and the fix."""


def get_base_config() -> ml_collections.ConfigDict:
  """All fields, with the values of the embedded MNIST default."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Datasets. Everything is read through TFDS array_record shards under data_dir.
  c.data = ml_collections.ConfigDict()
  c.data.data_dir = ''  # '' means <workdir>/data.
  c.data.sidecar_dir = ''  # Where margin sidecars go; '' means beside the shards.
  c.data.real = ml_collections.ConfigDict()
  c.data.real.kind = 'mnist_embedded'  # mnist_embedded | cifar10 | cifar100 | image_folder
  # cifar10/cifar100: folder holding the official binary archive; '' means <data_dir>/downloads
  # when download is on (and is an error when it is off).
  c.data.real.archive_dir = ''
  # cifar10/cifar100: download the official archive (URL and sha256 as in puma_jax/datasets/
  # cifar.py) into archive_dir when it is not there; resumable, checked, done by process 0.
  # False: offline, the archive must be placed by hand.
  c.data.real.download = True
  c.data.real.name = ''  # image_folder: TFDS name written by the converter.
  c.data.real.num_shards = 4
  c.data.generated = ml_collections.ConfigDict()
  c.data.generated.kind = 'embedded'  # none | embedded | npz
  # npz: the user's file with keys `image` and `label`; with `url`, where the download goes
  # ('' means <data_dir>/downloads/<the URL's file name>).
  c.data.generated.path = ''
  # npz: an http(s) URL to download the file from when it is not at `path` (streamed in chunks,
  # resumable, only by process 0); needs `sha256`. '' means the file is placed by hand.
  c.data.generated.url = ''
  c.data.generated.sha256 = ''  # npz with url: the file's sha256 (hex), checked after download.
  c.data.generated.name = 'mnist_generated'  # TFDS config name of the built dataset.
  # Embedded generator only. 24,000 (and the 5-step training attack below) keep the quick
  # start under 5 minutes on 2 CPU cores (README); docs/performance.md has the trials.
  c.data.generated.num_examples = 24_000
  c.data.generated.seed = 0  # embedded generator only.
  c.data.generated.num_shards = 4
  c.data.generated_fraction = 0.7  # Share of every training batch drawn from generated data.
  c.data.augment = False  # Random crop + horizontal flip (on for CIFAR).
  c.data.crop_padding = 4  # Zero padding (pixels) before the random crop.
  c.data.read_threads = 4  # Threads decoding records for the input pipeline.
  c.data.prefetch_batches = 4  # Batches prepared ahead of the training loop.

  # Model (a name in puma_jax.models plus its keyword arguments).
  c.model = ml_collections.ConfigDict()
  c.model.name = 'small_cnn'
  c.model.num_classes = 10
  # Compute dtype of convs and matmuls: float32 | bfloat16 (mixed precision: parameters,
  # optimiser state, EMA, BatchNorm statistics, logits, losses and attacks stay float32).
  c.model.dtype = 'float32'
  # Programs lowered for CPU use convs / max-pools with XLA:CPU-fast gradients (custom VJPs,
  # chunked kernel gradients; puma_jax/models/layers.py). Accelerators always get plain XLA
  # ops. False: plain ops on CPU too (slower; needed for forward-mode autodiff, jax.jvp).
  # Parameters and checkpoints are the same either way.
  c.model.cpu_kernels = True

  # The threat model: training attack and PGD evaluation.
  c.attack = ml_collections.ConfigDict()
  c.attack.norm = 'linf'  # linf | l2
  c.attack.eps = 0.3
  c.attack.num_steps = 5  # The training attack's steps (PGD evaluation: eval.pgd_steps).
  c.attack.step_size = 0.25  # Relative to each example's radius |eps_i|.

  # Margin model: trained here on the unpruned data, or loaded.
  c.margin_model = ml_collections.ConfigDict()
  c.margin_model.source = 'train'  # train | checkpoint | torch_npz
  # checkpoint: a workdir's train/ folder; torch_npz: a PyTorch state_dict as .npz or
  # .safetensors (what python -m puma_jax.export writes).
  c.margin_model.path = ''
  c.margin_model.num_steps = 300  # source=train: length of its short run.

  # DeepFool margins of every training example.
  c.margins = ml_collections.ConfigDict()
  c.margins.norm = 'linf'
  c.margins.num_candidates = 10
  c.margins.overshoot = 0.02
  c.margins.max_iter = 50
  c.margins.clip = True  # Clip every DeepFool iterate to the image box [0, 1].
  c.margins.batch_size = 1024  # Per process; a multiple of its local devices.
  # DeepFool's `batch_size` per device: examples iterated at once (0: the device's
  # whole share of a batch). A finished example frees its place for the next one, so a
  # batch does not wait for its slowest example; small values suit CPUs, the largest
  # that fits suits accelerators. A speed setting: margins do not depend on it.
  c.margins.deepfool_batch_size = 64
  c.margins.recompute = False  # Recompute when the saved manifest disagrees.
  # deepfool | first_order (one linearisation, no loop) | fab (untargeted FAB's minimum-norm
  # distance, an upper bound for ablations); see puma_jax/attacks/margin_estimators.py.
  # deepfool's settings are overshoot and max_iter above; first_order has none.
  c.margins.estimator = 'deepfool'
  c.margins.fab = ml_collections.ConfigDict()  # Used by estimator fab only.
  c.margins.fab.num_steps = 20  # FAB steps per restart.
  c.margins.fab.restarts = 2  # The first from x, the others from random points near it.
  c.margins.fab.alpha_max = 0.1  # FAB's bias towards the clean input.
  c.margins.fab.eta = 1.05  # FAB's overshoot of the projection.
  c.margins.fab.beta = 0.9  # FAB's pull-back towards the clean input after a success.
  c.margins.fab.seed = 0  # Restart randomness (folded with each example's pixels).
  # The --dry_run cost estimate (puma_jax.margins.estimate_margin_cost).
  c.margins.estimate = ml_collections.ConfigDict()
  c.margins.estimate.num_examples = 0  # N to project for; 0: the prepared training splits.
  c.margins.estimate.num_devices = 0  # D to project for; 0: this job's devices.
  c.margins.estimate.price_per_device_hour = 0.0  # 0: no cost column.
  c.margins.estimate.probe_batches = 3  # Batches timed after one warm-up batch.

  # Pruning and per-example eps (puma_jax/pruning.py; eps is c.attack.eps, `random` uses c.seed).
  c.prune = ml_collections.ConfigDict()
  # none | random | prune_high (drop the highest margins) | prune_low (drop the lowest) |
  # puma (drop the highest, then per-example eps by eps_rule; the others use a constant eps).
  c.prune.strategy = 'puma'
  c.prune.fraction = 0.3  # Share of the pool dropped, in [0, 1), rounded half up.
  c.prune.scope = 'generated'  # generated (real data all kept) | joint (real + generated ranked)
  c.prune.class_balanced = False  # Drop the same fraction within every class.
  # constant: eps | puma: clip(m, -eps, eps) | clip0: clip(m, 0, eps). Used by strategy puma.
  c.prune.eps_rule = 'puma'
  # A margin whose DeepFool run did not converge (a lower bound): keep_distance (use it) |
  # infinite (+-inf: pruned first, full eps if kept) | exclude (not trained on). docs/recipe.md.
  c.prune.unconverged = 'infinite'

  # Adversarial training.
  c.train = ml_collections.ConfigDict()
  c.train.loss = 'trades'  # trades | pgd_at
  c.train.trades_beta = 5.0
  c.train.label_smoothing = 0.1
  c.train.batch_size = 128
  c.train.num_steps = 800
  c.train.learning_rate = 0.1
  c.train.momentum = 0.9
  c.train.nesterov = True
  c.train.weight_decay = 5e-4
  c.train.warmup_steps = 40  # lr_schedule warmup_cosine: linear warm-up steps from 0.
  # warmup_cosine (per step: linear warm-up, cosine to 0, fixed momentum) | cosinew
  # (DM-Improves-AT: PyTorch OneCycleLR stepped once per epoch, cycled momentum 0.95 ->
  # 0.85 -> 0.95; see puma_jax/schedules.py). docs/recipe.md compares the two.
  c.train.lr_schedule = 'warmup_cosine'
  c.train.steps_per_epoch = 0  # Optimiser steps per epoch (cosinew, ema_batch_stats); 0: none.
  c.train.pct_start = 0.025  # cosinew: share of the epochs spent warming up.
  c.train.weight_decay_on = 'kernels'  # kernels | all_but_batchnorm (DM-Improves-AT)
  c.train.ema_decay = 0.995
  # 0: the average ramps from step 0, decay min(ema_decay, (1+t)/(10+t)). f > 0
  # (DM-Improves-AT: 0.025): a copy of the model for the first f * num_steps steps, then
  # min(ema_decay, (1+d)/(10+d)), d the steps since.
  c.train.ema_warmup_fraction = 0.0
  # average: BatchNorm statistics averaged like the weights | copy_each_epoch: copied from
  # the model after every steps_per_epoch steps (DM-Improves-AT's update_bn).
  c.train.ema_batch_stats = 'average'
  # TRADES' inner maximisation. Start: normal (x + 0.001 N(0,1)) | uniform (x + U(-eps, eps)
  # clipped to [0, 1], DM-Improves-AT's L-inf start). BatchNorm: running (eval mode) |
  # batch (train mode, batch statistics, running ones not updated: DM-Improves-AT).
  c.train.trades_start = 'normal'
  # TRADES' step relative to eps_i; 0: attack.step_size (which PGD evaluation also uses).
  # DM-Improves-AT's L2 TRADES steps 2 * eps / num_steps while its PGD evaluation steps 15/255.
  c.train.trades_step_size = 0.5  # 5 steps of eps/2 (the CIFAR configs: 10 of eps/4).
  c.train.attack_batchnorm = 'running'
  # Step 0 sets BatchNorm running statistics to the batch's (PyTorch momentum 1.0,
  # DM-Improves-AT); False: they move from (0, 1) by the model's momentum. Needs a model
  # with `bn_momentum` (wrn); models without BatchNorm ignore it.
  c.train.bn_first_batch = False
  # Refreshed margins: every N steps, recompute the kept examples' margins with the EMA
  # weights of the model being trained (c.margins' estimator and settings, on the devices)
  # and give them the prune stage's eps rule; the kept set stays the margin model's.
  # Needs prune.strategy=puma with eps_rule puma or clip0. 0: off (PUMA's precomputed eps).
  # See docs/margin_estimators.md for its cost.
  c.train.refresh_margins_every = 0
  c.train.log_every_steps = 50
  c.train.eval_every_steps = 400
  c.train.checkpoint_every_steps = 200

  # Evaluation on the test split.
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 256
  c.eval.num_examples = 250  # The first N test examples; 0 means the whole test split.
  c.eval.pgd_steps = 20
  c.eval.autoattack = 'standard'  # standard | none
  # Rows of still-robust examples attacked together per device (0: the whole slice).
  c.eval.autoattack_chunk_size = 25
  # AutoAttack's budgets; only these defaults are AutoAttack "standard".
  c.eval.autoattack_budgets = ml_collections.ConfigDict()
  c.eval.autoattack_budgets.apgd_steps = 100
  c.eval.autoattack_budgets.fab_steps = 100
  c.eval.autoattack_budgets.num_targets = 9
  c.eval.autoattack_budgets.square_queries = 5000
  c.eval.recompute = False  # Replace saved evaluation results made with other settings.

  return c


def shrink_for_tests(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `:tiny` variant of any config: the same pipeline in seconds on a CPU."""
  c.data.generated.num_examples = min(c.data.generated.num_examples, 2_000)
  c.data.generated.num_shards = 2
  c.data.real.num_shards = 2
  c.margin_model.num_steps = 20
  c.margins.batch_size = 64
  c.margins.deepfool_batch_size = 16
  c.train.batch_size = 32
  c.train.num_steps = 20
  c.train.warmup_steps = 2
  c.train.log_every_steps = 5
  c.train.eval_every_steps = 10
  c.train.checkpoint_every_steps = 10
  c.eval.num_examples = 64
  c.eval.batch_size = 32
  c.eval.pgd_steps = 5
  c.eval.autoattack_budgets.apgd_steps = 10
  c.eval.autoattack_budgets.fab_steps = 10
  c.eval.autoattack_budgets.num_targets = 3
  c.eval.autoattack_budgets.square_queries = 100
  c.margins.max_iter = 5
  return c
