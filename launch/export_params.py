r"""Exports the latest parameters of a run, with its config, as one .npz file.

  python -m launch.export_params --workdir=workdirs/nth_rmc --out=nth_rmc.npz

Keys are Haiku's parameter names, 'module/path/param' (e.g.
'relational_memory/block_0/qkv/w'), plus '__config__' (the run's config as
JSON) and '__step__'. `rmc_jax.training.runs.load_exported(FILE)` gives back
(config, params) without the run directory. The run directory is only read.
"""

import os

from absl import app
from absl import flags

from launch import common
from rmc_jax.training import runs

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.", required=True)
_OUT = flags.DEFINE_string("out", None, ".npz file to write.", required=True)


def main(argv):
  del argv
  out_dir = os.path.dirname(os.path.abspath(_OUT.value))
  if not os.path.isdir(out_dir):
    common.fail(f"--out: the directory {out_dir} does not exist")
  try:
    run = runs.load_run(_WORKDIR.value)
  except (*common.RUN_ERRORS, FileNotFoundError, ValueError) as e:
    common.fail(f"--workdir: {e}")
  try:
    count = runs.export_params(run, _OUT.value)
  except (OSError, ValueError) as e:
    common.fail(f"--out: {e}")
  print(f"wrote {count} parameters of {run.config.experiment!r} step "
        f"{run.step} to {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
