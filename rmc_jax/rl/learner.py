"""Actor-critic training on in-graph rollouts of vectorised JAX environments.

One training step (inside the loop's jitted step) rolls every one of the B
parallel episodes forward `unroll_length` steps with the current parameters,
then takes a V-trace actor-critic gradient step on that trajectory (IMPALA's
loss; with actors and learner sharing parameters the trajectory is on-policy,
so the importance weights are 1 up to rounding). Environment states, the
agent's recurrent state and running episode returns live in the loop's
carried state, split over devices with the rest of the batch, and are
checkpointed with it.

Transitions from a LAST timestep to the next episode's FIRST (the
auto-reset, whose action is ignored) are masked out of the loss and cut in
the V-trace recursion, so no value is bootstrapped across episodes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rmc_jax.rl import envs as envs_lib
from rmc_jax.rl import vtrace
from rmc_jax.rl.agent import ActorCriticFns
from rmc_jax.training.task import Task


class RolloutCarry(NamedTuple):
  """What persists between training steps (leading axis: the B episodes)."""

  env_state: Any
  timestep: envs_lib.TimeStep
  core_state: Any
  episode_return: jax.Array  # [B] return of the running episode so far.


def actor_critic_task(env: envs_lib.Environment, net: ActorCriticFns, *,
                      batch_size: int, unroll_length: int, discount: float,
                      baseline_cost: float, entropy_cost: float,
                      random_policy: bool = False, env_seed: int = 1) -> Task:
  """The Task of V-trace actor-critic training of `net` on `env`.

  The Task has no host batches (its steps roll `batch_size` episodes of the
  auto-resetting `env` forward in-graph) and no held-out evaluation: the
  training returns are the learning curve. With `random_policy`, actions
  are uniform whatever the parameters: the baseline every learning curve is
  compared with. Episodes start from keys split from PRNGKey(env_seed).
  """
  unroll = unroll_length

  def init(rng, batch):
    del batch
    return net.init(rng)

  def init_carry(b):
    keys = jax.random.split(jax.random.PRNGKey(env_seed), b)
    env_state, timestep = jax.vmap(env.reset)(keys)
    core_state = net.initial_state({}, b)  # Parameter-free.
    return RolloutCarry(env_state, timestep, core_state, jnp.zeros((b,)))

  def rollout(params, carry: RolloutCarry, rng):
    """T acting steps: returns the trajectory and the next carry."""

    def act(c: RolloutCarry, key):
      obs = c.timestep.observation.astype(jnp.float32)
      (logits, _), core_state = net.step(params, obs, c.core_state,
                                         c.timestep.first())
      if random_policy:
        logits = jnp.zeros_like(logits)
      action = jax.random.categorical(key, logits)
      env_state, timestep = jax.vmap(env.step)(c.env_state, action)
      was_last = c.timestep.last()
      episode_return = jnp.where(was_last, 0.0, c.episode_return
                                 + timestep.reward)
      finished = timestep.last()
      record = dict(obs=obs, first=c.timestep.first(), last=was_last,
                    action=action, logits=logits, reward=timestep.reward,
                    discount=timestep.discount,
                    return_sum=jnp.where(finished, episode_return, 0.0),
                    episodes=finished.astype(jnp.float32))
      return RolloutCarry(env_state, timestep, core_state,
                          episode_return), record

    carry, traj = jax.lax.scan(act, carry, jax.random.split(rng, unroll))
    return jax.lax.stop_gradient(traj), carry

  def loss(params, carry: RolloutCarry, rng, batch):
    del batch  # ()
    start_core_state = carry.core_state
    traj, carry = rollout(params, carry, rng)
    # Learner pass: the T rollout observations plus the next one (bootstrap).
    obs = jnp.concatenate(
        [traj["obs"], carry.timestep.observation.astype(jnp.float32)[None]])
    first = jnp.concatenate([traj["first"], carry.timestep.first()[None]])
    (logits, values), _ = net.unroll(params, obs, start_core_state, first)
    not_last = 1.0 - traj["last"].astype(jnp.float32)
    total, stats = vtrace.actor_critic_loss(
        logits[:-1], values[:-1], values[-1], traj["action"], traj["logits"],
        traj["reward"] * not_last, traj["discount"] * not_last,
        discount=discount, baseline_cost=baseline_cost,
        entropy_cost=entropy_cost, mask_TB=not_last)
    metrics = dict(entropy=stats["entropy"],
                   policy_loss=stats["policy_loss"],
                   baseline_loss=stats["baseline_loss"],
                   return_sum=traj["return_sum"].sum() / batch_size,
                   episodes=traj["episodes"].sum() / batch_size)
    return total, (metrics, carry)

  def summarize(metrics):
    if "episodes" in metrics:
      metrics = dict(metrics)
      metrics["episode_return"] = (metrics["return_sum"] / metrics["episodes"]
                                   if metrics["episodes"] > 0 else float("nan"))
      if "steps_per_sec" in metrics:
        metrics["env_steps_per_sec"] = (metrics["steps_per_sec"] * batch_size
                                        * unroll)
    return metrics

  return Task(init=init, loss=loss, init_carry=init_carry,
              summarize=summarize)
