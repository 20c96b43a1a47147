"""What the launchers share: the `--config` flag and one-line failures.

`--config=NAME:VARIANT` names an experiment of `rmc_jax.experiments` (e.g.
`nth_farthest:cpu`); `--config=FILE.py[:VARIANT]` a config file. Fields are
overridden with `--config.field=value` (nested: `--config.rmc.head_size=16`);
only existing fields can be set, so a misspelt field is an error. The
exceptions are the fields of OPEN_FIELDS, keyword arguments that the library
checks where it uses them (a corpus reader's options, an environment's
arguments): `--config.reader_options.download=true` adds a key to them (the
value is read as a Python literal, `true`/`false` as booleans, anything else
as a string). A bad value is one line on stderr and exit code 2.

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

import ast
import re
import sys
from typing import Any

from absl import flags
import jax
from ml_collections import config_flags

from rmc_jax import experiments
from rmc_jax.training import checkpoint
from rmc_jax.training import config as config_lib
from rmc_jax.training import cpu_plan

_CONFIG_PREFIX = "--config="

# Dict-valued config fields that take new keys from the command line (see the
# module docstring); a bad key is reported by the code that receives them.
OPEN_FIELDS = ("reader_options", "env_kwargs")
_OPEN_OVERRIDE = re.compile(
    r"--config\.(%s)\.(\w+)=(.*)" % "|".join(OPEN_FIELDS), re.DOTALL)
# The command line ml_collections reads the --config.* overrides from: the
# real one without the overrides of OPEN_FIELDS (`parse_flags` applies those).
_CONFIG_ARGV: list[str] = []

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


def apply_cpu_plan(config) -> cpu_plan.CpuPlan:
  """Chooses and applies `config.cpu_plan` (first thing in `main`, before
  any computation) and records the choice in `config.cpu_plan`."""
  module = experiments.get(config.experiment)
  width = max(cpu_plan.core_width(config.core,
                                  config_lib.core_kwargs(config)),
              getattr(module, "matmul_width", lambda c: 0)(config))
  batches = [config.batch_size // max(config.grad_accum_steps, 1)]
  if "eval_batch_size" in config:
    batches.append(config.eval_batch_size)
  try:
    chosen = cpu_plan.choose(config.cpu_plan, tuple(batches), width)
  except ValueError as e:  # An unknown plan name.
    fail(str(e))
  plan = cpu_plan.apply(chosen)
  config.cpu_plan = plan.name
  return plan


def define_config_flag(default: str | None = None):
  """The `--config` flag (see the module docstring), resolved by
  `parse_flags`; `default` is a NAME:VARIANT or a file."""
  _CONFIG_ARGV[:] = _split_open_overrides(sys.argv)[0]
  try:
    resolved = experiments.config_file(default) if default else None
    return config_flags.DEFINE_config_file(
        "config", resolved,
        "NAME:VARIANT of an experiment (" + ", ".join(experiments.names())
        + ") or FILE.py[:VARIANT].", lock_config=True, sys_argv=_CONFIG_ARGV)
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


def _split_open_overrides(argv: list[str]
                          ) -> tuple[list[str], list[tuple[str, str, str]]]:
  """(argv without the `--config.FIELD.KEY=VALUE` flags of OPEN_FIELDS,
  their (FIELD, KEY, VALUE) in command-line order)."""
  rest, overrides = [], []
  for arg in argv:
    match = _OPEN_OVERRIDE.fullmatch(arg)
    if match:
      overrides.append(match.groups())
    else:
      rest.append(arg)
  return rest, overrides


def _literal(text: str) -> Any:
  """A flag value as ml_collections reads an untyped one: `true`/`false`,
  a Python literal, or else the string itself."""
  try:
    return ast.literal_eval(text.capitalize() if text in ("true", "false")
                            else text)
  except (SyntaxError, ValueError):
    return text


def _set_open_fields(config, overrides: list[tuple[str, str, str]]) -> None:
  """Applies `--config.FIELD.KEY=VALUE` flags of OPEN_FIELDS (new keys
  allowed; an existing key keeps its type)."""
  for field, key, text in overrides:
    flag = f"--config.{field}.{key}"
    if config is None:
      fail(f"{flag} needs --config=NAME:VARIANT (or FILE.py[:VARIANT]).")
    if field not in config:
      fail(f"unknown config field {field!r} in {flag}; see the experiment's "
           "get_config for the fields.")
    try:
      with config.unlocked():
        config[field][key] = _literal(text)
    except TypeError as e:
      fail(f"{flag}={text}: {e}")


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that reports a bad `--config` in one line.

  Use as `app.run(main, flags_parser=common.parse_flags)`.
  """
  argv, open_overrides = _split_open_overrides(argv)
  _CONFIG_ARGV[:] = argv
  try:
    rest = flags.FLAGS(_resolve_config_args(argv))
  except flags.Error as e:
    fail(str(e))
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    bad = [a for a in argv[1:] if a.startswith("--config")]
    # ml_collections wraps a missing field's KeyError in an AttributeError;
    # str() of a KeyError would quote its newlines.
    reason = e.args[0] if e.args else e
    if isinstance(reason, KeyError) and reason.args:
      reason = reason.args[0]
    fail(f"bad --config among {bad}: {' '.join(str(reason).split())}")
  _set_open_fields(flags.FLAGS["config"].value, open_overrides)
  return rest


PLOT_INSTALL_HINT = "pip install -e .[plot]"


def pyplot():
  """matplotlib.pyplot on the Agg backend (files only); without matplotlib,
  one line naming the `plot` extra and exit code 2."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError:
    fail("plots need matplotlib, which is not installed; install the "
         f"optional extra: {PLOT_INSTALL_HINT}")
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def fail(message: str, code: int = 2):
  """One line on stderr, then exit with `code` (2: bad input)."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)
