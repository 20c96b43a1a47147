"""Pure-JAX, vmappable environments of the paper's RL experiments.

`MiniPacman` (I2A's PillEater) and `BoxWorld` (Zambaldi et al. 2018) share the
dm_env-style interface of `spec.Environment`: `reset(key)` and
`step(state, action)` return `(state, TimeStep)`; `AutoReset` restarts
finished episodes for training loops.
"""

from rmc_jax.rl.envs.boxworld import BoxWorld, BoxWorldState
from rmc_jax.rl.envs.mini_pacman import MiniPacman, MiniPacmanState
from rmc_jax.rl.envs.spec import (ArraySpec, BoundedArraySpec,
                                  DiscreteArraySpec, Environment, StepType,
                                  TimeStep)
from rmc_jax.rl.envs.wrappers import AutoReset, AutoResetState

ENVIRONMENTS = {"mini_pacman": MiniPacman, "boxworld": BoxWorld}

__all__ = ["ArraySpec", "AutoReset", "AutoResetState", "BoundedArraySpec",
           "BoxWorld", "BoxWorldState", "DiscreteArraySpec", "ENVIRONMENTS",
           "Environment", "MiniPacman", "MiniPacmanState", "StepType",
           "TimeStep"]
