"""Tests for V-trace and the actor-critic loss (`rmc_jax.rl.vtrace`).

V-trace is checked against a float64 NumPy reference written here from the
IMPALA paper's explicit n-step sum (eq. 1, per-step discounts), which is a
different formula from the module's backward recursion; the on-policy case
against plain discounted returns; and the loss's gradients against a loss
whose targets are NumPy constants.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmc_jax.rl import vtrace as vt

T, B, A = 7, 3, 4


def ref_vtrace(log_rhos, discounts, rewards, values, bootstrap, rho_bar,
               pg_rho_bar, lam):
  """IMPALA eq. 1 as an explicit sum, float64, time-major [T, B].

  v_s = V(x_s) + sum_{t=s}^{T-1} (prod_{i=s}^{t-1} gamma_i c_i) delta_t,
  delta_t = rho_t (r_t + gamma_t V(x_{t+1}) - V(x_t)),
  A_s = rho_pg_s (r_s + gamma_s v_{s+1} - V(x_s)), v_T = V(x_T).
  """
  log_rhos, discounts, rewards, values, bootstrap = (
      np.asarray(a, np.float64)
      for a in (log_rhos, discounts, rewards, values, bootstrap))
  n = log_rhos.shape[0]
  rhos = np.exp(log_rhos)
  clip = lambda x, c: x if c is None else np.minimum(x, c)
  values_ext = np.concatenate([values, bootstrap[None]], 0)  # [T+1, B]
  vs = np.zeros_like(values)
  for s in range(n):
    total = values[s].copy()
    for t in range(s, n):
      weight = np.ones_like(total)
      for i in range(s, t):
        weight *= discounts[i] * lam * np.minimum(1.0, rhos[i])
      delta = clip(rhos[t], rho_bar) * (
          rewards[t] + discounts[t] * values_ext[t + 1] - values[t])
      total += weight * delta
    vs[s] = total
  vs_ext = np.concatenate([vs, bootstrap[None]], 0)
  adv = np.zeros_like(values)
  for s in range(n):
    adv[s] = clip(rhos[s], pg_rho_bar) * (
        rewards[s] + discounts[s] * vs_ext[s + 1] - values[s])
  return vs, adv


def _random_inputs(seed, scale_log_rhos=1.5):
  rng = np.random.default_rng(seed)
  log_rhos = rng.normal(0.0, scale_log_rhos, (T, B)).astype(np.float32)
  # Episode ends (discount 0) at some steps, 0.99 elsewhere.
  discounts = np.where(rng.random((T, B)) < 0.2, 0.0, 0.99).astype(np.float32)
  discounts[2, 0] = 0.0
  rewards = rng.normal(0.0, 1.0, (T, B)).astype(np.float32)
  values = rng.normal(0.0, 1.0, (T, B)).astype(np.float32)
  bootstrap = rng.normal(0.0, 1.0, (B,)).astype(np.float32)
  return log_rhos, discounts, rewards, values, bootstrap


@pytest.mark.parametrize("rho_bar,pg_rho_bar,lam", [
    (1.0, 1.0, 1.0),
    (1.0, 1.0, 0.8),
    (2.5, 0.7, 0.95),
    (0.5, 2.0, 0.9),  # rho_bar < 1 must not truncate the traces c_t.
    (None, None, 1.0),
])
def test_vtrace_matches_reference(rho_bar, pg_rho_bar, lam):
  inputs = _random_inputs(0)
  rhos = np.exp(inputs[0])
  assert (rhos > 2.5).any() and (rhos < 0.7).any()  # Clipping is active.
  assert (inputs[1] == 0).any()
  out = vt.vtrace(*map(jnp.asarray, inputs), clip_rho_threshold=rho_bar,
                  clip_pg_rho_threshold=pg_rho_bar, lambda_=lam)
  vs, adv = ref_vtrace(*inputs, rho_bar, pg_rho_bar, lam)
  assert out.vs_TB.shape == (T, B) and out.pg_advantages_TB.shape == (T, B)
  np.testing.assert_allclose(out.vs_TB, vs, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.pg_advantages_TB, adv, rtol=1e-5, atol=1e-5)


def test_episode_end_blocks_the_trace():
  """With gamma_t = 0, v_s for s <= t does not depend on anything after t."""
  log_rhos, discounts, rewards, values, bootstrap = _random_inputs(1)
  discounts[3] = 0.0
  base = vt.vtrace(log_rhos, discounts, rewards, values, bootstrap)
  rewards2, values2 = rewards.copy(), values.copy()
  rewards2[4:] += 5.0
  values2[4:] -= 3.0
  changed = vt.vtrace(log_rhos, discounts, rewards2, values2, bootstrap + 7.0)
  np.testing.assert_allclose(changed.vs_TB[:4], base.vs_TB[:4], atol=1e-6)
  np.testing.assert_allclose(changed.pg_advantages_TB[:4],
                             base.pg_advantages_TB[:4], atol=1e-6)


def test_on_policy_equals_discounted_returns():
  _, discounts, rewards, values, bootstrap = _random_inputs(2)
  returns = np.zeros((T, B), np.float64)
  acc = bootstrap.astype(np.float64)
  for t in reversed(range(T)):
    acc = rewards[t] + discounts[t] * acc
    returns[t] = acc
  out = vt.vtrace(np.zeros((T, B), np.float32), discounts, rewards, values,
                  bootstrap, lambda_=1.0)
  np.testing.assert_allclose(out.vs_TB, returns, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.pg_advantages_TB, returns - values,
                             rtol=1e-5, atol=1e-5)


def test_from_logits_and_jit():
  rng = np.random.default_rng(3)
  behaviour = rng.normal(size=(T, B, A)).astype(np.float32)
  target = rng.normal(size=(T, B, A)).astype(np.float32)
  actions = rng.integers(0, A, (T, B))
  _, discounts, rewards, values, bootstrap = _random_inputs(3)
  log_softmax = lambda l: l - np.log(np.sum(np.exp(l), -1, keepdims=True))
  pick = lambda lp: np.take_along_axis(lp, actions[..., None], -1)[..., 0]
  log_rhos = pick(log_softmax(target)) - pick(log_softmax(behaviour))
  np.testing.assert_allclose(
      vt.log_rhos_from_logits(target, behaviour, actions), log_rhos,
      atol=1e-5)
  out = jax.jit(vt.vtrace_from_logits)(behaviour, target, actions, discounts,
                                       rewards, values, bootstrap)
  vs, adv = ref_vtrace(log_rhos, discounts, rewards, values, bootstrap, 1.0,
                       1.0, 1.0)
  np.testing.assert_allclose(out.vs_TB, vs, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.pg_advantages_TB, adv, rtol=1e-5, atol=1e-5)


def test_shape_errors():
  log_rhos, discounts, rewards, values, bootstrap = _random_inputs(0)
  with pytest.raises(ValueError, match="bootstrap"):
    vt.vtrace(log_rhos, discounts, rewards, values, bootstrap[:2])
  with pytest.raises(ValueError, match="rewards_TB"):
    vt.vtrace(log_rhos, discounts, rewards[:-1], values, bootstrap)


def test_targets_are_constants():
  inputs = [jnp.asarray(a) for a in _random_inputs(4)]
  for argnum in (0, 2, 3, 4):
    grad = jax.grad(lambda *a: jnp.sum(vt.vtrace(*a).vs_TB)
                    + jnp.sum(vt.vtrace(*a).pg_advantages_TB),
                    argnums=argnum)(*inputs)
    np.testing.assert_array_equal(grad, 0.0)


def _loss_inputs(seed):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(T, B, A)).astype(np.float32)
  behaviour = (logits + rng.normal(0, 1.0, (T, B, A))).astype(np.float32)
  actions = rng.integers(0, A, (T, B))
  _, env_discounts, rewards, values, bootstrap = _random_inputs(seed)
  env_discounts = (env_discounts > 0).astype(np.float32)
  return logits, values, bootstrap, actions, behaviour, rewards, env_discounts


def test_actor_critic_loss_value_and_gradients():
  (logits, values, bootstrap, actions, behaviour, rewards,
   env_discounts) = _loss_inputs(5)
  gamma, baseline_cost, entropy_cost = 0.99, 0.5, 0.005
  total, stats = vt.actor_critic_loss(
      logits, values, bootstrap, actions, behaviour, rewards, env_discounts,
      discount=gamma, baseline_cost=baseline_cost, entropy_cost=entropy_cost)

  # Reference: targets as NumPy constants, then a plain differentiable loss.
  log_softmax = lambda l: l - np.log(np.sum(np.exp(l), -1, keepdims=True))
  pick = lambda lp: np.take_along_axis(lp, actions[..., None], -1)[..., 0]
  log_rhos = pick(log_softmax(logits)) - pick(log_softmax(behaviour))
  vs, adv = ref_vtrace(log_rhos, gamma * env_discounts, rewards, values,
                       bootstrap, 1.0, 1.0, 1.0)
  vs, adv = jnp.asarray(vs, jnp.float32), jnp.asarray(adv, jnp.float32)

  def ref_loss(logits, values):
    log_p = jax.nn.log_softmax(logits)
    log_pi_a = jnp.take_along_axis(log_p, actions[..., None], -1)[..., 0]
    pg = jnp.mean(-log_pi_a * adv)
    bl = jnp.mean(0.5 * (vs - values) ** 2)
    ent = jnp.mean(-jnp.sum(jnp.exp(log_p) * log_p, -1))
    return pg + baseline_cost * bl - entropy_cost * ent, (pg, bl, ent)

  ref_total, (pg, bl, ent) = ref_loss(logits, values)
  np.testing.assert_allclose(total, ref_total, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["policy_loss"], pg, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["baseline_loss"], bl, rtol=1e-5)
  np.testing.assert_allclose(stats["entropy"], ent, rtol=1e-5)
  np.testing.assert_allclose(stats["entropy_loss"], -entropy_cost * ent,
                             rtol=1e-5)

  loss_fn = lambda *a: vt.actor_critic_loss(
      *a, discount=gamma, baseline_cost=baseline_cost,
      entropy_cost=entropy_cost)[0]
  grads = jax.grad(loss_fn, argnums=(0, 1, 2, 4))(
      logits, values, bootstrap, actions, behaviour, rewards, env_discounts)
  ref_grads = jax.grad(lambda l, v: ref_loss(l, v)[0], argnums=(0, 1))(
      logits, values)
  np.testing.assert_allclose(grads[0], ref_grads[0], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grads[1], ref_grads[1], rtol=1e-4, atol=1e-6)
  # The value gradient is the baseline term alone: cost * (V - vs) / (T*B).
  np.testing.assert_allclose(grads[1], baseline_cost * (values - vs) / (T * B),
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(grads[2], 0.0)  # Bootstrap value.
  np.testing.assert_array_equal(grads[3], 0.0)  # Behaviour logits.


def test_actor_critic_loss_mask():
  args = _loss_inputs(6)
  mask = np.ones((T, B), np.float32)
  mask[:, 1] = 0.0
  masked, _ = vt.actor_critic_loss(*args, mask_TB=mask)
  # Equal to the loss on the batch rows kept (V-trace is per row).
  kept = [a[:, [0, 2]] if a.ndim >= 2 else a[[0, 2]] for a in args]
  np.testing.assert_allclose(masked, vt.actor_critic_loss(*kept)[0],
                             rtol=1e-5)
