"""dm_env-style types shared by the pure-JAX environments.

Environments here are pure functions of explicit state, in the style of
dm_env but without Python-side mutation:

  state, timestep = env.reset(key)            # timestep.first() is True
  state, timestep = env.step(state, action)   # MID ... LAST

Both methods are jit-compatible and can be `jax.vmap`-ed over a leading batch
axis of (key) / (state, action): every state leaf has a fixed shape and dtype
that depends only on the environment's constructor arguments.

`TimeStep` follows dm_env's field order and meaning:
  step_type:   int32 [] StepType.FIRST (after reset), MID, or LAST (the
               episode ended at this step).
  reward:      float32 [] reward of the transition that led here (0 at FIRST).
  discount:    float32 [] 1 except at a termination (0). A time-limit
               truncation is LAST with the discount the environment documents.
  observation: the environment's observation array (see observation_spec()).

Spec objects (`ArraySpec`, `BoundedArraySpec`, `DiscreteArraySpec`) carry
shape, dtype and name like dm_env.specs, and `validate` checks a value
(batched values are checked with `validate(x, batched=True)`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class StepType:
  """Integer codes of `TimeStep.step_type` (dm_env's values)."""

  FIRST = 0
  MID = 1
  LAST = 2


class TimeStep(NamedTuple):
  """One dm_env-style timestep; fields may carry leading batch axes."""

  step_type: jax.Array
  reward: jax.Array
  discount: jax.Array
  observation: jax.Array

  def first(self) -> jax.Array:
    """bool, same shape as step_type: this is the first step of an episode."""
    return self.step_type == StepType.FIRST

  def mid(self) -> jax.Array:
    """bool: neither the first nor the last step."""
    return self.step_type == StepType.MID

  def last(self) -> jax.Array:
    """bool: the episode ended at this step."""
    return self.step_type == StepType.LAST


def restart(observation: jax.Array) -> TimeStep:
  """FIRST timestep: reward 0, discount 1."""
  return TimeStep(jnp.asarray(StepType.FIRST, jnp.int32),
                  jnp.zeros((), jnp.float32), jnp.ones((), jnp.float32),
                  observation)


def transition(observation: jax.Array, reward: jax.Array,
               terminated: jax.Array, truncated: jax.Array,
               truncation_discount: float = 1.0) -> TimeStep:
  """MID or LAST timestep from per-step flags.

  Args:
    observation: the new observation.
    reward: float scalar.
    terminated: bool scalar; the episode ended in a terminal state
      (discount 0).
    truncated: bool scalar; the episode was cut by a time limit (discount
      `truncation_discount` unless also terminated).
    truncation_discount: the discount of a pure truncation.
  """
  last = terminated | truncated
  step_type = jnp.where(last, StepType.LAST, StepType.MID).astype(jnp.int32)
  discount = jnp.where(terminated, 0.0,
                       jnp.where(truncated, truncation_discount, 1.0))
  return TimeStep(step_type, jnp.asarray(reward, jnp.float32),
                  discount.astype(jnp.float32), observation)


@dataclasses.dataclass(frozen=True)
class ArraySpec:
  """Shape, dtype and name of an array (dm_env.specs.Array)."""

  shape: tuple[int, ...]
  dtype: np.dtype
  name: str = ""

  def __post_init__(self):
    object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
    object.__setattr__(self, "dtype", np.dtype(self.dtype))

  def _fail(self, message: str):
    raise ValueError(f"Spec {self.name!r}: {message}")

  def validate(self, value: Any, batched: bool = False) -> Any:
    """Checks dtype and shape (trailing shape if `batched`); returns value.

    Raises:
      ValueError: on a mismatch.
    """
    value_dtype = np.dtype(value.dtype)
    if value_dtype != self.dtype:
      self._fail(f"dtype {value_dtype} != {self.dtype}.")
    shape = tuple(value.shape)
    if batched:
      shape = shape[len(shape) - len(self.shape):] if self.shape else ()
      if len(value.shape) < len(self.shape):
        self._fail(f"shape {tuple(value.shape)} has too few axes for "
                   f"{self.shape}.")
    if shape != self.shape:
      self._fail(f"shape {tuple(value.shape)} != {self.shape}"
                 f"{' (trailing)' if batched else ''}.")
    return value

  def generate_value(self) -> np.ndarray:
    """A zero array matching the spec."""
    return np.zeros(self.shape, self.dtype)


@dataclasses.dataclass(frozen=True)
class BoundedArraySpec(ArraySpec):
  """An ArraySpec whose values lie in [minimum, maximum] (inclusive)."""

  minimum: float = -np.inf
  maximum: float = np.inf

  def validate(self, value: Any, batched: bool = False) -> Any:
    """Also checks the bounds of concrete arrays (not tracers or shapes)."""
    super().validate(value, batched)
    concrete = (isinstance(value, (np.ndarray, np.generic, jax.Array))
                and not isinstance(value, jax.core.Tracer))
    if concrete:
      array = np.asarray(value)
      if array.size and (array.min() < self.minimum
                         or array.max() > self.maximum):
        self._fail(f"values outside [{self.minimum}, {self.maximum}].")
    return value

  def generate_value(self) -> np.ndarray:
    """The minimum (or 0 if unbounded below), broadcast to the shape."""
    low = 0 if np.isinf(self.minimum) else self.minimum
    return np.full(self.shape, low, self.dtype)


@dataclasses.dataclass(frozen=True)
class DiscreteArraySpec(BoundedArraySpec):
  """A scalar integer in [0, num_values) (dm_env.specs.DiscreteArray)."""

  num_values: int = 0

  def __post_init__(self):
    super().__post_init__()
    object.__setattr__(self, "minimum", 0)
    object.__setattr__(self, "maximum", int(self.num_values) - 1)


def discrete_spec(num_values: int, name: str = "action") -> DiscreteArraySpec:
  """int32 scalar spec with values in [0, num_values)."""
  return DiscreteArraySpec(shape=(), dtype=np.int32, name=name,
                           num_values=num_values)


class Environment:
  """Interface of the pure-JAX environments (no state on the object).

  Subclasses implement `reset`, `step`, `observation_spec` and
  `action_spec`; the object holds only constants, so its bound methods can be
  passed to `jax.jit` / `jax.vmap` directly.
  """

  def reset(self, key: jax.Array) -> tuple[Any, TimeStep]:
    """Starts an episode from a PRNG key; returns (state, FIRST timestep)."""
    raise NotImplementedError

  def step(self, state: Any, action: jax.Array) -> tuple[Any, TimeStep]:
    """Advances one step; returns (new state, MID or LAST timestep).

    Stepping a state whose episode already ended is allowed but meaningless:
    use `reset` or the `AutoReset` wrapper.
    """
    raise NotImplementedError

  def observation_spec(self) -> ArraySpec:
    raise NotImplementedError

  def action_spec(self) -> DiscreteArraySpec:
    raise NotImplementedError

  def reward_spec(self) -> ArraySpec:
    return ArraySpec((), np.float32, "reward")

  def discount_spec(self) -> BoundedArraySpec:
    return BoundedArraySpec((), np.float32, "discount", 0.0, 1.0)


def uniforms(key: jax.Array, *shapes: tuple[int, ...]) -> list[jax.Array]:
  """Independent float32 uniforms in (0, 1), one array per shape.

  All come from a single `jax.random.uniform` call (sliced), which keeps the
  number of PRNG hash instances, and so the compile and run time of a jitted
  step, low.
  """
  sizes = [int(np.prod(shape)) for shape in shapes]
  flat = jax.random.uniform(key, (sum(sizes),), jnp.float32,
                            minval=np.finfo(np.float32).tiny, maxval=1.0)
  out, offset = [], 0
  for shape, size in zip(shapes, sizes):
    out.append(flat[offset:offset + size].reshape(shape))
    offset += size
  return out


def random_index(u: jax.Array, mask: jax.Array) -> jax.Array:
  """Flat index of a uniformly random True entry of a small 1-D `mask`.

  With c True entries, u in (0, 1) picks the floor(u c)-th of them: each is
  chosen with probability 1/c. Returns 0 (arbitrary) if the mask is all
  False.
  """
  count = mask.sum(dtype=jnp.int32)
  k = jnp.minimum(jnp.floor(u * count).astype(jnp.int32), count - 1)
  return jnp.argmax(jnp.cumsum(mask, dtype=jnp.int32) > k)


def random_cell(u: jax.Array, mask_HW: jax.Array) -> jax.Array:
  """(row, col) int32 [2] of a uniformly random True cell of `mask_HW`.

  The floor(u c)-th True cell in row-major order (c True cells), found with
  two short cumulative sums (over rows, then within the row) rather than one
  over all H * W cells: cheap under vmap. (0, 0) if the mask is all False.
  """
  per_row_H = mask_HW.sum(axis=1, dtype=jnp.int32)
  cum_H = jnp.cumsum(per_row_H)
  count = cum_H[-1]
  k = jnp.minimum(jnp.floor(u * count).astype(jnp.int32), count - 1)
  row = jnp.argmax(cum_H > k)
  k_in_row = k - (cum_H[row] - per_row_H[row])
  col = jnp.argmax(jnp.cumsum(mask_HW[row], dtype=jnp.int32) > k_in_row)
  return jnp.stack([row, col]).astype(jnp.int32)


def random_int(u: jax.Array, low: jax.Array | int,
               high: jax.Array | int) -> jax.Array:
  """int32 uniform in [low, high) from uniforms u in (0, 1) (high > low)."""
  value = low + jnp.floor(u * (high - low)).astype(jnp.int32)
  return jnp.clip(value, low, jnp.asarray(high) - 1).astype(jnp.int32)


def random_permutation(u_K: jax.Array) -> jax.Array:
  """int32 [K]: the permutation that sorts u_K (so uniformly random if u_K
  holds i.i.d. uniforms), computed with [K, K] comparisons instead of a sort
  (XLA's CPU sort is slow under vmap). Ties are broken by index, so the
  result is always a permutation."""
  k = u_K.shape[0]
  index = jnp.arange(k)
  before_KK = (u_K[None, :] < u_K[:, None]) | (
      (u_K[None, :] == u_K[:, None]) & (index[None, :] < index[:, None]))
  rank_K = before_KK.sum(axis=1)  # rank_K[i]: position of element i
  return jnp.argmax(rank_K[None, :] == index[:, None], axis=1).astype(
      jnp.int32)
