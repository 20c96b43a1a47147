"""Reading a finished (or running) run directory, writing nothing into it.

A run directory holds `config.json` and `checkpoints/<step>/` (see
`rmc_jax.training.checkpoint`). `load_run` gives its config and the
parameters of a checkpoint as host arrays, without building the task's data
and without opening a checkpoint manager (which may create or clean
directories): the step's files are only read. `read_history` gives its logs
(metrics.jsonl, summary.json) for plots and reports.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from rmc_jax.training import checkpoint as checkpoint_lib


@dataclasses.dataclass
class Run:
  """A run's config, and the parameters (NumPy arrays) of one checkpoint."""

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


def complete_steps(workdir: str) -> list[int]:
  """The steps with a complete checkpoint in `workdir`, ascending."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit() and
                os.path.exists(os.path.join(directory, d,
                                            checkpoint_lib.COMMIT_MARKER)))


def restore_params(workdir: str, step: int | None = None) -> tuple[Any, int]:
  """(params as NumPy arrays, step) of checkpoint `step` (default: latest).

  Only the parameters are read (not the optimizer state).

  Raises:
    FileNotFoundError: no complete checkpoint (for `step`) in the run.
  """
  steps = complete_steps(workdir)
  if step is None and steps:
    step = steps[-1]
  if step is None or step not in steps:
    raise FileNotFoundError(
        f"no complete checkpoint{'' if step is None else f' for step {step}'}"
        f" in {os.path.join(workdir, 'checkpoints')}")
  path = os.path.abspath(os.path.join(workdir, "checkpoints", str(step),
                                      checkpoint_lib.STATE_ITEM))
  with ocp.PyTreeCheckpointer() as reader:
    tree = reader.metadata(path).item_metadata.tree
    item = {"params": jax.tree.map(lambda m: np.zeros(m.shape, m.dtype),
                                   tree["params"])}
    restore_args = jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    restored = reader.restore(path, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
  return restored["params"], int(step)


def load_run(workdir: str, step: int | None = None,
             experiment: str | None = None) -> Run:
  """The config and checkpoint parameters of a run; see `load_config` and
  `restore_params`."""
  config = load_config(workdir, experiment)
  params, step = restore_params(workdir, step)
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
