"""Every core behaves like Haiku's own RNN cores (hk.LSTM is the yardstick).

For each core: unbatched states (`initial_state(None)`), `hk.vmap`,
`hk.ResetCore` (batched and unbatched), `hk.DeepRNN`,
`hk.deep_rnn_with_skip_connections` and `hk.BatchApply` give the values of
the batched call and the output shapes hk.LSTM gives under the same wrapper;
`unroll(..., reset_TB, mask_TB)` equals `hk.dynamic_unroll` of the step with
`hk.ResetCore` and a frozen state where masked; and under a bfloat16
`hk.mixed_precision` policy `unroll` runs, stays close to float32, returns
float32 gradients and trains like float32.
"""

from __future__ import annotations

import functools

import haiku as hk
import jax
import jax.numpy as jnp
import jmp
import numpy as np
import pytest

from rmc_jax.cores import DNC, LSTMStack, RelationalMemory, select_state

T, B, D = 3, 2, 5
CORES = {
    "rmc": (RelationalMemory, dict(mem_slots=2, head_size=2, num_heads=2)),
    "lstm": (LSTMStack, dict(hidden_sizes=(3, 4), skip_connections=True)),
    "dnc": (DNC, dict(memory_size=3, word_size=2, controller_sizes=(4,))),
}
OURS = sorted(CORES)


def _make(name):
  if name == "hk_lstm":
    return hk.LSTM(4)
  cls, kwargs = CORES[name]
  return cls(**kwargs)


def _unroll(core, xs, state, **flags):
  if isinstance(core, hk.LSTM):
    return hk.dynamic_unroll(core, xs, state)
  return core.unroll(xs, state, **flags)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  xs = rng.normal(size=(T, B, D)).astype(np.float32)
  reset_TB = np.array([[False, True], [True, False], [False, True]])
  mask_TB = np.array([[True, False], [True, True], [False, True]])
  return xs, reset_TB, mask_TB


def _close(actual, expected, tol, what):
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    assert a.shape == e.shape, (what, a.shape, e.shape)
    np.testing.assert_allclose(a, e, rtol=tol, atol=tol, err_msg=what)


# ---------------------------------------------------------------------------
# Wrappers.
# ---------------------------------------------------------------------------


def _wrapped(name, xs, reset_TB):
  """The core under every wrapper, and the batched results to compare with."""
  core = _make(name)
  second = hk.LSTM(3, name="second")
  s_B = core.initial_state(B)
  unbatched = lambda: core.initial_state(None)
  out = {}
  out["call"] = core(xs[0], s_B)
  out["call_unbatched"] = core(xs[0, 1], unbatched())
  out["unroll"] = _unroll(core, xs, s_B)
  out["unroll_unbatched"] = _unroll(core, xs[:, 1], unbatched())
  out["vmap_call"] = hk.vmap(lambda x: core(x, unbatched()),
                             split_rng=False)(xs[0])
  out["vmap_unroll"] = hk.vmap(lambda x: _unroll(core, x, unbatched()),
                               in_axes=1, out_axes=(1, 0),
                               split_rng=False)(xs)
  out["reset"] = hk.dynamic_unroll(hk.ResetCore(core), (xs, reset_TB), s_B)
  out["reset_unbatched"] = hk.dynamic_unroll(
      hk.ResetCore(core), (xs[:, 1], reset_TB[:, 1]), unbatched())
  # Reference of the resets: a plain step loop with select_state.
  s, outs = s_B, []
  for t in range(T):
    o, s = core(xs[t], select_state(reset_TB[t], s_B, s))
    outs.append(o)
  out["reset_reference"] = (jnp.stack(outs), s)
  out["deep"] = hk.dynamic_unroll(hk.DeepRNN([core, jnp.tanh]), xs, (s_B,))
  skip = hk.deep_rnn_with_skip_connections([core, second])
  out["skip"] = hk.dynamic_unroll(skip, xs, skip.initial_state(B))
  out["second"] = hk.dynamic_unroll(
      second, jnp.concatenate([xs, out["unroll"][0]], -1),
      second.initial_state(B))
  state_TB = jax.tree.map(lambda a: jnp.broadcast_to(a, (T,) + a.shape),
                          s_B)
  out["batch_apply"] = hk.BatchApply(core)(xs, state_TB)
  return out


@functools.lru_cache(maxsize=None)
def _wrapped_results(name):
  xs, reset_TB, _ = _inputs()
  t = hk.transform(functools.partial(_wrapped, name))
  params = jax.jit(t.init)(jax.random.PRNGKey(0), xs, reset_TB)
  params = jax.tree.map(  # non-zero biases and LayerNorm offsets too
      lambda p: p + 0.1 * jnp.sin(jnp.arange(p.size).reshape(p.shape)),
      params)
  return jax.jit(t.apply)(params, None, xs, reset_TB)


@pytest.mark.parametrize("name", OURS)
def test_wrappers_give_the_batched_values(name):
  r = _wrapped_results(name)
  tol = 1e-5
  (out_B, state_B), (out_TB, final_B) = r["call"], r["unroll"]
  row = lambda tree, axis=0: jax.tree.map(lambda a: a.take(1, axis), tree)
  _close(r["call_unbatched"], (row(out_B), row(state_B)), tol, "call")
  _close(r["unroll_unbatched"], (row(out_TB, 1), row(final_B)), tol,
         "unroll")
  _close(r["vmap_call"], r["call"], tol, "vmap call")
  _close(r["vmap_unroll"], r["unroll"], tol, "vmap unroll")
  _close(r["reset"], r["reset_reference"], tol, "ResetCore")
  reset_out, reset_final = r["reset"]
  _close(r["reset_unbatched"], (row(reset_out, 1), row(reset_final)), tol,
         "unbatched ResetCore")
  _close(r["deep"], (jnp.tanh(out_TB), (final_B,)), tol, "DeepRNN")
  second_out, second_final = r["second"]
  _close(r["skip"], (jnp.concatenate([out_TB, second_out], -1),
                     (final_B, second_final)), tol, "skip connections")
  # Every (t, b) starts from the initial state and takes input xs[t, b].
  first_step = jax.tree.map(lambda a: a[0], r["batch_apply"])
  _close(first_step, r["call"], tol, "BatchApply")


@pytest.mark.parametrize("name", OURS)
def test_wrappers_give_the_shapes_of_hk_lstm(name):
  """Same leading (time and batch) axes as hk.LSTM's under each wrapper."""
  ours, lstm = _wrapped_results(name), _wrapped_results("hk_lstm")
  lead = lambda r: jax.tree.leaves(r)[0].shape[:-1]  # the output
  for key in ours:
    assert lead(ours[key]) == lead(lstm[key]), key
  # Unbatched states have one axis less than batched ones, leaf by leaf.
  for batched, unbatched in (("call", "call_unbatched"),
                             ("unroll", "unroll_unbatched")):
    for a, u in zip(jax.tree.leaves(ours[batched][1]),
                    jax.tree.leaves(ours[unbatched][1])):
      assert a.shape[1:] == u.shape


# ---------------------------------------------------------------------------
# Resets and masks in unroll.
# ---------------------------------------------------------------------------


class _Masked(hk.RNNCore):
  """A core's step, frozen (state kept, output zero) where mask is False."""

  def __init__(self, core):
    super().__init__(name="masked")
    self.core = core

  def __call__(self, inputs, state):
    x, mask = inputs
    out, new = self.core(x, state)
    return (jnp.where(mask[..., None], out, 0.0),
            select_state(mask, new, state))

  def initial_state(self, batch_size):
    return self.core.initial_state(batch_size)


def _flags_fn(name):
  def f(xs, reset_TB, mask_TB):
    core = _make(name)
    slow = hk.ResetCore(_Masked(core))
    res = {}
    for suffix, sl, b in (("", np.s_[:], B), ("_unbatched", np.s_[:, 0], None)):
      s0 = core.initial_state(b)
      res["fast" + suffix] = core.unroll(xs[sl], s0, reset_TB=reset_TB[sl],
                                         mask_TB=mask_TB[sl])
      res["slow" + suffix] = hk.dynamic_unroll(
          slow, ((xs[sl], mask_TB[sl]), reset_TB[sl]), s0)
    return res
  return hk.transform(f)


@pytest.mark.parametrize("name", OURS)
def test_unroll_resets_and_masks_equal_reset_core(name):
  xs, reset_TB, mask_TB = _inputs(1)
  t = _flags_fn(name)
  params = jax.jit(t.init)(jax.random.PRNGKey(1), xs, reset_TB, mask_TB)
  r = jax.jit(t.apply)(params, None, xs, reset_TB, mask_TB)
  _close(r["fast"], r["slow"], 1e-5, "batched")
  _close(r["fast_unbatched"], r["slow_unbatched"], 1e-5, "unbatched")
  out = np.asarray(r["fast"][0])
  assert np.all(out[~mask_TB] == 0) and np.all(
      np.abs(out[mask_TB]).max(-1) > 0)


@pytest.mark.parametrize("name", OURS)
def test_unroll_rejects_flags_of_the_wrong_shape(name):
  def f(xs):
    core = _make(name)
    return core.unroll(xs, core.initial_state(B),
                       reset_TB=jnp.zeros((T, B + 1), bool))
  xs, _, _ = _inputs()
  with pytest.raises(ValueError, match="reset_TB"):
    hk.transform(f).init(jax.random.PRNGKey(0), xs)


# ---------------------------------------------------------------------------
# Mixed precision.
# ---------------------------------------------------------------------------

BF16 = jmp.get_policy("params=float32,compute=bfloat16,output=float32")
# bfloat16 has an 8-bit mantissa (relative rounding 2**-8 ~ 0.4%); a few
# steps through matmuls and gates stay within a few percent of float32.
BF16_OUTPUT_TOL = 5e-2
BF16_TRAIN_TOL = 5e-2


def _regression_loss(name):
  """Mean squared error of a Linear read-out of the unrolled core."""

  def loss(xs, targets_TB):
    core = _make(name)
    outputs, _ = core.unroll(xs, core.initial_state(B))
    prediction = hk.Linear(1, name="readout")(outputs)[..., 0]
    return jnp.mean(jnp.square(prediction - targets_TB)), outputs

  return hk.without_apply_rng(hk.transform(loss))


def _train(name, policy, params, xs, targets, steps=5, lr=0.1):
  """Plain SGD; returns (losses, first outputs, first grads)."""
  t = _regression_loss(name)
  cls = CORES[name][0]
  with hk.mixed_precision.push_policy(cls, policy):
    grad_fn = jax.jit(jax.value_and_grad(t.apply, has_aux=True))
    losses, first = [], None
    for _ in range(steps):
      (loss, outputs), grads = grad_fn(params, xs, targets)
      first = first or (outputs, grads)
      losses.append(float(loss))
      params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
  return np.array(losses), first


@pytest.mark.parametrize("name", OURS)
def test_bfloat16_policy(name):
  xs, _, _ = _inputs(2)
  targets = np.sin(xs.sum(-1))
  params = jax.jit(_regression_loss(name).init)(jax.random.PRNGKey(2), xs,
                                                targets)
  f32 = jmp.get_policy("params=float32,compute=float32,output=float32")
  losses32, (out32, grads32) = _train(name, f32, params, xs, targets)
  losses16, (out16, grads16) = _train(name, BF16, params, xs, targets)
  assert out16.dtype == jnp.float32
  err = np.max(np.abs(np.asarray(out16) - np.asarray(out32)))
  assert 0 < err <= BF16_OUTPUT_TOL * max(1.0, np.max(np.abs(out32)))
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads16))
  for g16, g32 in zip(jax.tree.leaves(grads16), jax.tree.leaves(grads32)):
    scale = max(np.max(np.abs(g32)), 1e-3)
    assert np.max(np.abs(g16 - g32)) <= 0.1 * scale
  assert losses32[-1] < losses32[0]  # the tiny regression does train
  np.testing.assert_allclose(losses16, losses32, rtol=BF16_TRAIN_TOL)


@pytest.mark.parametrize("name", OURS)
def test_bfloat16_policy_keeps_a_float32_state(name):
  """unroll and the step loop carry float32 (unroll does not round it)."""

  def f(xs):
    core = _make(name)
    out, state = core.unroll(xs, core.initial_state(B))
    dyn_out, dyn_state = hk.dynamic_unroll(core, xs, core.initial_state(B))
    return state, dyn_state, out, dyn_out

  xs, _, _ = _inputs(3)
  t = hk.without_apply_rng(hk.transform(f))
  with hk.mixed_precision.push_policy(CORES[name][0], BF16):
    params = jax.jit(t.init)(jax.random.PRNGKey(3), xs)
    state, dyn_state, out, dyn_out = jax.jit(t.apply)(params, xs)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(state))
  _close(out, dyn_out, BF16_OUTPUT_TOL, "unroll vs dynamic_unroll")
