"""Nth farthest: `--config=nth_farthest:VARIANT`.

Variants:
  paper:  the paper's task (8 objects x 16 features, batch 1600) with an RMC
          of 2048 total units (8 slots x 8 heads x 32), unit gating, 1 block.
  sonnet: Sonnet's example script as it actually runs (4 objects x 4
          features, batch 1600, its flag quirk: N=4, H=4, 4 blocks,
          head_size 2048, so F = 8192), with Sonnet's generator semantics.
  cpu:    a small setting in which the RMC leaves the plateau within minutes
          on a 2-core CPU (see WORKSPACE_NOTES.md for how it was chosen).
All use Adam on Sonnet's schedule unless overridden.

Batches: (inputs_BTD float32 [B, K, F + 3K], labels_B int32 [B]), one object
per time step (T = K); the model reads them time-major through the core.
"""

from __future__ import annotations

import functools

import haiku as hk
import ml_collections

from rmc_jax.experiments.base import ResultsSpec
from rmc_jax.tasks import nth_farthest as data
from rmc_jax.training import config as config_lib
from rmc_jax.training import precision
from rmc_jax.training.config import ConfigError
from rmc_jax.training.mesh import process_rows
from rmc_jax.training.task import ProcessRows, take_rows, Task

NAME = "nth_farthest"
VARIANTS = ("paper", "sonnet", "cpu")
RESULTS = ResultsSpec(
    title="Nth farthest", split="eval", metric="accuracy",
    higher_is_better=True, metrics={"accuracy": "held-out accuracy"},
    # 8 objects x 16 features: held-out accuracy.
    paper={"rmc": "~91%", "lstm": "< 30%", "dnc": "< 30%"})


def get_config(variant: str = "cpu") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ConfigError(f"unknown {NAME} variant {variant!r}; expected one of "
                      f"{VARIANTS}")
  c = config_lib.base_config(NAME)
  c.num_objects = 8
  c.num_features = 16
  c.sonnet_compat = False
  # Curriculum over objects: start with min_objects (0 = off) and add one
  # every objects_step steps until num_objects.
  c.min_objects = 0
  c.objects_step = 0
  c.mlp_sizes = (256, 256, 256, 256)
  c.eval_batches = 4
  c.eval_batch_size = 1600
  # Sonnet: max(1e-4 * 0.9**(step / 10_000), 8e-5).
  c.learning_rate = 1e-4
  c.min_learning_rate = 8e-5
  c.lr_decay_steps = 10_000
  c.lr_decay_rate = 0.9
  c.batch_size = 1600
  c.num_steps = 1_000_000
  c.log_every = 100
  c.eval_every = 2_000
  c.checkpoint_every = 2_000
  c.rmc.update(mem_slots=8, num_heads=8, head_size=32, gate_style="unit")
  c.lstm.hidden_sizes = (1024,)

  if variant == "sonnet":
    c.num_objects = 4
    c.num_features = 4
    c.sonnet_compat = True
    c.rmc.update(mem_slots=4, num_heads=4, num_blocks=4, head_size=2048)
  elif variant == "cpu":
    c.num_objects = 3
    c.num_features = 2
    c.batch_size = 256
    c.learning_rate = 5e-4
    c.min_learning_rate = 0.0
    c.lr_decay_steps = 0
    c.num_steps = 2_500
    c.log_every = 50
    c.eval_every = 250
    c.checkpoint_every = 500
    c.eval_batches = 4
    c.eval_batch_size = 512
    c.rmc.update(mem_slots=4, num_heads=4, head_size=32)
    c.lstm.hidden_sizes = (512,)
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  config_lib.validate(config)
  if config.num_objects < 2 or config.num_features < 1:
    raise ConfigError(
        f"--config.num_objects={config.num_objects} and --config.num_features="
        f"{config.num_features}: expected num_objects >= 2 and "
        "num_features >= 1.")
  if config.eval_batches < 0 or config.eval_batch_size < 1:
    raise ConfigError("--config.eval_batches must be >= 0 and "
                      "--config.eval_batch_size >= 1.")


def make_task(config: ml_collections.ConfigDict) -> Task:
  validate(config)
  spec = data.NthFarthestSpec(config.num_objects, config.num_features,
                              config.sonnet_compat)
  model = hk.transform(precision.scoped(
      functools.partial(data.forward, core_name=config.core,
                        core_kwargs=config_lib.core_kwargs(config),
                        mlp_sizes=tuple(config.mlp_sizes),
                        num_classes=spec.num_classes), config.precision))

  def init(rng, batch):
    return model.init(rng, batch[0])

  def loss(params, carry, rng, batch):
    inputs_BTD, labels_B = batch
    value, metrics = data.loss_and_metrics(
        model.apply(params, rng, inputs_BTD), labels_B)
    return value, (metrics, carry)

  def evaluate(params, carry, batch):
    inputs_BTD, labels_B = batch
    value, metrics = data.loss_and_metrics(
        model.apply(params, None, inputs_BTD), labels_B)
    return dict(metrics, loss=value), carry

  # Every process generates the global batch and keeps its rows: a small
  # fraction of a step (see WORKSPACE_NOTES.md).
  iterator = ProcessRows(data.NthFarthestIterator(
      config.batch_size, spec.num_objects, spec.num_features,
      spec.sonnet_compat, seed=config.seed,
      min_objects=config.min_objects or None,
      objects_step=config.objects_step), process_rows(config.batch_size))
  splits = {}
  if config.eval_batches:
    rows = process_rows(config.eval_batch_size)
    splits["eval"] = [take_rows(batch, rows) for batch in data.held_out_batches(
        config.eval_batches, config.eval_batch_size, spec.num_objects,
        spec.num_features, spec.sonnet_compat, seed=config.seed)]
  return Task(init=init, loss=loss, train_iterator=iterator,
              evaluate=evaluate, eval_splits=splits)
