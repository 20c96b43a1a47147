"""Resuming a damaged or mismatched run through the launcher.

A short Nth-farthest run (checkpoints at steps 2, 4 and 6) is damaged in
copies: each case asserts the exit code, a single 'error:' line (or a single
warning) on stderr and no traceback, which checkpoint was used, that the
damaged one still exists, and for the fallback that the final numbers equal a
clean run resumed from the same step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from rmc_jax.training import runs
from tests.helpers import REPO_ROOT, TINY_NTH_FLAGS, subprocess_env

FLAGS = ("--config.core=lstm", "--config.lstm.hidden_sizes=(8,)",
         "--config.log_every=2", "--config.eval_every=2",
         "--config.checkpoint_every=2", *TINY_NTH_FLAGS)


def launch(workdir: str, *flags: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-m", "launch.train", "--config=nth_farthest:cpu",
       f"--workdir={workdir}", *FLAGS, *flags], cwd=REPO_ROOT,
      env=subprocess_env(), capture_output=True, text=True, timeout=300,
      check=False)


def assert_clean_stderr(proc: subprocess.CompletedProcess) -> None:
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "Event loop is closed" not in proc.stderr, proc.stderr[-3000:]


def only_error_line(proc: subprocess.CompletedProcess) -> str:
  assert_clean_stderr(proc)
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1] == errors[0]
  return errors[0]


def listing(path: str) -> list[tuple[str, int, int]]:
  return sorted((os.path.relpath(os.path.join(root, name), path),
                 os.stat(os.path.join(root, name)).st_size,
                 os.stat(os.path.join(root, name)).st_mtime_ns)
                for root, _, names in os.walk(path) for name in names)


def truncate_a_data_file(step_dir: str) -> str:
  """Halves the largest array data file that the step's state reads (the
  merged OCDBT store's `d/`), as a partial copy would."""
  data = os.path.join(step_dir, "state", "d")
  path = max((os.path.join(data, name) for name in os.listdir(data)),
             key=os.path.getsize)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("damaged"))
  workdir = os.path.join(root, "run")
  proc = launch(workdir, "--config.num_steps=6")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [
      "2", "4", "6"]
  return root, workdir


def copy_run(finished, name: str) -> str:
  root, workdir = finished
  target = os.path.join(root, name)
  shutil.copytree(workdir, target)
  return target


def eval_rows(workdir: str) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in runs.read_jsonl(
      os.path.join(workdir, "metrics.jsonl")) if r["split"] == "eval"}


def test_a_truncated_latest_checkpoint_falls_back(finished):
  damaged = copy_run(finished, "truncated")
  truncate_a_data_file(os.path.join(damaged, "checkpoints", "6"))
  # The clean reference: the same run with step 6 simply absent.
  clean = copy_run(finished, "clean")
  shutil.rmtree(os.path.join(clean, "checkpoints", "6"))

  proc = launch(damaged, "--config.num_steps=8")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert_clean_stderr(proc)
  warnings = [l for l in proc.stderr.splitlines() if "step 6" in l
              and "damaged" in l]
  assert len(warnings) == 1, proc.stderr[-3000:]
  # Moved aside, never deleted; the run went on from step 4.
  aside = os.listdir(os.path.join(damaged, "checkpoints", "damaged"))
  assert aside == ["6.state"]
  assert sorted(os.listdir(os.path.join(damaged, "checkpoints"))) == [
      "4", "6", "8", "damaged"]  # 6 and 8 newly written from step 4 on.
  assert json.loads(proc.stdout)["step"] == 8

  reference = launch(clean, "--config.num_steps=8")
  assert reference.returncode == 0, reference.stderr[-3000:]
  assert json.loads(proc.stdout)["eval"] == json.loads(reference.stdout)["eval"]
  assert eval_rows(damaged)[8] == eval_rows(clean)[8]


def test_another_model_stops_before_writing(finished):
  workdir = copy_run(finished, "other_model")
  before = listing(workdir)
  proc = launch(workdir, "--config.num_steps=8",
                "--config.lstm.hidden_sizes=(16,)")
  assert proc.returncode == 2, proc.stderr[-3000:]
  line = only_error_line(proc)
  assert "step 6" in line and "another model" in line, line
  assert "(8," in line and "(16," in line, line  # Saved and new shapes.
  assert "config.json" in line and "new workdir" in line, line
  assert listing(workdir) == before  # Nothing written, nothing moved.


def test_nothing_readable_is_one_line_and_touches_nothing(finished):
  workdir = copy_run(finished, "all_damaged")
  for step in ("2", "4", "6"):
    truncate_a_data_file(os.path.join(workdir, "checkpoints", step))
  before = listing(workdir)
  proc = launch(workdir, "--config.num_steps=8")
  assert proc.returncode == 2, proc.stderr[-3000:]
  line = only_error_line(proc)
  assert "can be read back" in line and "nothing was moved" in line, line
  assert listing(workdir) == before


def test_eval_only_and_reading_skip_a_damaged_checkpoint(finished):
  workdir = copy_run(finished, "eval_only")
  truncate_a_data_file(os.path.join(workdir, "checkpoints", "6"))
  checkpoints = listing(os.path.join(workdir, "checkpoints"))
  proc = launch(workdir, "--config.eval_only=true")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert_clean_stderr(proc)
  assert json.loads(proc.stdout)["eval"]["step"] == 4
  # Read-only: the damaged checkpoint stays where it was.
  assert listing(os.path.join(workdir, "checkpoints")) == checkpoints
  run = runs.load_run(workdir)
  assert run.step == 4 and tuple(run.config.lstm.hidden_sizes) == (8,)
  assert listing(os.path.join(workdir, "checkpoints")) == checkpoints


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
  path = tmp_path / "not_a_dir"
  path.write_text("x")
  proc = launch(str(path), "--config.num_steps=2")
  assert proc.returncode == 2, proc.stderr[-3000:]
  line = only_error_line(proc)
  assert str(path) in line and "is a file" in line, line
  assert path.read_text() == "x"
