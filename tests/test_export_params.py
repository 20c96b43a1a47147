"""launch.export_params and rmc_jax.training.runs.load_exported: a tiny run
trained through the launcher, exported, read back without its directory.

The export is checked against the run itself (`runs.load_run`): the same
arrays leaf by leaf, the documented key names, and the same held-out metrics
from the model built from the exported config.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import chex
import numpy as np
import pytest

from rmc_jax import experiments
from rmc_jax.training import runs
from rmc_jax.training import steps
from rmc_jax.training.mesh import DataMesh
from tests.helpers import REPO_ROOT, TINY_NTH_FLAGS, subprocess_env


def _launch(module: str, *flags: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *flags], cwd=REPO_ROOT,
                        env=subprocess_env(), capture_output=True, text=True,
                        timeout=300, check=False)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(workdir, export path) of a 2-step Nth-farthest RMC run."""
  root = tmp_path_factory.mktemp("export")
  workdir, out = str(root / "run"), str(root / "params.npz")
  proc = _launch("launch.train", "--config=nth_farthest:cpu", *TINY_NTH_FLAGS,
                 "--config.num_steps=2", "--config.log_every=1",
                 "--config.eval_every=2", "--config.checkpoint_every=2",
                 f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = _launch("launch.export_params", f"--workdir={workdir}", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().endswith(f"'nth_farthest' step 2 to {out}")
  return workdir, out


def test_export_holds_the_checkpoint_under_haiku_names(exported):
  workdir, out = exported
  run = runs.load_run(workdir)
  with np.load(out, allow_pickle=False) as data:
    keys = set(data.files)
    assert int(data[runs.EXPORT_STEP_KEY]) == run.step == 2
  # Haiku's module names with '/' for its '/~/'.
  names = {f"{module.replace('/~/', '/')}/{name}"
           for module, params in run.params.items() for name in params}
  assert keys == names | {runs.EXPORT_CONFIG_KEY, runs.EXPORT_STEP_KEY}
  # Names as RelationalMemory's docstring lists them.
  assert {"relational_memory/block_0/qkv/w", "relational_memory/block_0/qkv/b",
          "relational_memory/attention_mlp/linear_1/w",
          "logits/w"} <= keys, sorted(keys)


def test_loaded_export_equals_the_run_and_evaluates_the_same(exported):
  workdir, out = exported
  run = runs.load_run(workdir)
  # Read back without the run directory.
  moved = out + ".moved"
  shutil.move(workdir, moved)
  try:
    config, params = runs.load_exported(out)
  finally:
    shutil.move(moved, workdir)
  chex.assert_trees_all_equal(params, run.params)
  chex.assert_trees_all_equal_dtypes(params, run.params)
  assert config.to_dict() == run.config.to_dict()

  mesh = DataMesh()

  def held_out(config, params):
    task = experiments.make_task(config)
    return steps.Evaluator(task, mesh)(params, task.eval_splits["eval"])

  chex.assert_trees_all_close(held_out(config, params),
                              held_out(run.config, run.params), rtol=0, atol=0)


def test_bad_paths_are_one_line_errors(exported, tmp_path):
  workdir, out = exported
  cases = {
      "no_run": ([f"--workdir={tmp_path / 'none'}", f"--out={tmp_path / 'x.npz'}"],
                 "--workdir:"),
      "no_out_dir": ([f"--workdir={workdir}", f"--out={tmp_path / 'no' / 'x.npz'}"],
                     "--out:"),
  }
  for flags, prefix in cases.values():
    proc = _launch("launch.export_params", *flags)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {prefix}"), lines
  with pytest.raises(ValueError, match="not a parameter export"):
    np.savez(tmp_path / "other.npz", w=np.zeros(2))
    runs.load_exported(str(tmp_path / "other.npz"))
  with pytest.raises(FileNotFoundError):
    runs.load_exported(str(tmp_path / "missing.npz"))
