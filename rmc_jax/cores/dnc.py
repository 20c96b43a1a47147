"""The Differentiable Neural Computer (Graves et al., 2016) as a Haiku RNN core.

Written from the Methods section of "Hybrid computing using a neural network
with dynamic external memory" (Nature 538); the memory access is in
`rmc_jax.cores.dnc_addressing`. One step:

  h_t, s_t = controller(concat(flatten(x_t), r_{t-1}), s_{t-1})    [B, C]
  h_t, s_t = clip(h_t), clip(s_t)                                   [B, C]
  xi_t     = interface(h_t)                                         [B, I]
  r_t, A_t = access_step(A_{t-1}, parse_interface(xi_t))            [B, R, W]
  y_t      = clip(output(concat(h_t, flatten(r_t))))                [B, O]

where clip(z) = clip(z, -clip_value, clip_value), C is the controller output
size, I = `dnc_addressing.interface_size(R, H, W)` and O = output_size. The
paper's y_t = W_y h_t + W_r r_t is the single Linear `output` on the
concatenation.

Mixed precision: the controller and the Linears compute in the dtype of
their weights as fetched (an `hk.mixed_precision` policy's compute dtype,
else the parameters' dtype); the memory access and the whole state run in
float32 (or wider): usage, links and memory accumulate over many steps.
Haiku casts the returned output and state to the policy's output dtype.

Where DeepMind's released DNC code and the paper differ, the defaults follow
the code and the paper's variant is an option: key strengths softplus (code)
or oneplus (paper), `strength_activation`; no gradient through the previous
write weights in the usage update (code) or through it (paper),
`stop_usage_write_gradient`; the controller state clipped like its output
(code) or left alone (paper), `clip_controller_state`.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from rmc_jax.cores import dnc_addressing as addressing
from rmc_jax.cores import state as state_lib
from rmc_jax.cores.dnc_addressing import AccessState, TemporalLinkageState
from rmc_jax.cores.linear import Linear
from rmc_jax.cores.lstm import LSTMStack

_CONTROLLERS = ("lstm", "feedforward")


class DNCState(NamedTuple):
  """The DNC's recurrent state.

  Attributes:
    access: the memory's `AccessState` (memory [B, M, W], read_weights
      [B, R, M], write_weights [B, H, M], linkage (link [B, H, M, M],
      precedence_weights [B, H, M]), usage [B, M]).
    read_vectors: [B, R, W] the last read vectors r_{t-1}, fed to the
      controller at the next step.
    controller: the controller's state (an `LSTMStack` state, a tuple of
      `hk.LSTMState` per layer, or () for the feedforward controller).
  """

  access: AccessState
  read_vectors: jax.Array
  controller: Any


class _FeedForwardController(hk.Module):
  """MLP controller: Linear + ReLU per entry of `sizes`, no recurrent state.

  Parameters: `linear_{i}/{w,b}`, [D_i, sizes[i]] and [sizes[i]].
  """

  def __init__(self, sizes: tuple[int, ...], name: str):
    super().__init__(name=name)
    self._layers = [Linear(s, name=f"linear_{i}")
                    for i, s in enumerate(sizes)]

  def __call__(self, x_BD: jax.Array) -> jax.Array:
    for layer in self._layers:
      x_BD = jax.nn.relu(layer(x_BD))
    return x_BD


class DNC(hk.RNNCore):
  """Differentiable Neural Computer with an LSTM or feedforward controller.

  State: `DNCState` (float32); output [B, output_size].

  Parameters (paths under this module's name, default 'dnc'):
    `controller/~/layer_{l}/{w_x,w_h,b}`: the `LSTMStack` controller
      (controller='lstm'); its first layer sees D_in + R*W inputs.
    `controller/~/linear_{i}/{w,b}`: the MLP controller
      (controller='feedforward').
    `interface/{w,b}`: [C, I] Linear from the (clipped) controller output to
      the interface vector, laid out as described in
      `dnc_addressing.parse_interface`.
    `output/{w,b}`: [C + R*W, O] Linear from the controller output and the
      new read vectors to the output.
  Linears use Haiku's default initialisation (truncated normal, stddev
  1/sqrt(fan_in), zero biases). The memory has no parameters.
  """

  def __init__(
      self,
      memory_size: int = 16,
      word_size: int = 16,
      num_reads: int = 1,
      num_writes: int = 1,
      controller: str = "lstm",
      controller_sizes: Sequence[int] | int = (64,),
      clip_value: float | None = 20.0,
      output_size: int | None = None,
      skip_connections: bool = False,
      strength_activation: str = "softplus",
      stop_usage_write_gradient: bool = True,
      clip_controller_state: bool = True,
      name: str | None = "dnc",
  ):
    """Constructs the core.

    Args:
      memory_size: M, the number of memory slots.
      word_size: W, the size of each slot.
      num_reads: R, the number of read heads.
      num_writes: H, the number of write heads (the paper has one).
      controller: 'lstm' (an `LSTMStack` with hidden sizes controller_sizes)
        or 'feedforward' (an MLP of those sizes with ReLUs, no state).
      controller_sizes: the controller's layer sizes (an int for one layer).
      clip_value: the controller output (and state, see
        clip_controller_state) and the final output are clipped to
        [-clip_value, clip_value], as in DeepMind's original DNC (an LSTM
        controller's output lies in [-1, 1], so there it bounds the cell
        state and the final output); 0 or None disables clipping.
      output_size: O (default: the controller output size C).
      skip_connections: LSTM controller only: every layer also sees the input
        and the controller output is all layers' hidden states concatenated,
        as in the paper's deep LSTM controller.
      strength_activation: 'softplus' (DeepMind's code: strengths >= 0) or
        'oneplus' (the paper: 1 + softplus, >= 1) for the key strengths.
      stop_usage_write_gradient: the usage update passes no gradient to the
        previous write weights (DeepMind's code); False differentiates
        through them (the paper's equations as written).
      clip_controller_state: clip_value also clips every leaf of the
        controller's next state (DeepMind's code); False clips only the
        outputs.
      name: module name.

    The three defaults follow DeepMind's code because the DNC here is the
    baseline of the RMC paper, whose baselines came from that code. Results
    recorded with the earlier defaults (oneplus, gradient through the usage,
    unclipped state) are reproduced by strength_activation='oneplus',
    stop_usage_write_gradient=False, clip_controller_state=False.

    Raises:
      ValueError: on a non-positive size or count, an unknown controller or
        strength_activation, empty or non-positive controller_sizes, a
        negative clip_value, or skip_connections with the feedforward
        controller.
    """
    super().__init__(name=name)
    for arg, value in (("memory_size", memory_size), ("word_size", word_size),
                       ("num_reads", num_reads), ("num_writes", num_writes)):
      if not _is_positive_int(value):
        raise ValueError(f"DNC: {arg} must be a positive integer, got "
                         f"{value!r}.")
    if controller not in _CONTROLLERS:
      raise ValueError(f"DNC: controller must be one of {_CONTROLLERS}, got "
                       f"{controller!r}.")
    if _is_positive_int(controller_sizes):
      controller_sizes = (controller_sizes,)
    if (not isinstance(controller_sizes, (tuple, list)) or not controller_sizes
        or not all(_is_positive_int(s) for s in controller_sizes)):
      raise ValueError("DNC: controller_sizes must be a non-empty list of "
                       f"positive integers, got {controller_sizes!r}.")
    if clip_value is not None and (isinstance(clip_value, bool) or
                                   not isinstance(clip_value, numbers.Real)
                                   or not clip_value >= 0):
      raise ValueError("DNC: clip_value must be a number >= 0 or None, got "
                       f"{clip_value!r}.")
    if output_size is not None and not _is_positive_int(output_size):
      raise ValueError("DNC: output_size must be a positive integer or None, "
                       f"got {output_size!r}.")
    if skip_connections and controller != "lstm":
      raise ValueError("DNC: skip_connections needs controller='lstm', got "
                       f"controller={controller!r}.")
    if strength_activation not in addressing.STRENGTH_ACTIVATIONS:
      raise ValueError("DNC: strength_activation must be one of "
                       f"{addressing.STRENGTH_ACTIVATIONS}, got "
                       f"{strength_activation!r}.")

    self.memory_size = int(memory_size)
    self.word_size = int(word_size)
    self.num_reads = int(num_reads)
    self.num_writes = int(num_writes)
    self.controller_type = controller
    self.controller_sizes = tuple(int(s) for s in controller_sizes)
    self.clip_value = float(clip_value) if clip_value else None
    self.skip_connections = bool(skip_connections)
    self.strength_activation = strength_activation
    self.stop_usage_write_gradient = bool(stop_usage_write_gradient)
    self.clip_controller_state = bool(clip_controller_state)
    self.controller_output_size = (sum(self.controller_sizes)
                                   if self.skip_connections
                                   else self.controller_sizes[-1])
    self.output_size = int(output_size or self.controller_output_size)
    self.interface_size = addressing.interface_size(
        self.num_reads, self.num_writes, self.word_size)

    if controller == "lstm":
      self._controller = LSTMStack(self.controller_sizes,
                                   skip_connections=self.skip_connections,
                                   name="controller")
    else:
      self._controller = _FeedForwardController(self.controller_sizes,
                                                name="controller")
    self._interface = Linear(self.interface_size, name="interface")
    self._output = Linear(self.output_size, name="output")

  # -- State ---------------------------------------------------------------

  def initial_state(self, batch_size: int | None) -> DNCState:
    """All-zero memory, weights, links, usage, reads and controller state.

    Shapes as in `DNCState` with B = batch_size; without the batch axis if
    batch_size is None (for `jax.vmap`).
    """
    access = addressing.initial_access_state(
        batch_size, self.memory_size, self.word_size, self.num_reads,
        self.num_writes)
    lead = () if batch_size is None else (batch_size,)
    reads = jnp.zeros(lead + (self.num_reads, self.word_size), jnp.float32)
    controller = (self._controller.initial_state(batch_size)
                  if self.controller_type == "lstm" else ())
    return DNCState(access=access, read_vectors=reads, controller=controller)

  # -- One step --------------------------------------------------------------

  def __call__(self, inputs: jax.Array, prev_state: DNCState
               ) -> tuple[jax.Array, DNCState]:
    """Advances the DNC one step.

    Args:
      inputs: [B, ...] (flattened to [B, D_in]); or [...] without the batch
        axis when the state is unbatched (from `initial_state(None)`).
      prev_state: the previous `DNCState`.

    Returns:
      (output [B, O], next `DNCState`), without B for an unbatched state.
    """
    if prev_state.access.memory.ndim == 2:  # Unbatched (e.g. under vmap).
      return state_lib.remove_batch_axis(self(
          state_lib.add_batch_axis(inputs),
          state_lib.add_batch_axis(prev_state)))
    return _step(self, inputs, state_lib.widen(prev_state))

  # -- Unroll ----------------------------------------------------------------

  def unroll(self, inputs: jax.Array, state: DNCState, *,
             reset_TB: jax.Array | None = None,
             mask_TB: jax.Array | None = None
             ) -> tuple[jax.Array, DNCState]:
    """Runs the core over time; equals `hk.dynamic_unroll(core, inputs, state)`.

    A scan over the step: the controller input depends on the previous
    step's reads, so nothing can be hoisted out of the loop.

    Args:
      inputs: time-major [T, B, ...] (or [T, ...] with an unbatched state).
      state: the `DNCState` at the first step.
      reset_TB, mask_TB: optional bool [T, B] ([T] unbatched) step flags, as
        for every core (`LSTMStack.unroll`): a reset row starts the step
        from `initial_state`, a masked-out row keeps its state and outputs
        zeros.

    Returns:
      (outputs [T, B, O], final `DNCState`); without B for an unbatched state.
    """
    if state.access.memory.ndim == 2:
      return state_lib.unroll_unbatched(self.unroll, inputs, state, reset_TB,
                                        mask_TB)
    t, b = inputs.shape[:2]
    flags_TB = (state_lib.step_flags(reset_TB, "reset_TB", (t, b)),
                state_lib.step_flags(mask_TB, "mask_TB", (t, b)))
    state = state_lib.widen(state)
    initial = self.initial_state(b)

    def step(s, xs):
      x, (reset_B, mask_B) = xs
      output, s = state_lib.reset_and_freeze(
          lambda s: _step(self, x, s), initial, s, reset_B, mask_B)
      return s, output

    state, outputs = hk.scan(step, state, (inputs, flags_TB))
    return outputs, state


# Helpers of `DNC` are functions, not methods: under a `hk.mixed_precision`
# policy Haiku casts the arguments and results of every method of the core.


def _clip(x: jax.Array, clip_value: float | None) -> jax.Array:
  if clip_value is None:
    return x
  return jnp.clip(x, -clip_value, clip_value)


def _step(core: DNC, inputs: jax.Array, prev_state: DNCState
          ) -> tuple[jax.Array, DNCState]:
  """`__call__` on a batched state, float32 (or wider)."""
  b = inputs.shape[0]
  prev_reads_BRW = prev_state.read_vectors
  x_BD = inputs.reshape(b, -1).astype(prev_reads_BRW.dtype)
  controller_in = jnp.concatenate([x_BD, prev_reads_BRW.reshape(b, -1)], -1)
  if core.controller_type == "lstm":
    controller_out_BC, controller_state = core._controller(
        controller_in, prev_state.controller)
  else:
    controller_out_BC, controller_state = core._controller(controller_in), ()
  controller_out_BC = _clip(controller_out_BC, core.clip_value)
  if core.clip_controller_state:
    controller_state = jax.tree.map(lambda x: _clip(x, core.clip_value),
                                    controller_state)

  interface = addressing.parse_interface(
      core._interface(controller_out_BC).astype(prev_reads_BRW.dtype),
      core.num_reads, core.num_writes, core.word_size,
      core.strength_activation)
  reads_BRW, access = addressing.access_step(prev_state.access, interface,
                                             core.stop_usage_write_gradient)

  output_BO = _clip(core._output(
      jnp.concatenate([controller_out_BC, reads_BRW.reshape(b, -1)], -1)),
      core.clip_value)
  return output_BO, DNCState(access=access, read_vectors=reads_BRW,
                             controller=controller_state)


def _is_positive_int(value: Any) -> bool:
  return (isinstance(value, (int, np.integer)) and not isinstance(value, bool)
          and value >= 1)


__all__ = ["AccessState", "DNC", "DNCState", "TemporalLinkageState"]
