"""The RMC's fast `unroll` against `hk.dynamic_unroll`, on any device.

Outputs and gradients of every parameter of a few core configs, in float32
with the matmul precision set to "highest" (max error relative to the
largest value <= FLOAT32_TOL) and under the bfloat16 policy (<= BFLOAT16_TOL:
bfloat16 keeps 8 bits of mantissa and both paths round at other places).
Used by `benchmarks.accelerator_check`.
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from rmc_jax import RelationalMemory
from rmc_jax.training import precision as precision_lib

FLOAT32_TOL = 1e-4
BFLOAT16_TOL = 5e-2
# Fast-path checks: (gate style, blocks, remat) on 4 slots x 2 heads x 16.
_CHECKS = (("unit", 1, False), ("memory", 2, True), (None, 1, True))


def _paths(gate_style, num_blocks, remat, precision):
  """Loss, outputs and gradients of both unrolls for one core config."""

  def run(xs, use_unroll):
    core = RelationalMemory(mem_slots=4, head_size=16, num_heads=2,
                            num_blocks=num_blocks, gate_style=gate_style,
                            remat=remat)
    state = core.initial_state(xs.shape[1])
    if use_unroll:
      outputs, final = core.unroll(xs, state)
    else:
      outputs, final = hk.dynamic_unroll(core, xs, state)
    weights = jnp.arange(outputs.shape[-1], dtype=jnp.float32) / 7.0
    loss = jnp.sum(jnp.sin(outputs) * weights) + jnp.sum(jnp.cos(final))
    return loss, outputs

  xs = jax.random.normal(jax.random.PRNGKey(0), (12, 8, 24))
  results = {}
  for use_unroll in (False, True):
    model = hk.without_apply_rng(hk.transform(precision_lib.scoped(
        lambda x, u=use_unroll: run(x, u), precision)))
    params = jax.jit(model.init)(jax.random.PRNGKey(1), xs)
    grad_fn = jax.jit(jax.value_and_grad(model.apply, has_aux=True))
    (_, outputs), grads = grad_fn(params, xs)
    results[use_unroll] = jax.device_get((outputs, grads))
  return results[False], results[True]


def _relative_error(reference, other) -> float:
  worst = 0.0
  for r, o in zip(jax.tree.leaves(reference), jax.tree.leaves(other)):
    r, o = np.asarray(r, np.float64), np.asarray(o, np.float64)
    worst = max(worst, float(np.max(np.abs(o - r))
                             / max(np.max(np.abs(r)), 1e-30)))
  return worst


def fast_path_checks() -> list[dict]:
  rows = []
  for precision, tol in (("float32", FLOAT32_TOL),
                         ("bfloat16", BFLOAT16_TOL)):
    for gate_style, num_blocks, remat in _CHECKS:
      with jax.default_matmul_precision("highest"):
        reference, fast = _paths(gate_style, num_blocks, remat, precision)
      error = _relative_error(reference, fast)
      rows.append(dict(precision=precision, gate_style=gate_style,
                       num_blocks=num_blocks, remat=remat,
                       max_relative_error=error, tolerance=tol,
                       passed=bool(error <= tol)))
      print(f"fast path vs dynamic_unroll, {precision}, gates={gate_style}, "
            f"blocks={num_blocks}, remat={remat}: {error:.2e} (<= {tol}) "
            f"{'ok' if error <= tol else 'FAILED'}", flush=True)
  return rows
