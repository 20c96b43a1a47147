"""The custom-VJP unroll (`RelationalMemory.unroll`) against plain autodiff.

Gradients of `core.unroll` (activations stored, and recomputed) must equal
`jax.grad` of `hk.dynamic_unroll` over `__call__`, in float64, to a relative
error of 1e-9, for every gate style, 1 and 2 blocks, and matrix inputs; and
the backward pass must keep the weights once, not once per step.
"""

from __future__ import annotations

import functools
import subprocess
import sys

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmc_jax import RelationalMemory
from rmc_jax.cores import relational_memory as rmc_module
from rmc_jax.cores import relational_memory_unroll
from tests import helpers

T, B = 5, 3
MODES = ("dynamic_unroll", "store", "recompute")


# Resets and masks of the flags tests ([T, B]).
RESET_TB = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0]],
                    bool)
MASK_TB = np.array([[1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1], [1, 0, 1]],
                   bool)


class _ResetMaskedStep(hk.RNNCore):
  """The slow path of resets and masks: ResetCore around a masked step."""

  def __init__(self, core, matrix):
    super().__init__(name="slow")
    self._core, self._matrix = core, matrix

  def __call__(self, inputs, state):
    x, mask_B = inputs
    out, new = self._core(x, state, self._matrix)
    return (jnp.where(mask_B[:, None], out, 0.0),
            jnp.where(mask_B[:, None, None], new, state))

  def initial_state(self, batch_size):
    return self._core.initial_state(batch_size)


def _loss_fn(cfg, matrix, mode, flags=False):
  """A loss that weighs every output, the final state and every element."""

  def loss(xs, s0):
    core = RelationalMemory(**cfg, remat=(mode == "recompute"))
    if mode == "dynamic_unroll" and flags:
      outputs, state = hk.dynamic_unroll(
          hk.ResetCore(_ResetMaskedStep(core, matrix)),
          ((xs, MASK_TB), RESET_TB), s0)
    elif mode == "dynamic_unroll":
      step = (lambda x, s: core(x, s, True)) if matrix else core
      outputs, state = hk.dynamic_unroll(step, xs, s0)
    elif flags:
      outputs, state = core.unroll(xs, s0, matrix, reset_TB=RESET_TB,
                                   mask_TB=MASK_TB)
    else:
      outputs, state = core.unroll(xs, s0, matrix)
    weights = jnp.arange(outputs.shape[-1], dtype=outputs.dtype) / 7.0
    return jnp.sum(jnp.sin(outputs) * weights) + jnp.sum(jnp.cos(state))

  return hk.without_apply_rng(hk.transform(loss))


@functools.lru_cache(maxsize=None)
def _mode_gradients(gate_style, num_blocks, matrix, extra, chunk_rows, flags,
                    mode):
  cfg = dict(mem_slots=3, head_size=4, num_heads=2, num_blocks=num_blocks,
             gate_style=gate_style, attention_mlp_layers=2,
             **dict(extra))
  f = cfg["head_size"] * cfg["num_heads"]
  with jax.enable_x64(True):
    rng = np.random.default_rng(num_blocks)
    xs = rng.normal(size=(T, B, 2, 5) if matrix else (T, B, 7))
    s0 = rng.normal(size=(B, cfg["mem_slots"], f))
    init = _loss_fn(cfg, matrix, "dynamic_unroll", flags).init
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0), xs, s0)
    # Random values everywhere (LayerNorm scales and biases too), float64.
    params = jax.tree.map(
        lambda s: rng.normal(scale=0.5, size=s.shape).astype(np.float64),
        shapes)
    default_chunk_rows = relational_memory_unroll._CHUNK_ROWS
    relational_memory_unroll._CHUNK_ROWS = chunk_rows or default_chunk_rows
    try:
      grad_fn = jax.jit(jax.grad(_loss_fn(cfg, matrix, mode, flags).apply,
                                 argnums=(0, 1, 2)))
      return jax.tree.map(np.asarray, grad_fn(params, xs, s0))
    finally:
      relational_memory_unroll._CHUNK_ROWS = default_chunk_rows


def _gradients(gate_style, num_blocks, matrix, extra=(), chunk_rows=None,
               flags=False):
  """{mode: gradients}; the reference (chunk sizes do not change it) is
  computed once per config."""
  return {mode: _mode_gradients(
      gate_style, num_blocks, matrix, extra,
      None if mode == "dynamic_unroll" else chunk_rows, flags, mode)
          for mode in MODES}


def _max_relative_error(reference, other):
  errors = jax.tree.map(
      lambda r, o: np.max(np.abs(o - r)) / max(np.max(np.abs(r)), 1e-300),
      reference, other)
  return max(jax.tree.leaves(errors))


# Every gate style, both block counts and both input kinds (the full
# 3 x 2 x 2 product costs three times the time for no other path; the tests
# below add 2 blocks with unit and memory gates). Two blocks already chain a
# block's output into the next block's input, as any more do.
@pytest.mark.parametrize("gate_style,num_blocks,matrix", [
    ("unit", 2, True), ("memory", 1, False), (None, 2, False),
    (None, 1, True)])
def test_fast_path_gradients_equal_dynamic_unroll(gate_style, num_blocks,
                                                  matrix):
  grads = _gradients(gate_style, num_blocks, matrix)
  reference = grads["dynamic_unroll"]
  assert all(g.dtype == np.float64 for g in jax.tree.leaves(reference))
  # Every parameter, the inputs and the initial state get a gradient.
  assert min(np.max(np.abs(g)) for g in jax.tree.leaves(reference)) > 0
  for mode in ("store", "recompute"):
    assert (jax.tree.structure(grads[mode])
            == jax.tree.structure(reference)), mode
    assert _max_relative_error(reference, grads[mode]) <= 1e-9, mode


@pytest.mark.parametrize("extra", [
    (("paper_variant", True), ("key_size", 3)),
    (("legacy_attention_scale", True), ("input_bias", 0.5)),
])
def test_fast_path_gradients_of_options(extra):
  grads = _gradients("unit", 2, True, extra)
  for mode in ("store", "recompute"):
    assert _max_relative_error(grads["dynamic_unroll"], grads[mode]) <= 1e-9


@pytest.mark.parametrize("chunk_rows", [1, 20])
def test_fast_path_gradients_in_chunks(chunk_rows):
  """The reverse scan in chunks of 1 step, and of 2 steps with a 1-step head
  (B = 3, 3 slots + 1 input row: 12 rows per step; T = 5)."""
  grads = _gradients("unit", 2, False, (), chunk_rows)
  for mode in ("store", "recompute"):
    assert _max_relative_error(grads["dynamic_unroll"], grads[mode]) <= 1e-9


@pytest.mark.parametrize("gate_style,matrix,chunk_rows", [
    ("unit", False, None), ("memory", True, 20)])
def test_fast_path_gradients_with_resets_and_masks(gate_style, matrix,
                                                   chunk_rows):
  """unroll(reset_TB, mask_TB) vs hk.ResetCore around a masked step."""
  grads = _gradients(gate_style, 2, matrix, (), chunk_rows, flags=True)
  reference = grads["dynamic_unroll"]
  assert min(np.max(np.abs(g)) for g in jax.tree.leaves(reference)) > 0
  for mode in ("store", "recompute"):
    assert _max_relative_error(reference, grads[mode]) <= 1e-9, mode


def test_weight_positions_finds_every_weight_in_the_vjp():
  """The contract of `weight_positions`: jax.vjp keeps closed-over weights
  among its residuals as the very same objects. If JAX changes that, the
  backward pass would store the weights at every step; this test fails."""
  cfg = dict(mem_slots=2, head_size=4, num_heads=2, num_blocks=2)
  found, matrices = [], []

  def f(xs):
    core = RelationalMemory(**cfg)
    step_cfg, weights = rmc_module._recurrence(core)
    x_TBnF, gates_TB2G = rmc_module._project_inputs(core, xs[:, :, None])
    memory = core.initial_state(xs.shape[1])
    taps = relational_memory_unroll._zero_taps(
        step_cfg, weights, memory, x_TBnF[0], gates_TB2G[0])
    _, vjp_fn, _ = relational_memory_unroll._vjp(
        step_cfg, weights, (None, None), memory, x_TBnF[0], gates_TB2G[0],
        taps)
    found.append(relational_memory_unroll.weight_positions(
        jax.tree.leaves(vjp_fn), weights))
    matrices.append({i for i, a in enumerate(jax.tree.leaves(weights))
                     if a.ndim == 2})
    return jnp.zeros(())

  jax.eval_shape(hk.transform(f).init, jax.random.PRNGKey(0),
                 jnp.zeros((T, B, 3)))
  # Every weight matrix inside the recurrence (2 qkv, 2 MLP layers,
  # memory_to_gates) is found among the residuals.
  assert len(matrices[0]) == 5
  assert matrices[0] <= {i for i in found[0] if i is not None}, found[0]


def test_backward_keeps_the_weights_once():
  """The stored VJP residuals hold activations per step, not the weights.

  With weights far larger than the activations (F = 512, batch 1), storing
  them at each of 64 steps would need 64 copies; XLA's temporary buffers of
  the compiled gradient must stay within a few copies of the weights.
  """
  cfg = dict(mem_slots=1, head_size=128, num_heads=4, attention_mlp_layers=2)
  steps = 64

  def loss(xs):
    core = RelationalMemory(**cfg)
    outputs, _ = core.unroll(xs, core.initial_state(1))
    return jnp.sum(outputs)

  model = hk.without_apply_rng(hk.transform(loss))
  xs = jnp.zeros((steps, 1, 16))
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), xs)
  weight_bytes = sum(p.size * 4 for p in jax.tree.leaves(params))
  compiled = jax.jit(jax.grad(model.apply)).lower(params, xs).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert weight_bytes > 4e6
  assert temp < 4 * weight_bytes, (temp, weight_bytes)


_SHARDED_SCRIPT = r"""
import jax, jax.numpy as jnp, haiku as hk, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from rmc_jax import RelationalMemory

mesh = jax.make_mesh((2,), ("data",))  # Explicit axes: shardings in types.
grads = {}
for mode in ("dynamic_unroll", "store", "recompute"):
  def loss(x, s0, mode=mode):
    core = RelationalMemory(mem_slots=2, head_size=4, num_heads=2,
                            remat=(mode == "recompute"))
    if mode == "dynamic_unroll":
      out, state = hk.dynamic_unroll(core, x, s0)
    else:
      out, state = core.unroll(x, s0)
    return jnp.sum(jnp.sin(out)) + jnp.sum(state)
  model = hk.without_apply_rng(hk.transform(loss))
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 5))
  s0 = jax.random.normal(jax.random.PRNGKey(1), (4, 2, 8))
  params = jax.jit(model.init)(jax.random.PRNGKey(2), x, s0)
  if mode == "dynamic_unroll":  # The single-device reference.
    grads[mode] = jax.jit(jax.grad(model.apply))(params, x, s0)
    continue
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, NamedSharding(mesh, P(None, "data")))
    ss = jax.device_put(s0, NamedSharding(mesh, P("data")))
    grads[mode] = jax.jit(jax.grad(model.apply))(params, xs, ss)
for mode in ("store", "recompute"):
  err = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for a, b in zip(jax.tree.leaves(grads["dynamic_unroll"]),
                            jax.tree.leaves(grads[mode])))
  assert err < 1e-5, (mode, err)
print("OK")
"""


def test_fast_path_under_an_explicitly_sharded_batch():
  """Batch and state sharded over 2 devices (Explicit mesh axes): the same
  gradients as a single-device dynamic_unroll."""
  result = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT],
                          env=helpers.subprocess_env(num_devices=2),
                          cwd=helpers.REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("OK")
