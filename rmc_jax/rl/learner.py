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

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rmc_jax.rl import envs as envs_lib
from rmc_jax.rl import vtrace
from rmc_jax.rl.agent import make_actor_critic
from rmc_jax.training.loop import Task


class RolloutCarry(NamedTuple):
  """What persists between training steps (leading axis: the B episodes)."""

  env_state: Any
  timestep: envs_lib.TimeStep
  core_state: Any
  episode_return: jax.Array  # [B] return of the running episode so far.


class _NullIterator:
  """The loop expects host batches; RL makes its data in the jitted step."""

  def __init__(self, batch_size: int):
    self._batch = {"unused": np.zeros((batch_size,), np.int8)}
    self._index = 0

  def __iter__(self):
    return self

  def __next__(self):
    self._index += 1
    return self._batch

  def get_state(self) -> dict:
    return {"index": self._index}

  def set_state(self, state: Mapping[str, Any]) -> None:
    self._index = int(state["index"])


def make_env(config: Any) -> envs_lib.Environment:
  """The auto-resetting environment of a config (`env`, `env_kwargs`)."""
  if config.env not in envs_lib.ENVIRONMENTS:
    raise ValueError(f"--config.env={config.env!r}: expected one of "
                     f"{sorted(envs_lib.ENVIRONMENTS)}.")
  return envs_lib.AutoReset(
      envs_lib.ENVIRONMENTS[config.env](**dict(config.env_kwargs)))


def make_task(config: Any) -> Task:
  """The RL Task for a launcher config (launch/configs/rl.py).

  With `config.random_policy`, actions are uniform whatever the parameters:
  the baseline every learning curve is compared with.
  """
  random_policy = config.random_policy
  env = make_env(config)
  obs_shape = env.observation_spec().shape
  num_actions = env.action_spec().num_values
  net = make_actor_critic(
      obs_shape, num_actions, core_name=config.core,
      core_kwargs=dict(config[config.core]),
      conv_channels=tuple(config.conv_channels),
      head_hidden=tuple(config.head_hidden))
  batch_size, unroll = config.batch_size, config.unroll_length

  def init(rng, batch):
    del batch
    return net.init(rng)

  def init_carry(b):
    keys = jax.random.split(jax.random.PRNGKey(config.seed + 1), b)
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
    del batch
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
        discount=config.discount, baseline_cost=config.baseline_cost,
        entropy_cost=config.entropy_cost, mask_TB=not_last)
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

  return Task(init=init, loss=loss, train_iterator=_NullIterator(batch_size),
              init_carry=init_carry, summarize=summarize)
