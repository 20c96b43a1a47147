"""The experiment registry, `--config=NAME:VARIANT`, and a fifth experiment
added through the public API and trained through the launcher."""

import json
import os
import subprocess
import sys

import pytest

from rmc_jax import experiments
from rmc_jax.training.config import ConfigError
from tests import toy_experiment
from tests.helpers import REPO_ROOT, subprocess_env


@pytest.mark.parametrize("name", ["nth_farthest", "learn_to_execute", "lm",
                                  "rl"])
def test_every_variant_is_named_and_valid(name):
  module = experiments.get(name)
  for variant in module.VARIANTS:
    config = experiments.get_config(f"{name}:{variant}")
    assert config.experiment == name
    if "data_dir" in config and config.dataset != "synthetic":
      config.data_dir = "/data"  # The one field a real corpus needs.
    module.validate(config)
  assert experiments.config_file(f"{name}:cpu") == module.__file__ + ":cpu"
  assert module.RESULTS.metric in module.RESULTS.metrics


def test_lte_cpu_control_is_cpu_with_control_at_one_digit():
  """The grid behind docs/results.md's control numbers ran `cpu` with
  `--config.task=control --config.max_length=1`: the variant must be it."""
  cpu = experiments.get_config("learn_to_execute:cpu").to_dict()
  control = experiments.get_config("learn_to_execute:cpu_control").to_dict()
  differ = {k for k in cpu.keys() | control.keys()
            if cpu.get(k) != control.get(k)}
  assert differ == {"task", "max_length"}
  assert (control["task"], control["max_length"]) == ("control", 1)


def test_unknown_names_are_one_line_errors():
  with pytest.raises(ValueError, match="unknown experiment 'bogus'"):
    experiments.get("bogus")
  with pytest.raises(ConfigError, match="unknown nth_farthest variant"):
    experiments.get_config("nth_farthest:bogus")
  config = experiments.get_config("nth_farthest:cpu")
  config.num_objects = 1
  # The library validates: a notebook gets the launcher's one-line error.
  with pytest.raises(ConfigError, match=r"--config\.num_objects=1"):
    experiments.make_task(config)


def test_file_paths_pass_through():
  assert experiments.config_file("my/config.py:x") == "my/config.py:x"
  assert experiments.config_file("cfg.py") == "cfg.py"


_TOY_MAIN = """
import sys
from rmc_jax import experiments
from tests import toy_experiment
experiments.register(toy_experiment.NAME, toy_experiment)  # The one line.
from launch import train
train.cli()
"""


def test_a_registered_toy_experiment_trains_through_the_launcher(tmp_path):
  workdir = str(tmp_path / "toy")
  proc = subprocess.run(
      [sys.executable, "-c", _TOY_MAIN, "--config=toy_sum:tiny",
       f"--workdir={workdir}", "--config.lstm.hidden_sizes=(4,)"],
      cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
      timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  printed = json.loads(proc.stdout)
  assert printed["status"] == "completed" and printed["step"] == 3
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    summary = json.load(f)
  assert summary["step"] == 3 and summary["eval"]["loss"] > 0
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    config = json.load(f)
  assert config["experiment"] == "toy_sum"
  assert config["lstm"]["hidden_sizes"] == [4]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3"]
  # The registered module is the experiment, also for reading the run back.
  experiments.register(toy_experiment.NAME, toy_experiment)
  from rmc_jax.training import runs  # pylint: disable=g-import-not-at-top
  run = runs.load_run(workdir)
  assert run.step == 3 and run.config.num_vectors == 3


def test_rl_variants_select_the_convlstm_baseline():
  from rmc_jax.training import steps  # pylint: disable=g-import-not-at-top
  from rmc_jax.training.mesh import DataMesh  # pylint: disable=g-import-not-at-top
  for variant in ("mini_pacman_viewport", "mini_pacman_full",
                  "boxworld_viewport"):
    config = experiments.get_config(f"rl:{variant}")
    assert config.env_kwargs.observation_type == "rgb"  # The paper's pixels.
  config = experiments.get_config("rl:cpu")
  config.update(core="convlstm", batch_size=4, unroll_length=3,
                conv_channels=(4,), head_hidden=(8,))
  config.convlstm.channels = (4,)
  task = experiments.make_task(config)
  mesh = DataMesh()
  state = steps.init_train_state(task, config, mesh)
  names = "\n".join(state.params)
  assert "conv_lstm" in names
  train_step = steps.make_train_step(task, config, mesh, state)
  _, metrics = train_step(state, ())
  assert float(metrics["loss"]) == float(metrics["loss"])  # Finite, not NaN.
  # Cores an experiment has no settings for are refused by name.
  nth = experiments.get_config("nth_farthest:cpu")
  nth.core = "convlstm"
  with pytest.raises(ConfigError, match=r"--config\.core='convlstm'"):
    experiments.make_task(nth)
