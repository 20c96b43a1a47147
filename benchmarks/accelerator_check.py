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
     to "highest", and under the bfloat16 policy (`benchmarks.fast_path_check`
     states the tolerances);
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
import jax

from benchmarks import fast_path_check

_OUT = flags.DEFINE_string("out", "accelerator_check.json",
                           "Where the JSON results go.")
_QUICK = flags.DEFINE_bool(
    "quick", False, "Only C1 and C4, and no LM step (a smoke test).")
_CORES = flags.DEFINE_list("cores", ["rmc", "lstm"],
                           "Cores of the throughput part.")

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
  checks = fast_path_check.fast_path_checks()
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
