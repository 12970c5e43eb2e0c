"""The margin stage: the signed margin of every training example, at scale.

`compute_margins(model, variables, splits, settings=..., batch_size=...)` scores
every example of the given splits (real and generated training data) with the
margin estimator the settings name (`attacks.margin_estimators.ESTIMATORS`:
deepfool, first_order, fab; `settings_from_config(c.margins)`) on the margin
model and stores, beside each TFDS shard (or
under `sidecar_root`), three sidecars (`datasets.sidecar`, each with a sha256
checksum file), in shard order:

  <shard>.<tag>.npy              f32: the signed margin (negative: the model misclassifies it)
  <shard>.<tag>_iterations.npy   i32: the estimator's steps (DeepFool's iterations)
  <shard>.<tag>_converged.npy    bool: the estimator's success (DeepFool: flipped within max_iter)

under the estimator's own tag (`default_tag`: 'margins' for DeepFool, as
before other estimators existed, 'margins_first_order', 'margins_fab'), with
one manifest per split and tag whose `settings` hold the estimator's settings
under its name,
the margin model's fingerprint (`model_fingerprint`: sha256 over the variables'
names, dtypes, shapes and bytes) and a description of the module. The manifest
also records the shards and a fingerprint of the labels (the dataset).

How the work is organised:

- Devices: each batch is split over a 1-D ('data',) mesh of this process's
  local devices with `parallel.per_device` (`jax.shard_map`), and every device
  runs the estimator on its own examples (DeepFool: its own `while_loop`, so a
  device stops when its own examples have converged). The program is a plain `jax.jit`, compiled once per batch
  shape (usually once for the whole run), not per shard.
- Hosts: under `jax.distributed`, shard k of a split belongs to process
  k mod P; each process writes only its own shards, then all processes meet at
  a barrier and load the complete arrays. Choose the number of shards as a
  multiple of the host count so that every host has equal work.
- Batches: the last batch of a shard is padded and masked, never dropped; every
  example gets exactly one margin (checked).
- Overlap: grain threads read and decode ahead across shard boundaries
  (`input_pipeline.shards_batches`), and batch t+1 is dispatched to the devices
  before the results of batch t are pulled back.
- Resume: a shard whose three sidecars are complete under a matching manifest
  and pass their checksums is skipped (a damaged one is recomputed, with a
  warning); sidecars are written atomically (temp file + rename), the margin
  last, so a shard killed at any point is simply recomputed. This process's
  arrays stay in memory: only the shards of other processes are read back. Computation is
  deterministic, so a killed and resumed run ends with the same arrays as an
  uninterrupted one (same batch size and devices; other batch sizes or device
  counts change margins by float rounding, which can rarely change an example's
  DeepFool path).
- A manifest that disagrees (model, estimator settings, dataset) is refused,
  naming the difference, unless `recompute=True`, which replaces it and deletes
  the old sidecars. Batch size and device count are not settings.

`estimate_margin_cost` times a short probe on the current devices and projects
the wall time, device-hours and cost of N examples on D devices (the main
job's `--dry_run`).

Modules: `settings` (estimator settings, tags, provenance), `engine` (the program on
the devices), `store` (sidecars, manifests, resume), `stage` (`compute_margins`,
`load_margins`), `estimate` (the cost estimate), `refresh` (the kept examples'
margins and eps recomputed with the model being trained, c.train.refresh_margins_every).
"""

from puma_jax.margins import refresh
from puma_jax.margins.engine import MarginEngine
from puma_jax.margins.estimate import (
  CostEstimate,
  estimate_from_config,
  estimate_margin_cost,
  write_estimate,
)
from puma_jax.margins.settings import (
  DTYPES,
  QUANTITIES,
  DeepFoolSettings,
  EstimatorSettings,
  MarginSettings,
  default_tag,
  describe_module,
  model_fingerprint,
  settings_from_config,
  sidecar_settings,
  sidecar_tags,
)
from puma_jax.margins.stage import MarginResult, compute_margins, load_margins

__all__ = [
  'DTYPES',
  'QUANTITIES',
  'CostEstimate',
  'DeepFoolSettings',
  'EstimatorSettings',
  'MarginEngine',
  'MarginSettings',
  'MarginResult',
  'compute_margins',
  'default_tag',
  'describe_module',
  'estimate_from_config',
  'estimate_margin_cost',
  'load_margins',
  'refresh',
  'model_fingerprint',
  'settings_from_config',
  'sidecar_settings',
  'sidecar_tags',
  'write_estimate',
]
