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
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

_GATE_STYLES = ("unit", "memory", None)
_LAYER_NORM_EPS = 1e-5  # Sonnet v1's snt.LayerNorm default.


class StepInfo(NamedTuple):
  """Per-step internals, for analysis and plots.

  Attributes:
    attention_weights: [B, num_blocks, H, N+n, N+n] softmax weights of every
      block; rows are queries, columns keys; the first N rows/columns are the
      memory slots and the last n the input rows.
    input_gate: [B, N, G] after the sigmoid (G = F for 'unit', 1 for
      'memory'); None when gate_style is None.
    forget_gate: like input_gate.
  """

  attention_weights: jax.Array
  input_gate: jax.Array | None
  forget_gate: jax.Array | None


class _Dense(hk.Module):
  """Affine map over the last axis with Sonnet v1's initialisation.

  Weights are truncated normal with stddev 1/sqrt(fan_in), biases zero. The
  parameters are stored in `param_dtype`; the product runs in `compute_dtype`.
  """

  def __init__(self, output_size: int, compute_dtype: Any, name: str):
    super().__init__(name=name)
    self._output_size = output_size
    self._compute_dtype = compute_dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = x.shape[-1]
    w = hk.get_parameter(
        "w", [fan_in, self._output_size], jnp.float32,
        init=hk.initializers.TruncatedNormal(stddev=1.0 / math.sqrt(fan_in)))
    b = hk.get_parameter("b", [self._output_size], jnp.float32,
                         init=jnp.zeros)
    cd = self._compute_dtype
    return jnp.dot(x.astype(cd), w.astype(cd)) + b.astype(cd)


def _layer_norm(module: hk.LayerNorm, x: jax.Array) -> jax.Array:
  """Applies a LayerNorm in float32 whatever the compute dtype."""
  return module(x.astype(jnp.float32)).astype(x.dtype)


class _AttentionBlock(hk.Module):
  """One block of multi-head attention over memory and input rows.

  Owns the block's qkv projection and its three LayerNorms; the MLP is passed
  in because Sonnet shares it across blocks.
  """

  def __init__(self, num_heads: int, head_size: int, key_size: int,
               scale: float, compute_dtype: Any, name: str):
    super().__init__(name=name)
    self._num_heads = num_heads
    self._head_size = head_size
    self._key_size = key_size
    self._scale = scale
    self._qkv = _Dense(num_heads * (2 * key_size + head_size), compute_dtype,
                       name="qkv")
    ln = lambda n: hk.LayerNorm(axis=-1, create_scale=True, create_offset=True,
                                eps=_LAYER_NORM_EPS, name=n)
    self._qkv_layer_norm = ln("qkv_layer_norm")
    self._attention_layer_norm = ln("attention_layer_norm")
    self._mlp_layer_norm = ln("mlp_layer_norm")

  def __call__(self, z_BRF: jax.Array, mlp: hk.Module,
               num_queries: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Returns the updated rows [B, R, F] and attention weights [B, H, Q, R].

    With `num_queries` = Q, only the first Q rows (the memory) query and are
    updated; the others (the input rows) are keys and values only and come
    back unchanged (the paper's eq. 2). By default every row queries (Q = R).
    """
    b, r, f = z_BRF.shape
    q = r if num_queries is None else num_queries
    h, dk, dv = self._num_heads, self._key_size, self._head_size
    qkv = _layer_norm(self._qkv_layer_norm, self._qkv(z_BRF))
    # Per head, the qkv columns are contiguous: [q (d_k) | k (d_k) | v (d_v)].
    qkv_BRHQ = qkv.reshape(b, r, h, 2 * dk + dv)
    q_BQHK = qkv_BRHQ[:, :q, :, :dk] * jnp.asarray(self._scale, qkv.dtype)
    k_BRHK = qkv_BRHQ[..., dk:2 * dk]
    v_BRHV = qkv_BRHQ[..., 2 * dk:]
    logits_BHQR = jnp.einsum("bqhk,bshk->bhqs", q_BQHK, k_BRHK,
                             preferred_element_type=jnp.float32)
    weights_BHQR = jax.nn.softmax(logits_BHQR, axis=-1)
    attended_BQHV = jnp.einsum("bhqs,bshv->bqhv",
                               weights_BHQR.astype(v_BRHV.dtype), v_BRHV)
    attended_BQF = attended_BQHV.reshape(b, q, f)
    z_BQF = _layer_norm(self._attention_layer_norm, z_BRF[:, :q] + attended_BQF)
    z_BQF = _layer_norm(self._mlp_layer_norm, mlp(z_BQF) + z_BQF)
    if q == r:
      return z_BQF, weights_BHQR
    return jnp.concatenate([z_BQF, z_BRF[:, q:]], axis=1), weights_BHQR


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
      compute_dtype: Any = jnp.float32,
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
      compute_dtype: dtype of the matmuls (e.g. jnp.bfloat16 on accelerators).
        Parameters and the memory state stay float32; LayerNorm and softmax
        always run in float32.

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
    self.compute_dtype = jnp.dtype(compute_dtype)
    self.paper_variant = bool(paper_variant)
    qkv_size = 2 * self.key_size + self.head_size
    scale = (qkv_size if legacy_attention_scale else self.key_size) ** -0.5

    f, cd = self.mem_size, self.compute_dtype
    self._input_projection = _Dense(f, cd, name="input_projection")
    self._blocks = [
        _AttentionBlock(self.num_heads, self.head_size, self.key_size, scale,
                        cd, name=f"block_{k}") for k in range(self.num_blocks)
    ]
    self._attention_mlp = _RowMLP(f, self.attention_mlp_layers, cd,
                                  name="attention_mlp")
    if gate_style is not None:
      gate_size = f if gate_style == "unit" else 1
      self._input_to_gates = _Dense(2 * gate_size, cd, name="input_to_gates")
      self._memory_to_gates = _Dense(2 * gate_size, cd, name="memory_to_gates")

  # -- State ---------------------------------------------------------------

  def initial_state(self, batch_size: int | None) -> jax.Array:
    """The identity memory, zero-padded or truncated to F columns.

    Returns [batch_size, N, F] float32, or [N, F] if batch_size is None.
    """
    n, f = self.mem_slots, self.mem_size
    memory_NF = jnp.eye(n, max(n, f), dtype=jnp.float32)[:, :f]
    if batch_size is None:
      return memory_NF
    return jnp.broadcast_to(memory_NF, (batch_size, n, f))

  # -- One step --------------------------------------------------------------

  def __call__(self, inputs: jax.Array, prev_state: jax.Array,
               treat_input_as_matrix: bool = False
               ) -> tuple[jax.Array, jax.Array]:
    """Advances the memory one step.

    Args:
      inputs: [B, ...] (flattened to one row) or, with treat_input_as_matrix,
        [B, n, ...] (each of the n rows flattened and projected separately).
      prev_state: memory [B, N, F].
      treat_input_as_matrix: see `inputs`.

    Returns:
      (output [B, N*F], next memory [B, N, F]).
    """
    output, state, _ = self.step_with_info(inputs, prev_state,
                                           treat_input_as_matrix)
    return output, state

  def step_with_info(self, inputs: jax.Array, prev_state: jax.Array,
                     treat_input_as_matrix: bool = False
                     ) -> tuple[jax.Array, jax.Array, StepInfo]:
    """Like `__call__`, and also returns the step's `StepInfo`."""
    x_BnF, gates_in_B2G = self._project_inputs(
        _input_rows(inputs, treat_input_as_matrix, batch_dims=1))
    return self._recurrent_step(x_BnF, gates_in_B2G, prev_state)

  # -- Unroll ----------------------------------------------------------------

  def unroll(self, inputs: jax.Array, state: jax.Array,
             treat_input_as_matrix: bool = False, *, remat: bool = False,
             return_info: bool = False):
    """Runs the core over time; equals `hk.dynamic_unroll(core, inputs, state)`.

    Everything that depends only on the inputs (the input projection and its
    gate contribution) is computed for all steps in one batched matmul before
    the scan.

    Args:
      inputs: time-major [T, B, ...] (or [T, B, n, ...] with
        treat_input_as_matrix).
      state: memory [B, N, F] at the first step.
      treat_input_as_matrix: as in `__call__`.
      remat: recompute each step's activations in the backward pass instead
        of storing them (less memory for long unrolls, about 1/3 more FLOPs).
      return_info: also return the `StepInfo` of every step (time-major).

    Returns:
      (outputs [T, B, N*F], final memory [B, N, F]) and, if return_info, the
      stacked StepInfo as a third element.
    """
    x_TBnF, gates_in_TB2G = self._project_inputs(
        _input_rows(inputs, treat_input_as_matrix, batch_dims=2))

    def step(memory_BNF, xs):
      output, memory_BNF, info = self._recurrent_step(*xs, memory_BNF)
      return memory_BNF, ((output, info) if return_info else output)

    if remat:
      step = hk.remat(step)
    state, ys = hk.scan(step, state, (x_TBnF, gates_in_TB2G))
    if return_info:
      outputs, info = ys
      return outputs, state, info
    return ys, state

  # -- Internals -------------------------------------------------------------

  def _project_inputs(self, rows: jax.Array
                      ) -> tuple[jax.Array, jax.Array | None]:
    """[..., n, D] input rows -> (x' [..., n, F], gate input [..., 2G])."""
    x = self._input_projection(rows)
    if self.gate_style is None:
      return x, None
    gates_in = self._input_to_gates(x.reshape(*x.shape[:-2], -1))
    return x, gates_in

  def _recurrent_step(self, x_BnF: jax.Array, gates_in_B2G: jax.Array | None,
                      memory_BNF: jax.Array
                      ) -> tuple[jax.Array, jax.Array, StepInfo]:
    """The part of a step that depends on the previous memory."""
    cd = self.compute_dtype
    n_slots = self.mem_slots
    z_BRF = jnp.concatenate([memory_BNF.astype(cd), x_BnF.astype(cd)], axis=1)
    weights = []
    num_queries = n_slots if self.paper_variant else None
    for block in self._blocks:
      z_BRF, weights_BHQR = block(z_BRF, self._attention_mlp, num_queries)
      weights.append(weights_BHQR)
    attended_BNF = z_BRF[:, :n_slots].astype(jnp.float32)
    attention_BKHRR = jnp.stack(weights, axis=1)

    if self.gate_style is None:
      next_memory = attended_BNF
      input_gate = forget_gate = None
    else:
      gates_BN2G = (gates_in_B2G[:, None, :]
                    + self._memory_to_gates(jnp.tanh(memory_BNF).astype(cd)))
      gates_BN2G = gates_BN2G.astype(jnp.float32)
      gi, gf = jnp.split(gates_BN2G, 2, axis=-1)
      input_gate = jax.nn.sigmoid(gi + self.input_bias)
      forget_gate = jax.nn.sigmoid(gf + self.forget_bias)
      candidate = attended_BNF if self.paper_variant else jnp.tanh(attended_BNF)
      next_memory = input_gate * candidate + forget_gate * memory_BNF
    output = next_memory.reshape(next_memory.shape[0], -1)
    return output, next_memory, StepInfo(attention_BKHRR, input_gate,
                                         forget_gate)


class _RowMLP(hk.Module):
  """Row-wise MLP: `num_layers` Linears of width `size`, ReLU between them."""

  def __init__(self, size: int, num_layers: int, compute_dtype: Any, name: str):
    super().__init__(name=name)
    self._layers = [_Dense(size, compute_dtype, name=f"linear_{i}")
                    for i in range(num_layers)]

  def __call__(self, x: jax.Array) -> jax.Array:
    for i, layer in enumerate(self._layers):
      if i:
        x = jax.nn.relu(x)
      x = layer(x)
    return x


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
