"""Tests for `rmc_jax.RelationalMemory` against an independent NumPy reference.

The reference below (`_ref_*`) is a float64 NumPy transcription of Sonnet v1's
`snt.RelationalMemory` step; it shares no code with `rmc_jax`. JAX runs in its
default float32 (x64 is never enabled: other test modules share the process).
Parameters are random (every weight, bias, LayerNorm scale and offset), so
every parameter of the module is exercised by the comparison.
"""

from __future__ import annotations

import functools
import math

import haiku as hk
import jax
import jax.numpy as jnp
import jmp
import numpy as np
import pytest

import rmc_jax
from rmc_jax import RelationalMemory, StepInfo

B = 2  # batch
T = 4  # time steps
NAME = "relational_memory"
LN_EPS = 1e-5
F32_TOL = 1e-5  # float32 module vs float64 reference, norm-relative.


# ---------------------------------------------------------------------------
# Independent float64 NumPy reference of Sonnet v1's RelationalMemory.
# ---------------------------------------------------------------------------


def _cfg_full(cfg):
  """Fills in the constructor defaults of a config dict."""
  full = dict(num_heads=1, num_blocks=1, forget_bias=1.0, input_bias=0.0,
              gate_style="unit", attention_mlp_layers=2, key_size=None,
              legacy_attention_scale=False)
  full.update(cfg)
  return full


def _ref_sizes(cfg):
  c = _cfg_full(cfg)
  dv = c["head_size"]
  dk = c["key_size"] or dv
  h = c["num_heads"]
  return c, c["mem_slots"], h, dv, dk, h * dv


def _ref_initial_state(mem_slots, mem_size, batch_size=None):
  m = np.zeros((mem_slots, mem_size), np.float64)
  for i in range(min(mem_slots, mem_size)):
    m[i, i] = 1.0
  if batch_size is None:
    return m
  return np.tile(m[None], (batch_size, 1, 1))


def _ref_linear(x, p):
  return x @ np.asarray(p["w"], np.float64) + np.asarray(p["b"], np.float64)


def _ref_layer_norm(x, p):
  mean = x.mean(axis=-1, keepdims=True)
  var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
  return ((x - mean) / np.sqrt(var + LN_EPS) * np.asarray(p["scale"], np.float64)
          + np.asarray(p["offset"], np.float64))


def _ref_softmax(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _ref_step(params, cfg, inputs, memory, treat_input_as_matrix=False):
  """One Sonnet v1 RelationalMemory step in float64.

  Returns (output [B, N*F], next memory [B, N, F], attention [B, K, H, R, R],
  input gate [B, N, G] or None, forget gate or None).
  """
  c, n_slots, h, dv, dk, f = _ref_sizes(cfg)
  p = lambda suffix: params[f"{NAME}/~/{suffix}"]
  inputs = np.asarray(inputs, np.float64)
  memory = np.asarray(memory, np.float64)
  b = inputs.shape[0]
  if treat_input_as_matrix:
    rows = inputs.reshape(b, inputs.shape[1], -1)
  else:
    rows = inputs.reshape(b, 1, -1)
  n_rows = rows.shape[1]
  x_proj = _ref_linear(rows, p("input_projection"))  # [B, n, F]
  z = np.concatenate([memory, x_proj], axis=1)  # [B, R, F]
  r = z.shape[1]
  qkv_size = 2 * dk + dv
  scale = (qkv_size if c["legacy_attention_scale"] else dk) ** -0.5
  attention = np.zeros((b, c["num_blocks"], h, r, r))
  for k in range(c["num_blocks"]):
    qkv = _ref_layer_norm(_ref_linear(z, p(f"block_{k}/~/qkv")),
                          p(f"block_{k}/~/qkv_layer_norm"))
    attended = np.zeros_like(z)
    for head in range(h):
      base = head * qkv_size
      q = qkv[:, :, base:base + dk] * scale
      key = qkv[:, :, base + dk:base + 2 * dk]
      v = qkv[:, :, base + 2 * dk:base + qkv_size]
      for i in range(b):
        w = _ref_softmax(q[i] @ key[i].T)  # [R queries, R keys]
        attention[i, k, head] = w
        attended[i, :, head * dv:(head + 1) * dv] = w @ v[i]
    z = _ref_layer_norm(z + attended, p(f"block_{k}/~/attention_layer_norm"))
    mlp = z
    for layer in range(c["attention_mlp_layers"]):
      if layer:
        mlp = np.maximum(mlp, 0.0)
      mlp = _ref_linear(mlp, p(f"attention_mlp/~/linear_{layer}"))
    z = _ref_layer_norm(mlp + z, p(f"block_{k}/~/mlp_layer_norm"))
  m_hat = z[:, :n_slots]
  if c["gate_style"] is None:
    new_memory, input_gate, forget_gate = m_hat, None, None
  else:
    g = f if c["gate_style"] == "unit" else 1
    gi_in = _ref_linear(x_proj.reshape(b, n_rows * f), p("input_to_gates"))
    gi_mem = _ref_linear(np.tanh(memory), p("memory_to_gates"))
    s = gi_in[:, None, :] + gi_mem
    assert s.shape == (b, n_slots, 2 * g)
    input_gate = _sigmoid(s[..., :g] + c["input_bias"])
    forget_gate = _sigmoid(s[..., g:] + c["forget_bias"])
    new_memory = input_gate * np.tanh(m_hat) + forget_gate * memory
  return (new_memory.reshape(b, n_slots * f), new_memory, attention,
          input_gate, forget_gate)


def _ref_unroll(params, cfg, xs, memory, treat_input_as_matrix=False):
  outs = []
  for t in range(xs.shape[0]):
    out, memory, *_ = _ref_step(params, cfg, xs[t], memory,
                                treat_input_as_matrix)
    outs.append(out)
  return np.stack(outs), memory


def _expected_param_shapes(cfg, d_in, n_rows=1):
  """Parameter paths and shapes per the Sonnet-v1 layout."""
  c, _, h, dv, dk, f = _ref_sizes(cfg)
  d_qkv = h * (2 * dk + dv)
  shapes = {"input_projection": {"w": (d_in, f), "b": (f,)}}
  for k in range(c["num_blocks"]):
    shapes[f"block_{k}/~/qkv"] = {"w": (f, d_qkv), "b": (d_qkv,)}
    shapes[f"block_{k}/~/qkv_layer_norm"] = {"scale": (d_qkv,),
                                             "offset": (d_qkv,)}
    for ln in ("attention_layer_norm", "mlp_layer_norm"):
      shapes[f"block_{k}/~/{ln}"] = {"scale": (f,), "offset": (f,)}
  for i in range(c["attention_mlp_layers"]):
    shapes[f"attention_mlp/~/linear_{i}"] = {"w": (f, f), "b": (f,)}
  if c["gate_style"] is not None:
    g = f if c["gate_style"] == "unit" else 1
    shapes["input_to_gates"] = {"w": (n_rows * f, 2 * g), "b": (2 * g,)}
    shapes["memory_to_gates"] = {"w": (f, 2 * g), "b": (2 * g,)}
  return {f"{NAME}/~/{k}": v for k, v in shapes.items()}


def _analytic_param_count(cfg, d_in, n_rows=1):
  c, _, h, dv, dk, f = _ref_sizes(cfg)
  d_qkv = h * (2 * dk + dv)
  k, l = c["num_blocks"], c["attention_mlp_layers"]
  count = (d_in * f + f + k * (f * d_qkv + d_qkv + 2 * d_qkv + 4 * f)
           + l * (f * f + f))
  if c["gate_style"] is not None:
    g = f if c["gate_style"] == "unit" else 1
    count += n_rows * f * 2 * g + 2 * g + f * 2 * g + 2 * g
  return count


# ---------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------


def _assert_close(actual, expected, tol, what=""):
  """max|actual - expected| <= tol * max|expected| (and same shape, finite)."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
  scale = np.max(np.abs(expected))
  assert scale > 1e-3, f"{what}: degenerate reference (max |x| = {scale})"
  err = np.max(np.abs(actual - expected)) / scale
  assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.1g}"


def _freeze(cfg):
  return tuple(sorted(cfg.items()))


def _input_shape(treat_input_as_matrix):
  # Extra trailing dims exercise the flattening: D = 6, or n = 3 rows of 4.
  return (3, 2, 2) if treat_input_as_matrix else (2, 3)


def _inputs(seed, treat_input_as_matrix, t=T, b=B):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(t, b) + _input_shape(treat_input_as_matrix)).astype(
      np.float32)


def _random_params(shapes, seed):
  """Random values for every parameter (weights, biases, LayerNorm params)."""
  rng = np.random.default_rng(seed)
  params = {}
  for module in sorted(shapes):
    params[module] = {}
    for name in sorted(shapes[module]):
      shape = tuple(shapes[module][name].shape)
      if name == "scale":
        value = 1.0 + 0.3 * rng.normal(size=shape)
      elif len(shape) == 2:
        value = rng.normal(size=shape) / math.sqrt(shape[0])
      else:  # biases and LayerNorm offsets
        value = 0.3 * rng.normal(size=shape)
      params[module][name] = jnp.asarray(value, jnp.float32)
  return params


def _to_numpy(tree):
  return jax.tree.map(np.asarray, tree)


@functools.lru_cache(maxsize=None)
def _step_fn(frozen_cfg, treat_input_as_matrix):
  """(transformed, jitted apply) of step_with_info for a config (cached)."""
  cfg = dict(frozen_cfg)

  def f(x, memory):
    core = RelationalMemory(**cfg)
    return core.step_with_info(x, memory, treat_input_as_matrix)

  t = hk.without_apply_rng(hk.transform(f))
  return t, jax.jit(t.apply)


def _params_for(cfg, treat_input_as_matrix, seed=0):
  t, _ = _step_fn(_freeze(cfg), treat_input_as_matrix)
  c, n_slots, _, _, _, f = _ref_sizes(cfg)
  x = jnp.zeros((B,) + _input_shape(treat_input_as_matrix))
  shapes = jax.eval_shape(t.init, jax.random.PRNGKey(0), x,
                          jnp.zeros((B, n_slots, f)))
  return _random_params(shapes, seed)


# ---------------------------------------------------------------------------
# Reference comparisons.
# ---------------------------------------------------------------------------

BASE = dict(mem_slots=3, head_size=3, num_heads=2)

REF_CASES = {
    "unit": (dict(BASE), False),
    "memory": (dict(BASE, gate_style="memory"), False),
    "none": (dict(BASE, gate_style=None), False),
    "unit_3_blocks": (dict(BASE, num_blocks=3), False),
    "none_3_blocks": (dict(BASE, num_blocks=3, gate_style=None), False),
    "key_size": (dict(BASE, key_size=2), False),
    "matrix_unit": (dict(BASE), True),
    "matrix_memory_2_blocks_key_size": (
        dict(mem_slots=2, head_size=2, num_heads=3, num_blocks=2, key_size=4,
             gate_style="memory"), True),
    "one_slot": (dict(BASE, mem_slots=1), False),
    "f_less_than_n": (dict(mem_slots=6, head_size=4, num_heads=1), False),
    "legacy_scale": (dict(BASE, key_size=2, legacy_attention_scale=True),
                     False),
    "biases_1_mlp_layer": (dict(BASE, forget_bias=0.5, input_bias=-0.7,
                                attention_mlp_layers=1), False),
    "none_3_mlp_layers": (dict(BASE, gate_style=None, attention_mlp_layers=3),
                          False),
}


@pytest.mark.parametrize("case", sorted(REF_CASES))
def test_step_matches_numpy_reference(case):
  cfg, matrix = REF_CASES[case]
  c, n_slots, h, dv, dk, f = _ref_sizes(cfg)
  params = _params_for(cfg, matrix, seed=1)
  n_rows = 3 if matrix else 1
  d_in = 4 if matrix else 6
  expected_shapes = _expected_param_shapes(cfg, d_in, n_rows)
  assert jax.tree.map(np.shape, params) == expected_shapes

  _, step = _step_fn(_freeze(cfg), matrix)
  np_params = _to_numpy(params)
  xs = _inputs(2, matrix)
  memory = jnp.asarray(_ref_initial_state(n_slots, f, B), jnp.float32)
  ref_memory = _ref_initial_state(n_slots, f, B)
  r = n_slots + n_rows
  g = f if c["gate_style"] == "unit" else 1
  for t in range(T):
    out, memory, info = step(params, xs[t], memory)
    ref_out, ref_memory, ref_att, ref_ig, ref_fg = _ref_step(
        np_params, cfg, xs[t], ref_memory, matrix)
    assert isinstance(info, StepInfo)
    assert out.dtype == jnp.float32 and memory.dtype == jnp.float32
    _assert_close(out, ref_out, F32_TOL, f"output t={t}")
    _assert_close(memory, ref_memory, F32_TOL, f"memory t={t}")
    assert info.attention_weights.shape == (B, c["num_blocks"], h, r, r)
    _assert_close(info.attention_weights, ref_att, F32_TOL, f"attention t={t}")
    if c["gate_style"] is None:
      assert info.input_gate is None and info.forget_gate is None
    else:
      assert info.input_gate.shape == (B, n_slots, g)
      assert info.forget_gate.shape == (B, n_slots, g)
      _assert_close(info.input_gate, ref_ig, F32_TOL, f"input gate t={t}")
      _assert_close(info.forget_gate, ref_fg, F32_TOL, f"forget gate t={t}")
  # The memory moved away from the identity: the comparison was not trivial.
  assert np.max(np.abs(ref_memory - _ref_initial_state(n_slots, f, B))) > 0.1


def test_reference_is_sensitive_to_every_option():
  """Guards the reference test itself: each option changes the result."""
  cfg, _ = REF_CASES["unit"]
  params = _to_numpy(_params_for(dict(cfg, key_size=2), False, seed=3))
  xs = _inputs(4, False)
  m0 = _ref_initial_state(3, 6, B)
  base = _ref_step(params, dict(cfg, key_size=2), xs[0], m0)[0]
  for change in (dict(legacy_attention_scale=True), dict(forget_bias=0.0),
                 dict(input_bias=1.0)):
    other = _ref_step(params, dict(cfg, key_size=2, **change), xs[0], m0)[0]
    assert np.max(np.abs(other - base)) > 1e-3, change


# ---------------------------------------------------------------------------
# Initial state, parameters.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mem_slots,head_size,num_heads", [
    (3, 3, 2),  # F = 6 > N: identity padded with zeros.
    (6, 4, 1),  # F = 4 < N: identity truncated.
    (4, 2, 2),  # F = N: identity.
    (1, 5, 1),
])
def test_initial_state(mem_slots, head_size, num_heads):
  f = head_size * num_heads

  def fn():
    core = RelationalMemory(mem_slots, head_size, num_heads)
    return core.initial_state(None), core.initial_state(3)

  unbatched, batched = hk.transform(fn).apply({}, None)
  assert unbatched.dtype == jnp.float32 and batched.dtype == jnp.float32
  np.testing.assert_array_equal(unbatched, _ref_initial_state(mem_slots, f))
  np.testing.assert_array_equal(batched,
                                _ref_initial_state(mem_slots, f, 3))


PARAM_COUNT_GRID = [
    # (cfg without mem_slots, input feature shape, treat_input_as_matrix)
    (dict(head_size=3, num_heads=2), (5,), False),
    (dict(head_size=3, num_heads=2, gate_style="memory"), (5,), False),
    (dict(head_size=3, num_heads=2, gate_style=None), (5,), False),
    (dict(head_size=4, num_heads=1, num_blocks=3), (2, 3), False),
    (dict(head_size=2, num_heads=3, attention_mlp_layers=1, key_size=5),
     (7,), False),
    (dict(head_size=2, num_heads=2, attention_mlp_layers=4, num_blocks=2,
          gate_style="memory"), (3, 4), True),
    (dict(head_size=3, num_heads=2, key_size=1), (2, 2, 3), True),
    (dict(head_size=3, num_heads=2, gate_style=None, num_blocks=2), (4, 2),
     True),
]


@pytest.mark.parametrize("index", range(len(PARAM_COUNT_GRID)))
def test_parameter_count_matches_formula(index):
  cfg, feature_shape, matrix = PARAM_COUNT_GRID[index]
  n_rows = feature_shape[0] if matrix else 1
  d_in = int(np.prod(feature_shape[1:] if matrix else feature_shape))
  counts = []
  for mem_slots in (1, 4, 9):
    full = dict(cfg, mem_slots=mem_slots)
    f = full["head_size"] * full["num_heads"]

    def fn(x, memory, full=full):
      return RelationalMemory(**full)(x, memory, matrix)

    shapes = jax.eval_shape(hk.transform(fn).init, jax.random.PRNGKey(0),
                            jnp.zeros((B,) + feature_shape),
                            jnp.zeros((B, mem_slots, f)))
    assert jax.tree.map(lambda s: tuple(s.shape), shapes) == (
        _expected_param_shapes(full, d_in, n_rows))
    assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(shapes))
    counts.append(sum(math.prod(s.shape) for s in jax.tree.leaves(shapes)))
  expected = _analytic_param_count(dict(cfg, mem_slots=1), d_in, n_rows)
  assert counts == [expected] * 3


def test_real_initialisation():
  """init: Sonnet-style truncated-normal weights, zero biases, LN 1/0."""
  cfg = dict(mem_slots=2, head_size=8, num_heads=2, num_blocks=2)
  t, _ = _step_fn(_freeze(cfg), False)
  params = jax.jit(t.init)(jax.random.PRNGKey(7), jnp.zeros((B, 40)),
                           jnp.zeros((B, 2, 16)))
  assert jax.tree.map(np.shape, params) == _expected_param_shapes(cfg, 40)
  for module, leaves in params.items():
    for name, value in leaves.items():
      value = np.asarray(value)
      assert value.dtype == np.float32, (module, name)
      if name == "scale":
        np.testing.assert_array_equal(value, 1.0)
      elif name in ("offset", "b"):
        np.testing.assert_array_equal(value, 0.0)
      else:
        std = 1.0 / math.sqrt(value.shape[0])
        assert np.max(np.abs(value)) <= 2.0 * std + 1e-6, module
        assert 0.5 * std < np.std(value) < 1.2 * std, module


# ---------------------------------------------------------------------------
# Unrolling, Haiku integration, vmap, gradients, bfloat16.
# ---------------------------------------------------------------------------

UNROLL_CASES = {
    "unit": (dict(BASE, num_blocks=2), False),
    "matrix_memory": (dict(BASE, gate_style="memory"), True),
    "none": (dict(BASE, gate_style=None), False),
}


@functools.lru_cache(maxsize=None)
def _unroll_fn(frozen_cfg, matrix):
  cfg = dict(frozen_cfg)

  def f(xs, s0):
    core = RelationalMemory(**cfg)
    step = (lambda x, s: core(x, s, True)) if matrix else core
    res = {}
    res["unroll"] = core.unroll(xs, s0, matrix)
    res["dynamic"] = hk.dynamic_unroll(step, xs, s0)
    res["static"] = hk.static_unroll(step, xs, s0)
    s, outs, infos = s0, [], []
    for t in range(xs.shape[0]):
      out, s, info = core.step_with_info(xs[t], s, matrix)
      outs.append(out)
      infos.append(info)
    res["steps"] = (jnp.stack(outs), s,
                    jax.tree.map(lambda *a: jnp.stack(a), *infos))
    res["call"] = core(xs[0], s0, matrix)
    return res

  return jax.jit(hk.without_apply_rng(hk.transform(f)).apply)


@functools.lru_cache(maxsize=None)
def _remat_info_fn(frozen_cfg, matrix):
  """unroll(return_info=True) of RelationalMemory(remat=True) (same params)."""

  def f(xs, s0):
    return RelationalMemory(**dict(frozen_cfg), remat=True).unroll(
        xs, s0, matrix, return_info=True)

  return jax.jit(hk.without_apply_rng(hk.transform(f)).apply)


@pytest.mark.parametrize("case", sorted(UNROLL_CASES))
def test_unroll_equals_dynamic_and_static_unroll(case):
  cfg, matrix = UNROLL_CASES[case]
  _, n_slots, _, _, _, f = _ref_sizes(cfg)
  params = _params_for(cfg, matrix, seed=5)
  xs = _inputs(6, matrix)
  s0 = jnp.asarray(_ref_initial_state(n_slots, f, B), jnp.float32)
  res = _unroll_fn(_freeze(cfg), matrix)(params, xs, s0)
  out, state = res["unroll"]
  assert out.shape == (T, B, n_slots * f) and state.shape == (B, n_slots, f)
  assert state.dtype == jnp.float32
  for other in ("dynamic", "static"):
    _assert_close(res[other][0], out, 1e-6, other)
    _assert_close(res[other][1], state, 1e-6, other)
  remat_out, remat_state, remat_info = _remat_info_fn(_freeze(cfg), matrix)(
      params, xs, s0)
  _assert_close(remat_out, out, 1e-6, "remat")
  _assert_close(remat_state, state, 1e-6, "remat")
  step_out, step_state, step_info = res["steps"]
  _assert_close(step_out, out, 1e-6, "steps")
  _assert_close(step_state, state, 1e-6, "steps")
  assert isinstance(remat_info, StepInfo)
  assert remat_info.attention_weights.shape == (
      (T,) + step_info.attention_weights.shape[1:])
  jax.tree.map(lambda a, b: _assert_close(a, b, 1e-6, "info"), remat_info,
               step_info)
  _assert_close(res["call"][0], step_out[0], 1e-6, "__call__")
  _assert_close(res["call"][1], step_out[0].reshape(B, n_slots, f), 1e-6,
                "__call__ state")
  # And the whole unroll agrees with the float64 reference.
  ref_out, ref_state = _ref_unroll(_to_numpy(params), cfg, xs,
                                   _ref_initial_state(n_slots, f, B), matrix)
  _assert_close(out, ref_out, F32_TOL, "unroll vs reference")
  _assert_close(state, ref_state, F32_TOL, "unroll vs reference")


def test_deep_rnn_and_reset_core():
  cfg = dict(BASE)
  n_slots, f = cfg["mem_slots"], 6
  reset_t = 2

  def fn(xs, resets):
    core = RelationalMemory(**cfg)
    linear = hk.Linear(5)
    deep = hk.DeepRNN([core, linear])
    deep_out, _ = hk.dynamic_unroll(deep, xs, deep.initial_state(B))
    core_out, _ = core.unroll(xs, core.initial_state(B))
    manual_deep = linear(core_out)
    reset_core = hk.ResetCore(core)
    reset_out, _ = hk.dynamic_unroll(reset_core, (xs, resets),
                                     reset_core.initial_state(B))
    fresh_out, _ = core(xs[reset_t], core.initial_state(B))
    return deep_out, manual_deep, core_out, reset_out, fresh_out

  t = hk.without_apply_rng(hk.transform(fn))
  xs = _inputs(8, False)
  resets = np.zeros((T, B), bool)
  resets[reset_t, 0] = True  # reset batch element 0 only, at step 2
  params = _random_params(jax.eval_shape(t.init, jax.random.PRNGKey(0), xs,
                                         resets), seed=9)
  assert "linear" in params and f"{NAME}/~/input_projection" in params
  deep_out, manual_deep, core_out, reset_out, fresh_out = jax.jit(t.apply)(
      params, xs, resets)
  assert deep_out.shape == (T, B, 5)
  _assert_close(deep_out, manual_deep, 1e-6, "DeepRNN")

  # Before the reset, and for the batch element that is never reset, the
  # ResetCore is the plain core.
  _assert_close(reset_out[:reset_t], core_out[:reset_t], 1e-6, "pre-reset")
  _assert_close(reset_out[:, 1], core_out[:, 1], 1e-6, "not reset")
  # At the reset, element 0 restarts from the initial state ...
  _assert_close(reset_out[reset_t, 0], fresh_out[0], 1e-6, "reset step")
  assert np.max(np.abs(reset_out[reset_t, 0] - core_out[reset_t, 0])) > 1e-2
  # ... and continues from there (checked against the reference).
  np_params = _to_numpy(params)
  ref_out, _ = _ref_unroll(np_params, cfg, xs[reset_t:, :1],
                           _ref_initial_state(n_slots, f, 1))
  _assert_close(reset_out[reset_t:, :1], ref_out, F32_TOL, "after reset")


def test_vmap_over_unbatched_initial_state():
  cfg = dict(BASE, num_blocks=2)
  n_slots, f = cfg["mem_slots"], 6

  def single(xs_T):
    """One sequence [T, D], no batch axis; initial_state(None)."""
    core = RelationalMemory(**cfg)
    s0 = core.initial_state(None)
    assert s0.shape == (n_slots, f)
    out, state = core.unroll(xs_T[:, None], s0[None])
    step_out, _ = core(xs_T[0][None], s0[None])
    return out[:, 0], state[0], step_out[0]

  def batched(xs):
    core = RelationalMemory(**cfg)
    out, state = core.unroll(xs, core.initial_state(B))
    return out, state

  single_t = hk.without_apply_rng(hk.transform(single))
  batched_t = hk.without_apply_rng(hk.transform(batched))
  xs = _inputs(10, False).reshape(T, B, -1)
  params = _random_params(
      jax.eval_shape(batched_t.init, jax.random.PRNGKey(0), xs), seed=11)
  v_out, v_state, v_step = jax.jit(
      jax.vmap(single_t.apply, in_axes=(None, 1)))(params, xs)
  b_out, b_state = jax.jit(batched_t.apply)(params, xs)
  _assert_close(jnp.swapaxes(v_out, 0, 1), b_out, 1e-6, "vmap outputs")
  _assert_close(v_state, b_state, 1e-6, "vmap state")
  _assert_close(v_step, b_out[0], 1e-6, "vmap step")


def test_gradients_through_unroll():
  cfg = dict(BASE, num_blocks=2, key_size=2)
  n_slots, f = cfg["mem_slots"], 6
  xs = _inputs(12, True)
  weights = jnp.asarray(np.random.default_rng(13).normal(
      size=(T, B, n_slots * f)), jnp.float32)

  def make_loss(remat):
    def fn(xs):
      core = RelationalMemory(**cfg, remat=remat)
      out, state = core.unroll(xs, core.initial_state(B), True)
      return jnp.sum(out * weights) + jnp.sum(jnp.sin(state))
    return hk.without_apply_rng(hk.transform(fn))

  plain, remat = make_loss(False), make_loss(True)
  params = _random_params(jax.eval_shape(plain.init, jax.random.PRNGKey(0),
                                         xs), seed=14)
  grads = jax.jit(jax.grad(plain.apply))(params, xs)
  remat_grads = jax.jit(jax.grad(remat.apply))(params, xs)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  assert set(grads) == set(_expected_param_shapes(cfg, 4, 3))
  for module, leaves in grads.items():
    for name, g in leaves.items():
      g = np.asarray(g)
      assert np.all(np.isfinite(g)), (module, name)
      assert np.max(np.abs(g)) > 1e-6, f"zero gradient for {module}/{name}"
      _assert_close(remat_grads[module][name], g, 1e-5, f"remat {module}")


def test_bfloat16_policy():
  """A bfloat16 `hk.mixed_precision` policy: bf16 matmuls, float32 state."""
  cfg = dict(BASE, num_blocks=2)
  n_slots, f = cfg["mem_slots"], 6

  def fn(xs):
    core = RelationalMemory(**cfg)
    out, state = core.unroll(xs, core.initial_state(B))
    step_out, step_state, info = core.step_with_info(xs[0],
                                                     core.initial_state(B))
    return out, state, step_state, info

  t = hk.without_apply_rng(hk.transform(fn))
  xs = _inputs(15, False)
  shapes = jax.eval_shape(t.init, jax.random.PRNGKey(0), xs)
  params = _random_params(shapes, seed=16)
  out32, state32, _, _ = jax.jit(t.apply)(params, xs)
  policy = jmp.get_policy("params=float32,compute=bfloat16,output=float32")
  with hk.mixed_precision.push_policy(RelationalMemory, policy):
    # Parameters stay float32 under the policy.
    shapes16 = jax.eval_shape(t.init, jax.random.PRNGKey(0), xs)
    # A new function to trace: jax.jit(t.apply) would reuse the float32 trace.
    out16, state16, step_state16, info16 = jax.jit(
        lambda p, x: t.apply(p, x))(params, xs)
  assert jax.tree.map(lambda s: (s.shape, s.dtype), shapes16) == (
      jax.tree.map(lambda s: (s.shape, s.dtype), shapes))
  assert state16.dtype == jnp.float32 and step_state16.dtype == jnp.float32
  assert out16.dtype == jnp.float32
  assert state16.shape == (B, n_slots, f)
  assert np.all(np.isfinite(np.asarray(info16.attention_weights,
                                       np.float32)))
  _assert_close(out16, out32, 5e-2, "bfloat16 outputs")
  _assert_close(state16, state32, 5e-2, "bfloat16 state")
  # It really computed in bfloat16 (not silently float32).
  assert np.max(np.abs(np.asarray(out16) - np.asarray(out32))) > 1e-5


# ---------------------------------------------------------------------------
# Errors and exports.
# ---------------------------------------------------------------------------


def _construct(**kwargs):
  def fn():
    RelationalMemory(**kwargs)
    return jnp.zeros(())
  hk.transform(fn).init(jax.random.PRNGKey(0))


@pytest.mark.parametrize("kwargs,match", [
    (dict(mem_slots=0), "mem_slots"),
    (dict(mem_slots=-2), "mem_slots"),
    (dict(mem_slots=2.5), "mem_slots"),
    (dict(head_size=0), "head_size"),
    (dict(head_size=-1), "head_size"),
    (dict(num_heads=0), "num_heads"),
    (dict(key_size=0), "key_size"),
    (dict(key_size=-3), "key_size"),
    (dict(num_blocks=0), "num_blocks"),
    (dict(attention_mlp_layers=0), "attention_mlp_layers"),
    (dict(gate_style="bogus"), "gate_style"),
    (dict(gate_style="Unit"), "gate_style"),
])
def test_bad_arguments_raise(kwargs, match):
  good = dict(mem_slots=2, head_size=2)
  _construct(**good)  # the harness itself does not raise
  with pytest.raises(ValueError, match=match):
    _construct(**dict(good, **kwargs))


def test_matrix_input_with_too_few_dims_raises():
  def fn(x):
    core = RelationalMemory(2, 2)
    return core(x, core.initial_state(B), treat_input_as_matrix=True)
  with pytest.raises(ValueError, match="treat_input_as_matrix"):
    hk.transform(fn).init(jax.random.PRNGKey(0), jnp.zeros((B, 5)))


def test_exports_and_make_core():
  assert rmc_jax.RelationalMemory is RelationalMemory
  assert rmc_jax.StepInfo is StepInfo

  def fn():
    core = rmc_jax.make_core("rmc", mem_slots=2, head_size=3, num_heads=2,
                             gate_style="memory")
    assert isinstance(core, RelationalMemory) and isinstance(core, hk.RNNCore)
    assert (core.mem_slots, core.mem_size, core.gate_style) == (2, 6, "memory")
    return core.initial_state(1)

  state = hk.transform(fn).apply({}, None)
  assert state.shape == (1, 2, 6)
