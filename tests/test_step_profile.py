"""experiments/step_profile.py: FLOPs of conv/dot instructions from compiled HLO, time from a trace."""

import jax
import jax.numpy as jnp
import numpy as np

from experiments import step_profile


def _program(x, k, w):
  y = jax.lax.conv_general_dilated(
    x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  z = jax.nn.relu(y).reshape(x.shape[0], -1) @ w
  return jax.lax.fori_loop(0, 3, lambda i, a: jnp.tanh(a @ w[: a.shape[1]]), z)


def test_flops_and_time_of_a_conv_a_dot_and_a_loop_of_dots():
  x = jnp.ones((4, 8, 8, 3), jnp.float32)
  k = jnp.ones((3, 3, 3, 5), jnp.float32)
  w = jnp.ones((8 * 8 * 5, 16), jnp.float32) * 0.01
  jitted = jax.jit(_program)

  summary, result = step_profile.profile_call(jitted, x, k, w)

  np.testing.assert_allclose(result, jitted(x, k, w))
  conv = 2 * 4 * 8 * 8 * 5 * (3 * 3 * 3)
  dot = 2 * 4 * 16 * (8 * 8 * 5)
  loop_dots = 3 * 2 * 4 * 16 * 16  # the loop's dot, once per iteration
  assert summary['matmul_gflop'] * 1e9 == conv + dot + loop_dots
  assert summary['matmul_calls'] == 1 + 1 + 3
  assert summary['matmul_thread_s'] > 0
  assert summary['other_thread_s'] > 0  # relu, tanh
  assert 'while' not in summary['other_by_kind_s']


def test_instruction_flops_reads_tuple_shaped_and_grouped_instructions():
  hlo = """HloModule m

%body (p: (s32[], f32[2,3])) -> (s32[], f32[2,3]) {
  %p = (s32[], f32[2,3]{1,0}) parameter(0)
  ROOT %t = (s32[], f32[2,3]{1,0}) tuple(%a, %b)
}

ENTRY %main (x: f32[1,4,4,6], k: f32[3,3,2,6]) -> f32[1,4,4,6] {
  %x = f32[1,4,4,6]{3,2,1,0} parameter(0)
  %k = f32[3,3,2,6]{3,2,1,0} parameter(1)
  %w = ((s32[], f32[2,3]{1,0}), f32[]) while(%init), condition=%c, body=%body
  ROOT %convolution.1 = f32[1,4,4,6]{3,2,1,0} convolution(%x, %k), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, feature_group_count=3
}
"""
  flops, opcodes = step_profile.instruction_flops(hlo)
  assert opcodes['w'] == 'while' and opcodes['t'] == 'tuple'
  assert flops == {'convolution.1': 2 * (4 * 4 * 6) * 9 * 2 // 3}
