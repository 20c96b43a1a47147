r"""One command that checks and times rmc_jax on a GPU or TPU (a few minutes).

  python -m benchmarks.accelerator_check --out=accelerator_check.json
  python -m benchmarks.accelerator_check --quick      # C1 and C4, no LM step

On a machine without dm-haiku, jmp and ml_collections (and no network), bring
them as wheels (`make wheels` writes them to .whl/) and run

  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  PYTHONPATH=/tmp/site:. python3 -m benchmarks.accelerator_check --out=OUT.json

from the repository root. In order, it
  1. prints the device (platform, kind, count) and the JAX version;
  2. checks `RelationalMemory.unroll` (the custom-VJP fast path, storing and
     recomputing) against `hk.dynamic_unroll` over `__call__`: outputs and
     gradients of every parameter, in float32 with the matmul precision set
     to "highest" (max error relative to the largest value <= FLOAT32_TOL),
     and under the bfloat16 policy (<= BFLOAT16_TOL: bfloat16 keeps 8 bits of
     mantissa and both paths round at other places);
  3. times the cores of C1-C6 (benchmarks/core_configs.py) forward+backward
     in float32 and bfloat16 against the matmul peak measured in that dtype
     (`benchmarks.core_throughput`, one process per precision);
  4. times the LM train step of the `wikitext103` variant at the paper's 64
     sequences x 100 steps per device (`benchmarks.lm_throughput`): tokens/s,
     compiled memory, peak host memory;
and writes everything to one JSON file. Exit code 1 if a check fails (the
timings still run and are written).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from rmc_jax import RelationalMemory
from rmc_jax.training import precision as precision_lib

_OUT = flags.DEFINE_string("out", "accelerator_check.json",
                           "Where the JSON results go.")
_QUICK = flags.DEFINE_bool(
    "quick", False, "Only C1 and C4, and no LM step (a smoke test).")
_CORES = flags.DEFINE_list("cores", ["rmc", "lstm"],
                           "Cores of the throughput part.")

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
    (loss, outputs), grads = grad_fn(params, xs)
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


def _benchmark(module: str, *args: str) -> tuple[list | dict | None, float]:
  """Runs `python -m module args --json=...`; its rows and wall seconds."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "rows.json")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", module, *args,
                             f"--json={path}"], check=False)
    seconds = time.perf_counter() - start
    if result.returncode != 0 or not os.path.exists(path):
      print(f"{module} failed with exit code {result.returncode}",
            flush=True)
      return None, seconds
    with open(path) as f:
      return json.load(f), seconds


def main(argv):
  del argv
  start = time.perf_counter()
  devices = jax.devices()
  device = dict(platform=devices[0].platform,
                kind=devices[0].device_kind, count=len(devices),
                jax=jax.__version__)
  print(f"device: {len(devices)} x {device['kind']} ({device['platform']}), "
        f"jax {jax.__version__}", flush=True)
  checks = fast_path_checks()
  configs = "C1,C4" if _QUICK.value else "C1,C2,C3,C4,C5,C6"
  throughput = {}
  for precision in ("float32", "bfloat16"):
    rows, seconds = _benchmark(
        "benchmarks.core_throughput", f"--configs={configs}",
        f"--cores={','.join(_CORES.value)}", f"--precision={precision}",
        "--repeats=7")
    throughput[precision] = dict(rows=rows, wall_seconds=seconds)
  lm = None
  if not _QUICK.value:
    rows, seconds = _benchmark("benchmarks.lm_throughput",
                               "--sizes=wikitext103", "--cores=rmc,lstm")
    lm = dict(rows=rows, wall_seconds=seconds)
  passed = all(row["passed"] for row in checks)
  report = dict(device=device, fast_path_checks=checks,
                checks_passed=passed, core_throughput=throughput,
                lm_train_step=lm,
                wall_seconds=time.perf_counter() - start)
  with open(_OUT.value, "w") as f:
    json.dump(report, f, indent=1, default=str)
  print(f"wrote {_OUT.value} ({report['wall_seconds']:.0f} s); checks "
        f"{'passed' if passed else 'FAILED'}")
  if not passed:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
