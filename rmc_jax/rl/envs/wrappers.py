"""Automatic episode resets for training loops over many parallel episodes."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rmc_jax.rl.envs.spec import Environment, TimeStep


class AutoResetState(NamedTuple):
  """State of `AutoReset`.

  Attributes:
    env_state: the wrapped environment's state.
    last: bool []; the timestep returned with this state was LAST, so the
      next `step` starts a new episode.
    key: PRNG key from which the next episode's reset key is split.
  """

  env_state: Any
  last: jax.Array
  key: jax.Array


class AutoReset(Environment):
  """Restarts episodes automatically, dm_env style.

  The stream of timesteps is FIRST, MID, ..., LAST, FIRST, MID, ...: the call
  to `step` after a LAST timestep ignores its action and returns the FIRST
  timestep (reward 0, discount 1) of a new episode, reset with a key split
  from the wrapper's own key. So every transition an agent sees is either a
  real environment transition or an episode boundary marked by step_type, as
  with dm_env and rlax/IMPALA-style learners.

  Under `jax.vmap` the reset and step branches are both computed (lax.cond
  becomes a select); the cost is one reset per step.
  """

  def __init__(self, env: Environment):
    self.env = env

  def reset(self, key: jax.Array) -> tuple[AutoResetState, TimeStep]:
    env_key, next_key = jax.random.split(key)
    env_state, timestep = self.env.reset(env_key)
    return AutoResetState(env_state, timestep.last(), next_key), timestep

  def step(self, state: AutoResetState,
           action: jax.Array) -> tuple[AutoResetState, TimeStep]:
    def restart(_):
      next_key, env_key = jax.random.split(state.key)
      env_state, timestep = self.env.reset(env_key)
      return AutoResetState(env_state, jnp.zeros((), bool), next_key), timestep

    def advance(_):
      env_state, timestep = self.env.step(state.env_state, action)
      return AutoResetState(env_state, timestep.last(), state.key), timestep

    return jax.lax.cond(state.last, restart, advance, None)

  def observation_spec(self):
    return self.env.observation_spec()

  def action_spec(self):
    return self.env.action_spec()

  def reward_spec(self):
    return self.env.reward_spec()

  def discount_spec(self):
    return self.env.discount_spec()
