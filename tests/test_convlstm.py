"""Tests for the ConvLSTM core (`rmc_jax.cores.convlstm`).

Steps are checked against a float64 NumPy reference with the convolution
written out as loops (zero padding, the extra row and column of an even
kernel at the bottom and right), `unroll` against `hk.dynamic_unroll`, and
the unbatched state under vmap against the batched one.
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmc_jax.cores import CORES, ConvLSTM, make_core

T, B, H, W, C_IN = 3, 2, 3, 4, 2


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def ref_conv(x_HWC, w_KKCD):
  """'SAME' stride-1 cross-correlation of one [H, W, C] map, by loops."""
  h, w, _ = x_HWC.shape
  k, d = w_KKCD.shape[0], w_KKCD.shape[-1]
  before = (k - 1) // 2
  out = np.zeros((h, w, d))
  for y in range(h):
    for x in range(w):
      for dy in range(k):
        for dx in range(k):
          yy, xx = y + dy - before, x + dx - before
          if 0 <= yy < h and 0 <= xx < w:
            out[y, x] += x_HWC[yy, xx] @ w_KKCD[dy, dx]
  return out


def ref_step(params, x_HWC, state):
  """One step of the stack for one example; state: [(hidden, cell)]."""
  below, new_state = x_HWC, []
  for l, (hidden, cell) in enumerate(state):
    p = params[f"conv_lstm/~/layer_{l}"]
    gates = ref_conv(below, p["w_x"]) + ref_conv(hidden, p["w_h"]) + p["b"]
    i, g, f, o = np.split(gates, 4, axis=-1)
    cell = _sigmoid(f + 1.0) * cell + _sigmoid(i) * np.tanh(g)
    hidden = _sigmoid(o) * np.tanh(cell)
    new_state.append((hidden, cell))
    below = hidden
  return below, new_state


def _fn(kernel_size, channels):
  def fn(xs, state):
    core = ConvLSTM((H, W), channels=channels, kernel_size=kernel_size)
    steps, s = [], state
    for t in range(xs.shape[0]):
      out, s = core(xs[t], s)
      steps.append(out)
    per_example = hk.vmap(
        lambda x, s0: core.unroll(x, s0)[0], in_axes=(1, 0), out_axes=1,
        split_rng=False)(xs, state)
    return (jnp.stack(steps), s, core.unroll(xs, state),
            hk.dynamic_unroll(core, xs, state), per_example)

  return hk.without_apply_rng(hk.transform(fn))


@pytest.mark.parametrize("kernel_size,channels", [(2, (3, 2)), (3, (4,))])
def test_steps_match_reference_and_unroll(kernel_size, channels):
  rng = np.random.default_rng(0)
  xs = rng.normal(size=(T, B, H, W, C_IN)).astype(np.float32)
  # A non-zero start state, so the recurrent convolution matters at step 0.
  state = tuple(hk.LSTMState(
      hidden=jnp.asarray(rng.uniform(-1, 1, (B, H, W, c)), jnp.float32),
      cell=jnp.asarray(rng.normal(size=(B, H, W, c)), jnp.float32))
                for c in channels)
  t = _fn(kernel_size, channels)
  params = jax.jit(t.init)(jax.random.PRNGKey(1), xs, state)
  k = kernel_size
  assert params["conv_lstm/~/layer_0"]["w_x"].shape == (k, k, C_IN,
                                                        4 * channels[0])
  assert params["conv_lstm/~/layer_0"]["w_h"].shape == (k, k, channels[0],
                                                        4 * channels[0])
  # Non-zero biases, so that a misplaced bias shows.
  params = jax.tree.map(
      lambda p: p + 0.1 * jnp.asarray(rng.normal(size=p.shape), p.dtype),
      params)
  steps, final, (outs, unrolled), (d_outs, d_final), per_example = (
      jax.jit(t.apply)(params, xs, state))

  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  for b in range(B):
    s = [(np.asarray(st.hidden[b], np.float64),
          np.asarray(st.cell[b], np.float64)) for st in state]
    for step in range(T):
      out, s = ref_step(p64, xs[step, b].astype(np.float64), s)
      np.testing.assert_allclose(steps[step, b], out, rtol=1e-4, atol=1e-5)
    for l, (hidden, cell) in enumerate(s):
      np.testing.assert_allclose(final[l].hidden[b], hidden, rtol=1e-4,
                                 atol=1e-5)
      np.testing.assert_allclose(final[l].cell[b], cell, rtol=1e-4,
                                 atol=1e-5)
  assert steps.shape == (T, B, H, W, channels[-1])
  for got in (outs, d_outs, per_example):
    np.testing.assert_allclose(got, steps, rtol=1e-5, atol=1e-6)
  for got in (unrolled, d_final):
    jax.tree.map(lambda a, b_: np.testing.assert_allclose(a, b_, rtol=1e-5,
                                                          atol=1e-6),
                 got, final)


def test_registry_initial_state_and_bad_args():
  assert CORES["convlstm"] is ConvLSTM

  def fn():
    core = make_core("convlstm", input_shape=(5, 5), channels=64,
                     kernel_size=2)
    assert core.channels == (64,)
    s = core.initial_state(3)
    assert len(s) == 1 and s[0].hidden.shape == (3, 5, 5, 64)
    assert core.initial_state(None)[0].cell.shape == (5, 5, 64)
    for leaf in jax.tree.leaves(s):
      np.testing.assert_array_equal(leaf, 0.0)
    with pytest.raises(ValueError, match="grid"):
      core(jnp.zeros((3, 4, 5, 2)), s)
    return jnp.zeros(())

  hk.transform(fn).init(jax.random.PRNGKey(0))
  for kwargs, match in ((dict(input_shape=(5,)), "input_shape"),
                        (dict(input_shape=(5, 5), channels=()), "channels"),
                        (dict(input_shape=(5, 5), channels=(4, 0)),
                         "channels"),
                        (dict(input_shape=(5, 5), kernel_size=0),
                         "kernel_size")):
    with pytest.raises(ValueError, match=match):
      hk.transform(lambda: ConvLSTM(**kwargs)).init(jax.random.PRNGKey(0))


def test_unroll_resets_and_masks_equal_the_step_loop():
  """unroll(reset_TB, mask_TB) == a step loop that resets rows to the initial
  state before the step and keeps masked rows' state (outputs zero)."""
  t, b, grid = 4, 2, (3, 3)
  rng = np.random.default_rng(1)
  xs = rng.normal(size=(t, b) + grid + (2,)).astype(np.float32)
  reset_TB = np.array([[False, True], [True, False], [False, False],
                       [True, True]])
  mask_TB = np.array([[True, True], [False, True], [True, False],
                      [True, True]])

  def fast(xs):
    core = ConvLSTM(grid, channels=(3, 2), kernel_size=2)
    state = jax.tree.map(lambda a: a + 0.5, core.initial_state(b))
    return core.unroll(xs, state, reset_TB=reset_TB, mask_TB=mask_TB)

  def loop(xs):
    core = ConvLSTM(grid, channels=(3, 2), kernel_size=2)
    state = jax.tree.map(lambda a: a + 0.5, core.initial_state(b))
    outs = []
    for step in range(t):
      keep = lambda new, old, m=mask_TB[step]: jnp.where(
          m.reshape((b,) + (1,) * (new.ndim - 1)), new, old)
      reset = lambda fresh, old, r=reset_TB[step]: jnp.where(
          r.reshape((b,) + (1,) * (old.ndim - 1)), fresh, old)
      state = jax.tree.map(reset, core.initial_state(b), state)
      out, new_state = core(xs[step], state)
      state = jax.tree.map(keep, new_state, state)
      outs.append(keep(out, jnp.zeros_like(out)))
    return jnp.stack(outs), state

  f_fast = hk.without_apply_rng(hk.transform(fast))
  f_loop = hk.without_apply_rng(hk.transform(loop))
  params = jax.jit(f_fast.init)(jax.random.PRNGKey(0), xs)
  got = jax.jit(f_fast.apply)(params, xs)
  expected = jax.jit(f_loop.apply)(params, xs)
  for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(got[0])[1, 0] == 0)  # Masked step: zero output.
