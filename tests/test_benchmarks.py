"""The benchmark scripts run end to end and report consistent numbers.

No timing is asserted (timings belong in the benchmarks' own output); the
checks are on what must hold whatever the machine's speed.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks import core_configs
from rmc_jax.training import cpu_plan
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
  # C1 is a small core: "auto" profiles one device's share of the batch
  # where there are cores to split it over.
  devices = cpu_plan.usable_cores()
  if row["cpu_plan"] == "device_per_core":
    assert devices > 1 and row["batch"] == c.batch // devices
  else:
    assert row["batch"] == c.batch
  c = dataclasses.replace(c, batch=row["batch"])
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


def test_env_and_lm_benchmarks_split_over_the_devices_of_their_plan(tmp_path):
  devices = cpu_plan.usable_cores()
  rows, stdout = _run("benchmarks.env_throughput", "--envs=boxworld",
                      f"--sizes={2 * devices}", "--steps=2", "--repeats=1",
                      "--cpu_plan=device_per_core", tmp_path=str(tmp_path))
  assert f"{devices} device(s)" in stdout
  [row] = rows["results"]
  assert row["cpu_plan"] == "device_per_core"
  assert row["steps_per_s"] == pytest.approx(
      row["batch"] * row["steps"] / row["median_s"])
  rows, _ = _run("benchmarks.lm_throughput", "--sizes=small", "--cores=lstm",
                 "--vocab_size=12000", f"--batch_size={2 * devices}",
                 "--unroll_length=4", "--compile_only",
                 "--cpu_plan=device_per_core", tmp_path=str(tmp_path))
  [row] = rows
  assert (row["cpu_plan"], row["num_devices"]) == ("device_per_core", devices)
