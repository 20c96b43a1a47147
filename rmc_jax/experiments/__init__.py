"""One module per experiment, chosen by name.

An experiment module (e.g. `rmc_jax.experiments.nth_farthest`) is the one
home of its experiment and defines:

  NAME:                 the registry name, also `config.experiment`;
  VARIANTS:             the names `get_config` accepts;
  get_config(variant):  an `ml_collections.ConfigDict` (from
                        `rmc_jax.training.config.base_config`);
  validate(config):     raises `ConfigError` naming the bad field;
  make_task(config):    validates, then builds the `Task` the training stack
                        runs;
  RESULTS:              a `ResultsSpec`: what the results page reports.

The built-in experiments are registered below; another one is a new module
plus one `register(NAME, module)` call. Configs are named on the command line
as `--config=NAME:VARIANT` (or a config file path, `FILE.py:VARIANT`).
"""

from __future__ import annotations

import importlib
import os
import types

import ml_collections

from rmc_jax.experiments.base import ResultsSpec
from rmc_jax.training.config import ConfigError
from rmc_jax.training.task import Task

__all__ = ["ConfigError", "ResultsSpec", "config_file", "get", "get_config",
           "make_task", "names", "register"]

_BUILTIN = ("nth_farthest", "learn_to_execute", "lm", "rl")
_REGISTRY: dict[str, types.ModuleType] = {}


def register(name: str, module: types.ModuleType) -> None:
  """Makes `module` (an experiment module, see above) available as `name`."""
  for attr in ("VARIANTS", "get_config", "validate", "make_task"):
    if not hasattr(module, attr):
      raise ValueError(f"experiment module {module.__name__} lacks {attr!r}")
  _REGISTRY[name] = module


def names() -> list[str]:
  return sorted(set(_BUILTIN) | set(_REGISTRY))


def get(name: str) -> types.ModuleType:
  """The experiment module registered as `name`."""
  if name not in _REGISTRY and name in _BUILTIN:
    register(name, importlib.import_module(f"rmc_jax.experiments.{name}"))
  if name not in _REGISTRY:
    raise ValueError(f"unknown experiment {name!r}; expected one of "
                     f"{names()}")
  return _REGISTRY[name]


def config_file(spec: str) -> str:
  """`NAME[:VARIANT]` -> `/path/of/its/module.py[:VARIANT]`; paths unchanged.

  What `--config=` takes: an experiment's name (and variant), or a config
  file (relative to the working directory or absolute) with an optional
  `:VARIANT`.
  """
  name, sep, variant = spec.partition(":")
  if name.endswith(".py") or os.sep in name:
    return spec
  path = get(name).__file__
  return path + sep + variant


def get_config(spec: str) -> ml_collections.ConfigDict:
  """The config of `NAME[:VARIANT]` (the experiment's default variant if
  none is given)."""
  name, _, variant = spec.partition(":")
  module = get(name)
  return module.get_config(variant) if variant else module.get_config()


def make_task(config: ml_collections.ConfigDict) -> Task:
  """Validates `config` and builds the Task of `config.experiment`."""
  if "experiment" not in config:
    raise ConfigError("the config names no experiment (expected a "
                      "'experiment' field, as get_config sets)")
  try:
    module = get(config.experiment)
  except ValueError as e:
    raise ConfigError(f"--config.experiment: {e}") from None
  return module.make_task(config)
