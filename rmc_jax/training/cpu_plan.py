"""How a run uses the CPU when it has no accelerator: devices and threads.

XLA runs a CPU computation on one device whose large ops (matmuls,
convolutions) are split over a pool of Eigen threads. For the small memory
cores of most of the paper's tasks the ops are too small to split well: one
single-threaded CPU device per core, the batch split over them as on any
data-parallel mesh, is faster (WORKSPACE_NOTES.md, "CPU execution plan",
gives the measurements). Large matmuls (a big LM's embeddings and softmax,
the 2,500-wide memory of C3) keep the threads.

Plans (`--config.cpu_plan`, or `--cpu_plan` of the benchmarks):
  * "threads": XLA's default, one device, multi-threaded Eigen;
  * "device_per_core": one single-threaded device per usable core;
  * "auto" (the default): "device_per_core" when the batch divides over the
    cores, the core's matmuls are small and each device gets enough of them
    (see `choose`), else "threads";
  * "off": leave XLA_FLAGS as they are (no choice made).

The plan is only applied to CPU runs: not when JAX_PLATFORMS names another
platform or an accelerator plugin (CUDA, ROCm, TPU) is installed, and not
when XLA_FLAGS already sets a device count (a multi-process run, a test).
It must be applied before JAX initialises its backends (`apply` refuses
afterwards).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
from typing import Any

PLANS = ("auto", "threads", "device_per_core", "off")
_COUNT_FLAG = "--xla_force_host_platform_device_count"
_ONE_THREAD_FLAGS = ("--xla_cpu_multi_thread_eigen=false",)
_ACCELERATOR_PACKAGES = ("jax-cuda12-plugin", "jax-cuda13-plugin",
                         "jax-rocm60-plugin", "jax-rocm7-plugin", "libtpu",
                         "libtpu-nightly")
# The widest matmul (units of a core's state that one matmul produces) below
# which one device per core beats the threaded single device; measured on
# C1-C6 of benchmarks/core_configs.py (see the module docstring).
SMALL_CORE_WIDTH = 512
# Below this much work per device (training rows per device x matmul width)
# the collectives between the devices cost more than they save. Steps/s of
# the launchers' variants against "threads" (CPU-2, 2026-12-02): lm:synthetic
# (16 rows x 64) 0.73x, rl:cpu (32 x 64) 0.96x, learn_to_execute:cpu (64 x 64)
# 0.96x, nth_farthest:cpu (128 x 128) 1.5x; C4 (16 x 256) 1.08x.
MIN_WORK_PER_DEVICE = 4096


@dataclasses.dataclass(frozen=True)
class CpuPlan:
  """A resolved plan: `name` is one of PLANS but "auto"."""

  name: str
  devices: int  # CPU devices the run will have (1 for "threads").
  reason: str

  def xla_flags(self) -> tuple[str, ...]:
    if self.name != "device_per_core":
      return ()
    return (f"{_COUNT_FLAG}={self.devices}",) + _ONE_THREAD_FLAGS


def usable_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not Linux.
    return os.cpu_count() or 1


def not_cpu_reason() -> str | None:
  """Why the plan would not apply to this process (None: a CPU run)."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms and platforms.split(",")[0].strip() != "cpu":
    return f"JAX_PLATFORMS={platforms}"
  if _COUNT_FLAG in os.environ.get("XLA_FLAGS", ""):
    return "XLA_FLAGS already sets the CPU device count"
  for package in _ACCELERATOR_PACKAGES:
    try:
      importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      continue
    return f"{package} is installed (an accelerator run)"
  return None


def core_width(core: str, core_kwargs: dict[str, Any]) -> int:
  """Widest output of the core's matmuls: the RMC's memory size, the LSTM's
  4 x hidden gates, the DNC's controller gates; 0 for unknown cores."""
  if core == "rmc":
    return int(core_kwargs.get("head_size", 0) * core_kwargs.get(
        "num_heads", 1))
  if core == "lstm":
    return 4 * max(core_kwargs.get("hidden_sizes", (0,)))
  if core == "dnc":
    return 4 * max(core_kwargs.get("controller_sizes", (0,)))
  return 0


def check(requested: str, flag: str = "--config.cpu_plan") -> None:
  if requested not in PLANS:
    raise ValueError(f"{flag}={requested!r}: expected one of {list(PLANS)}.")


def choose(requested: str, batch_sizes: tuple[int, ...], width: int,
           cores: int | None = None) -> CpuPlan:
  """Resolves `requested` (one of PLANS) for a run of these batch sizes
  (every one must divide over the devices; the first is the training
  batch) and widest matmul `width`."""
  check(requested)
  cores = cores or usable_cores()
  if requested in ("threads", "off"):
    return CpuPlan(requested, 1, "requested")
  if requested == "device_per_core":
    return CpuPlan(requested, cores, "requested")
  if cores == 1:
    return CpuPlan("threads", 1, "one usable core")
  uneven = [b for b in batch_sizes if b % cores]
  if uneven:
    return CpuPlan("threads", 1,
                   f"batch {uneven[0]} does not divide over {cores} cores")
  if not 0 < width <= SMALL_CORE_WIDTH:
    return CpuPlan("threads", 1, f"matmuls {width} wide (> "
                   f"{SMALL_CORE_WIDTH}) use the threads")
  rows = batch_sizes[0] // cores if batch_sizes else 0
  if rows * width < MIN_WORK_PER_DEVICE:
    return CpuPlan("threads", 1, f"{rows} rows x {width} per device is too "
                   "little work to split")
  return CpuPlan("device_per_core", cores,
                 f"small core (matmuls {width} wide), batch divides over "
                 f"{cores} cores")


def choose_for_process(requested: str,
                       runs: list[tuple[tuple[int, ...], int]],
                       cores: int | None = None) -> CpuPlan:
  """One plan for a process that runs several configs in turn: `choose` for
  each `(batch_sizes, width)` of `runs`; "auto" falls back to "threads"
  when they disagree or there is no core to size the plan by."""
  if requested != "auto":
    return choose(requested, (), 0, cores)
  if not runs:
    return CpuPlan("threads", 1, "no memory core to size the plan by")
  plans = [choose("auto", b, w, cores) for b, w in runs]
  if len({p.name for p in plans}) > 1:
    return CpuPlan("threads", 1, "the configs would choose different plans "
                   "(run them one at a time to give each its own)")
  return plans[0]


def apply(plan: CpuPlan) -> CpuPlan:
  """Sets XLA_FLAGS for `plan` in this process; returns what was applied
  ("off" with the reason when the plan does not apply here).

  Raises:
    RuntimeError: JAX's backends are already initialised.
  """
  skip = not_cpu_reason()
  if skip is not None:
    return CpuPlan("off", 1, skip)
  flags = plan.xla_flags()
  if not flags:
    return plan
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    raise RuntimeError("the CPU plan must be applied before JAX initialises "
                       "its backends (before the first computation).")
  os.environ["XLA_FLAGS"] = " ".join(
      [os.environ.get("XLA_FLAGS", ""), *flags]).strip()
  return plan
