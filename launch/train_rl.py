r"""Trains an actor-critic agent with any memory core on Mini PacMan or BoxWorld.

  python -m launch.train_rl --config=launch/configs/rl.py:cpu --workdir=workdirs/rl_rmc
  python -m launch.train_rl --config=launch/configs/rl.py:cpu --workdir=workdirs/rl_lstm \
      --config.core=lstm
  python -m launch.train_rl --config=launch/configs/rl.py:cpu --workdir=workdirs/rl_random \
      --config.random_policy=true --config.num_steps=200      # the random-policy baseline

metrics.jsonl holds `episode_return` (mean return of the episodes that ended
in each log window) per step; `python -m launch.plot --metric=episode_return
--split=train ...` draws the curves.
"""

from absl import app
from absl import flags

from launch import common
from rmc_jax.rl import learner

_CONFIG = common.define_config_flag("launch/configs/rl.py:cpu")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.",
                               required=True)


def main(argv):
  del argv
  config = _CONFIG.value
  common.run(lambda: learner.make_task(config), config, _WORKDIR.value,
             validate=_validate)


def _validate(config):
  if config.unroll_length < 1:
    raise common.ConfigError(f"--config.unroll_length={config.unroll_length}: "
                             "expected a positive integer.")
  if not 0 <= config.discount <= 1:
    raise common.ConfigError(f"--config.discount={config.discount}: expected "
                             "a value in [0, 1].")
  learner.make_env(config)  # Unknown env or bad env_kwargs: one-line error.


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
