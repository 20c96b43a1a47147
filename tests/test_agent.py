"""Tests for the actor-critic network (`rmc_jax.rl.agent`).

The learner's `unroll` is checked against the actor's step-by-step
`__call__` (for every core, the ConvLSTM on unflattened feature maps),
episode resets against fresh episodes, the coordinate planes
against hand-written values, and the V-trace loss's gradient through the
unroll for every core.
"""

from __future__ import annotations

import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmc_jax.rl import agent as ag
from rmc_jax.rl import vtrace as vt

T, B, A = 5, 2, 4
OBS_SHAPE = (4, 4, 3)

CONFIGS = {
    "rmc": dict(core_name="rmc",
                core_kwargs=dict(mem_slots=2, head_size=4, num_heads=2)),
    "rmc_matrix": dict(core_name="rmc", rmc_input_as_matrix=True,
                       core_kwargs=dict(mem_slots=2, head_size=4,
                                        num_heads=2)),
    "lstm": dict(core_name="lstm", core_kwargs=dict(hidden_sizes=(8,))),
    "dnc": dict(core_name="dnc",
                core_kwargs=dict(memory_size=4, word_size=4,
                                 controller_sizes=(8,))),
    "convlstm": dict(core_name="convlstm",
                     core_kwargs=dict(input_shape=OBS_SHAPE[:2],
                                      channels=(3,))),
}


def _random_params(init, *args, seed=0):
  """Parameters of the right shapes with random values.

  Drawn with NumPy from `jax.eval_shape(init)`, which skips compiling the
  initialisers (the slowest part of these tests); weights get stddev
  1/sqrt(fan_in), vectors (biases, LayerNorm) stddev 0.1.
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(init, jax.random.PRNGKey(0), *args)

  def draw(s):
    std = 0.1 if len(s.shape) < 2 else 1.0 / np.sqrt(np.prod(s.shape[:-1]))
    return jnp.asarray(rng.normal(0.0, std, s.shape), s.dtype)
  return jax.tree.map(draw, shapes)


@functools.lru_cache(maxsize=None)
def _make(config_name):
  kwargs = dict(CONFIGS[config_name], head_hidden=(16,))
  fns = ag.make_actor_critic(OBS_SHAPE, A, **kwargs)
  return fns, _random_params(fns.init)


def _obs(seed, t=T, b=B):
  return jax.random.uniform(jax.random.PRNGKey(seed), (t, b) + OBS_SHAPE)


def _allclose(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5,
                                                       atol=1e-5), a, b)


def test_coordinate_planes():
  x = jnp.full((2, 3, 4, 1), 7.0)
  out = ag.add_coordinate_planes(x)
  assert out.shape == (2, 3, 4, 3)
  np.testing.assert_array_equal(out[..., 0], 7.0)
  xs = np.array([-1.0, -1.0 / 3.0, 1.0 / 3.0, 1.0])  # Along W (columns).
  ys = np.array([-1.0, 0.0, 1.0])                     # Along H (rows).
  for b in range(2):
    for h in range(3):
      for w in range(4):
        np.testing.assert_allclose(out[b, h, w, 1:], [xs[w], ys[h]],
                                   atol=1e-6)
  # Time-major inputs get the same planes.
  np.testing.assert_allclose(ag.add_coordinate_planes(x[None])[0], out)


def test_torso_sees_the_planes():
  def shapes(**kw):
    kw = {"core_name": "lstm", "core_kwargs": dict(hidden_sizes=(8,)), **kw}
    return jax.eval_shape(ag.make_actor_critic(OBS_SHAPE, A, **kw).init,
                          jax.random.PRNGKey(0))
  params = shapes()
  assert params["actor_critic/~/torso_conv_0"]["w"].shape == (2, 2, 5, 12)
  assert params["actor_critic/~/torso_conv_1"]["w"].shape == (2, 2, 12, 24)
  assert params["actor_critic/~/head_linear_0"]["w"].shape == (8, 256)
  assert params["actor_critic/~/policy"]["w"].shape == (256, A)
  assert params["actor_critic/~/value"]["w"].shape == (256, 1)
  params = shapes(coords_position="torso_output")
  assert params["actor_critic/~/torso_conv_0"]["w"].shape == (2, 2, 3, 12)
  # 4*4 cells x (24 + 2) channels reach the LSTM.
  assert params["actor_critic/~/lstm_stack/~/layer_0"]["w_x"].shape[0] == 416
  # Each cell is one RMC input row: the input projection sees 24 + 2 features.
  params = shapes(coords_position="torso_output", core_name="rmc",
                  rmc_input_as_matrix=True,
                  core_kwargs=dict(mem_slots=2, head_size=4))
  assert params["actor_critic/~/relational_memory/~/input_projection"][
      "w"].shape == (26, 4)
  # The ConvLSTM sees the 24 + 2 feature maps unflattened; the heads see its
  # 4*4 cells x 3 channels.
  params = shapes(coords_position="torso_output", core_name="convlstm",
                  core_kwargs=dict(input_shape=(4, 4), channels=(3,)))
  assert params["actor_critic/~/conv_lstm/~/layer_0"]["w_x"].shape == (
      2, 2, 26, 12)
  assert params["actor_critic/~/head_linear_0"]["w"].shape == (48, 256)


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_unroll_matches_steps_and_resets(config_name):
  fns, params = _make(config_name)
  unroll = jax.jit(fns.unroll)
  step = jax.jit(fns.step)
  obs_TB = _obs(1)
  state0 = fns.initial_state(params, B)

  def run_steps(obs_TB, state):
    """The actor's loop: __call__ step by step, no resets."""
    logits, values = [], []
    for t in range(obs_TB.shape[0]):
      (l_BA, v_B), state = step(params, obs_TB[t], state)
      logits.append(l_BA)
      values.append(v_B)
    return (jnp.stack(logits), jnp.stack(values)), state

  # Acting step by step equals the learner's unroll (without first_TB, which
  # uses the core's own unroll, and with an all-False first_TB).
  stepped, final_stepped = run_steps(obs_TB, state0)
  assert stepped[0].shape == (T, B, A) and stepped[1].shape == (T, B)
  out_plain, final_plain = unroll(params, obs_TB, state0)
  out_nofirst, final_nofirst = unroll(params, obs_TB, state0,
                                      jnp.zeros((T, B), bool))
  _allclose(out_plain, stepped)
  _allclose(out_nofirst, stepped)
  _allclose(final_plain, final_stepped)
  _allclose(final_nofirst, final_stepped)

  # Resets: start from a state that is not the initial one (after 2 steps);
  # row 0 starts a new episode at t=2, row 1 at t=0 and again at t=3.
  _, warm_state = run_steps(_obs(2, t=2), state0)
  first_TB = np.zeros((T, B), bool)
  first_TB[2, 0] = first_TB[0, 1] = first_TB[3, 1] = True
  (logits_TBA, values_TB), final = unroll(params, obs_TB, warm_state,
                                          jnp.asarray(first_TB))
  row = lambda tree, b: jax.tree.map(lambda s: s[b], tree)
  # Each segment equals the actor's steps from the segment's start state.
  for b, t0, t1, start in ((0, 0, 2, warm_state), (0, 2, T, state0),
                           (1, 0, 3, state0), (1, 3, T, state0)):
    (seg_l, seg_v), seg_final = run_steps(obs_TB[t0:t1], start)
    np.testing.assert_allclose(logits_TBA[t0:t1, b], seg_l[:, b], rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(values_TB[t0:t1, b], seg_v[:, b], rtol=1e-5,
                               atol=1e-5)
    if t1 == T:
      _allclose(row(final, b), row(seg_final, b))
  # The reset matters: without it row 0's outputs after t=2 differ.
  (no_reset_l, _), _ = unroll(params, obs_TB, warm_state)
  assert not np.allclose(no_reset_l[2:, 0], logits_TBA[2:, 0], atol=1e-4)

  # The acting step's first_B resets the rows it marks.
  (l_BA, v_B), s1 = step(params, obs_TB[0], warm_state,
                         jnp.array([True, False]))
  (l_ref, v_ref), s_ref = step(params, obs_TB[0], state0)
  (l_warm, v_warm), s_warm = step(params, obs_TB[0], warm_state)
  _allclose((l_BA[0], v_B[0], row(s1, 0)), (l_ref[0], v_ref[0], row(s_ref, 0)))
  _allclose((l_BA[1], v_B[1], row(s1, 1)),
            (l_warm[1], v_warm[1], row(s_warm, 1)))


# The DNC's gradients are covered in test_dnc.py; its compile is the slowest.
@pytest.mark.parametrize("config_name", ["rmc", "lstm"])
def test_loss_gradient_through_unroll(config_name):
  fns, params = _make(config_name)
  obs_TB = _obs(3, t=T + 1)  # T transitions and the bootstrap observation.
  first_TB = jnp.zeros((T + 1, B), bool).at[0].set(True).at[3, 0].set(True)
  rng = np.random.default_rng(0)
  actions_TB = rng.integers(0, A, (T, B))
  behaviour_TBA = rng.normal(size=(T, B, A)).astype(np.float32)
  rewards_TB = rng.normal(size=(T, B)).astype(np.float32)
  env_discounts_TB = np.ones((T, B), np.float32)
  env_discounts_TB[2, 0] = 0.0  # Row 0's episode terminates into step 3.

  def loss_fn(params):
    state = fns.initial_state(params, B)
    (logits_TBA, values_TB), _ = fns.unroll(params, obs_TB, state, first_TB)
    return vt.actor_critic_loss(logits_TBA[:-1], values_TB[:-1],
                                values_TB[-1], actions_TB, behaviour_TBA,
                                rewards_TB, env_discounts_TB)

  (loss, stats), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      params)
  assert np.isfinite(loss)
  assert all(np.isfinite(v) for v in stats.values())
  leaves = jax.tree.leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in leaves)
  assert np.abs(grads["actor_critic/~/policy"]["w"]).sum() > 0
  assert np.abs(grads["actor_critic/~/value"]["w"]).sum() > 0
  assert np.abs(grads["actor_critic/~/torso_conv_0"]["w"]).sum() > 0


def test_module_contract_inside_transform():
  """The module itself: initial_state / __call__ / unroll in one transform."""

  def f(obs_TB):
    net = ag.ActorCriticNetwork(A, "lstm", dict(hidden_sizes=(8,)),
                                head_hidden=())
    state = net.initial_state(B)
    (l_BA, v_B), _ = net(obs_TB[0], state)
    (l_TBA, v_TB), _ = net.unroll(obs_TB, state, jnp.zeros((T, B), bool))
    return l_BA, l_TBA[0], v_B, v_TB[0]

  f = hk.without_apply_rng(hk.transform(f))
  obs_TB = _obs(4)
  l_BA, l0, v_B, v0 = f.apply(_random_params(f.init, obs_TB), obs_TB)
  _allclose((l_BA, v_B), (l0, v0))


def test_bad_arguments():
  init = lambda **kw: jax.eval_shape(
      ag.make_actor_critic(OBS_SHAPE, A, **kw).init, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="rmc_input_as_matrix"):
    init(core_name="lstm", rmc_input_as_matrix=True)
  with pytest.raises(ValueError, match="coords_position"):
    init(core_name="lstm", coords_position="middle")
  with pytest.raises(ValueError, match="Unknown core"):
    init(core_name="gru")
  with pytest.raises(ValueError, match="num_actions"):
    jax.eval_shape(ag.make_actor_critic(OBS_SHAPE, 0, core_name="lstm").init,
                   jax.random.PRNGKey(0))
  fns, params = _make("lstm")
  with pytest.raises(ValueError, match="first_TB"):
    fns.unroll(params, _obs(0), fns.initial_state(params, B),
               jnp.zeros((T, B + 1), bool))
