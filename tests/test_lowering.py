"""The accelerator programs, lowered for TPU and CUDA on this CPU host (no compile, no device).

For every registered model at a tiny size, the TRADES and PGD-AT train steps, the
DeepFool margin program and the AutoAttack program (as `experiments.accelerator_bench`
builds them from the pipeline's own functions) are exported with `jax.export` for
'tpu' and 'cuda', and their StableHLO must hold: no optimisation barrier; no loops but
the attacks' own; exactly the convolutions of the same model built on Flax's plain
`nn.Conv` / `nn.max_pool`; and, in bfloat16, bf16 convs and matmuls while every
parameter, state, input and output and every loop-carried value stays float32.
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments import accelerator_bench as bench
from puma_jax import models, parallel
from puma_jax.attacks import autoattack
from puma_jax.models import layers

MODELS = {
  'small_cnn': dict(conv_channels=(4, 8), pool_after=(True, True), dense_widths=(16,)),
  'preact_resnet18': dict(width=8),
  'wrn': dict(depth=10, width=1),
}
PLATFORMS = ('tpu', 'cuda')
# The attacks' own loops, the only loops allowed (the plain-nn.Conv reference has them too):
ATTACK_LOOPS = {
  'trades_step': 1,  # the TRADES attack's iterations
  'pgd_at_step': 1,  # PGD's iterations
  'margins': 1,  # DeepFool's iterations (finished slots refill inside the same loop)
  # Each AutoAttack attack: its target rounds, its chunks of still-robust rows, its iterations.
  'autoattack': 3 * len(autoattack.STANDARD),
}


def _config(name: str, dtype: str, cpu_kernels: bool = True):
  config = bench.load_config(tiny=True, dtype=dtype, batch_size=4)
  config.model = ml_collections.ConfigDict(
    dict(name=name, num_classes=10, dtype=dtype, cpu_kernels=cpu_kernels, **MODELS[name])
  )
  return config


def _plain_conv(features, kernel_size, *, cpu_kernels=True, **kwargs):
  """Flax's own nn.Conv in place of `layers.Conv` (the same parameters)."""
  del cpu_kernels
  return nn.Conv(features, kernel_size, **kwargs)


def _plain_pool(x, cpu_kernels=True):
  del cpu_kernels
  return nn.max_pool(x, (2, 2), strides=(2, 2))


@functools.cache
def _exports(name: str, dtype: str, reference: bool = False) -> dict:
  """{(program, platform): jax.export.Exported} of every program of one model."""
  mesh = parallel.make_mesh(jax.devices()[:1])
  with pytest.MonkeyPatch.context() as mp:
    if reference:
      mp.setattr(layers, 'Conv', _plain_conv)
      mp.setattr(layers, 'max_pool_2x2', _plain_pool)
    programs = bench.build_programs(_config(name, dtype), mesh)
    platforms = PLATFORMS[:1] if reference else PLATFORMS
    return {
      (p, platform): jax.export.export(prog.fn, platforms=[platform])(*prog.args)
      for p, prog in programs.items()
      for platform in platforms
    }


def _ops(text: str, op: str) -> list[str]:
  return [line for line in text.splitlines() if f'stablehlo.{op}' in line]


@pytest.mark.parametrize('name', sorted(MODELS))
def test_accelerator_programs_are_plain_jax(name):
  exports = _exports(name, 'float32')
  reference = _exports(name, 'float32', reference=True)
  for (program, platform), exported in exports.items():
    text = exported.mlir_module()
    where = f'{name} {program} for {platform}'
    assert 'optimization_barrier' not in text, where
    assert 'custom_vjp' not in text, where
    ref = reference[program, 'tpu'].mlir_module()
    assert len(_ops(text, 'while')) == len(_ops(ref, 'while')) == ATTACK_LOOPS[program], where
    convs = len(_ops(text, 'convolution'))
    assert convs == len(_ops(ref, 'convolution')) and convs > 0, where


def _float_dtypes(avals) -> set[str]:
  return {str(a.dtype) for a in avals if jnp.issubdtype(a.dtype, jnp.floating)}


def _tensor_types(line: str) -> list[str]:
  return re.findall(r'tensor<[^>]*>', line)


def test_bfloat16_computes_in_bf16_and_keeps_everything_else_float32():
  for (program, platform), exported in _exports('wrn', 'bfloat16').items():
    where = f'{program} for {platform}'
    # Parameters, optimiser state, EMA, BatchNorm statistics, images, eps, labels in; the
    # new state, losses and metrics, margins, adversarial images out: all float32.
    assert _float_dtypes(exported.in_avals) == {'float32'}, where
    assert _float_dtypes(exported.out_avals) == {'float32'}, where
    text = exported.mlir_module()
    for op in ('convolution', 'dot_general'):
      lines = _ops(text, op)
      assert lines, where
      for line in lines:  # operands and result
        types = _tensor_types(line.rsplit(':', 1)[-1])
        assert types and all(t.endswith('xbf16>') for t in types), (where, line)
    for line in _ops(text, 'while'):  # attack iterates, eps and logits carried in f32
      assert 'bf16' not in line, (where, line)
    assert len(_ops(text, 'while')) == ATTACK_LOOPS[program], where


def test_cpu_lowering_keeps_the_cpu_workarounds():
  """The checks above can fail: lowered for CPU, the same step has barriers and chunk loops."""
  mesh = parallel.make_mesh(jax.devices()[:1])
  texts = {}
  for cpu_kernels in (True, False):
    config = _config('wrn', 'float32', cpu_kernels=cpu_kernels)
    prog = bench.build_programs(config, mesh, ['trades_step'])['trades_step']
    texts[cpu_kernels] = jax.export.export(prog.fn, platforms=['cpu'])(*prog.args).mlir_module()
  assert 'optimization_barrier' in texts[True] and 'optimization_barrier' not in texts[False]
  # The kernel gradients' batch-chunk loops (3x3 convs; the CPU's RNG has loops of its own).
  assert len(_ops(texts[True], 'while')) > len(_ops(texts[False], 'while'))


@pytest.mark.parametrize('name', sorted(MODELS))
def test_without_cpu_kernels_forward_mode_works_and_parameters_are_the_same(name):
  x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (2, 32, 32, 3)), jnp.float32)
  fast = models.create(name, num_classes=10, **MODELS[name])
  plain = models.create(name, num_classes=10, cpu_kernels=False, **MODELS[name])
  variables = fast.init(jax.random.key(0), x, train=False)
  same = plain.init(jax.random.key(0), x, train=False)
  assert jax.tree.structure(variables) == jax.tree.structure(same)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(same), strict=True):
    np.testing.assert_array_equal(a, b)
  tangent = jnp.ones_like(x)
  f = lambda m: lambda v: m.apply(variables, v, train=False)
  logits, jvp = jax.jvp(f(plain), (x,), (tangent,))
  np.testing.assert_allclose(logits, f(fast)(x), rtol=1e-5, atol=1e-5)
  # Forward mode agrees with reverse mode: <J t, e_k> = <t, J^T e_k> for each logit k.
  vjp = jax.vjp(f(fast), x)[1]
  for k in range(3):
    (row,) = vjp(jnp.zeros_like(logits).at[:, k].set(1.0))
    np.testing.assert_allclose(jvp[:, k], jnp.sum(row * tangent, axis=(1, 2, 3)), rtol=2e-4)
  with pytest.raises(TypeError, match='custom_vjp'):
    jax.jvp(f(fast), (x,), (tangent,))


@pytest.mark.parametrize('name', sorted(MODELS))
def test_cpu_kernels_work_inside_shard_map_with_its_type_check(name):
  """Per-device gradients inside `jax.shard_map` (check_vma on), as with the plain layers.

  The replicated weights' gradients come back summed over the devices, as JAX's own
  rules make them; the input gradients stay per device.
  """
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  x = jnp.asarray(np.random.default_rng(1).uniform(0, 1, (8, 32, 32, 3)), jnp.float32)
  fast = models.create(name, num_classes=10, **MODELS[name])
  plain = models.create(name, num_classes=10, cpu_kernels=False, **MODELS[name])
  variables = fast.init(jax.random.key(0), x, train=False)
  x = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.P('data')))

  def grads(model):
    def per_device(v, x):
      loss = lambda v, x: model.apply(v, x, train=False).sum()
      return jax.grad(loss, argnums=(0, 1))(v, x)

    spec = (jax.P(), jax.P('data'))
    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=spec, out_specs=spec))(
      variables, x
    )

  ours, reference = grads(fast), grads(plain)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5)
