r"""Trains (or evaluates) any experiment of `rmc_jax.experiments`.

  python -m launch.train --config=nth_farthest:cpu --workdir=workdirs/nth_rmc
  python -m launch.train --config=nth_farthest:cpu --workdir=workdirs/nth_lstm \
      --config.core=lstm --config.num_steps=5000
  python -m launch.train --config=learn_to_execute:cpu --workdir=workdirs/lte \
      --config.task=copy
  python -m launch.train --config=lm:wikitext103 --config.data_dir=DIR \
      --workdir=workdirs/wt103_rmc [--config.eval_only=true]
  python -m launch.train --config=rl:cpu --workdir=workdirs/rl_rmc
  python -m launch.local_cluster --num_processes=2 --devices_per_process=2 \
      -- python -m launch.train --config=nth_farthest:cpu --workdir=DIR
  srun ... python -m launch.train --distributed --config=... --workdir=DIR

Rerunning the same command on a workdir with checkpoints resumes from the
latest readable checkpoint (a damaged one is moved to checkpoints/damaged/).
After training, the final parameters are evaluated on every held-out split
(the LM's valid and test splits); `--config.eval_only=true` evaluates the
latest checkpoint instead of training. Bad input (a bad flag, a checkpoint of
another model, an unusable --workdir) is one line on stderr and exit code 2;
a non-finite loss stops the run with exit code 1.

Multi-process runs (`--distributed`, or `--coordinator_address`,
`--num_processes` and `--process_id`; see launch/common.py): every process
runs this same command on the same --workdir (a shared filesystem); each
reads only its own rows of every batch, all take part in each checkpoint,
and only process 0 writes logs, metrics and summary.json.
"""

from __future__ import annotations

import json
import logging as py_logging

from absl import app
from absl import flags
from absl import logging
import jax

from launch import common
from rmc_jax import experiments
from rmc_jax.training import loop
from rmc_jax.training.mesh import DataMesh
from rmc_jax.training.task import Task

_CONFIG = common.define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.",
                               required=True)
common.define_distributed_flags()

_SUMMARY_KEYS = ("status", "step", "num_params", "steps_per_sec", "train")


def main(argv):
  del argv
  config = _CONFIG.value
  if config is None:
    common.fail("--config is required: NAME:VARIANT with NAME one of "
                f"{experiments.names()}, or FILE.py[:VARIANT].")
  plan = common.apply_cpu_plan(config)
  common.initialize_distributed()
  logging.set_verbosity(logging.INFO)
  logging.info("CPU plan: %s (%s).", plan.name, plan.reason)
  # Orbax narrates every save at INFO; keep its warnings, drop the rest.
  logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= py_logging.WARNING or "/orbax/" not in r.pathname)
  try:
    task = experiments.make_task(config)
    mesh = DataMesh()
    mesh.check_batch_size(config.batch_size, "--config.batch_size")
    if "eval_batch_size" in config:
      mesh.check_batch_size(config.eval_batch_size, "--config.eval_batch_size")
    _check_model_builds(task)
  except ValueError as e:  # ConfigError and the library's argument checks.
    common.fail(str(e))
  if config.eval_only:
    try:
      results = loop.evaluate_run(task, config, _WORKDIR.value, mesh)
    except common.RUN_ERRORS as e:
      common.fail(str(e))
    print(json.dumps(results, indent=1, default=str))
    return
  try:
    summary = loop.train(task, config, _WORKDIR.value, mesh).summary
  except loop.NonFiniteLossError as e:
    common.fail(str(e), code=1)
  except common.RUN_ERRORS as e:
    common.fail(str(e))
  if jax.process_index() == 0:
    keys = _SUMMARY_KEYS + tuple(task.eval_splits)
    print(json.dumps({k: summary[k] for k in keys if k in summary},
                     indent=1, default=str))


def _check_model_builds(task: Task) -> None:
  """Traces the model's init once (no compute), so that a bad core or model
  argument is reported here as one line, before anything is written."""
  jax.eval_shape(task.init, jax.random.PRNGKey(0), task.example_batch())


def cli():
  app.run(main, flags_parser=common.parse_flags)


if __name__ == "__main__":
  cli()
