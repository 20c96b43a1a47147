"""The RMC's fast `unroll` against `hk.dynamic_unroll`, on any device.

Outputs and gradients of every parameter of a few core configs, with the
matmul precision set to "highest". In float32 the two paths must agree (max
error relative to the largest value <= FLOAT32_TOL). Under the bfloat16
policy both paths round, at different places, by as much as 8% of a small
gradient (a gate bias sums many bfloat16 terms that nearly cancel), so each is
measured against the float32 result instead: the fast path must lose at most
BFLOAT16_MARGIN times what `hk.dynamic_unroll` loses (or BFLOAT16_FLOOR).
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
BFLOAT16_MARGIN = 1.5
BFLOAT16_FLOOR = 1e-2
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


def _row(precision, gate_style, num_blocks, remat, error, tolerance,
         **extra) -> dict:
  passed = bool(error <= tolerance)
  print(f"fast path vs dynamic_unroll, {precision}, gates={gate_style}, "
        f"blocks={num_blocks}, remat={remat}: {error:.2e} "
        f"(<= {tolerance:.2e}) {'ok' if passed else 'FAILED'}", flush=True)
  return dict(precision=precision, gate_style=gate_style,
              num_blocks=num_blocks, remat=remat, max_relative_error=error,
              tolerance=tolerance, passed=passed, **extra)


def fast_path_checks() -> list[dict]:
  """One row per config and precision: float32 rows first, then bfloat16.

  A bfloat16 row's `max_relative_error` is the fast path's distance from the
  float32 `hk.dynamic_unroll` result and `reference_error` that of
  `hk.dynamic_unroll` under bfloat16.
  """
  float32_rows, bfloat16_rows = [], []
  for config in _CHECKS:
    with jax.default_matmul_precision("highest"):
      truth, fast32 = _paths(*config, "float32")
      reference16, fast16 = _paths(*config, "bfloat16")
    float32_rows.append(_row("float32", *config,
                             _relative_error(truth, fast32), FLOAT32_TOL))
    reference_error = _relative_error(truth, reference16)
    bfloat16_rows.append(_row(
        "bfloat16", *config, _relative_error(truth, fast16),
        max(BFLOAT16_MARGIN * reference_error, BFLOAT16_FLOOR),
        reference_error=reference_error))
  return float32_rows + bfloat16_rows
