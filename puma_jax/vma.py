"""Values typed for `jax.shard_map`'s check (check_vma, on by default).

Inside `shard_map` every value is typed with the mesh axes along which it differs
between devices (it "varies"). A loop's carry must keep its type from one
iteration to the next, and a custom VJP must return cotangents of its inputs'
types. Constants (`jnp.zeros`, `jnp.arange`) vary along nothing, so a loop
started from them over per-device data, or a custom VJP whose per-device
kernel gradient meets a replicated kernel, fails the check. Outside
`shard_map` nothing varies and both helpers return their input unchanged.
"""

from typing import Any

import jax


def varying_axes(a: Any) -> frozenset[str]:
  """The `shard_map` axes along which `a` differs between devices (empty outside)."""
  t = jax.typeof(a)
  manual = getattr(t, 'manual_axis_type', None)  # jax 0.10; earlier releases: `vma`
  return manual.varying if manual is not None else getattr(t, 'vma', frozenset())


def vary_like(tree: Any, like: jax.Array) -> Any:
  """Every leaf of `tree` typed to vary along `like`'s axes as well (a loop's initial carry)."""

  def cast(leaf):
    axes = tuple(sorted(varying_axes(like) - varying_axes(leaf)))
    return jax.lax.pcast(leaf, axes, to='varying') if axes else leaf

  return jax.tree.map(cast, tree)


def sum_like(ct: jax.Array, primal: jax.Array) -> jax.Array:
  """A cotangent summed over the axes it varies along and its primal does not.

  What JAX's own rules do when a replicated value meets per-device data (the
  transpose of making it per-device); a custom VJP must do the same.
  """
  axes = tuple(sorted(varying_axes(ct) - varying_axes(primal)))
  return jax.lax.psum(ct, axes) if axes else ct
