"""A stack of convolutional LSTM layers (Shi et al., 2015) as a Haiku core.

The baseline of the RMC paper's BoxWorld experiments: the torso's feature
maps go into the ConvLSTM without flattening. Layer l, on a [B, H, W, C_in]
input x_t with state (h_{t-1}, c_{t-1}) of [B, H, W, C_l]:

  i, g, f, o = split(conv(x_t, w_x) + conv(h_{t-1}, w_h) + b, 4)
  c_t = sigmoid(f + forget_bias) c_{t-1} + sigmoid(i) tanh(g)
  h_t = sigmoid(o) tanh(c_t)

with k x k convolutions (cross-correlations, as `hk.Conv2D`), stride 1,
'SAME' zero padding, so H and W are kept (for an even k the extra padding
row and column are at the bottom and right, as in TensorFlow and Haiku); the gate order and the forget bias follow `hk.LSTM`
and `LSTMStack`. Each layer's input is the hidden state of the layer below
(the core's input for layer 0); the output is the last layer's hidden state,
[B, H, W, C_last].
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from rmc_jax.cores import state as state_lib

ConvLSTMState = tuple[hk.LSTMState, ...]


class ConvLSTM(hk.RNNCore):
  """Convolutional LSTM stack on a fixed [H, W] grid.

  State: one `hk.LSTMState` per layer, hidden and cell [B, H, W, C_l]
  (float32). Output: [B, H, W, C_last].

  Parameters: `layer_{l}/w_x` [k, k, C_in_l, 4 C_l] (input convolution),
  `layer_{l}/w_h` [k, k, C_l, 4 C_l] (recurrent convolution), `layer_{l}/b`
  [4 C_l]; gates in the order i, g, f, o along the last axis. Weights are
  truncated normal with stddev 1/sqrt(k^2 (C_in_l + C_l)), biases zero.
  Splitting the input and recurrent weights lets `unroll` run each layer's
  input convolution over all time steps at once.
  """

  def __init__(self, input_shape: Sequence[int],
               channels: Sequence[int] | int = (64,), kernel_size: int = 2,
               forget_bias: float = 1.0, name: str | None = "conv_lstm"):
    """Constructs the core.

    Args:
      input_shape: (H, W) of the input grid (the state has this size).
      channels: C_l, the state channels of each layer (an int for one layer;
        the number of layers is its length).
      kernel_size: k, the square kernel of both convolutions.
      forget_bias: added to the forget gate's pre-activation.
      name: module name.

    Raises:
      ValueError: on input_shape not two positive integers, empty or
        non-positive channels, or kernel_size < 1.
    """
    super().__init__(name=name)
    if (len(tuple(input_shape)) != 2
        or not all(_is_positive_int(d) for d in input_shape)):
      raise ValueError("ConvLSTM: input_shape must be two positive integers "
                       f"(H, W), got {input_shape!r}.")
    if _is_positive_int(channels):
      channels = (channels,)
    if (not isinstance(channels, (tuple, list)) or not channels
        or not all(_is_positive_int(c) for c in channels)):
      raise ValueError("ConvLSTM: channels must be a non-empty list of "
                       f"positive integers, got {channels!r}.")
    if not _is_positive_int(kernel_size):
      raise ValueError("ConvLSTM: kernel_size must be a positive integer, "
                       f"got {kernel_size!r}.")
    self.input_shape = tuple(int(d) for d in input_shape)
    self.channels = tuple(int(c) for c in channels)
    self.kernel_size = int(kernel_size)
    self.forget_bias = float(forget_bias)
    self._layers = [_LayerParams(c, self.kernel_size, name=f"layer_{l}")
                    for l, c in enumerate(self.channels)]

  def initial_state(self, batch_size: int | None) -> ConvLSTMState:
    """Zero hidden and cell states per layer: [B, H, W, C_l] ([H, W, C_l]
    without the batch axis if batch_size is None)."""
    lead = () if batch_size is None else (batch_size,)
    return tuple(
        hk.LSTMState(hidden=jnp.zeros(lead + self.input_shape + (c,)),
                     cell=jnp.zeros(lead + self.input_shape + (c,)))
        for c in self.channels)

  def __call__(self, inputs: jax.Array, prev_state: ConvLSTMState
               ) -> tuple[jax.Array, ConvLSTMState]:
    """One step: inputs [B, H, W, C_in] -> (output [B, H, W, C_last], state).

    Without the batch axis ([H, W, C_in]) for an unbatched state.
    """
    if prev_state[0].hidden.ndim == 3:  # Unbatched (e.g. under vmap).
      add = lambda a: a[None]
      output, state = self(add(inputs), jax.tree.map(add, prev_state))
      return output[0], jax.tree.map(lambda a: a[0], state)
    self._check_grid(inputs.shape[1:3])
    below, next_state = inputs.astype(jnp.float32), []
    for layer, state in zip(self._layers, prev_state):
      w_x, w_h, b = layer(below.shape[-1])
      state = self._cell(_conv(below, w_x) + b, w_h, state)
      below = state.hidden
      next_state.append(state)
    return below, tuple(next_state)

  def unroll(self, inputs: jax.Array, state: ConvLSTMState, *,
             reset_TB: jax.Array | None = None,
             mask_TB: jax.Array | None = None
             ) -> tuple[jax.Array, ConvLSTMState]:
    """Time-major [T, B, H, W, C_in] -> ([T, B, H, W, C_last], final state).

    Equals `hk.dynamic_unroll(core, inputs, state)`; one scan per layer,
    after that layer's input convolution over all T * B inputs. `reset_TB`
    and `mask_TB` are the step flags every core takes (`LSTMStack.unroll`):
    a reset row starts the step from `initial_state`, a masked-out row keeps
    its state and outputs zeros. Without the batch axis for an unbatched
    state (inputs [T, H, W, C_in], flags [T]).
    """
    if state[0].hidden.ndim == 3:
      return state_lib.unroll_unbatched(self.unroll, inputs, state, reset_TB,
                                        mask_TB)
    t, b = inputs.shape[:2]
    self._check_grid(inputs.shape[2:4])
    flags_TB = (state_lib.step_flags(reset_TB, "reset_TB", (t, b)),
                state_lib.step_flags(mask_TB, "mask_TB", (t, b)))
    below, final_state = inputs.astype(jnp.float32), []
    for layer, layer_state in zip(self._layers, state):
      w_x, w_h, bias = layer(below.shape[-1])
      pre_N = _conv(below.reshape((t * b,) + below.shape[2:]), w_x) + bias
      pre_TB = pre_N.reshape((t, b) + pre_N.shape[1:])
      initial = jax.tree.map(jnp.zeros_like, layer_state)

      def step(s, xs, w_h=w_h, initial=initial):
        pre, (reset_B, mask_B) = xs

        def advance(s):
          s = self._cell(pre, w_h, s)
          return s.hidden, s

        hidden, s = state_lib.reset_and_freeze(advance, initial, s, reset_B,
                                               mask_B)
        return s, hidden

      layer_state, below = jax.lax.scan(step, layer_state, (pre_TB, flags_TB))
      final_state.append(layer_state)
    return below, tuple(final_state)

  def _cell(self, pre_BHW4C: jax.Array, w_h: jax.Array,
            state: hk.LSTMState) -> hk.LSTMState:
    gates = pre_BHW4C + _conv(state.hidden, w_h)
    i, g, f, o = jnp.split(gates, 4, axis=-1)
    cell = (jax.nn.sigmoid(f + self.forget_bias) * state.cell
            + jax.nn.sigmoid(i) * jnp.tanh(g))
    return hk.LSTMState(hidden=jax.nn.sigmoid(o) * jnp.tanh(cell), cell=cell)

  def _check_grid(self, grid: tuple[int, ...]):
    if tuple(grid) != self.input_shape:
      raise ValueError(f"ConvLSTM: inputs must have the grid {self.input_shape}"
                       f" given as input_shape, got {tuple(grid)}.")


def _conv(x_NHWC: jax.Array, w_KKCD: jax.Array) -> jax.Array:
  """Stride-1 'SAME' convolution (cross-correlation) -> [N, H, W, D].

  As one matmul over the k x k shifted copies of the padded input (im2col):
  on XLA:CPU the gradient of `lax.conv_general_dilated` at these sizes was
  20x slower than its forward pass (WORKSPACE_NOTES.md, "ConvLSTM speed").
  """
  k = w_KKCD.shape[0]
  low = (k - 1) // 2  # 'SAME': the odd row / column of padding goes last.
  _, h, w, c = x_NHWC.shape
  padded = jnp.pad(x_NHWC, ((0, 0), (low, k - 1 - low), (low, k - 1 - low),
                            (0, 0)))
  patches_NHWX = jnp.concatenate(
      [padded[:, a:a + h, b:b + w] for a in range(k) for b in range(k)],
      axis=-1)
  return jnp.dot(patches_NHWX, w_KKCD.reshape(k * k * c, -1))


class _LayerParams(hk.Module):
  """Owns one layer's weights, found at `conv_lstm/~/layer_{l}` by both
  `__call__` and `unroll`."""

  def __init__(self, channels: int, kernel_size: int, name: str):
    super().__init__(name=name)
    self._channels = channels
    self._kernel_size = kernel_size

  def __call__(self, input_channels: int):
    c, k = self._channels, self._kernel_size
    init = hk.initializers.TruncatedNormal(
        1.0 / math.sqrt(k * k * (input_channels + c)))
    w_x = hk.get_parameter("w_x", [k, k, input_channels, 4 * c], init=init)
    w_h = hk.get_parameter("w_h", [k, k, c, 4 * c], init=init)
    b = hk.get_parameter("b", [4 * c], init=jnp.zeros)
    return w_x, w_h, b


def _is_positive_int(value: Any) -> bool:
  return (isinstance(value, (int, np.integer)) and not isinstance(value, bool)
          and value >= 1)
