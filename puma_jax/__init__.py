"""puma_jax: PUMA margin-based data pruning for adversarial training, in JAX.

Stages: prepare data -> margin model -> DeepFool margins -> prune -> adversarial
training with per-example eps -> evaluation (PGD, AutoAttack) -> report.
"""

__version__ = '0.1.0'
