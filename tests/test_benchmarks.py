"""The benchmark scripts run end to end and report consistent numbers.

No timing is asserted (timings belong in the benchmarks' own output); the
checks are on what must hold whatever the machine's speed.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks import core_configs
from tests import helpers


def _run(module, *flags, tmp_path):
  out = os.path.join(tmp_path, "out.json")
  result = subprocess.run(
      [sys.executable, "-m", module, *flags, f"--json={out}"],
      env=helpers.subprocess_env(), cwd=helpers.REPO_ROOT,
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(out) as f:
    return json.load(f), result.stdout


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
  rows, stdout = _run("benchmarks.profile_core", "--configs=C1", "--repeats=1",
                      "--top=3", tmp_path=str(tmp_path_factory.mktemp("p")))
  return rows[0], stdout


def test_profile_accounts_for_the_whole_step(profile):
  row, stdout = profile
  c = core_configs.CONFIGS["C1"]
  # Categories plus the idle time between ops are the profiled step.
  accounted = sum(row["categories"].values()) + row["overhead"]
  assert accounted == pytest.approx(row["profiled_seconds_per_step"], rel=0.01)
  assert row["categories"]["matmul"] > 0
  # Every time step runs at least one op in the forward and the backward.
  assert row["ops_per_step"] >= 2 * c.steps
  assert 0 < row["in_loop_seconds"] <= row["op_time_sum"] * 1.001
  # The floors follow from the config: FLOPs over the peak, and the
  # recurrent weights (all but the input side) read twice per time step.
  flops = 3 * core_configs.rmc_forward_flops_per_token(c) * c.batch * c.steps
  assert row["flop_floor_s"] == pytest.approx(flops / row["peak_flops"])
  assert row["byte_floor_s"] == pytest.approx(
      2 * c.steps * row["recurrent_param_bytes"]
      / row["bandwidth_bytes_per_s"])
  f, d_in = c.mem_size, c.input_size
  input_side = (d_in + 1) * f + (f + 1) * 2 * f  # input projection + gates
  assert row["recurrent_param_bytes"] == 4 * (
      core_configs.count_rmc_params(c) - input_side)
  assert "floors:" in stdout


def test_core_throughput_compile_only_reports_memory(tmp_path):
  rows, stdout = _run("benchmarks.core_throughput", "--configs=C1",
                      "--cores=rmc,lstm", "--compile_only", "--batch_size=4",
                      tmp_path=str(tmp_path))
  assert [r["core"] for r in rows] == ["rmc", "lstm"]
  for r in rows:
    assert r["batch"] == 4
    assert r["temp_bytes"] > 0
    assert math.isnan(r["seconds_per_step"])
  assert rows[0]["params"] == core_configs.count_rmc_params(
      core_configs.CONFIGS["C1"])
  assert "temp MiB" in stdout
