"""What every launcher does around the training loop.

Validates the config (a bad value is one line on stderr and exit code 2),
initialises multi-host JAX on `--distributed`, builds the task, trains, and
turns a non-finite loss into a one-line error with exit code 1.
"""

from __future__ import annotations

import json
import logging as py_logging
import sys
from typing import Any, Callable

from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from rmc_jax.training import config as config_lib
from rmc_jax.training.config import ConfigError
from rmc_jax.training.loop import NonFiniteLossError, Task, evaluate_checkpoint, train
from rmc_jax.training.mesh import DataMesh

__all__ = ["ConfigError", "run"]

_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Call jax.distributed.initialize() first (one process per host; "
    "coordinator and process ids come from the cluster environment).")


def run(make_task: Callable[[], Task], config: ml_collections.ConfigDict,
        workdir: str,
        validate: Callable[[ml_collections.ConfigDict], None] | None = None,
        final_evals: Callable[[], dict[str, Any]] | None = None,
        eval_only: bool = False) -> dict:
  """Validates, builds the task, trains in `workdir`; exits on bad input.

  `final_evals() -> {split: batches}` are evaluated on the last checkpoint
  after training (e.g. the LM's test split). With `eval_only`, training is
  skipped and the latest checkpoint is evaluated on the task's eval batches
  and on `final_evals`.
  """
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  logging.set_verbosity(logging.INFO)
  # Orbax narrates every save at INFO; keep its warnings, drop the rest.
  logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= py_logging.WARNING or "/orbax/" not in r.pathname)
  try:
    config_lib.validate(config)
    if validate is not None:
      validate(config)
    mesh = DataMesh()
    mesh.check_batch_size(config.batch_size, "--config.batch_size")
    if "eval_batch_size" in config:
      mesh.check_batch_size(config.eval_batch_size, "--config.eval_batch_size")
    task = make_task()
    _check_model_builds(task)
  except ValueError as e:  # ConfigError and the library's argument checks.
    _fail(str(e), code=2)
  summary = {}
  if not eval_only:
    try:
      summary = train(task, config, workdir, mesh)
    except NonFiniteLossError as e:
      _fail(str(e), code=1)
    if summary["status"] != "completed":
      return summary
  evals = dict(final_evals() if final_evals else {})
  if eval_only:
    evals = {"eval": task.eval_batches, **evals}
  for split, batches in evals.items():
    try:
      summary[split] = evaluate_checkpoint(task, config, workdir, batches,
                                           split, mesh)
    except FileNotFoundError as e:
      _fail(str(e), code=2)
  if eval_only:
    print(json.dumps(summary, indent=1, default=str))
    return summary
  if jax.process_index() == 0:
    print(json.dumps({k: summary[k] for k in
                      ("status", "step", "num_params", "steps_per_sec",
                       "train", "eval", *evals) if k in summary},
                     indent=1, default=str))
  return summary


def _check_model_builds(task: Task) -> None:
  """Traces the model's init once (no compute), so that a bad core or model
  argument is reported here as one line, before anything is written."""
  position = task.train_iterator.get_state()
  example = next(task.train_iterator)
  task.train_iterator.set_state(position)
  jax.eval_shape(task.init, jax.random.PRNGKey(0), example)


def define_config_flag(default: str):
  """`--config=FILE:VARIANT` with `--config.field=value` overrides.

  ml_collections reads the overrides from sys.argv as soon as the flag is
  defined; an unknown field then raises there, so it is reported here.
  """
  try:
    return config_flags.DEFINE_config_file(
        "config", default, "Config file and variant.", lock_config=True)
  except (AttributeError, KeyError) as e:
    bad = [a.split("=")[0] for a in sys.argv[1:] if a.startswith("--config.")]
    _fail(f"unknown config field {e} among {bad}; see the config file for the "
          "fields.", code=2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that reports a bad `--config.*` override in one line.

  Use as `app.run(main, flags_parser=common.parse_flags)`.
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e), code=2)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    _fail(f"bad config override among {bad}: {e}", code=2)


def _fail(message: str, code: int):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)
