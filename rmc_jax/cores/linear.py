"""The affine layer the cores declare their Linears with."""

from __future__ import annotations

import math

import haiku as hk
import jax
import jax.numpy as jnp

Dense = tuple[jax.Array, jax.Array]  # (w [in, out], b [out])


class Linear(hk.Module):
  """y = x @ w + b, with Haiku's (and Sonnet v1's) initialisation.

  Parameters: `w` [D_in, D_out], truncated normal with stddev 1/sqrt(D_in),
  and `b` [D_out], zeros; created float32 (a mixed-precision policy's param
  dtype instead). The product runs in the dtype of the weights as fetched:
  the compute dtype of an active `hk.mixed_precision` policy, else the
  parameters' own dtype; the input is cast to it.

  `params(input_size)` returns (w, b) for callers that apply them elsewhere
  (e.g. inside a custom-VJP scan).
  """

  def __init__(self, output_size: int, name: str):
    super().__init__(name=name)
    self.output_size = output_size

  def params(self, input_size: int) -> Dense:
    init = hk.initializers.TruncatedNormal(stddev=1.0 / math.sqrt(input_size))
    w = hk.get_parameter("w", [input_size, self.output_size], jnp.float32,
                         init=init)
    b = hk.get_parameter("b", [self.output_size], jnp.float32, init=jnp.zeros)
    return w, b

  def __call__(self, x_BD: jax.Array) -> jax.Array:
    """[..., D_in] -> [..., D_out] in the weights' dtype."""
    return apply_dense(self.params(x_BD.shape[-1]), x_BD)


def apply_dense(dense: Dense, x: jax.Array) -> jax.Array:
  """x @ w + b with x cast to the dtype of w."""
  w, b = dense
  return jnp.dot(x.astype(w.dtype), w) + b
