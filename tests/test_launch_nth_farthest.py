"""Smoke tests of `python -m launch.train --config=nth_farthest:cpu`, run as a subprocess.

One short run of a tiny RMC is shared by the tests that inspect its workdir;
bad flag values must fail fast with one line on stderr naming the flag.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import struct
import subprocess
import sys

import chex
import haiku as hk
import jax
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from rmc_jax.experiments import nth_farthest as nth_experiment
from rmc_jax.tasks import nth_farthest
from rmc_jax.training import config as config_lib
from rmc_jax.training import cpu_plan
from rmc_jax.training import runs
from rmc_jax.training import steps
from rmc_jax.training.checkpoint import Checkpointer
from rmc_jax.training.mesh import DataMesh
from tests.helpers import REPO_ROOT, TINY_NTH_FLAGS, subprocess_env

NUM_STEPS = 4
RUN_FLAGS = (
    f"--config.num_steps={NUM_STEPS}",
    "--config.log_every=2",
    "--config.eval_every=2",
    "--config.checkpoint_every=2",
    *TINY_NTH_FLAGS,
)


def launch(workdir: str, *flags: str, num_devices: int | None = None,
           timeout: float = 300) -> subprocess.CompletedProcess:
  env = subprocess_env(num_devices)
  cmd = [sys.executable, "-m", "launch.train",
         "--config=nth_farthest:cpu", f"--workdir={workdir}",
         *flags]
  return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout, check=False)


def tiny_config():
  """The config RUN_FLAGS describe, built in-process."""
  c = nth_experiment.get_config("cpu")
  c.batch_size = 16
  c.num_objects = 3
  c.num_features = 2
  c.mlp_sizes = (16,)
  c.rmc.update(mem_slots=2, head_size=8, num_heads=2)
  c.eval_batches = 1
  c.eval_batch_size = 16
  return c


def read_tensorboard_scalars(path: str) -> dict[tuple[str, int], float]:
  """{(tag, step): value} from a TFRecord events file (no TensorFlow needed)."""
  with open(path, "rb") as f:
    data = f.read()
  scalars, pos = {}, 0
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    pos += 12  # length + its CRC
    event = event_pb2.Event.FromString(data[pos:pos + length])
    pos += length + 4  # record + its CRC
    for value in event.summary.value:
      if value.HasField("simple_value"):
        scalars[(value.tag, event.step)] = value.simple_value
      elif value.HasField("tensor") and value.tensor.float_val:
        scalars[(value.tag, event.step)] = value.tensor.float_val[0]
  return scalars


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("launch") / "run")
  proc = launch(workdir, *RUN_FLAGS)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir, proc


def test_exits_cleanly_and_prints_summary(run):
  _, proc = run
  assert "Traceback" not in proc.stderr
  printed = json.loads(proc.stdout)
  assert printed["status"] == "completed" and printed["step"] == NUM_STEPS


def test_config_json_records_the_overrides(run):
  workdir, _ = run
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    config = json.load(f)
  assert config["num_steps"] == NUM_STEPS and config["batch_size"] == 16
  assert config["core"] == "rmc" and config["mlp_sizes"] == [16]
  assert config["rmc"]["mem_slots"] == 2 and config["rmc"]["num_heads"] == 2


def test_metrics_jsonl_rows(run):
  workdir, _ = run
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  train = [r for r in rows if r["split"] == "train"]
  evals = [r for r in rows if r["split"] == "eval"]
  assert len(train) + len(evals) == len(rows)
  assert [r["step"] for r in train] == [2, 4]
  assert [r["step"] for r in evals] == [2, 4]
  for r in train:
    for key in ("loss", "accuracy", "steps_per_sec", "examples_per_sec"):
      assert isinstance(r[key], float) and np.isfinite(r[key]), (key, r)
    assert r["examples_per_sec"] == pytest.approx(16 * r["steps_per_sec"])
    assert r["learning_rate"] == pytest.approx(5e-4)
  for r in evals:
    for key in ("loss", "accuracy"):
      assert isinstance(r[key], float) and np.isfinite(r[key]), (key, r)
  for r in rows:
    assert 0 <= r["accuracy"] <= 1 and r["loss"] > 0


def test_summary_json(run):
  workdir, _ = run
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    summary = json.load(f)
  assert summary["status"] == "completed"
  assert summary["step"] == summary["num_steps"] == NUM_STEPS
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    plan = json.load(f)["cpu_plan"]  # The launcher's choice (auto).
  assert plan in ("threads", "device_per_core")
  assert summary["num_devices"] == (
      cpu_plan.usable_cores() if plan == "device_per_core" else 1)
  assert summary["core"] == "rmc"
  assert summary["num_params"] > 0
  assert set(summary["train"]) >= {"loss", "accuracy", "steps_per_sec"}
  assert set(summary["eval"]) >= {"loss", "accuracy"}


def test_tensorboard_mirrors_metrics(run):
  workdir, _ = run
  (events,) = glob.glob(os.path.join(workdir, "tensorboard",
                                     "events.out.tfevents.*"))
  scalars = read_tensorboard_scalars(events)
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  for r in rows:
    for key in ("loss", "accuracy"):
      assert scalars[(f"{r['split']}/{key}", r["step"])] == pytest.approx(
          r[key], rel=1e-6)


def test_checkpoints_restore_and_eval_matches_them(run):
  workdir, _ = run
  config = tiny_config()
  target = steps.abstract_train_state(nth_experiment.make_task(config),
                                      config, DataMesh())
  with Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    assert ckpt.all_steps() == [2, NUM_STEPS]
    state, iterator_state, step = ckpt.restore(target=target)
  assert step == NUM_STEPS and int(state.step) == NUM_STEPS
  assert iterator_state == {"seed": config.seed, "index": NUM_STEPS}
  # The read-only loader gives the same parameters and the saved config.
  run_ = runs.load_run(workdir)
  assert run_.step == NUM_STEPS and run_.config.experiment == "nth_farthest"
  assert run_.config.rmc.head_size == 8
  chex.assert_trees_all_equal(run_.params, jax.device_get(state.params))

  # The eval row at the last step is the restored model on the held-out set,
  # recomputed here with NumPy's cross-entropy.
  model = hk.transform(functools.partial(
      nth_farthest.forward, core_name="rmc",
      core_kwargs=config_lib.core_kwargs(config), mlp_sizes=(16,),
      num_classes=3))
  ((inputs, labels),) = nth_farthest.held_out_batches(
      1, 16, 3, 2, seed=config.seed)
  logits = np.asarray(jax.jit(model.apply)(state.params, None, inputs),
                      np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  loss = -log_probs[np.arange(16), labels].mean()
  accuracy = (logits.argmax(-1) == labels).mean()
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    (last_eval,) = [r for r in map(json.loads, f)
                    if r["split"] == "eval" and r["step"] == NUM_STEPS]
  assert last_eval["loss"] == pytest.approx(loss, abs=1e-5)
  assert last_eval["accuracy"] == pytest.approx(accuracy)


@pytest.mark.parametrize("flags,name,num_devices", [
    (["--config.batch_size=0"], "batch_size", None),
    (["--config.core=bogus"], "core", None),
    (["--config.num_objects=1"], "num_objects", None),
    (["--config.batch_size=12"], "batch_size", 8),
    (["--config.eval_batch_size=12"], "eval_batch_size", 8),
])
def test_bad_flag_is_one_line_naming_it(tmp_path, flags, name, num_devices):
  workdir = str(tmp_path / "run")
  proc = launch(workdir, *flags, num_devices=num_devices, timeout=120)
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and f"--config.{name}=" in last, last
  assert not os.path.exists(workdir)  # Nothing is written for a bad config.
