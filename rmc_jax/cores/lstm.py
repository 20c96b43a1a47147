"""A stack of LSTM layers with an efficient layer-by-layer `unroll`."""

from __future__ import annotations

import math
from typing import Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from rmc_jax.cores import state as state_lib

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

  Mixed precision: the matmuls run in the dtype of the weights as fetched
  (an `hk.mixed_precision` policy's compute dtype, else the parameters'
  dtype); the gate nonlinearities and the state run in float32 (or wider),
  so the cell state does not accumulate bfloat16 rounding over time. Haiku
  casts the returned output and state to the policy's output dtype.
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

  def __call__(self, inputs: jax.Array, prev_state: LSTMStackState
               ) -> tuple[jax.Array, LSTMStackState]:
    """inputs [B, ...] (flattened) -> (output [B, H_out], next state).

    Without the B axis (inputs [...], state from `initial_state(None)`) the
    output and state have none either.
    """
    if prev_state[0].hidden.ndim == 1:
      return state_lib.remove_batch_axis(self(
          state_lib.add_batch_axis(inputs),
          state_lib.add_batch_axis(prev_state)))
    x = inputs.reshape(inputs.shape[0], -1)
    below, hiddens, next_state = None, [], []
    for layer, state in enumerate(state_lib.widen(prev_state)):
      layer_in = _layer_inputs(x, below, self.skip_connections)
      w_x, w_h, b = self._layers[layer](layer_in.shape[-1])
      state = _cell(_matmul(layer_in, w_x) + b, w_h, state, self.forget_bias)
      below = state.hidden
      hiddens.append(below)
      next_state.append(state)
    return _output(hiddens, self.skip_connections), tuple(next_state)

  def unroll(self, inputs: jax.Array, state: LSTMStackState, *,
             reset_TB: jax.Array | None = None,
             mask_TB: jax.Array | None = None
             ) -> tuple[jax.Array, LSTMStackState]:
    """Runs the core over time; equals `hk.dynamic_unroll(core, inputs, state)`.

    One scan per layer, its input half computed for all steps in one matmul.

    Args:
      inputs: time-major [T, B, ...] ([T, ...] with an unbatched state).
      state: the state at the first step.
      reset_TB: optional bool [T, B] ([T] unbatched): where True, row b
        starts step t from `initial_state` (as `hk.ResetCore` does).
      mask_TB: optional bool [T, B] ([T] unbatched): where False, row b
        skips step t: its state is carried unchanged (after any reset) and
        its output at t is zeros.

    Returns:
      (outputs [T, B, H_out], final state); without B for an unbatched state.
    """
    if state[0].hidden.ndim == 1:
      return state_lib.unroll_unbatched(self.unroll, inputs, state, reset_TB,
                                        mask_TB)
    t, b = inputs.shape[:2]
    flags_TB = (state_lib.step_flags(reset_TB, "reset_TB", (t, b)),
                state_lib.step_flags(mask_TB, "mask_TB", (t, b)))
    x = inputs.reshape(t, b, -1)
    below, hiddens, final_state = None, [], []
    for layer, layer_state in enumerate(state_lib.widen(state)):
      layer_in = _layer_inputs(x, below, self.skip_connections)
      w_x, w_h, b_4H = self._layers[layer](layer_in.shape[-1])
      pre_TB4H = _matmul(layer_in, w_x) + b_4H
      initial = jax.tree.map(jnp.zeros_like, layer_state)

      def step(s, xs, w_h=w_h, initial=initial):
        pre_B4H, (reset_B, mask_B) = xs

        def advance(s):
          s = _cell(pre_B4H, w_h, s, self.forget_bias)
          return s.hidden, s

        hidden, s = state_lib.reset_and_freeze(advance, initial, s, reset_B,
                                               mask_B)
        return s, hidden

      layer_state, below = jax.lax.scan(step, layer_state,
                                        (pre_TB4H, flags_TB))
      hiddens.append(below)
      final_state.append(layer_state)
    return _output(hiddens, self.skip_connections), tuple(final_state)


# Helpers of `LSTMStack` are functions, not methods: under a
# `hk.mixed_precision` policy Haiku casts the results of every method of the
# core to the policy's output dtype.


def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  return jnp.dot(x.astype(w.dtype), w)


def _cell(pre_B4H: jax.Array, w_h: jax.Array, state: hk.LSTMState,
          forget_bias: float) -> hk.LSTMState:
  """One LSTM step from the input half of the gates; state float32 or wider."""
  gates = (pre_B4H + _matmul(state.hidden, w_h)).astype(state.cell.dtype)
  i, g, f, o = jnp.split(gates, 4, axis=-1)
  cell = (jax.nn.sigmoid(f + forget_bias) * state.cell
          + jax.nn.sigmoid(i) * jnp.tanh(g))
  return hk.LSTMState(hidden=jax.nn.sigmoid(o) * jnp.tanh(cell), cell=cell)


def _layer_inputs(x: jax.Array, below: jax.Array | None,
                  skip_connections: bool) -> jax.Array:
  if below is None:
    return x
  return jnp.concatenate([x, below], -1) if skip_connections else below


def _output(hiddens: list[jax.Array], skip_connections: bool) -> jax.Array:
  return jnp.concatenate(hiddens, -1) if skip_connections else hiddens[-1]


class _LayerParams(hk.Module):
  """Owns one layer's weights, so both `__call__` and `unroll` find them at
  `lstm_stack/~/layer_{l}` (a name scope would add the calling method's name).

  Not a `linear.Linear`: the input and recurrent weights share one bias.
  """

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
