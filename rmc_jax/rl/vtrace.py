"""V-trace targets and the IMPALA actor-critic loss (Espeholt et al., 2018).

Written from section 4 of "IMPALA: Scalable Distributed Deep-RL with
Importance Weighted Actor-Learner Architectures". Everything is time-major:
arrays are [T, B] (or [T, B, A] for logits) and step t of a trajectory is the
transition x_t --a_t--> x_{t+1} with reward r_t and discount gamma_t.

With truncated importance weights

  rho_t = min(rho_bar, pi(a_t|x_t) / mu(a_t|x_t))
  c_t   = lambda * min(1, pi(a_t|x_t) / mu(a_t|x_t))

and temporal differences delta_t = rho_t (r_t + gamma_t V(x_{t+1}) - V(x_t)),
the n-step V-trace target (the paper's eq. 1, with per-step discounts) is

  v_s = V(x_s) + sum_{t=s}^{T-1} (prod_{i=s}^{t-1} gamma_i c_i) delta_t,

computed here backwards with its recursive form

  v_s - V(x_s) = delta_s + gamma_s c_s (v_{s+1} - V(x_{s+1})),  v_T = V(x_T),

and the policy-gradient advantage is

  A_s = rho_pg_s (r_s + gamma_s v_{s+1} - V(x_s)),
  rho_pg_s = min(rho_bar_pg, pi(a_s|x_s) / mu(a_s|x_s)).

gamma_t = 0 marks an episode end between x_t and x_{t+1}: nothing flows back
across it. Both targets are returned under `stop_gradient`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class VTraceReturns(NamedTuple):
  """V-trace targets (both under stop_gradient).

  Attributes:
    vs_TB: [T, B] the V-trace value targets v_s.
    pg_advantages_TB: [T, B] the policy-gradient advantages
      rho_pg_s (r_s + gamma_s v_{s+1} - V(x_s)).
  """

  vs_TB: jax.Array
  pg_advantages_TB: jax.Array


def _clip_above(x: jax.Array, threshold: float | None) -> jax.Array:
  return x if threshold is None else jnp.minimum(x, threshold)


def log_rhos_from_logits(target_logits_TBA: jax.Array,
                         behaviour_logits_TBA: jax.Array,
                         actions_TB: jax.Array) -> jax.Array:
  """log pi(a_t|x_t) - log mu(a_t|x_t), [T, B], from unnormalised logits.

  Args:
    target_logits_TBA: [T, B, A] logits of the learner's policy pi.
    behaviour_logits_TBA: [T, B, A] logits of the acting policy mu.
    actions_TB: [T, B] integer actions taken by mu.
  """
  return (_action_log_probs(target_logits_TBA, actions_TB)
          - _action_log_probs(behaviour_logits_TBA, actions_TB))


def _action_log_probs(logits_TBA: jax.Array, actions_TB: jax.Array
                      ) -> jax.Array:
  """log softmax(logits)[a], [T, B]."""
  log_probs_TBA = jax.nn.log_softmax(logits_TBA.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(log_probs_TBA, actions_TB[..., None].astype(
      jnp.int32), axis=-1)[..., 0]


def vtrace(log_rhos_TB: jax.Array,
           discounts_TB: jax.Array,
           rewards_TB: jax.Array,
           values_TB: jax.Array,
           bootstrap_value_B: jax.Array,
           clip_rho_threshold: float | None = 1.0,
           clip_pg_rho_threshold: float | None = 1.0,
           lambda_: float = 1.0) -> VTraceReturns:
  """V-trace targets from log importance weights (a reverse `lax.scan`).

  Args:
    log_rhos_TB: [T, B] log(pi(a_t|x_t) / mu(a_t|x_t)).
    discounts_TB: [T, B] gamma_t of the transition x_t -> x_{t+1}, i.e. the
      agent's discount times the environment's (0 when x_{t+1} ends the
      episode by termination).
    rewards_TB: [T, B] r_t, the reward of that transition.
    values_TB: [T, B] V(x_t) for t = 0 .. T-1.
    bootstrap_value_B: [B] V(x_T).
    clip_rho_threshold: rho_bar, the truncation of rho_t in the value
      targets (None: no truncation).
    clip_pg_rho_threshold: the truncation of rho_pg_s in the advantages
      (None: no truncation).
    lambda_: the trace coefficient: c_t = lambda_ * min(1, pi/mu).

  Returns:
    `VTraceReturns(vs_TB, pg_advantages_TB)`, float32 [T, B], constants for
    autodiff.
  """
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  log_rhos_TB, discounts_TB, rewards_TB, values_TB, bootstrap_value_B = map(
      f32, (log_rhos_TB, discounts_TB, rewards_TB, values_TB,
            bootstrap_value_B))
  if values_TB.ndim < 1 or bootstrap_value_B.shape != values_TB.shape[1:]:
    raise ValueError("vtrace: bootstrap_value_B must have the shape of one "
                     f"step of values_TB; got {bootstrap_value_B.shape} and "
                     f"{values_TB.shape}.")
  for name, x in (("log_rhos_TB", log_rhos_TB),
                  ("discounts_TB", discounts_TB), ("rewards_TB", rewards_TB)):
    if x.shape != values_TB.shape:
      raise ValueError(f"vtrace: {name} has shape {x.shape}, values_TB "
                       f"{values_TB.shape}; they must match.")

  rhos_TB = jnp.exp(log_rhos_TB)
  clipped_rhos_TB = _clip_above(rhos_TB, clip_rho_threshold)
  cs_TB = lambda_ * jnp.minimum(1.0, rhos_TB)
  # V(x_{t+1}) for t = 0 .. T-1.
  next_values_TB = jnp.concatenate([values_TB[1:], bootstrap_value_B[None]],
                                   axis=0)
  deltas_TB = clipped_rhos_TB * (rewards_TB + discounts_TB * next_values_TB
                                 - values_TB)

  def backward_step(next_diff_B, xs):
    # next_diff_B = v_{s+1} - V(x_{s+1}); zero after the last step (v_T=V(x_T)).
    delta_B, discount_B, c_B = xs
    diff_B = delta_B + discount_B * c_B * next_diff_B
    return diff_B, diff_B

  _, diffs_TB = jax.lax.scan(backward_step, jnp.zeros_like(bootstrap_value_B),
                             (deltas_TB, discounts_TB, cs_TB), reverse=True)
  vs_TB = values_TB + diffs_TB

  next_vs_TB = jnp.concatenate([vs_TB[1:], bootstrap_value_B[None]], axis=0)
  clipped_pg_rhos_TB = _clip_above(rhos_TB, clip_pg_rho_threshold)
  pg_advantages_TB = clipped_pg_rhos_TB * (rewards_TB
                                           + discounts_TB * next_vs_TB
                                           - values_TB)
  return VTraceReturns(vs_TB=jax.lax.stop_gradient(vs_TB),
                       pg_advantages_TB=jax.lax.stop_gradient(
                           pg_advantages_TB))


def vtrace_from_logits(behaviour_logits_TBA: jax.Array,
                       target_logits_TBA: jax.Array, actions_TB: jax.Array,
                       *args: Any, **kwargs: Any) -> VTraceReturns:
  """`vtrace` with log_rhos from the two policies' logits [T, B, A].

  The other arguments are `vtrace`'s after `log_rhos_TB` (discounts_TB,
  rewards_TB, values_TB, bootstrap_value_B and the clipping options);
  `actions_TB` are the integer actions taken by the behaviour policy.
  """
  log_rhos_TB = log_rhos_from_logits(target_logits_TBA, behaviour_logits_TBA,
                                     actions_TB)
  return vtrace(log_rhos_TB, *args, **kwargs)


def actor_critic_loss(
    logits_TBA: jax.Array,
    values_TB: jax.Array,
    bootstrap_value_B: jax.Array,
    actions_TB: jax.Array,
    behaviour_logits_TBA: jax.Array,
    rewards_TB: jax.Array,
    env_discounts_TB: jax.Array,
    *,
    discount: float = 0.99,
    baseline_cost: float = 0.5,
    entropy_cost: float = 0.005,
    clip_rho_threshold: float | None = 1.0,
    clip_pg_rho_threshold: float | None = 1.0,
    lambda_: float = 1.0,
    mask_TB: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The IMPALA loss with V-trace targets, averaged over time and batch.

    total = policy_loss + baseline_cost * baseline_loss
            - entropy_cost * entropy
    policy_loss   = mean(-log pi(a_t|x_t) * A_t)
    baseline_loss = mean(0.5 * (v_t - V(x_t))^2)
    entropy       = mean(-sum_a pi(a|x_t) log pi(a|x_t))

  where v_t, A_t are `vtrace` targets with gamma_t = discount *
  env_discounts_TB[t], computed from the learner's (target) logits and
  values. Gradients reach `logits_TBA` (policy and entropy terms) and
  `values_TB` (baseline term) only: the targets, `bootstrap_value_B` and the
  behaviour logits are constants. The IMPALA paper's defaults: baseline cost
  0.5, entropy cost 0.005 and discount 0.99 (the RMC paper's BoxWorld runs).
  IMPALA sums over [T, B]; this averages, so the learning rate does not
  depend on the batch or unroll size.

  Args:
    logits_TBA: [T, B, A] learner policy logits at x_0 .. x_{T-1}.
    values_TB: [T, B] learner values V(x_t) at x_0 .. x_{T-1}.
    bootstrap_value_B: [B] V(x_T) (gradient stopped here).
    actions_TB: [T, B] integer actions a_t taken by the actor.
    behaviour_logits_TBA: [T, B, A] the actor's logits at x_t.
    rewards_TB: [T, B] r_t, reward of the transition x_t -> x_{t+1}.
    env_discounts_TB: [T, B] the environment's discount of that transition
      (0 at a termination, 1 otherwise).
    discount: the agent's discount gamma.
    baseline_cost: weight of the baseline loss.
    entropy_cost: weight of the entropy bonus.
    clip_rho_threshold, clip_pg_rho_threshold, lambda_: see `vtrace`.
    mask_TB: optional [T, B] weights (e.g. 0 on transitions that cross from
      one episode into the next); means are then weighted by it.

  Returns:
    (total loss [], dict with 'total_loss', 'policy_loss', 'baseline_loss',
    'entropy_loss' (= -entropy_cost * entropy), 'entropy', 'mean_vs',
    'mean_pg_advantage' and 'mean_clipped_rho', all scalars).
  """
  logits_TBA = logits_TBA.astype(jnp.float32)
  values_TB = values_TB.astype(jnp.float32)
  log_rhos_TB = jax.lax.stop_gradient(log_rhos_from_logits(
      logits_TBA, behaviour_logits_TBA, actions_TB))
  targets = vtrace(log_rhos_TB, discount * jnp.asarray(env_discounts_TB),
                   rewards_TB, jax.lax.stop_gradient(values_TB),
                   jax.lax.stop_gradient(bootstrap_value_B),
                   clip_rho_threshold=clip_rho_threshold,
                   clip_pg_rho_threshold=clip_pg_rho_threshold,
                   lambda_=lambda_)

  if mask_TB is None:
    mean = jnp.mean
  else:
    mask_TB = jnp.asarray(mask_TB, jnp.float32)
    mean = lambda x: jnp.sum(x * mask_TB) / jnp.maximum(jnp.sum(mask_TB), 1.0)

  log_pi_a_TB = _action_log_probs(logits_TBA, actions_TB)
  policy_loss = mean(-log_pi_a_TB * targets.pg_advantages_TB)
  baseline_loss = mean(0.5 * jnp.square(targets.vs_TB - values_TB))
  log_probs_TBA = jax.nn.log_softmax(logits_TBA, axis=-1)
  entropy = mean(-jnp.sum(jnp.exp(log_probs_TBA) * log_probs_TBA, axis=-1))
  entropy_loss = -entropy_cost * entropy
  total = policy_loss + baseline_cost * baseline_loss + entropy_loss
  clipped_rho_TB = _clip_above(jnp.exp(log_rhos_TB), clip_rho_threshold)
  stats = {
      "total_loss": total,
      "policy_loss": policy_loss,
      "baseline_loss": baseline_loss,
      "entropy_loss": entropy_loss,
      "entropy": entropy,
      "mean_vs": mean(targets.vs_TB),
      "mean_pg_advantage": mean(targets.pg_advantages_TB),
      "mean_clipped_rho": mean(clipped_rho_TB),
  }
  return total, stats
