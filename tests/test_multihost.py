"""Multi-process training on one machine (launch.local_cluster, gloo on CPU).

The reference is independent of the multi-process machinery: a
single-process run on one device of the same global batches.

  1. Nth farthest and the LM: 2 processes x 2 devices, 1 process x 4 devices
     and 1 process x 1 device end with the same parameters and evaluation
     after k steps (relative 1e-5); only process 0 writes the logs.
  2. SIGTERM to one process of two stops both at the same step with one
     checkpoint. Killing one process of two (SIGKILL, after a checkpoint) makes the
     runner exit non-zero within 90 s with no process left; rerunning the
     same command resumes and ends equal to the uninterrupted run, and so
     does resuming on 1 process x 4 devices.
  3. `shard_params` (parameters and Adam moments split over 8 devices)
     trains like the replicated state.

Each run is a subprocess (a few seconds of start-up and compilation); the
runs are module-scoped fixtures shared by several assertions. Models are a
tiny LSTM: the core does not matter here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from rmc_jax.training import runs
from tests.helpers import REPO_ROOT, subprocess_env

RUN_TIMEOUT_S = 120
NTH_STEPS = 12
LM_STEPS = 6

NTH_FLAGS = (
    "--config=nth_farthest:cpu", "--config.core=lstm",
    "--config.lstm.hidden_sizes=(8,)", "--config.mlp_sizes=(16,)",
    "--config.batch_size=16", "--config.eval_batches=2",
    "--config.eval_batch_size=8", f"--config.num_steps={NTH_STEPS}",
    "--config.log_every=2", "--config.checkpoint_every=2",
    "--config.eval_every=1000",
)


def lm_flags(cache_dir) -> tuple[str, ...]:
  return (
      "--config=lm:synthetic", "--config.core=lstm",
      f"--config.cache_dir={cache_dir}",
      "--config.reader_options.train_tokens=3000",
      "--config.reader_options.valid_tokens=300",
      "--config.reader_options.test_tokens=300",
      "--config.embed_size=16", "--config.lstm.hidden_sizes=(16,)",
      "--config.batch_size=8", "--config.eval_batch_size=4",
      "--config.unroll_length=8", f"--config.num_steps={LM_STEPS}",
      "--config.log_every=2", "--config.checkpoint_every=3",
      "--config.eval_every=1000",
  )


def command(workdir, flags, num_processes: int, devices: int) -> tuple:
  """(argv, env) of a training run with `num_processes` x `devices`."""
  train = [sys.executable, "-m", "launch.train", f"--workdir={workdir}",
           *flags]
  if num_processes == 1:
    return train, subprocess_env(devices)
  return ([sys.executable, "-m", "launch.local_cluster",
           f"--num_processes={num_processes}",
           f"--devices_per_process={devices}", "--grace_seconds=10", "--",
           *train], subprocess_env())


def run(workdir, flags, num_processes: int, devices: int
        ) -> subprocess.CompletedProcess:
  argv, env = command(workdir, flags, num_processes, devices)
  proc = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True,
                        text=True, timeout=RUN_TIMEOUT_S, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def final_params(workdir) -> dict:
  params, step = runs.restore_params(str(workdir))
  return params, step


def assert_close(a, b, rtol: float) -> None:
  """Every leaf of `a` within `rtol` of `b`, relative to the leaf's norm."""
  flat_a, flat_b = (dict(_flatten(t)) for t in (a, b))
  assert flat_a.keys() == flat_b.keys()
  for key, x in flat_a.items():
    y = flat_b[key]
    err = np.linalg.norm(np.asarray(x) - y) / max(np.linalg.norm(y), 1e-12)
    assert err <= rtol, f"{key}: relative difference {err:.2e}"


def _flatten(tree, prefix=""):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flatten(v, f"{prefix}/{k}")
  else:
    yield prefix, tree


def summary(workdir) -> dict:
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    return json.load(f)


TOPOLOGIES = {"2x2": (2, 2), "1x4": (1, 4), "1x1": (1, 1)}


@pytest.fixture(scope="module")
def nth_runs(tmp_path_factory):
  """name -> (workdir, completed process) of one run per topology."""
  root = tmp_path_factory.mktemp("nth")
  return {name: (root / name, run(root / name, NTH_FLAGS, *shape))
          for name, shape in TOPOLOGIES.items()}


@pytest.fixture(scope="module")
def lm_runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("lm")
  flags = lm_flags(root / "cache")
  # The single-device run first: it builds the token cache the others read.
  return {name: (root / name, run(root / name, flags, *shape))
          for name, shape in TOPOLOGIES.items()}


@pytest.mark.parametrize("experiment", ["nth", "lm"])
def test_same_parameters_and_evaluation_on_any_topology(experiment, request):
  results = request.getfixturevalue(f"{experiment}_runs")
  reference, ref_step = final_params(results["1x1"][0])
  steps = NTH_STEPS if experiment == "nth" else LM_STEPS
  assert ref_step == steps
  ref_summary = summary(results["1x1"][0])
  for name in ("2x2", "1x4"):
    params, step = final_params(results[name][0])
    assert step == steps
    assert_close(params, reference, 1e-5)
    got = summary(results[name][0])
    assert got["num_devices"] == 4
    assert got["num_processes"] == TOPOLOGIES[name][0]
    for split in ("eval", "test") if experiment == "lm" else ("eval",):
      np.testing.assert_allclose(got[split]["loss"], ref_summary[split]["loss"],
                                 rtol=1e-5)


def test_only_process_0_writes_the_logs(nth_runs):
  workdir, proc = nth_runs["2x2"]
  rows = runs.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  train_steps = [r["step"] for r in rows if r["split"] == "train"]
  assert train_steps == list(range(2, NTH_STEPS + 1, 2))  # Each row once.
  # The final summary is printed by process 0 only.
  assert re.search(r"^\[0\] {", proc.stdout, re.M)
  assert not re.search(r"^\[1\] {", proc.stdout, re.M)
  events = os.listdir(os.path.join(workdir, "tensorboard"))
  assert len(events) == 1, events


def _groups_alive(pids) -> list[int]:
  alive = []
  for pid in pids:
    try:
      os.killpg(pid, 0)
      alive.append(pid)
    except ProcessLookupError:
      pass
  return alive


def test_killed_process_stops_the_run_and_the_rerun_resumes(
    nth_runs, tmp_path):
  workdir = tmp_path / "killed"
  argv, env = command(workdir, NTH_FLAGS, 2, 2)
  marker = workdir / "checkpoints" / "2" / "commit_success.txt"
  with open(tmp_path / "stderr.txt", "w+", encoding="utf-8") as stderr:
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=stderr)
    try:
      deadline = time.monotonic() + RUN_TIMEOUT_S
      while not marker.exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.02)
      stderr.seek(0)
      pids = {int(i): int(p) for i, p in re.findall(
          r"local_cluster: process (\d) is pid (\d+)", stderr.read())}
      os.kill(pids[1], signal.SIGKILL)
      killed_at = time.monotonic()
      code = proc.wait(timeout=90)
      assert time.monotonic() - killed_at < 90
    finally:
      proc.kill()
      proc.wait()
    stderr.seek(0)
    log = stderr.read()
  assert code != 0, log[-3000:]
  assert not _groups_alive(pids.values())
  steps = runs.read_jsonl(os.path.join(workdir, "metrics.jsonl"))[-1]["step"]
  assert steps < NTH_STEPS, "the kill came after the run had finished"

  moved = tmp_path / "moved"
  shutil.copytree(workdir, moved)
  run(workdir, NTH_FLAGS, 2, 2)  # The same command again.
  run(moved, NTH_FLAGS, 1, 4)  # Another number of processes.
  reference, _ = final_params(nth_runs["2x2"][0])
  for resumed in (workdir, moved):
    params, step = final_params(resumed)
    assert step == NTH_STEPS
    assert_close(params, reference, 1e-5)


def test_sigterm_to_one_process_stops_both_at_one_step(tmp_path):
  workdir = tmp_path / "run"
  flags = [f for f in NTH_FLAGS if "num_steps" not in f] + [
      "--config.num_steps=100000"]
  argv, env = command(workdir, flags, 2, 2)
  with open(tmp_path / "stderr.txt", "w+", encoding="utf-8") as stderr:
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=stderr)
    try:
      marker = workdir / "checkpoints" / "2" / "commit_success.txt"
      deadline = time.monotonic() + RUN_TIMEOUT_S
      while not marker.exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)
      stderr.seek(0)
      pid = re.search(r"local_cluster: process 1 is pid (\d+)",
                      stderr.read()).group(1)
      os.kill(int(pid), signal.SIGTERM)  # Process 0 gets no signal.
      code = proc.wait(timeout=90)
    finally:
      proc.kill()
      proc.wait()
    stderr.seek(0)
    log = stderr.read()
  assert code == 0, log[-3000:]
  stops = re.findall(r"^\[(\d)\] .*Stopped by (.*) at step (\d+); checkpoint "
                     "saved", log, re.M)
  assert sorted(s[0] for s in stops) == ["0", "1"], log[-3000:]
  assert len({s[2] for s in stops}) == 1  # The same step on both.
  _, step = final_params(workdir)
  assert step == int(stops[0][2])


SHARDED_SCRIPT = r"""
import json, sys
import jax, numpy as np
from rmc_jax.experiments import lm
from rmc_jax.lm import batcher
from rmc_jax.training import steps
from rmc_jax.training.mesh import DataMesh

results = {}
for shard in (False, True):
  config = lm.get_config("synthetic")
  config.core = "lstm"
  config.lstm.hidden_sizes = (256,)
  config.embed_size = 250  # The 500 x 250 embedding: split as 4 x 2 tiles.
  config.batch_size, config.unroll_length = 16, 8
  config.shard_params = shard
  vocab = 500
  tokens = np.random.default_rng(0).integers(0, vocab, 16 * 8 * 6 + 1)
  task = lm.build_task(config, vocab, batcher.TBPTTBatcher(tokens, 16, 8))
  mesh = DataMesh()
  state = steps.init_train_state(task, config, mesh)
  train_step = steps.make_train_step(task, config, mesh, state)
  split = [not leaf.sharding.is_fully_replicated
           for leaf in jax.tree.leaves((state.params, state.opt_state))]
  for _ in range(5):
    state, metrics = train_step(state, mesh.shard_batch(
        next(task.train_iterator)))
  results[shard] = dict(
      params={"/".join(map(str, k)): np.asarray(v).tolist() for k, v in
              jax.tree_util.tree_flatten_with_path(state.params)[0]},
      loss=float(metrics["loss"]), num_split=sum(split))
json.dump(results, sys.stdout)
"""


def test_sharded_parameters_train_like_replicated_ones():
  proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], cwd=REPO_ROOT,
                        env=subprocess_env(8), capture_output=True, text=True,
                        timeout=RUN_TIMEOUT_S, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(proc.stdout)
  replicated, sharded = results["false"], results["true"]
  assert replicated["num_split"] == 0
  # The embedding (in 4 x 2 tiles), the LSTM's two matrices (along their
  # 1024 columns), the 256 x 500 softmax matrix and the Adam moments of
  # the four.
  assert sharded["num_split"] == 12
  assert_close(sharded["params"], replicated["params"], 1e-5)
  np.testing.assert_allclose(sharded["loss"], replicated["loss"], rtol=1e-5)
