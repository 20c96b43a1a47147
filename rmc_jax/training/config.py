"""Config fields shared by every experiment, their validation and the optimiser they define.

Experiment modules (`rmc_jax.experiments.*`) start from `base_config(NAME)`
and add their task's fields; users override any of them with
`--config.field=value`.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import optax

from rmc_jax.cores import CORES
from rmc_jax.training import cpu_plan
from rmc_jax.training import precision as precision_lib


class ConfigError(ValueError):
  """A config value is invalid; the message names the field and what is expected."""


def base_config(experiment: str) -> ml_collections.ConfigDict:
  """The shared fields, with per-core constructor arguments under their names."""
  c = ml_collections.ConfigDict()
  c.experiment = experiment  # Its module in rmc_jax.experiments.
  # Evaluate the run's latest checkpoint on every split instead of training.
  c.eval_only = False
  c.core = "rmc"
  c.seed = 0
  c.num_steps = 1000
  c.batch_size = 64
  c.learning_rate = 1e-3
  # Exponential decay lr * rate**(step / decay_steps), floored at
  # min_learning_rate (Sonnet's schedule); lr_decay_steps = 0 keeps lr constant.
  c.min_learning_rate = 0.0
  c.lr_decay_steps = 0
  c.lr_decay_rate = 0.9
  c.grad_clip_norm = 0.0  # Global L2 norm; 0 disables clipping.
  # Gradients of grad_accum_steps micro-batches (batch_size / k rows each)
  # averaged into one update: a k-times larger batch on the same memory.
  c.grad_accum_steps = 1
  # float32 or bfloat16 (bfloat16 matmuls, float32 parameters, states and
  # loss; see rmc_jax/training/precision.py).
  c.precision = "float32"
  c.log_every = 100
  c.eval_every = 1000
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  # Split every large parameter and its Adam moments over the devices
  # instead of replicating them (see steps.state_shardings).
  c.shard_params = False
  # CPU devices and threads when there is no accelerator: auto, threads,
  # device_per_core or off (rmc_jax/training/cpu_plan.py). A launcher
  # replaces "auto" by its choice, which config.json then records.
  c.cpu_plan = "auto"
  c.rmc = ml_collections.ConfigDict(dict(
      mem_slots=4, head_size=32, num_heads=4, num_blocks=1,
      gate_style="unit", attention_mlp_layers=2, key_size=None,
      forget_bias=1.0, input_bias=0.0,
      # None: the core's choice (RelationalMemory's remat docstring).
      remat=ml_collections.config_dict.placeholder(bool)), type_safe=False)
  c.lstm = ml_collections.ConfigDict(dict(
      hidden_sizes=(512,), skip_connections=False), type_safe=False)
  c.dnc = ml_collections.ConfigDict(dict(
      memory_size=16, word_size=16, num_reads=4, num_writes=1,
      controller="lstm", controller_sizes=(128, 128), clip_value=20.0),
      type_safe=False)
  return c


def core_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Constructor arguments of the chosen core (`config[config.core]`)."""
  return dict(config[config.core]) if config.core in config else {}


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the shared fields; raises ConfigError naming the bad one."""
  usable = sorted(name for name in CORES if name in config)
  if config.core not in usable:
    raise ConfigError(f"--config.core={config.core!r}: expected one of "
                      f"{usable}.")
  for field in ("num_steps", "batch_size", "log_every", "eval_every",
                "checkpoint_every", "keep_checkpoints", "grad_accum_steps"):
    value = config[field]
    if not isinstance(value, int) or value < 1:
      raise ConfigError(f"--config.{field}={value!r}: expected a positive "
                        "integer.")
  try:
    cpu_plan.check(config.get("cpu_plan", "auto"))
    precision_lib.check(config.precision)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if config.batch_size % config.grad_accum_steps:
    raise ConfigError(f"--config.batch_size={config.batch_size} must be a "
                      "multiple of --config.grad_accum_steps="
                      f"{config.grad_accum_steps}.")
  if not config.learning_rate > 0:
    raise ConfigError(f"--config.learning_rate={config.learning_rate!r}: "
                      "expected a positive number.")
  if config.min_learning_rate < 0 or config.lr_decay_steps < 0:
    raise ConfigError("--config.min_learning_rate and --config.lr_decay_steps "
                      "must be >= 0.")
  if config.grad_clip_norm < 0:
    raise ConfigError(f"--config.grad_clip_norm={config.grad_clip_norm!r}: "
                      "expected >= 0 (0 disables clipping).")


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """lr * rate**(step/decay_steps) floored at min_learning_rate, or constant."""
  lr = config.learning_rate
  if not config.lr_decay_steps:
    return optax.constant_schedule(lr)
  # With rate < 1, end_value is a floor: Sonnet's max(lr * rate**(t/T), min_lr).
  return optax.exponential_decay(lr, config.lr_decay_steps, config.lr_decay_rate,
                                 staircase=False,
                                 end_value=config.min_learning_rate or None)


def make_optimizer(config: ml_collections.ConfigDict
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Adam on the config's schedule, after optional global-norm clipping."""
  schedule = learning_rate_schedule(config)
  parts = []
  if config.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  parts.append(optax.adam(schedule))
  return optax.chain(*parts), schedule
