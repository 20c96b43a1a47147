"""`python -m launch.compare`: a 2-core x 2-seed grid of tiny runs, its table
against the runs' own summary.json files, and a rerun that reuses them."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import REPO_ROOT, TINY_NTH_FLAGS, subprocess_env

CORES, SEEDS = ("lstm", "rmc"), (0, 1)


def compare(out: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-m", "launch.compare",
       "--experiment=nth_farthest:cpu", f"--cores={','.join(CORES)}",
       f"--seeds={','.join(map(str, SEEDS))}", f"--out={out}", "--parallel=2",
       "--", "--config.num_steps=3", "--config.log_every=1",
       "--config.eval_every=1", "--config.checkpoint_every=3",
       "--config.lstm.hidden_sizes=(8,)", *TINY_NTH_FLAGS],
      cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
      timeout=600, check=False)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("compare") / "nth")
  proc = compare(out)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  return out, proc


def test_table_is_the_runs_own_numbers(grid):
  out, proc = grid
  with open(os.path.join(out, "comparison.json"), encoding="utf-8") as f:
    table = json.load(f)
  assert (table["split"], table["metric"]) == ("eval", "accuracy")
  assert table["higher_is_better"] is True
  for core in CORES:
    finals = []
    for seed in SEEDS:
      with open(os.path.join(out, f"{core}_seed{seed}", "summary.json"),
                encoding="utf-8") as f:
        summary = json.load(f)
      assert summary["core"] == core and summary["step"] == 3
      finals.append(summary["eval"]["accuracy"])
    row = table["cores"][core]
    assert row["n"] == 2
    assert row["mean"] == pytest.approx(np.mean(finals))
    assert row["std"] == pytest.approx(np.std(finals, ddof=1))
    assert (row["min"], row["max"]) == (min(finals), max(finals))
    assert f"| {core} | {row['mean']:.4g} +- {row['std']:.2g} |" in proc.stdout
  # Different seeds really are different runs.
  with open(os.path.join(out, "lstm_seed1", "config.json"),
            encoding="utf-8") as f:
    assert json.load(f)["seed"] == 1
  with open(os.path.join(out, "curves.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_rerun_reuses_the_finished_runs(grid):
  out, _ = grid
  before = {d: os.path.getmtime(os.path.join(out, d, "summary.json"))
            for d in os.listdir(out) if d.endswith(("seed0", "seed1"))}
  proc = compare(out)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.count("reused") == 4 and "started" not in proc.stdout
  after = {d: os.path.getmtime(os.path.join(out, d, "summary.json"))
           for d in before}
  assert after == before


def test_overrides_must_be_config_fields(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "launch.compare", "--experiment=nth_farthest:cpu",
       f"--out={tmp_path}", "--", "--bogus=1"], cwd=REPO_ROOT,
      env=subprocess_env(), capture_output=True, text=True, timeout=120,
      check=False)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: arguments")
