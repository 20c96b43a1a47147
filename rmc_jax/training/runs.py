"""Reading a finished (or running) run directory, writing nothing into it.

A run directory holds `config.json` and `checkpoints/<step>/` (see
`rmc_jax.training.checkpoint`). `load_run` gives its config and the
parameters of its newest readable checkpoint as host arrays, without
building the task's data: the checkpoints are opened read-only. `read_history` gives its logs
(metrics.jsonl, summary.json) for plots and reports, `spread` the statistics
of a metric over seeds, `grid_run_dir` / `grid_runs` where a `launch.compare`
grid keeps its runs. `export_params` writes a
run's parameters and config into one .npz file, which `load_exported` reads
back without the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any

import jax
import ml_collections
import numpy as np

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
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found (not a run directory?)")
  with open(path, encoding="utf-8") as f:
    return _config_over_defaults(json.load(f), path, experiment)


def _config_over_defaults(saved: Any, path: str, experiment: str | None
                          ) -> ml_collections.ConfigDict:
  """A saved config (a JSON object) over its experiment's defaults."""
  from rmc_jax import experiments  # pylint: disable=g-import-not-at-top
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


# Keys of an export that are not parameters.
EXPORT_CONFIG_KEY = "__config__"
EXPORT_STEP_KEY = "__step__"


def export_params(run: Run, path: str) -> int:
  """Writes the run's parameters to the .npz file `path`; returns their count.

  One array per parameter, keyed 'module/path/param': Haiku's module name
  with its '/~/' separators written as '/', then the parameter name (e.g.
  'relational_memory/block_0/qkv/w' for Haiku's
  'relational_memory/~/block_0/~/qkv' and 'w'; each module's docstring lists
  its names), plus EXPORT_CONFIG_KEY (the run's config as JSON) and
  EXPORT_STEP_KEY (the checkpoint's step). Read it back with
  `load_exported`, or with `np.load` anywhere.
  """
  arrays = {}
  for module, module_params in run.params.items():
    module_path = module.replace("/~/", "/")
    if module_path.replace("/", "/~/") != module:
      raise ValueError(f"module name {module!r} does not map to a "
                       "'module/path' key and back")
    for name, value in module_params.items():
      value = np.asarray(value)
      if value.dtype.kind == "V":
        raise ValueError(f"parameter {module}/{name} has dtype {value.dtype}, "
                         "which .npz files do not record")
      arrays[f"{module_path}/{name}"] = value
  arrays[EXPORT_CONFIG_KEY] = np.asarray(run.config.to_json())
  arrays[EXPORT_STEP_KEY] = np.asarray(run.step)
  with open(path, "wb") as f:  # np.savez(path) would append '.npz'.
    np.savez(f, **arrays)
  return len(arrays) - 2


def load_exported(path: str) -> tuple[ml_collections.ConfigDict, dict]:
  """(config, Haiku params) of a file written by `export_params`.

  The config is laid over its experiment's current defaults (as
  `load_config`); the params are {module: {name: NumPy array}}, what the
  experiment's model takes. Raises FileNotFoundError, or ValueError when
  `path` is not such a file.
  """
  try:
    data = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} not found") from None
    raise ValueError(f"{path}: not an .npz file ({e})") from None
  with data:
    if EXPORT_CONFIG_KEY not in data.files:
      raise ValueError(f"{path}: not a parameter export (no "
                       f"{EXPORT_CONFIG_KEY!r} entry)")
    config = _config_over_defaults(json.loads(str(data[EXPORT_CONFIG_KEY])),
                                   path, None)
    params = {}
    for key in data.files:
      if key not in (EXPORT_CONFIG_KEY, EXPORT_STEP_KEY):
        module_path, name = key.rsplit("/", 1)
        params.setdefault(module_path.replace("/", "/~/"), {})[name] = data[key]
  return config, params


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


def spread(values: list[float]) -> dict:
  """mean, std (n - 1 in the denominator; 0 for one value), min, max, n."""
  n = len(values)
  mean = sum(values) / n
  std = (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
         if n > 1 else 0.0)
  return dict(mean=mean, std=std, min=min(values), max=max(values), n=n)


_GRID_RUN = re.compile(r"^(?P<core>[a-z0-9]+)_seed(?P<seed>\d+)$")


def grid_run_dir(grid: str, core: str, seed: int) -> str:
  """The run of (core, seed) in a `launch.compare` grid directory."""
  return os.path.join(grid, f"{core}_seed{seed}")


def grid_runs(grid: str) -> list[tuple[str, int, str]]:
  """(core, seed, run directory) of every run in a grid directory, sorted by
  core and seed; empty when `grid` is not a directory."""
  names = os.listdir(grid) if os.path.isdir(grid) else []
  return sorted((m["core"], int(m["seed"]), os.path.join(grid, name))
                for name in names if (m := _GRID_RUN.match(name)))
