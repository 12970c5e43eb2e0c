"""Per-example losses used by the attacks and the train step (all f32[B] out).

Attacks maximise these; every function maps logits f32[B,K] (any dtype, computed
in float32) and labels i32[B] to one value per example.
"""

import jax
import jax.numpy as jnp


def cross_entropy(
  logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0
) -> jax.Array:
  """Softmax cross-entropy f32[B], optionally with label smoothing."""
  logits = logits.astype(jnp.float32)
  num_classes = logits.shape[-1]
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if label_smoothing:
    targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
  return -jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1)


def _top_other(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Largest logit among classes other than the label, f32[B]."""
  true_mask = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  return jnp.max(jnp.where(true_mask, -jnp.inf, logits), axis=-1)


def cw_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Carlini-Wagner margin loss: max_{k != y} z_k - z_y (positive when misclassified)."""
  logits = logits.astype(jnp.float32)
  z_y = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  return _top_other(logits, labels) - z_y


def dlr_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Difference of Logits Ratio (Croce and Hein 2020), untargeted, to be maximised.

  -(z_y - max_{k != y} z_k) / (z_pi1 - z_pi3 + 1e-12), pi the descending order.
  Needs at least 3 classes.
  """
  logits = logits.astype(jnp.float32)
  z_sorted = jnp.sort(logits, axis=-1)
  z_y = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  denom = z_sorted[:, -1] - z_sorted[:, -3] + 1e-12
  return -(z_y - _top_other(logits, labels)) / denom


def dlr_targeted_loss(logits: jax.Array, labels: jax.Array, targets: jax.Array) -> jax.Array:
  """Targeted DLR (Croce and Hein 2020): -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12).

  Needs at least 4 classes.
  """
  logits = logits.astype(jnp.float32)
  z_sorted = jnp.sort(logits, axis=-1)
  z_y = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  z_t = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
  denom = z_sorted[:, -1] - 0.5 * (z_sorted[:, -3] + z_sorted[:, -4]) + 1e-12
  return -(z_y - z_t) / denom


def kl_divergence(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
  """KL(softmax(p) || softmax(q)) per example, f32[B] (TRADES uses p = clean, q = adversarial)."""
  log_p = jax.nn.log_softmax(p_logits.astype(jnp.float32))
  log_q = jax.nn.log_softmax(q_logits.astype(jnp.float32))
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
