r"""Trains a memory core on the Nth-farthest task.

  python -m launch.train_nth_farthest --config=launch/configs/nth_farthest.py:cpu \
      --workdir=workdirs/nth_rmc [--config.core=lstm] [--config.num_steps=5000]

Rerunning the same command on a workdir with checkpoints resumes from the latest.
"""

from absl import app
from absl import flags

from launch import common
from rmc_jax.tasks import nth_farthest

_CONFIG = common.define_config_flag("launch/configs/nth_farthest.py:cpu")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.",
                               required=True)


def main(argv):
  del argv
  config = _CONFIG.value
  common.run(lambda: nth_farthest.make_task(config), config, _WORKDIR.value,
             validate=_validate)


def _validate(config):
  if config.num_objects < 2 or config.num_features < 1:
    raise common.ConfigError(
        f"--config.num_objects={config.num_objects} and --config.num_features="
        f"{config.num_features}: expected num_objects >= 2 and "
        "num_features >= 1.")
  if config.eval_batches < 0 or config.eval_batch_size < 1:
    raise common.ConfigError("--config.eval_batches must be >= 0 and "
                             "--config.eval_batch_size >= 1.")


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
