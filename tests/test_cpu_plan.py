"""The CPU execution plan: its choice, where it applies, and the launcher's use."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rmc_jax.training import cpu_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("requested,batches,width,expected", [
    ("auto", (256, 512), 128, "device_per_core"),
    ("auto", (256, 511), 128, "threads"),  # the eval batch does not divide
    ("auto", (256,), cpu_plan.SMALL_CORE_WIDTH + 1, "threads"),
    ("auto", (256,), 0, "threads"),  # width unknown
    ("auto", (64, 512), 128, "threads"),  # 16 rows x 128 per device
    ("threads", (256,), 128, "threads"),
    ("device_per_core", (3,), 10**6, "device_per_core"),  # as requested
    ("off", (256,), 128, "off"),
])
def test_choose(requested, batches, width, expected):
  plan = cpu_plan.choose(requested, batches, width, cores=4)
  assert plan.name == expected
  assert plan.devices == (4 if expected == "device_per_core" else 1)
  if requested == "auto" and expected == "threads":
    assert plan.reason != "requested"


def test_choose_one_core_and_bad_name():
  assert cpu_plan.choose("auto", (8,), 16, cores=1).name == "threads"
  with pytest.raises(ValueError, match="expected one of"):
    cpu_plan.choose("fast", (8,), 16)


def test_one_plan_for_a_process_of_several_configs():
  small, large = ((256,), 128), ((256,), cpu_plan.SMALL_CORE_WIDTH + 1)
  choose = lambda runs: cpu_plan.choose_for_process("auto", runs, cores=4)
  assert choose([small, small]).name == "device_per_core"
  assert choose([large]).name == "threads"
  mixed = choose([small, large])
  assert (mixed.name, mixed.devices) == ("threads", 1)
  assert "different plans" in mixed.reason
  assert choose([]).name == "threads"
  requested = cpu_plan.choose_for_process("device_per_core", [large], cores=4)
  assert (requested.name, requested.devices) == ("device_per_core", 4)


def test_flags():
  plan = cpu_plan.CpuPlan("device_per_core", 3, "")
  assert plan.xla_flags() == (
      "--xla_force_host_platform_device_count=3",
      "--xla_cpu_multi_thread_eigen=false")
  assert cpu_plan.CpuPlan("threads", 1, "").xla_flags() == ()


def test_widths():
  assert cpu_plan.core_width("rmc", dict(head_size=32, num_heads=4)) == 128
  assert cpu_plan.core_width("lstm", dict(hidden_sizes=(64, 512))) == 2048
  assert cpu_plan.core_width("dnc", dict(controller_sizes=(128,))) == 512
  assert cpu_plan.core_width("convlstm", {}) == 0


_PROBE = """
import json, os, sys
from rmc_jax.training import cpu_plan
plan = cpu_plan.apply(cpu_plan.CpuPlan("device_per_core", 3, "test"))
import jax
out = dict(name=plan.name, reason=plan.reason, devices=len(jax.devices()),
           flags=os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = ""  # As if the plan had not been applied.
try:
  cpu_plan.apply(cpu_plan.CpuPlan("device_per_core", 2, "again"))
  out["after_init"] = "applied"
except RuntimeError as e:
  out["after_init"] = str(e)
print(json.dumps(out))
"""


def _probe(**env):
  full = {k: v for k, v in os.environ.items()
          if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  full.update(env, PYTHONPATH=ROOT)
  result = subprocess.run([sys.executable, "-c", _PROBE], env=full,
                          capture_output=True, text=True, timeout=120,
                          check=True)
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_apply_sets_devices_and_threads_before_init_only():
  out = _probe()
  assert out["name"] == "device_per_core" and out["devices"] == 3
  assert "--xla_cpu_multi_thread_eigen=false" in out["flags"]
  assert "before JAX initialises" in out["after_init"]


def test_apply_keeps_a_device_count_already_set():
  out = _probe(XLA_FLAGS="--xla_force_host_platform_device_count=2")
  assert out["name"] == "off" and "device count" in out["reason"]
  assert out["devices"] == 2


def test_apply_leaves_accelerator_runs_alone(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cuda")
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  plan = cpu_plan.apply(cpu_plan.CpuPlan("device_per_core", 3, ""))
  assert plan.name == "off" and "JAX_PLATFORMS" in plan.reason
  assert "XLA_FLAGS" not in os.environ


def test_launcher_records_its_choice(tmp_path):
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  workdir = tmp_path / "run"
  subprocess.run(
      [sys.executable, "-m", "launch.train", "--config=nth_farthest:cpu",
       f"--workdir={workdir}", "--config.num_steps=2", "--config.log_every=1",
       "--config.eval_batches=1", "--config.batch_size=8",
       "--config.eval_batch_size=8", "--config.rmc.head_size=4"],
      cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
  config = json.loads((workdir / "config.json").read_text())
  summary = json.loads((workdir / "summary.json").read_text())
  expected = cpu_plan.choose("auto", (8, 8), 16)  # threads: tiny
  assert config["cpu_plan"] == expected.name
  assert summary["num_devices"] == expected.devices
