"""Tests for `rmc_jax.LSTMStack` (vs a float64 NumPy reference) and make_core."""

from __future__ import annotations

import functools
import math
import re

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmc_jax
from rmc_jax import LSTMStack, RelationalMemory, make_core

B = 2
T = 4
HIDDEN = (3, 5)
INPUT_SHAPE = (2, 2)  # flattened to D = 4
D_IN = 4
FORGET_BIAS = 0.7  # not the default, so the argument is exercised


# ---------------------------------------------------------------------------
# Independent float64 NumPy reference.
# ---------------------------------------------------------------------------


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _layer_params(params, layer):
  """The {'w_x','w_h','b'} dict of layer `layer`, whatever its scope path.

  (Exact paths are checked separately in test_parameter_names.)
  """
  keys = [k for k in params
          if k.startswith("lstm_stack/") and re.search(rf"layer_{layer}$", k)]
  assert len(keys) == 1, (layer, sorted(params))
  return {n: np.asarray(v, np.float64) for n, v in params[keys[0]].items()}


def _ref_step(params, skip, forget_bias, x, state):
  """x [B, ...]; state: list of (h, c) per layer. Returns (output, state)."""
  x = np.asarray(x, np.float64).reshape(x.shape[0], -1)
  below, hiddens, new_state = None, [], []
  for layer, (h, c) in enumerate(state):
    if below is None:
      layer_in = x
    elif skip:
      layer_in = np.concatenate([x, below], axis=-1)
    else:
      layer_in = below
    p = _layer_params(params, layer)
    pre = layer_in @ p["w_x"] + h @ p["w_h"] + p["b"]
    size = h.shape[-1]
    i, g, f, o = (pre[:, j * size:(j + 1) * size] for j in range(4))
    c = _sigmoid(f + forget_bias) * c + _sigmoid(i) * np.tanh(g)
    h = _sigmoid(o) * np.tanh(c)
    below = h
    hiddens.append(h)
    new_state.append((h, c))
  out = np.concatenate(hiddens, axis=-1) if skip else hiddens[-1]
  return out, new_state


def _ref_zero_state(batch):
  return [(np.zeros((batch, h)), np.zeros((batch, h))) for h in HIDDEN]


# ---------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------


def _assert_close(actual, expected, tol, what=""):
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  assert np.all(np.isfinite(actual)), what
  scale = np.max(np.abs(expected))
  assert scale > 1e-3, f"{what}: degenerate reference"
  err = np.max(np.abs(actual - expected)) / scale
  assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.1g}"


def _random_params(shapes, seed):
  rng = np.random.default_rng(seed)
  params = {}
  for module in sorted(shapes):
    params[module] = {}
    for name in sorted(shapes[module]):
      shape = tuple(shapes[module][name].shape)
      if len(shape) == 2:
        value = rng.normal(size=shape) / math.sqrt(shape[0])
      else:
        value = 0.3 * rng.normal(size=shape)
      params[module][name] = jnp.asarray(value, jnp.float32)
  return params


@functools.lru_cache(maxsize=None)
def _lstm_fns(skip):
  """Transformed function running __call__ steps, unroll and dynamic_unroll."""

  def fn(xs):
    core = LSTMStack(HIDDEN, skip_connections=skip, forget_bias=FORGET_BIAS)
    s0 = core.initial_state(B)
    state, outs, states = s0, [], []
    for t in range(xs.shape[0]):
      out, state = core(xs[t], state)
      outs.append(out)
      states.append(state)
    unrolled = core.unroll(xs, s0)
    dynamic = hk.dynamic_unroll(core, xs, s0)
    return jnp.stack(outs), states, unrolled, dynamic

  t = hk.without_apply_rng(hk.transform(fn))
  return t, jax.jit(t.apply)


def _xs(seed):
  return np.random.default_rng(seed).normal(
      size=(T, B) + INPUT_SHAPE).astype(np.float32)


# ---------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("skip", [False, True])
def test_lstm_stack_matches_numpy_reference(skip):
  t, apply = _lstm_fns(skip)
  xs = _xs(1)
  shapes = jax.eval_shape(t.init, jax.random.PRNGKey(0), xs)
  params = _random_params(shapes, seed=2)
  # Input sizes per layer: skip connections feed [x, h_below] to upper layers.
  for layer, h in enumerate(HIDDEN):
    d = D_IN if layer == 0 else (D_IN + HIDDEN[layer - 1] if skip
                                 else HIDDEN[layer - 1])
    p = _layer_params(params, layer)
    assert {n: v.shape for n, v in p.items()} == {
        "w_x": (d, 4 * h), "w_h": (h, 4 * h), "b": (4 * h,)}

  outs, states, (u_out, u_state), (d_out, d_state) = apply(params, xs)
  out_size = sum(HIDDEN) if skip else HIDDEN[-1]
  assert outs.shape == (T, B, out_size)

  ref_state = _ref_zero_state(B)
  np_params = jax.tree.map(np.asarray, params)
  for t_ in range(T):
    ref_out, ref_state = _ref_step(np_params, skip, FORGET_BIAS, xs[t_],
                                   ref_state)
    _assert_close(outs[t_], ref_out, 1e-5, f"output t={t_}")
    assert len(states[t_]) == len(HIDDEN)
    for layer, (h, c) in enumerate(ref_state):
      assert isinstance(states[t_][layer], hk.LSTMState)
      _assert_close(states[t_][layer].hidden, h, 1e-5, f"h{layer} t={t_}")
      _assert_close(states[t_][layer].cell, c, 1e-5, f"c{layer} t={t_}")

  # unroll == dynamic_unroll == the step loop.
  for name, (o, s) in (("unroll", (u_out, u_state)),
                       ("dynamic_unroll", (d_out, d_state))):
    _assert_close(o, outs, 1e-6, name)
    for layer in range(len(HIDDEN)):
      _assert_close(s[layer].hidden, states[-1][layer].hidden, 1e-6, name)
      _assert_close(s[layer].cell, states[-1][layer].cell, 1e-6, name)


def test_parameter_names():
  """Parameters live at 'lstm_stack/~/layer_{l}' with w_x, w_h, b."""
  t, _ = _lstm_fns(True)
  shapes = jax.eval_shape(t.init, jax.random.PRNGKey(0), _xs(0))
  assert sorted(shapes) == ["lstm_stack/~/layer_0", "lstm_stack/~/layer_1"]
  for leaves in shapes.values():
    assert sorted(leaves) == ["b", "w_h", "w_x"]


def test_initial_state():
  def fn():
    core = LSTMStack(HIDDEN)
    return core.initial_state(None), core.initial_state(3)

  unbatched, batched = hk.transform(fn).apply({}, None)
  for layer, h in enumerate(HIDDEN):
    assert isinstance(batched[layer], hk.LSTMState)
    for leaf, shape in ((unbatched[layer].hidden, (h,)),
                        (unbatched[layer].cell, (h,)),
                        (batched[layer].hidden, (3, h)),
                        (batched[layer].cell, (3, h))):
      assert leaf.shape == shape
      np.testing.assert_array_equal(leaf, 0.0)


def _build(fn):
  def wrapped():
    fn()
    return jnp.zeros(())
  hk.transform(wrapped).init(jax.random.PRNGKey(0))


@pytest.mark.parametrize("hidden_sizes", [(), (0,), (4, -1)])
def test_lstm_bad_hidden_sizes(hidden_sizes):
  _build(lambda: LSTMStack((4,)))  # the harness itself does not raise
  with pytest.raises(ValueError, match="hidden_sizes"):
    _build(lambda: LSTMStack(hidden_sizes))


def test_lstm_int_hidden_size():
  def fn():
    core = LSTMStack(4)
    assert core.hidden_sizes == (4,)
  _build(fn)


def test_make_core():
  assert rmc_jax.LSTMStack is LSTMStack and rmc_jax.make_core is make_core

  def fn():
    lstm = make_core("lstm", hidden_sizes=(3, 4), skip_connections=True)
    assert isinstance(lstm, LSTMStack) and isinstance(lstm, hk.RNNCore)
    assert lstm.hidden_sizes == (3, 4) and lstm.skip_connections
    rmc = make_core("rmc", mem_slots=2, head_size=3, num_heads=2,
                    num_blocks=2)
    assert isinstance(rmc, RelationalMemory)
    assert (rmc.mem_slots, rmc.mem_size, rmc.num_blocks) == (2, 6, 2)

  _build(fn)


@pytest.mark.parametrize("name,kwargs,match", [
    ("gru", {}, "gru"),
    ("RMC", dict(mem_slots=2, head_size=2), "RMC"),
    ("", {}, "Unknown core"),
    ("lstm", dict(mem_slots=3), "mem_slots"),
    ("lstm", dict(hidden_sizes=(3,), bogus=1), "bogus"),
    ("rmc", dict(mem_slots=2, head_size=2, hidden_sizes=(3,)),
     "hidden_sizes"),
])
def test_make_core_errors(name, kwargs, match):
  with pytest.raises(ValueError, match=match):
    _build(lambda: make_core(name, **kwargs))


def test_make_core_propagates_constructor_errors():
  with pytest.raises(ValueError, match="mem_slots"):
    _build(lambda: make_core("rmc", mem_slots=0, head_size=2))


@pytest.mark.parametrize("core_name,kwargs", [
    ("rmc", dict(mem_slots=2, head_size=2)),
    ("lstm", dict(hidden_sizes=(3,))),
    ("dnc", dict(memory_size=2, word_size=2, controller_sizes=(3,))),
])
def test_make_core_takes_the_module_name(core_name, kwargs):
  def fn(x):
    core = make_core(core_name, name="my_core", **kwargs)
    return core(x, core.initial_state(2))

  params = hk.transform(fn).init(jax.random.PRNGKey(0), jnp.zeros((2, 3)))
  assert params and all(path.split("/")[0] == "my_core" for path in params)
