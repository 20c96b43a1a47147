"""The Relational Memory's recurrence over time, with a custom VJP.

Plain reverse-mode differentiation of a scan accumulates the gradient of
every weight used inside the loop at every step: per step and per Linear, a
[in, out] matmul over only B*(N+1) rows, added into a [in, out] carry. For
the paper's language-model core that is 250 MB of weight gradients written
and read at each of the 100 steps.

Here the reverse scan propagates activation gradients only: the step adds a
zero "tap" to the output of every Linear inside the recurrence and the tap's
cotangent is that Linear's output gradient dY. The reverse scan runs over
chunks of steps (about `_CHUNK_ROWS` rows of steps x batch x rows each; the
whole unroll when a step has few rows); after each chunk, each weight
gradient is one matmul over the chunk's rows, dW += X^T dY (X the Linear's
inputs), db += sum(dY), so only one chunk's dY is kept. The LayerNorms'
scales and offsets (vectors) are differentiated inside the step and summed in
the reverse scan's carry.

Two ways to get each step's backward (the `recompute` flag):
  store (default): the forward scan keeps each step's VJP residuals (the
    step's activations; the weights, shared by all steps, are kept once, not
    per step) and the layer inputs X.
  recompute: the forward scan keeps only the memory of every step; the
    reverse scan reruns each step's forward to get its VJP and X (one more
    forward pass of FLOPs; only one chunk's activations are ever kept).

Resets and masks (`reset_TB`, `mask_TB`) are part of each step (`step`
selects the initial memory before it and the old memory after it), so the
VJP of a step covers them; they get no gradient.

Dtypes: the weights come in float32 (or wider) and are cast to
`cfg.compute_dtype` inside; their gradients are accumulated and returned in
the dtype they came in.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from rmc_jax.cores.relational_memory_step import cast_weights
from rmc_jax.cores.relational_memory_step import step
from rmc_jax.cores.relational_memory_step import StepConfig
from rmc_jax.cores.relational_memory_step import Weights

# Rows (steps x batch x memory-and-input rows) of each weight-gradient matmul:
# the reverse scan runs in chunks of about this many rows, keeping the output
# gradients of one chunk only, and adds each chunk's weight gradients.
_CHUNK_ROWS = 4096


def unroll(cfg: StepConfig, weights: Weights, x_TBnF: jax.Array,
           gates_in_TB2G: jax.Array | None, memory_BNF: jax.Array,
           recompute: bool = False, reset_TB: jax.Array | None = None,
           mask_TB: jax.Array | None = None) -> jax.Array:
  """Runs `step` over time; returns the memory after every step [T, B, N, F].

  Args:
    cfg: the step's static configuration.
    weights: the recurrence's weights, float32 (or wider).
    x_TBnF: the projected input rows of every step.
    gates_in_TB2G: the input's gate contribution of every step, or None.
    memory_BNF: the memory before the first step, float32 (or wider).
    recompute: recompute each step's forward in the backward pass instead of
      storing its activations.
    reset_TB: optional bool: start step t of row b from the initial memory.
    mask_TB: optional bool: where False, row b keeps its memory at step t.
  """
  if x_TBnF.shape[0] < 1:
    raise ValueError("RelationalMemory.unroll: the inputs need at least one "
                     f"time step, got shape {x_TBnF.shape}.")
  return _unroll(cfg, bool(recompute), weights, x_TBnF, gates_in_TB2G,
                 memory_BNF, reset_TB, mask_TB)


def _norms(w: Weights):
  return w.qkv_norm, w.attention_norm, w.mlp_norm


def _step_fn(cfg, w, flags, memory, x, gates_in, taps, norms):
  """The step as differentiated: LayerNorm parameters are inputs, Linears not;
  flags = (reset_B, mask_B) are per-step constants."""
  w = w._replace(qkv_norm=norms[0], attention_norm=norms[1],
                 mlp_norm=norms[2])
  next_memory, _, layer_inputs, _ = step(cfg, w, memory, x, gates_in, taps,
                                         *flags)
  return next_memory, layer_inputs


def _zero_taps(cfg, w, memory, x, gates_in) -> dict[str, jax.Array]:
  outputs = jax.eval_shape(lambda *a: step(cfg, *a)[3], w, memory, x, gates_in)
  return {k: jnp.zeros(s.shape, s.dtype) for k, s in outputs.items()}


def _vjp(cfg, w, flags, memory, x, gates_in, taps):
  """The step's next memory, VJP and layer inputs."""
  return jax.vjp(functools.partial(_step_fn, cfg, w, flags), memory, x,
                 gates_in, taps, _norms(w), has_aux=True)


def weight_positions(vjp_leaves, weights: Weights) -> tuple[int | None, ...]:
  """Which leaves of a step's VJP are the weights themselves.

  Returns, for each of `vjp_leaves`, its position among the leaves of
  `weights` if it is one of those very arrays (by identity), else None.

  Why identity: `jax.vjp` keeps the values a function closes over (here the
  weights, shared by every step) among the residuals of its VJP as the same
  objects (tracers), unchanged; that is the only way to tell them apart from
  the per-step activations without knowing how JAX lays out a VJP. The
  stored-activations backward keeps those leaves once, outside the forward
  scan, instead of once per step.

  If JAX ever copies or wraps closed-over values, no leaf is found: every
  residual, weights included, is then stored once per step. Gradients stay
  exact but the backward pass needs T copies of the weights;
  `tests/test_relational_memory_unroll.py` checks that the weights are found.
  """
  by_id = {id(a): i for i, a in enumerate(jax.tree.leaves(weights))}
  return tuple(by_id.get(id(a)) for a in vjp_leaves)


def _split_vjp(cfg, w, flags, memory, x, gates_in, taps):
  """The step's value, layer inputs and VJP, the VJP split for storage.

  Returns (next memory, layer inputs, per-step residuals, layout), where
  layout = (treedef, index) says how to rebuild the VJP: index[j] is the
  position in `w`'s leaves of the VJP's leaf j when that leaf is a weight
  (kept once, not per step), else None (the leaf is the next per-step one).
  """
  next_memory, vjp_fn, layer_inputs = _vjp(cfg, w, flags, memory, x,
                                           gates_in, taps)
  leaves, treedef = jax.tree.flatten(vjp_fn)
  index = weight_positions(leaves, w)
  per_step = [a for a, i in zip(leaves, index) if i is None]
  return next_memory, layer_inputs, per_step, (treedef, index)


def _layout(cfg, w, flags, memory, x, gates_in, taps):
  layouts = []

  def trace(*args):
    layouts.append(_split_vjp(cfg, *args)[3])

  jax.eval_shape(trace, w, flags, memory, x, gates_in, taps)
  return layouts[0]


def _memories(cfg, weights, x_TBnF, gates_in_TB2G, memory_BNF, flags_TB):
  """The plain forward scan: the memory after every step."""
  w = cast_weights(weights, cfg.compute_dtype)

  def body(memory, xs):
    x, gates_in, flags = xs
    memory = step(cfg, w, memory, x, gates_in, None, *flags)[0]
    return memory, memory

  return jax.lax.scan(body, memory_BNF, (x_TBnF, gates_in_TB2G, flags_TB))[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _unroll(cfg, recompute, weights, x_TBnF, gates_in_TB2G, memory_BNF,
            reset_TB, mask_TB):
  del recompute  # Only the backward pass differs.
  return _memories(cfg, weights, x_TBnF, gates_in_TB2G, memory_BNF,
                   (reset_TB, mask_TB))


def _unroll_fwd(cfg, recompute, weights, x_TBnF, gates_in_TB2G, memory_BNF,
                reset_TB, mask_TB):
  flags_TB = (reset_TB, mask_TB)
  if recompute:
    memories = _memories(cfg, weights, x_TBnF, gates_in_TB2G, memory_BNF,
                         flags_TB)
    return memories, (weights, x_TBnF, gates_in_TB2G, memory_BNF, flags_TB,
                      memories, None)
  w = cast_weights(weights, cfg.compute_dtype)
  first = (_at(flags_TB, 0), memory_BNF, x_TBnF[0], _at(gates_in_TB2G, 0))
  taps = _zero_taps(cfg, w, *first[1:])
  layout = _layout(cfg, w, *first, taps)

  def body(memory, xs):
    x, gates_in, flags = xs
    memory, layer_inputs, per_step, step_layout = _split_vjp(
        cfg, w, flags, memory, x, gates_in, taps)
    if step_layout[1] != layout[1]:  # Treedefs hold jaxprs: not comparable.
      raise AssertionError("RelationalMemory.unroll: the step's VJP changed "
                           "structure between traces.")
    return memory, (memory, layer_inputs, per_step)

  _, (memories, layer_inputs, per_step) = jax.lax.scan(
      body, memory_BNF, (x_TBnF, gates_in_TB2G, flags_TB))
  return memories, (weights, x_TBnF, gates_in_TB2G, memory_BNF, flags_TB,
                    memories, (layer_inputs, per_step))


def _unroll_bwd(cfg, recompute, residuals, ct_memories_TBNF):
  (weights, x_TBnF, gates_in_TB2G, memory_BNF, flags_TB, memories_TBNF,
   stored) = residuals
  w = cast_weights(weights, cfg.compute_dtype)
  first = (_at(flags_TB, 0), memory_BNF, x_TBnF[0], _at(gates_in_TB2G, 0))
  taps = _zero_taps(cfg, w, *first[1:])

  if recompute:
    previous_TBNF = jnp.concatenate([memory_BNF[None], memories_TBNF[:-1]])
    steps = (ct_memories_TBNF, flags_TB, previous_TBNF, x_TBnF, gates_in_TB2G)
    stored_inputs = None

    def step_bwd(carry, t):
      ct_t, flags, memory, x, gates_in = _at(steps, t)
      _, vjp_fn, layer_inputs = _vjp(cfg, w, flags, memory, x, gates_in, taps)
      return _apply_vjp(vjp_fn, carry, ct_t, layer_inputs)
  else:
    stored_inputs, per_step = stored
    steps = (ct_memories_TBNF, per_step)
    treedef, index = _layout(cfg, w, *first, taps)
    w_leaves = jax.tree.leaves(w)

    def step_bwd(carry, t):
      ct_t, step_leaves = _at(steps, t)
      step_leaves = iter(step_leaves)
      vjp_fn = jax.tree.unflatten(treedef, [
          next(step_leaves) if i is None else w_leaves[i] for i in index])
      return _apply_vjp(vjp_fn, carry, ct_t, None)

  def chunk_bwd(carry, start, length):
    """Steps [start, start + length) in reverse, then their weight gradients.

    Each step indexes the stacked residuals itself: slicing a chunk of them
    first would copy it.
    """
    ct_memory, ct_norms, ct_dense = carry
    (ct_memory, ct_norms), (ct_step_inputs, ct_taps, layer_inputs) = (
        jax.lax.scan(step_bwd, (ct_memory, ct_norms),
                     start + jnp.arange(length), reverse=True))
    if stored_inputs is not None:
      layer_inputs = jax.tree.map(
          lambda a: jax.lax.dynamic_slice_in_dim(a, start, length),
          stored_inputs)
    ct_dense = _add(ct_dense, _dense_grads(cfg, _dense(weights), layer_inputs,
                                           ct_taps))
    return (ct_memory, ct_norms, ct_dense), ct_step_inputs

  carry = (jnp.zeros_like(memory_BNF),
           jax.tree.map(jnp.zeros_like, _norms(weights)),
           jax.tree.map(jnp.zeros_like, _dense(weights)))
  num_steps = x_TBnF.shape[0]
  rows_per_step = math.prod(taps["qkv/0"].shape[:-1])
  length = max(1, min(num_steps, -(-_CHUNK_ROWS // rows_per_step)))
  head = num_steps % length
  # Full chunks cover steps [head, T), last chunk first; then steps [0, head).
  carry, ct_main = jax.lax.scan(
      lambda carry, start: chunk_bwd(carry, start, length), carry,
      head + length * jnp.arange(num_steps // length), reverse=True)
  ct_step_inputs = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]),
                                ct_main)
  if head:
    carry, ct_head = chunk_bwd(carry, 0, head)
    ct_step_inputs = jax.tree.map(lambda h, m: jnp.concatenate([h, m]),
                                  ct_head, ct_step_inputs)
  ct_memory0, ct_norms, ct_dense = carry
  qkv, mlp, memory_to_gates = ct_dense
  ct_weights = Weights(
      qkv=qkv, qkv_norm=ct_norms[0], attention_norm=ct_norms[1],
      mlp_norm=ct_norms[2], mlp=mlp, memory_to_gates=memory_to_gates)
  ct_x, ct_gates = ct_step_inputs
  return ct_weights, ct_x, ct_gates, ct_memory0, None, None


def _at(tree, t):
  """Step t of stacked arrays."""
  return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, t, 0, False),
                      tree)


def _apply_vjp(vjp_fn, carry, ct_t, layer_inputs):
  """One step of the reverse scan: (ct of memory, LayerNorm sums) carried."""
  ct_next, ct_norms = carry
  ct_memory, ct_x, ct_gates, ct_taps, ct_step_norms = vjp_fn(ct_next + ct_t)
  return ((ct_memory, _add(ct_norms, ct_step_norms)),
          ((ct_x, ct_gates), ct_taps, layer_inputs))


_unroll.defvjp(_unroll_fwd, _unroll_bwd)


def _add(a, b):
  return jax.tree.map(jnp.add, a, b)


def _dense(w: Weights):
  """The Linears inside the recurrence: (qkv per block, MLP, memory gates)."""
  return w.qkv, w.mlp, w.memory_to_gates


def _dense_grad(layer_inputs, ct_taps, keys, like):
  """Gradient of one Linear from all its applications, as one matmul each.

  dW contracts the inputs and output gradients over all their leading axes
  (steps, batch, rows) at once; no reshape, so a batch axis sharded over
  devices stays valid (the contraction then sums across devices).
  """
  w, b = like

  def contract(x, dy):
    lead = tuple(range(x.ndim - 1))
    return jax.lax.dot_general(x, dy, ((lead, lead), ((), ())),
                               preferred_element_type=w.dtype)

  dw = sum(contract(layer_inputs[k], ct_taps[k]) for k in keys)
  db = sum(jnp.sum(ct_taps[k].astype(b.dtype),
                   axis=tuple(range(ct_taps[k].ndim - 1))) for k in keys)
  return dw.astype(w.dtype), db.astype(b.dtype)


def _dense_grads(cfg: StepConfig, like, layer_inputs, ct_taps):
  """Gradients of `_dense(weights)` from a chunk's inputs and output grads."""
  qkv, mlp, memory_to_gates = like
  blocks = range(cfg.num_blocks)
  grad = lambda keys, layer: _dense_grad(layer_inputs, ct_taps, keys, layer)
  return (tuple(grad([f"qkv/{k}"], qkv[k]) for k in blocks),
          tuple(grad([f"mlp/{k}/{i}" for k in blocks], layer)
                for i, layer in enumerate(mlp)),
          None if memory_to_gates is None else grad(["memory_to_gates"],
                                                    memory_to_gates))
