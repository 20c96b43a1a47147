"""What the grid-world environments share: options, moves, views, timesteps.

`GridEnvironment` is the base of `MiniPacman` and `BoxWorld`. It checks and
keeps the options both have (an odd `viewport` or None, the observation type,
the frame cap and its discount), gives the discrete action spec and ends a
step with the frame cap applied. `move_target` and `crop_window` are the
agent's move on the grid and the viewport cut centred on it.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rmc_jax.rl.envs import spec as specs


def move_target(position_2: jax.Array, action: jax.Array,
                deltas_A2: np.ndarray) -> jax.Array:
  """The cell int32 [2] that `action` (clipped to [0, A)) leads to from
  `position_2`, with deltas_A2 the (row, col) offset of each action; the
  caller decides whether the move is allowed."""
  action = jnp.clip(jnp.asarray(action, jnp.int32), 0, len(deltas_A2) - 1)
  return position_2 + jnp.asarray(deltas_A2)[action]


def crop_window(grid: jax.Array, centre_2: jax.Array, size: int,
                fill: float | Sequence[float] | np.ndarray) -> jax.Array:
  """The size x size window of `grid` centred on `centre_2`.

  Args:
    grid: [H, W, ...] a grid of codes or of per-cell vectors.
    centre_2: int32 [2] (row, col) of the window's centre.
    size: odd window size v.
    fill: the value of the cells outside the grid: a scalar, or one value
      per trailing entry (shape grid.shape[2:]).

  Returns:
    [v, v, ...], same dtype as the grid.
  """
  pad = size // 2
  h, w = grid.shape[:2]
  trailing = grid.shape[2:]
  padded = jnp.broadcast_to(jnp.asarray(fill, grid.dtype),
                            (h + 2 * pad, w + 2 * pad) + trailing)
  padded = padded.at[pad:pad + h, pad:pad + w].set(grid)
  # The centre sits at centre + pad in the padded grid: the window starts at
  # centre.
  return jax.lax.dynamic_slice(
      padded, (centre_2[0], centre_2[1]) + (0,) * len(trailing),
      (size, size) + trailing)


class GridEnvironment(specs.Environment):
  """Options and step ending shared by the grid worlds.

  Attributes:
    viewport: None (full view) or the odd window size v.
    observation_type: one of the subclass's observation types.
    frame_cap: steps before truncation; 0 for no cap.
    frame_cap_discount: the discount of the LAST timestep at the frame cap.
    num_actions: A, the number of discrete actions.
  """

  def __init__(self, num_actions: int, viewport: int | None,
               observation_type: str, observation_types: Sequence[str],
               frame_cap: int | None, frame_cap_discount: float):
    """Checks and stores the shared options.

    Raises:
      ValueError: on an even or non-positive viewport, or an observation_type
        not in observation_types.
    """
    name = type(self).__name__
    if viewport is not None and (viewport < 1 or viewport % 2 == 0):
      raise ValueError(f"{name}: viewport must be a positive odd size or "
                       f"None, got {viewport!r}.")
    if observation_type not in observation_types:
      choices = " or ".join(repr(t) for t in observation_types)
      raise ValueError(f"{name}: observation_type must be {choices}, got "
                       f"{observation_type!r}.")
    self.num_actions = int(num_actions)
    self.viewport = viewport
    self.observation_type = observation_type
    self.frame_cap = int(frame_cap or 0)
    self.frame_cap_discount = float(frame_cap_discount)

  def action_spec(self) -> specs.DiscreteArraySpec:
    return specs.discrete_spec(self.num_actions)

  def end_step(self, observation: jax.Array, reward: jax.Array,
               terminated: jax.Array, frame: jax.Array) -> specs.TimeStep:
    """The MID or LAST timestep of a step that reached episode step `frame`:
    LAST with discount 0 if terminated, LAST with `frame_cap_discount` at the
    frame cap."""
    truncated = ((frame >= self.frame_cap) if self.frame_cap
                 else jnp.zeros((), bool))
    return specs.transition(observation, reward, terminated, truncated,
                            self.frame_cap_discount)
