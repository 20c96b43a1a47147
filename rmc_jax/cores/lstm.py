"""A stack of LSTM layers with an efficient layer-by-layer `unroll`."""

from __future__ import annotations

import math
from typing import Sequence

import haiku as hk
import jax
import jax.numpy as jnp

LSTMStackState = tuple[hk.LSTMState, ...]


class LSTMStack(hk.RNNCore):
  """Deep LSTM, optionally with skip connections (Graves 2013).

  Gates follow `hk.LSTM` (order i, g, f, o; forget-gate bias +1). With
  `skip_connections`, every layer also sees the core's input and the output
  is the concatenation of all layers' hidden states; otherwise layers are
  stacked plainly and the output is the last hidden state.

  Parameters: `layer_{l}/w_x` [D_l, 4H_l] (input weights), `layer_{l}/w_h`
  [H_l, 4H_l] (recurrent weights), `layer_{l}/b` [4H_l]. Splitting the input
  and recurrent weights lets `unroll` compute each layer's input half for all
  time steps in one matmul.
  """

  def __init__(self, hidden_sizes: Sequence[int] | int = (512,),
               skip_connections: bool = False, forget_bias: float = 1.0,
               name: str | None = "lstm_stack"):
    super().__init__(name=name)
    if isinstance(hidden_sizes, int):
      hidden_sizes = (hidden_sizes,)
    hidden_sizes = tuple(int(h) for h in hidden_sizes)
    if not hidden_sizes or min(hidden_sizes) < 1:
      raise ValueError("LSTMStack: hidden_sizes must be a non-empty list of "
                       f"positive integers, got {hidden_sizes!r}.")
    self.hidden_sizes = hidden_sizes
    self.skip_connections = bool(skip_connections)
    self.forget_bias = float(forget_bias)
    self._layers = [_LayerParams(h, name=f"layer_{l}")
                    for l, h in enumerate(hidden_sizes)]

  def initial_state(self, batch_size: int | None) -> LSTMStackState:
    """Zero hidden and cell states per layer ([B, H_l], or [H_l] if None)."""
    shape = lambda h: (h,) if batch_size is None else (batch_size, h)
    return tuple(hk.LSTMState(hidden=jnp.zeros(shape(h)),
                              cell=jnp.zeros(shape(h)))
                 for h in self.hidden_sizes)

  def _cell(self, pre_B4H: jax.Array, w_h: jax.Array,
            state: hk.LSTMState) -> hk.LSTMState:
    gates = pre_B4H + state.hidden @ w_h
    i, g, f, o = jnp.split(gates, 4, axis=-1)
    cell = (jax.nn.sigmoid(f + self.forget_bias) * state.cell
            + jax.nn.sigmoid(i) * jnp.tanh(g))
    return hk.LSTMState(hidden=jax.nn.sigmoid(o) * jnp.tanh(cell), cell=cell)

  def _layer_inputs(self, x: jax.Array, below: jax.Array | None) -> jax.Array:
    if below is None:
      return x
    return jnp.concatenate([x, below], -1) if self.skip_connections else below

  def _output(self, hiddens: list[jax.Array]) -> jax.Array:
    return jnp.concatenate(hiddens, -1) if self.skip_connections else hiddens[-1]

  def __call__(self, inputs: jax.Array, prev_state: LSTMStackState
               ) -> tuple[jax.Array, LSTMStackState]:
    """inputs [B, ...] (flattened) -> (output [B, H_out], next state)."""
    x = inputs.reshape(inputs.shape[0], -1)
    below, hiddens, next_state = None, [], []
    for layer, state in enumerate(prev_state):
      layer_in = self._layer_inputs(x, below)
      w_x, w_h, b = self._layers[layer](layer_in.shape[-1])
      state = self._cell(layer_in @ w_x + b, w_h, state)
      below = state.hidden
      hiddens.append(below)
      next_state.append(state)
    return self._output(hiddens), tuple(next_state)

  def unroll(self, inputs: jax.Array, state: LSTMStackState
             ) -> tuple[jax.Array, LSTMStackState]:
    """Time-major [T, B, ...] -> ([T, B, H_out], final state); one scan per layer."""
    x = inputs.reshape(*inputs.shape[:2], -1)
    below, hiddens, final_state = None, [], []
    for layer, layer_state in enumerate(state):
      layer_in = self._layer_inputs(x, below)
      w_x, w_h, b = self._layers[layer](layer_in.shape[-1])
      pre_TB4H = layer_in @ w_x + b

      def step(s, pre_B4H, w_h=w_h):
        s = self._cell(pre_B4H, w_h, s)
        return s, s.hidden

      layer_state, below = jax.lax.scan(step, layer_state, pre_TB4H)
      hiddens.append(below)
      final_state.append(layer_state)
    return self._output(hiddens), tuple(final_state)


class _LayerParams(hk.Module):
  """Owns one layer's weights, so both `__call__` and `unroll` find them at
  `lstm_stack/~/layer_{l}` (a name scope would add the calling method's name)."""

  def __init__(self, hidden_size: int, name: str):
    super().__init__(name=name)
    self._hidden_size = hidden_size

  def __call__(self, input_size: int):
    h = self._hidden_size
    init = hk.initializers.TruncatedNormal(1.0 / math.sqrt(input_size + h))
    w_x = hk.get_parameter("w_x", [input_size, 4 * h], init=init)
    w_h = hk.get_parameter("w_h", [h, 4 * h], init=init)
    b = hk.get_parameter("b", [4 * h], init=jnp.zeros)
    return w_x, w_h, b
