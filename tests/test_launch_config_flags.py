"""The launcher's `--config.*` flags: keys added to the open dict fields
(reader_options, env_kwargs) reach the run, misspelt fields do not pass.

Each case is one launcher subprocess; they run at once. The LM run is tiny
(2 steps of a 16-unit LSTM on a 3,000-token synthetic corpus).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from launch import common
from tests.helpers import REPO_ROOT, subprocess_env

TINY_LM = ("--config=lm:synthetic", "--config.core=lstm",
           "--config.lstm.hidden_sizes=(16,)", "--config.embed_size=16",
           "--config.batch_size=4", "--config.eval_batch_size=4",
           "--config.unroll_length=8", "--config.num_steps=2",
           "--config.log_every=1", "--config.eval_every=2",
           "--config.checkpoint_every=2",
           "--config.reader_options.train_tokens=3000",
           "--config.reader_options.valid_tokens=200",
           "--config.reader_options.test_tokens=200")

# {case: (flags, substrings of the one error line; None: the run succeeds)}.
CASES = {
    # 'alpha' is a synthetic-corpus option that lm:synthetic does not set.
    "new_reader_option": (
        [*TINY_LM, "--config.reader_options.alpha=0.25"], None),
    "misspelt_reader_option": (
        [*TINY_LM, "--config.reader_options.alpah=0.25"],
        ["'alpah'", "alpha"]),
    "misspelt_open_field": (
        [*TINY_LM, "--config.reader_optionz.alpha=0.25"],
        ["reader_optionz"]),
    "open_field_of_another_experiment": (
        [*TINY_LM, "--config.env_kwargs.viewport=3"], ["'env_kwargs'"]),
    "misspelt_top_level_field": (
        [*TINY_LM, "--config.num_stepz=3"], ["num_stepz", "num_steps"]),
    "misspelt_core_argument": (
        [*TINY_LM, "--config.lstm.hidden_size=(8,)"], ["hidden_size"]),
    "existing_key_keeps_its_type": (
        [*TINY_LM, "--config.reader_options.train_tokens=many"],
        ["--config.reader_options.train_tokens=many"]),
    "misspelt_env_argument": (
        ["--config=rl:cpu", "--config.env_kwargs.room_sise=5"],
        ["room_sise"]),
}


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
  root = tmp_path_factory.mktemp("config_flags")
  procs = {}
  for name, (flags, _) in CASES.items():
    workdir = root / name
    cache = ([f"--config.cache_dir={root / 'cache'}"]
             if flags[0] == "--config=lm:synthetic" else [])
    cmd = [sys.executable, "-m", "launch.train", *flags, *cache,
           f"--workdir={workdir}"]
    procs[name] = (subprocess.Popen(cmd, cwd=REPO_ROOT, env=subprocess_env(),
                                    stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True), workdir)
  results = {}
  for name, (proc, workdir) in procs.items():
    try:
      _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      proc.kill()
      _, stderr = proc.communicate()
    results[name] = (proc.returncode, stderr, workdir)
  return results


def test_a_new_key_of_an_open_field_reaches_the_run(launched):
  returncode, stderr, workdir = launched["new_reader_option"]
  assert returncode == 0, stderr[-3000:]
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    saved = json.load(f)
  assert saved["reader_options"] == dict(
      num_words=32, order=2, branching=3, eos_prob=0.05, seed=0,
      train_tokens=3000, valid_tokens=200, test_tokens=200, alpha=0.25)


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][1]])
def test_misspellings_are_one_error_line(launched, case):
  returncode, stderr, workdir = launched[case]
  assert returncode == 2, stderr[-3000:]
  assert "Traceback" not in stderr, stderr[-3000:]
  errors = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, stderr[-3000:]
  for word in CASES[case][1]:
    assert word in errors[0], (word, errors[0])
  assert not os.path.exists(workdir)


def test_open_field_values_read_as_literals():
  argv = ["prog", "--config=lm:synthetic", "--config.reader_options.download=true",
          "--config.env_kwargs.mode=regular", "--config.rmc.head_size=8",
          "--config.reader_options.split_names={'valid': 'test'}"]
  rest, overrides = common._split_open_overrides(argv)  # pylint: disable=protected-access
  assert rest == ["prog", "--config=lm:synthetic", "--config.rmc.head_size=8"]
  assert [(field, key, common._literal(text))  # pylint: disable=protected-access
          for field, key, text in overrides] == [
              ("reader_options", "download", True), ("env_kwargs", "mode", "regular"),
              ("reader_options", "split_names", {"valid": "test"})]
