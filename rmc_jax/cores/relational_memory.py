"""The Relational Memory Core (Santoro et al., 2018) as a Haiku RNN core.

The computation follows Sonnet v1's `snt.RelationalMemory` exactly (see
WORKSPACE_NOTES.md for the few documented options that depart from it):

  x'      = input_projection(flatten(x))                     [B, n, F]
  Z       = concat([M_{t-1}, x'], axis=1)                     [B, N+n, F]
  repeat num_blocks times (block k):
    qkv   = qkv_layer_norm(qkv(Z))                            [B, N+n, H*(2*d_k+d_v)]
    A     = softmax(q k^T * d_k**-0.5) v  (per head)          [B, N+n, F]
    Z     = attention_layer_norm(Z + A)
    Z     = mlp_layer_norm(attention_mlp(Z) + Z)   (MLP shared across blocks)
  M_hat   = Z[:, :N]
  gates   = input_to_gates(flatten(x')) + memory_to_gates(tanh(M_{t-1}))
  i, f    = sigmoid(gates_i + input_bias), sigmoid(gates_f + forget_bias)
  M_t     = i * tanh(M_hat) + f * M_{t-1}       ('unit' / 'memory' gating)
  M_t     = M_hat                               (gate_style=None)
  output  = flatten(M_t)                                      [B, N*F]

with N = mem_slots, F = head_size * num_heads, H = num_heads, d_v = head_size,
d_k = key_size (default head_size) and n input rows (1 unless
`treat_input_as_matrix`).

Mixed precision follows Haiku: with `hk.mixed_precision.set_policy(
RelationalMemory, jmp.get_policy("params=float32,compute=bfloat16,
output=float32"))` the parameters are float32, the matmuls run in the dtype
of the weights as fetched (the policy's compute dtype; without a policy the
parameters' own dtype, e.g. float64 under x64), and LayerNorm, softmax,
gates and the memory itself run in float32 (or wider). The memory is never
kept in bfloat16: the gated update adds to the previous memory at every
step and bfloat16 rounding would compound over time. `unroll` carries a
float32 memory through its scan; Haiku casts the state `__call__` receives
to the compute dtype, so `hk.dynamic_unroll` under a bfloat16 policy rounds
the memory between steps, and agrees with `unroll` only to bfloat16
accuracy. The custom VJP takes float32 weights (cast to the compute dtype
inside) and sums their gradients in float32; they reach the parameters in
the parameter dtype.
"""

from __future__ import annotations

import math
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from rmc_jax.cores import relational_memory_unroll
from rmc_jax.cores import state as state_lib
from rmc_jax.cores.linear import apply_dense
from rmc_jax.cores.linear import Linear
from rmc_jax.cores.relational_memory_step import initial_memory
from rmc_jax.cores.relational_memory_step import Norm
from rmc_jax.cores.relational_memory_step import step
from rmc_jax.cores.relational_memory_step import StepConfig
from rmc_jax.cores.relational_memory_step import StepInfo
from rmc_jax.cores.relational_memory_step import Weights

_GATE_STYLES = ("unit", "memory", None)


class _LayerNorm(hk.Module):
  """Parameters of a LayerNorm over the last axis (scale 1, offset 0)."""

  def params(self, size: int) -> Norm:
    scale = hk.get_parameter("scale", [size], jnp.float32, init=jnp.ones)
    offset = hk.get_parameter("offset", [size], jnp.float32, init=jnp.zeros)
    return scale, offset


class _Block(hk.Module):
  """Parameters of one attention block: its qkv Linear and three LayerNorms."""

  def __init__(self, qkv_size: int, name: str):
    super().__init__(name=name)
    self._qkv_size = qkv_size
    self._qkv = Linear(qkv_size, name="qkv")
    self._qkv_layer_norm = _LayerNorm(name="qkv_layer_norm")
    self._attention_layer_norm = _LayerNorm(name="attention_layer_norm")
    self._mlp_layer_norm = _LayerNorm(name="mlp_layer_norm")

  def params(self, size: int):
    return (self._qkv.params(size),
            self._qkv_layer_norm.params(self._qkv_size),
            self._attention_layer_norm.params(size),
            self._mlp_layer_norm.params(size))


class _RowMLP(hk.Module):
  """Parameters of the row-wise MLP: `num_layers` Linears of width `size`."""

  def __init__(self, size: int, num_layers: int, name: str):
    super().__init__(name=name)
    self._size = size
    self._layers = [Linear(size, name=f"linear_{i}") for i in range(num_layers)]

  def params(self):
    return tuple(layer.params(self._size) for layer in self._layers)


# remat=None recomputes the forward in the backward pass for memories at most
# this wide: there it was both faster and smaller (C1 and C4 of
# benchmarks/core_configs.py, 256 wide: 1.15-1.7x tokens/s, 0.2-0.4x the
# temporaries, on a CPU); at 768 (C2) storing was faster.
AUTO_REMAT_MAX_MEM_SIZE = 256


class RelationalMemory(hk.RNNCore):
  """Relational Memory Core, faithful to Sonnet v1's `snt.RelationalMemory`.

  State: memory [B, N, F] (float32). Output: the new memory flattened, [B, N*F].

  Parameters (paths under this module's name, default 'relational_memory'):
    `input_projection/{w,b}`: [D_in, F] Linear applied to each (flattened)
      input row, giving x'.
    `block_{k}/qkv/{w,b}`: [F, H*(2*d_k+d_v)] query/key/value projection of
      block k; per head h the columns h*(2d_k+d_v) + [0, d_k) are the query,
      [d_k, 2d_k) the key, [2d_k, 2d_k+d_v) the value.
    `block_{k}/qkv_layer_norm/{scale,offset}`: LayerNorm over the whole qkv
      vector of each row (all heads together).
    `block_{k}/attention_layer_norm`: LayerNorm after the attention residual.
    `block_{k}/mlp_layer_norm`: LayerNorm after the MLP residual.
    `attention_mlp/linear_{i}/{w,b}`: the row-wise MLP (F wide, ReLU between
      layers, none after the last), shared by all blocks.
    `input_to_gates/{w,b}`: [n*F, 2G] gate contribution of the projected
      input x'; columns [0, G) feed the input gate, [G, 2G) the forget gate.
    `memory_to_gates/{w,b}`: [F, 2G] gate contribution of tanh(M_{t-1}),
      applied per slot, same column split.
  The gate Linears exist only when gate_style is 'unit' (G = F) or 'memory'
  (G = 1). No parameter depends on N: slots share all weights.
  """

  def __init__(
      self,
      mem_slots: int,
      head_size: int,
      num_heads: int = 1,
      num_blocks: int = 1,
      forget_bias: float = 1.0,
      input_bias: float = 0.0,
      gate_style: str | None = "unit",
      attention_mlp_layers: int = 2,
      key_size: int | None = None,
      name: str | None = "relational_memory",
      *,
      legacy_attention_scale: bool = False,
      paper_variant: bool = False,
      remat: bool | None = None,
  ):
    """Constructs the core.

    Args:
      mem_slots: N, the number of memory rows.
      head_size: d_v, the value size of each head; F = head_size * num_heads.
      num_heads: H, the number of attention heads.
      num_blocks: K, attention blocks (iterations) per time step.
      forget_bias: constant added before the forget-gate sigmoid.
      input_bias: constant added before the input-gate sigmoid.
      gate_style: 'unit' (one gate per element), 'memory' (one per slot) or
        None (no gating: the new memory is the attended one).
      attention_mlp_layers: layers of the row-wise MLP after attention.
      key_size: d_k, the query/key size per head (default head_size).
      name: module name.
      legacy_attention_scale: scale queries by (2*d_k+d_v)**-0.5, as Sonnet
        did before 2018-11-20, instead of d_k**-0.5.
      paper_variant: the paper's formulation instead of Sonnet's: only the
        memory rows query (eq. 2; the input rows stay the projected input in
        every block, as keys and values), and the gated update has no tanh
        on the attended memory (eq. 7). Attention weights are then
        [B, K, H, N, N+n].
      remat: in the backward pass of `unroll`, recompute each step's forward
        instead of storing its activations: less memory (0.13-0.31x of
        storing), one more forward pass of compute (and of weight reads).
        Storing is faster where the weights are large (the paper's LM core);
        recomputing is faster on small cores with many slots on a CPU
        (WORKSPACE_NOTES.md has the measurements). None (the default):
        recompute when the memory is at most AUTO_REMAT_MAX_MEM_SIZE wide,
        where it was both faster and smaller.

    Raises:
      ValueError: on a non-positive size, num_blocks < 1,
        attention_mlp_layers < 1 or an unknown gate_style.
    """
    super().__init__(name=name)
    for arg, value in (("mem_slots", mem_slots), ("head_size", head_size),
                       ("num_heads", num_heads)):
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"RelationalMemory: {arg} must be a positive integer, "
                         f"got {value!r}.")
    if key_size is not None and (not isinstance(key_size, (int, np.integer))
                                 or key_size < 1):
      raise ValueError("RelationalMemory: key_size must be a positive integer "
                       f"or None, got {key_size!r}.")
    if num_blocks < 1:
      raise ValueError(
          f"RelationalMemory: num_blocks must be >= 1, got {num_blocks}.")
    if attention_mlp_layers < 1:
      raise ValueError("RelationalMemory: attention_mlp_layers must be >= 1, "
                       f"got {attention_mlp_layers}.")
    if gate_style not in _GATE_STYLES:
      raise ValueError(f"RelationalMemory: gate_style must be one of "
                       f"{_GATE_STYLES}, got {gate_style!r}.")
    self.mem_slots = int(mem_slots)
    self.head_size = int(head_size)
    self.num_heads = int(num_heads)
    self.num_blocks = int(num_blocks)
    self.key_size = int(key_size or head_size)
    self.mem_size = self.head_size * self.num_heads
    self.gate_style = gate_style
    self.forget_bias = float(forget_bias)
    self.input_bias = float(input_bias)
    self.attention_mlp_layers = int(attention_mlp_layers)
    self.paper_variant = bool(paper_variant)
    self.remat = (self.mem_size <= AUTO_REMAT_MAX_MEM_SIZE if remat is None
                  else bool(remat))
    qkv_size = 2 * self.key_size + self.head_size
    scale = (qkv_size if legacy_attention_scale else self.key_size) ** -0.5
    self._step_config = StepConfig(
        mem_slots=self.mem_slots, num_heads=self.num_heads,
        head_size=self.head_size, key_size=self.key_size,
        num_blocks=self.num_blocks, mlp_layers=self.attention_mlp_layers,
        gate_style=gate_style, input_bias=self.input_bias,
        forget_bias=self.forget_bias, attention_scale=scale,
        paper_variant=self.paper_variant,
        compute_dtype="float32")  # Replaced per call by the weights' dtype.

    f = self.mem_size
    self._input_projection = Linear(f, name="input_projection")
    self._blocks = [_Block(self.num_heads * qkv_size, name=f"block_{k}")
                    for k in range(self.num_blocks)]
    self._attention_mlp = _RowMLP(f, self.attention_mlp_layers,
                                  name="attention_mlp")
    if gate_style is not None:
      gate_size = f if gate_style == "unit" else 1
      self._input_to_gates = Linear(2 * gate_size, name="input_to_gates")
      self._memory_to_gates = Linear(2 * gate_size, name="memory_to_gates")

  # -- State ---------------------------------------------------------------

  def initial_state(self, batch_size: int | None) -> jax.Array:
    """The identity memory, zero-padded or truncated to F columns.

    Returns [batch_size, N, F] float32, or [N, F] if batch_size is None.
    """
    memory_NF = initial_memory(self.mem_slots, self.mem_size)
    if batch_size is None:
      return memory_NF
    return jnp.broadcast_to(memory_NF, (batch_size,) + memory_NF.shape)

  # -- One step --------------------------------------------------------------

  def __call__(self, inputs: jax.Array, prev_state: jax.Array,
               treat_input_as_matrix: bool = False
               ) -> tuple[jax.Array, jax.Array]:
    """Advances the memory one step.

    Args:
      inputs: [B, ...] (flattened to one row) or, with treat_input_as_matrix,
        [B, n, ...] (each of the n rows flattened and projected separately);
        without the B axis when the state is unbatched.
      prev_state: memory [B, N, F], or [N, F] (from `initial_state(None)`).
      treat_input_as_matrix: see `inputs`.

    Returns:
      (output [B, N*F], next memory [B, N, F]), without B for an unbatched
      state.
    """
    output, state, _ = self.step_with_info(inputs, prev_state,
                                           treat_input_as_matrix)
    return output, state

  def step_with_info(self, inputs: jax.Array, prev_state: jax.Array,
                     treat_input_as_matrix: bool = False
                     ) -> tuple[jax.Array, jax.Array, StepInfo]:
    """Like `__call__`, and also returns the step's `StepInfo` (batched like
    the state)."""
    if prev_state.ndim == 2:
      result = self.step_with_info(state_lib.add_batch_axis(inputs),
                                   state_lib.add_batch_axis(prev_state),
                                   treat_input_as_matrix)
      return state_lib.remove_batch_axis(result)
    x_BnF, gates_in_B2G = _project_inputs(
        self, _input_rows(inputs, treat_input_as_matrix, batch_dims=1))
    cfg, weights = _recurrence(self)
    memory_BNF, info, _, _ = step(cfg, weights, state_lib.widen(prev_state),
                                  x_BnF, gates_in_B2G)
    return memory_BNF.reshape(memory_BNF.shape[0], -1), memory_BNF, info

  # -- Unroll ----------------------------------------------------------------

  def unroll(self, inputs: jax.Array, state: jax.Array,
             treat_input_as_matrix: bool = False, *,
             reset_TB: jax.Array | None = None,
             mask_TB: jax.Array | None = None,
             return_info: bool = False):
    """Runs the core over time; equals `hk.dynamic_unroll(core, inputs, state)`.

    The fast path for training. Everything that depends only on the inputs
    (the input projection and its gate contribution) is computed for all
    steps in one batched matmul before the scan, and the scan has a custom
    VJP (`relational_memory_unroll`): its reverse pass propagates activation
    gradients only, and the weight gradients of the layers inside the
    recurrence are large matmuls over chunks of many steps.

    Args:
      inputs: time-major [T, B, ...] (or [T, B, n, ...] with
        treat_input_as_matrix); [T, ...] with an unbatched state.
      state: memory [B, N, F] (or [N, F]) at the first step.
      treat_input_as_matrix: as in `__call__`.
      reset_TB: optional bool [T, B] ([T] unbatched): where True, row b
        starts step t from `initial_state` instead of its memory, as
        `hk.ResetCore` around the core under `hk.dynamic_unroll` does.
      mask_TB: optional bool [T, B] ([T] unbatched): where False, row b
        skips step t: its memory is carried unchanged (after any reset at t)
        and its output at t is zeros (the StepInfo is that of the skipped
        step).
      return_info: also return the `StepInfo` of every step (time-major);
        this path is differentiated by plain autodiff.

    Returns:
      (outputs [T, B, N*F], final memory [B, N, F]) and, if return_info, the
      stacked StepInfo as a third element; without B for an unbatched state.
    """
    if state.ndim == 2:
      return state_lib.unroll_unbatched(
          self.unroll, inputs, state, reset_TB, mask_TB,
          treat_input_as_matrix=treat_input_as_matrix,
          return_info=return_info)
    t, b = inputs.shape[:2]
    reset_TB = state_lib.step_flags(reset_TB, "reset_TB", (t, b))
    mask_TB = state_lib.step_flags(mask_TB, "mask_TB", (t, b))
    x_TBnF, gates_in_TB2G = _project_inputs(
        self, _input_rows(inputs, treat_input_as_matrix, batch_dims=2))
    cfg, weights = _recurrence(self)
    state = state_lib.widen(state)
    if return_info:

      def body(memory_BNF, xs):
        x_BnF, gates_in_B2G, reset_B, mask_B = xs
        memory_BNF, info, _, _ = step(cfg, weights, memory_BNF, x_BnF,
                                      gates_in_B2G, reset_B=reset_B,
                                      mask_B=mask_B)
        return memory_BNF, (memory_BNF, info)

      if self.remat:
        body = jax.checkpoint(body)
      _, (memories_TBNF, info) = jax.lax.scan(
          body, state, (x_TBnF, gates_in_TB2G, reset_TB, mask_TB))
    else:
      memories_TBNF = relational_memory_unroll.unroll(
          cfg, state_lib.widen(weights), x_TBnF, gates_in_TB2G, state,
          recompute=self.remat, reset_TB=reset_TB, mask_TB=mask_TB)
    outputs = state_lib.zero_masked(
        mask_TB, memories_TBNF.reshape(*memories_TBNF.shape[:2], -1))
    if return_info:
      return outputs, memories_TBNF[-1], info
    return outputs, memories_TBNF[-1]


# Helpers of `RelationalMemory` are functions, not methods: under a
# `hk.mixed_precision` policy Haiku casts the results of every method of the
# core to the policy's output dtype.


def _recurrence(core: RelationalMemory) -> tuple[StepConfig, Weights]:
  """Gets (creating at init) the parameters used inside the recurrence.

  Returns them as fetched (in a policy's compute dtype) and the step
  configuration with that compute dtype.
  """
  f = core.mem_size
  qkv, qkv_norm, attention_norm, mlp_norm = zip(
      *[block.params(f) for block in core._blocks])
  weights = Weights(
      qkv=qkv, qkv_norm=qkv_norm, attention_norm=attention_norm,
      mlp_norm=mlp_norm, mlp=core._attention_mlp.params(),
      memory_to_gates=(None if core.gate_style is None
                       else core._memory_to_gates.params(f)))
  cfg = core._step_config._replace(
      compute_dtype=jnp.dtype(qkv[0][0].dtype).name)
  return cfg, weights


def _project_inputs(core: RelationalMemory, rows: jax.Array
                    ) -> tuple[jax.Array, jax.Array | None]:
  """[..., n, D] input rows -> (x' [..., n, F], gate input [..., 2G])."""
  x = core._input_projection(rows)
  if core.gate_style is None:
    return x, None
  x_flat = x.reshape(*x.shape[:-2], -1)
  return x, core._input_to_gates(x_flat)


def _input_rows(inputs: jax.Array, treat_input_as_matrix: bool,
                batch_dims: int) -> jax.Array:
  """Reshapes inputs to [*batch, n, D] rows (n = 1 unless a matrix)."""
  lead = inputs.shape[:batch_dims]
  if treat_input_as_matrix:
    if inputs.ndim < batch_dims + 2:
      raise ValueError(
          "RelationalMemory: treat_input_as_matrix needs inputs of shape "
          f"[{'T, ' if batch_dims == 2 else ''}B, n, ...], got {inputs.shape}.")
    return inputs.reshape(*lead, inputs.shape[batch_dims], -1)
  return inputs.reshape(*lead, 1, -1)
