"""Memory cores behind one contract, chosen by name with `make_core`."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import haiku as hk
import jax
import jax.numpy as jnp

from rmc_jax.cores.convlstm import ConvLSTM
from rmc_jax.cores.dnc import DNC, DNCState
from rmc_jax.cores.lstm import LSTMStack
from rmc_jax.cores.relational_memory import RelationalMemory
from rmc_jax.cores.relational_memory_step import StepInfo

CORES: dict[str, Callable[..., hk.RNNCore]] = {
    "rmc": RelationalMemory,
    "lstm": LSTMStack,
    "dnc": DNC,
    "convlstm": ConvLSTM,
}


def make_core(name: str, **kwargs: Any) -> hk.RNNCore:
  """Builds the core registered as `name` (inside an `hk.transform`).

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
                     f"{sorted(p for p in accepted if p != 'name')}.")
  return ctor(**kwargs)


def select_state(mask_B: jax.Array, if_true: Any, if_false: Any) -> Any:
  """Per batch row, the state `if_true` where mask_B is True, else `if_false`.

  Both are core states (pytrees whose leaves have the batch as leading axis);
  used to reset a core at episode or epoch starts, or to freeze finished
  sequences.
  """
  def select(a, b):
    mask = mask_B.reshape(mask_B.shape + (1,) * (b.ndim - 1))
    return jnp.where(mask, a.astype(b.dtype), b)
  return jax.tree.map(select, if_true, if_false)


__all__ = ["CORES", "ConvLSTM", "DNC", "DNCState", "LSTMStack",
           "RelationalMemory", "StepInfo", "make_core", "select_state"]
