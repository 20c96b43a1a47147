"""What the launchers share: the `--config` flag and one-line failures.

`--config=NAME:VARIANT` names an experiment of `rmc_jax.experiments` (e.g.
`nth_farthest:cpu`); `--config=FILE.py[:VARIANT]` a config file. Fields are
overridden with `--config.field=value` (nested: `--config.rmc.head_size=16`).
A bad value is one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from rmc_jax import experiments
from rmc_jax.training import checkpoint

_CONFIG_PREFIX = "--config="

# What opening or writing a run directory raises, each with a one-line message.
RUN_ERRORS = (checkpoint.CheckpointNotFoundError,
              checkpoint.CheckpointMismatchError,
              checkpoint.CheckpointDamagedError, checkpoint.CheckpointDirError,
              checkpoint.CheckpointSaveError)


def define_config_flag(default: str | None = None):
  """The `--config` flag (see the module docstring), resolved by
  `parse_flags`; `default` is a NAME:VARIANT or a file."""
  try:
    resolved = experiments.config_file(default) if default else None
    return config_flags.DEFINE_config_file(
        "config", resolved,
        "NAME:VARIANT of an experiment (" + ", ".join(experiments.names())
        + ") or FILE.py[:VARIANT].", lock_config=True)
  except (AttributeError, KeyError) as e:
    bad = [a.split("=")[0] for a in sys.argv[1:] if a.startswith("--config.")]
    fail(f"unknown config field {e} among {bad}; see the experiment's "
         "get_config for the fields.")
  except ValueError as e:
    fail(f"--config: {e}")


def _resolve_config_args(argv: list[str]) -> list[str]:
  """argv with `--config=NAME:VARIANT` (or `--config NAME:VARIANT`) turned
  into the experiment module's file, as ml_collections reads it."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith(_CONFIG_PREFIX):
      out[i] = _CONFIG_PREFIX + experiments.config_file(
          arg[len(_CONFIG_PREFIX):])
    elif arg == "--config" and i + 1 < len(out):
      out[i + 1] = experiments.config_file(out[i + 1])
  return out


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that reports a bad `--config` in one line.

  Use as `app.run(main, flags_parser=common.parse_flags)`.
  """
  try:
    return flags.FLAGS(_resolve_config_args(argv))
  except flags.Error as e:
    fail(str(e))
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    bad = [a for a in argv[1:] if a.startswith("--config")]
    fail(f"bad --config among {bad}: {str(e).strip().splitlines()[-1]}")


def fail(message: str, code: int = 2):
  """One line on stderr, then exit with `code` (2: bad input)."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)
