"""bfloat16 mixed precision: a tiny WRN's TRADES step in bf16 compute against float32."""

import jax
import jax.numpy as jnp
import numpy as np

from experiments import accelerator_bench as bench
from puma_jax import parallel

# A bf16 conv/matmul rounds its operands to 8 significant bits (relative error 2^-9 each),
# and the errors of the ~10 layers add up roughly as a random walk; the step's loss is a
# mean over the batch, so its relative error stays well under 1%.
LOSS_RTOL = 0.01


def _step(dtype):
  config = bench.load_config(tiny=True, dtype=dtype, batch_size=8)
  mesh = parallel.make_mesh(jax.devices()[:1])
  prog = bench.build_programs(config, mesh, ['trades_step'], concrete=True)['trades_step']
  before = jax.device_get(prog.args[0])
  state, metrics = prog.fn(*prog.args)
  return before, jax.device_get(state), jax.device_get(metrics)


def test_bfloat16_train_step_matches_float32(fast_compile):
  init32, state32, m32 = _step('float32')
  init16, state16, m16 = _step('bfloat16')
  # The same initial weights (parameters are float32 whatever the compute dtype).
  for a, b in zip(jax.tree.leaves(init32), jax.tree.leaves(init16), strict=True):
    np.testing.assert_array_equal(a, b)
  assert m16['nonfinite'] == 0 and m32['nonfinite'] == 0
  np.testing.assert_allclose(m16['loss'], m32['loss'], rtol=LOSS_RTOL)
  # Params, optimiser state, EMA and BatchNorm statistics all stay float32.
  floats = {str(x.dtype) for x in jax.tree.leaves(state16) if jnp.issubdtype(x.dtype, jnp.floating)}
  assert floats == {'float32'}
  assert {str(np.asarray(v).dtype) for k, v in m16.items() if k != 'nonfinite'} == {'float32'}
  # The gradients (the momentum trace after the first step; its learning rate is 0).
  np.testing.assert_allclose(m16['grad_norm'], m32['grad_norm'], rtol=5 * LOSS_RTOL)
  flat32, flat16 = (
    np.concatenate([np.ravel(x) for x in jax.tree.leaves(s.opt_state) if x.ndim])
    for s in (state32, state16)
  )
  cosine = flat32 @ flat16 / np.linalg.norm(flat32) / np.linalg.norm(flat16)
  assert cosine > 0.99, cosine
