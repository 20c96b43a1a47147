"""The recurrent part of one Relational Memory step, as a pure function.

`RelationalMemory` gathers its parameters into `Weights` and calls `step`;
every path (`__call__`, `unroll`, `unroll(return_info=True)`) runs this one
implementation, resets and masks of `unroll` included. `step` also serves
the custom-VJP unroll (`relational_memory_unroll`): it can add zero "taps" to
the output of every Linear inside the recurrence (their cotangents are the Linears' output
gradients) and it returns every Linear's input, which is all their weight
gradients need.

Linear keys (the keys of `taps` and of the returned layer inputs):
  qkv/{k}: block k's query/key/value projection;
  mlp/{k}/{i}: the shared MLP's layer i as applied in block k;
  memory_to_gates: the memory half of the gates.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rmc_jax.cores.linear import Dense
from rmc_jax.cores.state import reset_and_freeze
from rmc_jax.cores.state import wide_dtype as _wide

LAYER_NORM_EPS = 1e-5  # Sonnet v1's snt.LayerNorm default.

Norm = tuple[jax.Array, jax.Array]   # (scale [size], offset [size])


class StepConfig(NamedTuple):
  """Static (hashable) description of the step.

  compute_dtype is the dtype of the Dense weights as fetched (the policy's
  compute dtype under `hk.mixed_precision`, else the parameters' dtype).
  """
  mem_slots: int
  num_heads: int
  head_size: int
  key_size: int
  num_blocks: int
  mlp_layers: int
  gate_style: str | None
  input_bias: float
  forget_bias: float
  attention_scale: float
  paper_variant: bool
  compute_dtype: str


class Weights(NamedTuple):
  """The parameters used inside the recurrence.

  Dense weights are in the compute dtype when passed to `step` (see
  `cast_weights`); LayerNorms compute in float32 (or wider) whatever the
  dtype of their parameters.
  """
  qkv: tuple[Dense, ...]             # per block
  qkv_norm: tuple[Norm, ...]         # per block
  attention_norm: tuple[Norm, ...]   # per block
  mlp_norm: tuple[Norm, ...]         # per block
  mlp: tuple[Dense, ...]             # per layer, shared by the blocks
  memory_to_gates: Dense | None      # None when gate_style is None


class StepInfo(NamedTuple):
  """Per-step internals, for analysis and plots.

  Attributes:
    attention_weights: [B, num_blocks, H, Q, R] softmax weights of every
      block; rows are queries, columns keys (R = N+n: the first N are the
      memory slots and the last n the input rows; Q = R, or N with
      paper_variant).
    input_gate: [B, N, G] after the sigmoid (G = F for 'unit', 1 for
      'memory'); None when gate_style is None.
    forget_gate: like input_gate.
  """

  attention_weights: jax.Array
  input_gate: jax.Array | None
  forget_gate: jax.Array | None


def cast_weights(weights: Weights, compute_dtype: Any) -> Weights:
  """Casts the Dense weights to the compute dtype (LayerNorms stay float32)."""
  cast = lambda dense: jax.tree.map(lambda a: a.astype(compute_dtype), dense)
  return weights._replace(
      qkv=cast(weights.qkv), mlp=cast(weights.mlp),
      memory_to_gates=cast(weights.memory_to_gates))


def initial_memory(mem_slots: int, mem_size: int, dtype: Any = jnp.float32
                   ) -> jax.Array:
  """The identity memory [N, F], zero-padded or truncated to F columns."""
  return jnp.eye(mem_slots, max(mem_slots, mem_size), dtype=dtype)[:, :mem_size]


def _layer_norm(x: jax.Array, norm: Norm) -> jax.Array:
  """LayerNorm over the last axis, in float32 or wider; returns x's dtype."""
  scale, offset = norm
  wide = x.astype(_wide(x.dtype))
  centred = wide - jnp.mean(wide, axis=-1, keepdims=True)
  variance = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
  normalised = centred * jax.lax.rsqrt(variance + LAYER_NORM_EPS)
  return (normalised * scale + offset).astype(x.dtype)


class _Tape:
  """Applies Linears, adding taps to their outputs and recording their inputs.
  """

  def __init__(self, taps: dict[str, jax.Array] | None):
    self.taps = taps
    self.inputs: dict[str, jax.Array] = {}
    self.outputs: dict[str, jax.Array] = {}

  def dense(self, key: str, x: jax.Array, dense: Dense) -> jax.Array:
    w, b = dense
    x = x.astype(w.dtype)
    self.inputs[key] = x
    y = self.outputs[key] = jnp.dot(x, w) + b
    return y if self.taps is None else y + self.taps[key]


def _attention_block(cfg: StepConfig, weights: Weights, tape: _Tape, k: int,
                     z_BRF: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Block k: returns the updated rows [B, R, F] and weights [B, H, Q, R].

  With paper_variant only the first N rows (the memory) query and are
  updated; the input rows are keys and values only and come back unchanged.
  """
  b, r, f = z_BRF.shape
  q = cfg.mem_slots if cfg.paper_variant else r
  h, dk = cfg.num_heads, cfg.key_size
  qkv = _layer_norm(tape.dense(f"qkv/{k}", z_BRF, weights.qkv[k]),
                        weights.qkv_norm[k])
  # Per head, the qkv columns are contiguous: [q (d_k) | k (d_k) | v (d_v)].
  qkv_BRHC = qkv.reshape(b, r, h, -1)
  q_BQHK = qkv_BRHC[:, :q, :, :dk] * jnp.asarray(cfg.attention_scale,
                                                 qkv.dtype)
  k_BRHK = qkv_BRHC[..., dk:2 * dk]
  v_BRHV = qkv_BRHC[..., 2 * dk:]
  logits_BHQR = jnp.einsum("bqhk,bshk->bhqs", q_BQHK, k_BRHK,
                           preferred_element_type=_wide(qkv.dtype))
  weights_BHQR = jax.nn.softmax(logits_BHQR, axis=-1)
  attended_BQF = jnp.einsum("bhqs,bshv->bqhv",
                            weights_BHQR.astype(v_BRHV.dtype),
                            v_BRHV).reshape(b, q, f)
  z_BQF = _layer_norm(z_BRF[:, :q] + attended_BQF,
                          weights.attention_norm[k])
  mlp = z_BQF
  for i, layer in enumerate(weights.mlp):
    mlp = tape.dense(f"mlp/{k}/{i}", jax.nn.relu(mlp) if i else mlp, layer)
  z_BQF = _layer_norm(mlp + z_BQF, weights.mlp_norm[k])
  if q < r:
    z_BQF = jnp.concatenate([z_BQF, z_BRF[:, q:]], axis=1)
  return z_BQF, weights_BHQR


def step(cfg: StepConfig, weights: Weights, memory_BNF: jax.Array,
         x_BnF: jax.Array, gates_in_B2G: jax.Array | None,
         taps: dict[str, jax.Array] | None = None,
         reset_B: jax.Array | None = None, mask_B: jax.Array | None = None
         ) -> tuple[jax.Array, StepInfo, dict[str, jax.Array],
                    dict[str, jax.Array]]:
  """The part of a step that depends on the previous memory.

  Args:
    cfg: the static configuration.
    weights: the recurrence's weights (Dense ones in the compute dtype).
    memory_BNF: previous memory [B, N, F], float32 or wider.
    x_BnF: the projected input rows [B, n, F].
    gates_in_B2G: the input's gate contribution [B, 2G] (None without gates).
    taps: optional arrays added to the layer outputs, by layer key.
    reset_B: optional bool [B]: those rows start from `initial_memory`.
    mask_B: optional bool [B]: rows where False keep their memory (after any
      reset) instead of taking the new one.

  Returns:
    (next memory [B, N, F] in memory_BNF's dtype, StepInfo, layer inputs by
    key, layer outputs before the taps by key).
  """
  results = []

  def advance(memory_BNF):
    next_memory, *rest = _step(cfg, weights, memory_BNF, x_BnF, gates_in_B2G,
                               taps)
    results.extend(rest)
    return None, next_memory

  initial = initial_memory(cfg.mem_slots, cfg.num_heads * cfg.head_size,
                           memory_BNF.dtype)
  _, next_memory = reset_and_freeze(advance, initial, memory_BNF, reset_B,
                                    mask_B)
  return (next_memory, *results)


def _step(cfg: StepConfig, weights: Weights, memory_BNF: jax.Array,
          x_BnF: jax.Array, gates_in_B2G: jax.Array | None,
          taps: dict[str, jax.Array] | None):
  """`step` without resets or masks; the next memory is float32 or wider."""
  cd = jnp.dtype(cfg.compute_dtype)
  wide = _wide(cd)
  tape = _Tape(taps)
  n = cfg.mem_slots
  z_BRF = jnp.concatenate([memory_BNF.astype(cd), x_BnF.astype(cd)], axis=1)
  attention = []
  for k in range(cfg.num_blocks):
    z_BRF, weights_BHQR = _attention_block(cfg, weights, tape, k, z_BRF)
    attention.append(weights_BHQR)
  attended_BNF = z_BRF[:, :n].astype(wide)
  attention_BKHQR = jnp.stack(attention, axis=1)

  if cfg.gate_style is None:
    return (attended_BNF, StepInfo(attention_BKHQR, None, None), tape.inputs,
            tape.outputs)
  gates_BN2G = (gates_in_B2G[:, None, :].astype(cd)
                + tape.dense("memory_to_gates", jnp.tanh(memory_BNF),
                             weights.memory_to_gates))
  gi, gf = jnp.split(gates_BN2G.astype(wide), 2, axis=-1)
  input_gate = jax.nn.sigmoid(gi + cfg.input_bias)
  forget_gate = jax.nn.sigmoid(gf + cfg.forget_bias)
  candidate = attended_BNF if cfg.paper_variant else jnp.tanh(attended_BNF)
  next_memory = input_gate * candidate + forget_gate * memory_BNF
  return (next_memory, StepInfo(attention_BKHQR, input_gate, forget_gate),
          tape.inputs, tape.outputs)
