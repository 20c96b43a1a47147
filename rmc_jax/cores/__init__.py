"""Memory cores behind one contract, chosen by name with `make_core`."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import haiku as hk

from rmc_jax.cores.convlstm import ConvLSTM
from rmc_jax.cores.dnc import DNC, DNCState
from rmc_jax.cores.lstm import LSTMStack
from rmc_jax.cores.relational_memory import RelationalMemory
from rmc_jax.cores.relational_memory_step import StepInfo
from rmc_jax.cores.state import select_state

CORES: dict[str, Callable[..., hk.RNNCore]] = {
    "rmc": RelationalMemory,
    "lstm": LSTMStack,
    "dnc": DNC,
    "convlstm": ConvLSTM,
}


def make_core(name: str, /, **kwargs: Any) -> hk.RNNCore:
  """Builds the core registered as `name` (inside an `hk.transform`).

  `name` is positional-only, so `kwargs` may hold the core's own `name`
  (its module name): `make_core("rmc", name="my_rmc", mem_slots=4, ...)`.

  Every core implements `initial_state(batch_size)`, `__call__(x_B, state)`
  and a time-major `unroll(x_TB, state)` equal to `hk.dynamic_unroll`.

  Raises:
    ValueError: for an unknown core name or an argument the core lacks.
  """
  if name not in CORES:
    raise ValueError(f"Unknown core {name!r}; expected one of "
                     f"{sorted(CORES)}.")
  ctor = CORES[name]
  accepted = inspect.signature(ctor).parameters
  unknown = sorted(set(kwargs) - set(accepted))
  if unknown:
    raise ValueError(f"Core {name!r} does not take {unknown}; it accepts "
                     f"{sorted(accepted)}.")
  return ctor(**kwargs)


__all__ = ["CORES", "ConvLSTM", "DNC", "DNCState", "LSTMStack",
           "RelationalMemory", "StepInfo", "make_core", "select_state"]
