"""What the launchers share: the `--config` flag and one-line failures.

`--config=NAME:VARIANT` names an experiment of `rmc_jax.experiments` (e.g.
`nth_farthest:cpu`); `--config=FILE.py[:VARIANT]` a config file. Fields are
overridden with `--config.field=value` (nested: `--config.rmc.head_size=16`).
A bad value is one line on stderr and exit code 2.

Multi-process runs: `define_distributed_flags()` adds the flags that join a
launcher to a JAX cluster, `initialize_distributed()` (first thing in `main`)
acts on them:

  --distributed                  read coordinator, process count and id
                                 from the cluster environment (TPU pod,
                                 Slurm, Open MPI);
  --coordinator_address=HOST:PORT --num_processes=N --process_id=I
                                 give them explicitly (all three or none;
                                 `python -m launch.local_cluster` passes
                                 them).
"""

from __future__ import annotations

import sys

from absl import flags
import jax
from ml_collections import config_flags

from rmc_jax import experiments
from rmc_jax.training import checkpoint

_CONFIG_PREFIX = "--config="

# What opening or writing a run directory raises, each with a one-line message.
RUN_ERRORS = (checkpoint.CheckpointNotFoundError,
              checkpoint.CheckpointMismatchError,
              checkpoint.CheckpointDamagedError, checkpoint.CheckpointDirError,
              checkpoint.CheckpointSaveError)


# A process whose peer stopped sending heartbeats for this long is declared
# dead and every process of the job stops with an error (instead of waiting
# in a collective forever); a stopping process waits at most
# _SHUTDOWN_TIMEOUT_S for the others to stop too.
_HEARTBEAT_TIMEOUT_S = 20
_SHUTDOWN_TIMEOUT_S = 30


def define_distributed_flags():
  """The multi-process flags (see the module docstring)."""
  flags.DEFINE_bool(
      "distributed", False,
      "Join a multi-process run, one process per host: coordinator address, "
      "process count and id come from the cluster environment (TPU pod, "
      "Slurm, Open MPI), unless given by the three flags below.")
  flags.DEFINE_string(
      "coordinator_address", None,
      "HOST:PORT of process 0's coordination service (with --num_processes "
      "and --process_id).")
  flags.DEFINE_integer("num_processes", None,
                       "Number of processes of the run (with "
                       "--coordinator_address).")
  flags.DEFINE_integer("process_id", None,
                       "This process's id in [0, --num_processes).")


def initialize_distributed() -> None:
  """Joins the cluster the multi-process flags describe; nothing without them.

  Call before any computation. Selects the gloo collectives for CPU devices
  (the setting only affects the CPU backend). Bad combinations fail in one
  line (exit code 2), as does a coordinator that cannot be reached.
  """
  address = flags.FLAGS.coordinator_address
  num_processes = flags.FLAGS.num_processes
  process_id = flags.FLAGS.process_id
  explicit = (address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      fail("--coordinator_address, --num_processes and --process_id go "
           "together: give all three (or none, with --distributed, to read "
           "them from the cluster environment).")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
      fail(f"--coordinator_address={address!r}: expected HOST:PORT.")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      fail(f"--num_processes={num_processes} --process_id={process_id}: "
           "expected num_processes >= 1 and 0 <= process_id < "
           "num_processes.")
  elif not flags.FLAGS.distributed:
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(
        coordinator_address=address, num_processes=num_processes,
        process_id=process_id,
        heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT_S,
        shutdown_timeout_seconds=_SHUTDOWN_TIMEOUT_S)
  except (RuntimeError, ValueError) as e:
    fail("cannot join the multi-process run: "
         + " ".join(str(e).split())[:300])


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
