"""What every core does with its state: batch handling, resets, masks, dtypes.

Shape letters: T time, B batch. A core's state is a pytree whose leaves have
the batch as leading axis, or no batch axis at all when the state comes from
`initial_state(None)` (as under `hk.vmap`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def select_state(mask_B: jax.Array, if_true: Any, if_false: Any) -> Any:
  """Per batch row, the state `if_true` where mask_B is True, else `if_false`.

  Both are core states (pytrees whose leaves start with the axes of mask_B,
  e.g. [B] or [T, B]); used to reset a core at episode or epoch starts, or to
  freeze finished sequences. The result has the dtypes of `if_false`.
  """
  def select(a, b):
    mask = mask_B.reshape(mask_B.shape + (1,) * (b.ndim - mask_B.ndim))
    return jnp.where(mask, a.astype(b.dtype), b)
  return jax.tree.map(select, if_true, if_false)


def wide_dtype(dtype: Any) -> Any:
  """float32 for narrower dtypes (bfloat16, float16), else the dtype itself."""
  return jnp.promote_types(dtype, jnp.float32)


def widen(state: Any) -> Any:
  """The state with every floating leaf in `wide_dtype` (float32 or wider)."""
  def cast(a):
    a = jnp.asarray(a)
    if not jnp.issubdtype(a.dtype, jnp.floating):
      return a
    return a.astype(wide_dtype(a.dtype))
  return jax.tree.map(cast, state)


def add_batch_axis(tree: Any, axis: int = 0) -> Any:
  """Adds a batch axis of size 1 at `axis` to every leaf."""
  return jax.tree.map(lambda a: jnp.expand_dims(a, axis), tree)


def remove_batch_axis(tree: Any, axis: int = 0) -> Any:
  """Removes the size-1 batch axis at `axis` of every leaf."""
  return jax.tree.map(lambda a: jnp.squeeze(a, axis), tree)


def unroll_unbatched(unroll: Any, inputs_T: Any, state: Any,
                     reset_T: Any, mask_T: Any, **kwargs: Any) -> tuple:
  """A core's batched `unroll` applied to one unbatched sequence (B = 1).

  `unroll(inputs_TB, state_B, reset_TB=..., mask_TB=..., **kwargs)` returns
  (outputs, final state, *extras); the batch axis is added to the time-major
  inputs, flags and extras at axis 1 and to the state at axis 0, then removed.
  """
  add = lambda a: None if a is None else add_batch_axis(a, 1)
  outputs, final, *extras = unroll(add(inputs_T), add_batch_axis(state),
                                   reset_TB=add(reset_T),
                                   mask_TB=add(mask_T), **kwargs)
  return (remove_batch_axis(outputs, 1), remove_batch_axis(final),
          *remove_batch_axis(extras, 1))


def step_flags(flags_TB: Any, name: str, shape: tuple[int, ...]
               ) -> jax.Array | None:
  """Checks an optional reset_TB / mask_TB argument; returns it as bool.

  Raises:
    ValueError: if it is not None and its shape is not `shape`.
  """
  if flags_TB is None:
    return None
  flags_TB = jnp.asarray(flags_TB)
  if flags_TB.shape != tuple(shape):
    raise ValueError(f"unroll: {name} must have shape {tuple(shape)} (time, "
                     f"then batch if batched), got {flags_TB.shape}.")
  return flags_TB.astype(bool)


def reset_and_freeze(step_fn, initial: Any, state: Any,
                     reset_B: jax.Array | None, mask_B: jax.Array | None):
  """One step with a per-row reset before it and a per-row freeze after it.

  Rows where reset_B is True start the step from `initial`; rows where mask_B
  is False keep the state they started the step from (after any reset) and
  output zeros. `step_fn(state) -> (output, next state)`; the next state has
  the dtypes of `state`.
  """
  if reset_B is not None:
    state = select_state(reset_B, initial, state)
  output, next_state = step_fn(state)
  next_state = jax.tree.map(lambda a, s: a.astype(s.dtype), next_state, state)
  if mask_B is not None:
    next_state = select_state(mask_B, next_state, state)
    output = zero_masked(mask_B, output)
  return output, next_state


def zero_masked(mask_B: jax.Array | None, output: Any) -> Any:
  """`output` (leaves led by mask_B's axes), zero where mask_B is False."""
  if mask_B is None:
    return output
  return select_state(mask_B, output, jax.tree.map(jnp.zeros_like, output))
