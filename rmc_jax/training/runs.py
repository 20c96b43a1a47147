"""Reading a finished (or running) run directory, writing nothing into it.

A run directory holds `config.json` and `checkpoints/<step>/` (see
`rmc_jax.training.checkpoint`). `load_run` gives its config and the
parameters of its newest readable checkpoint as host arrays, without
building the task's data: the checkpoints are opened read-only. `read_history` gives its logs
(metrics.jsonl, summary.json) for plots and reports.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections

from rmc_jax.training import checkpoint as checkpoint_lib


@dataclasses.dataclass
class Run:
  """A run's config, and the parameters (NumPy arrays) of its checkpoint."""

  workdir: str
  config: ml_collections.ConfigDict
  params: Any
  step: int


def load_config(workdir: str, experiment: str | None = None
                ) -> ml_collections.ConfigDict:
  """The run's config.json over its experiment's current defaults.

  Fields added to an experiment after the run was made take their default
  values. `experiment` names the experiment of runs whose config.json
  predates the `experiment` field. Raises FileNotFoundError when there is no
  config.json, ValueError when the experiment is unknown.
  """
  from rmc_jax import experiments  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found (not a run directory?)")
  with open(path, encoding="utf-8") as f:
    saved = json.load(f)
  if not isinstance(saved, dict):
    raise ValueError(f"{path}: expected a JSON object")
  saved.setdefault("experiment", experiment)
  if saved["experiment"] is None:
    raise ValueError(f"{path} names no experiment (expected an "
                     "'experiment' field)")
  config = experiments.get(saved["experiment"]).get_config()
  config.update(saved)
  return config


def restore_params(workdir: str) -> tuple[Any, int]:
  """(params as NumPy arrays, step) of the run's newest readable checkpoint.

  The checkpoints are opened read-only: a damaged newest checkpoint is
  skipped (with a warning) but left in place, and nothing is written.

  Raises:
    FileNotFoundError: no complete checkpoint in the run.
    CheckpointDamagedError: no checkpoint can be read back.
  """
  directory = os.path.join(workdir, "checkpoints")
  with checkpoint_lib.Checkpointer(directory, read_only=True) as ckpt:
    restored = ckpt.restore_latest_good(None)
  return jax.device_get(restored.state["params"]), restored.step


def load_run(workdir: str, experiment: str | None = None) -> Run:
  """The config and latest parameters of a run; see `load_config` and
  `restore_params`."""
  config = load_config(workdir, experiment)
  params, step = restore_params(workdir)
  return Run(workdir=workdir, config=config, params=params, step=step)


def read_jsonl(path: str) -> list[dict]:
  """Reads a metrics.jsonl file (for plots and reports)."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def read_history(workdir: str) -> dict:
  """A run's logs: metrics.jsonl rows, summary.json and config.json as dicts.

  Returns {'name': the directory's name, 'rows', 'summary', 'config'}.
  """
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(metrics_path):
    raise FileNotFoundError(f"{metrics_path}: no metrics (is this a workdir?)")
  run = {"name": os.path.basename(os.path.normpath(workdir)),
         "rows": read_jsonl(metrics_path), "summary": {}, "config": {}}
  for key in ("summary", "config"):
    path = os.path.join(workdir, f"{key}.json")
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        run[key] = json.load(f)
  return run


def series(run: dict, split: str, metric: str) -> tuple[list[int], list[float]]:
  """(steps, values) of `metric` in `split`, the last value kept per step."""
  points = {r["step"]: r[metric] for r in run["rows"]
            if r["split"] == split and isinstance(r.get(metric), (int, float))}
  steps = sorted(points)
  return steps, [points[s] for s in steps]
