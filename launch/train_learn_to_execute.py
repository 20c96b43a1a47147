r"""Trains a memory core on a Learning to Execute task.

  python -m launch.train_learn_to_execute \
      --config=launch/configs/learn_to_execute.py:cpu --workdir=workdirs/lte_add \
      [--config.task=copy --config.max_nesting=1] [--config.core=lstm]

Rerunning the same command on a workdir with checkpoints resumes from the latest.
"""

from absl import app
from absl import flags

from launch import common
from rmc_jax.tasks import learn_to_execute as lte
from rmc_jax.tasks import learn_to_execute_model

_CONFIG = common.define_config_flag("launch/configs/learn_to_execute.py:cpu")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.",
                               required=True)


def main(argv):
  del argv
  config = _CONFIG.value
  common.run(lambda: learn_to_execute_model.make_task(config), config,
             _WORKDIR.value, validate=_validate)


def _validate(config):
  tasks = [t.value.lower() for t in lte.TaskType]
  if str(config.task).lower() not in tasks:
    raise common.ConfigError(f"--config.task={config.task!r}: expected one of "
                             f"{tasks}.")
  if config.eval_samples < 1 or config.eval_samples % config.eval_batch_size:
    raise common.ConfigError(
        f"--config.eval_samples={config.eval_samples} must be a positive "
        f"multiple of --config.eval_batch_size={config.eval_batch_size}.")


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
