"""A fifth experiment, as a user would add one: this module plus one
`rmc_jax.experiments.register` call.

Task: read T random vectors with a core and predict their sum (a
regression; the metric is the mean squared error).
"""

import haiku as hk
import jax.numpy as jnp
import ml_collections
import numpy as np

from rmc_jax.cores import make_core
from rmc_jax.training import config as config_lib
from rmc_jax.training.config import ConfigError
from rmc_jax.training.task import Task

NAME = "toy_sum"
VARIANTS = ("tiny",)


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ConfigError(f"unknown {NAME} variant {variant!r}")
  c = config_lib.base_config(NAME)
  c.core = "lstm"
  c.lstm.hidden_sizes = (8,)
  c.num_vectors = 3
  c.width = 2
  c.batch_size = 8
  c.num_steps = 3
  c.log_every = 1
  c.eval_every = 3
  c.checkpoint_every = 3
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  config_lib.validate(config)
  if config.num_vectors < 1:
    raise ConfigError(f"--config.num_vectors={config.num_vectors}: expected "
                      ">= 1.")


class _Batches:
  """Seeded batches (x_BTD, target_BD) with a saveable position."""

  def __init__(self, config):
    self._config, self._index = config, 0

  def __next__(self):
    c = self._config
    rng = np.random.default_rng([c.seed, self._index])
    self._index += 1
    x_BTD = rng.normal(size=(c.batch_size, c.num_vectors, c.width))
    return x_BTD.astype(np.float32), x_BTD.sum(1).astype(np.float32)

  def get_state(self):
    return {"index": self._index}

  def set_state(self, state):
    self._index = int(state["index"])


def make_task(config: ml_collections.ConfigDict) -> Task:
  validate(config)

  def forward(x_BTD):
    core = make_core(config.core, **config_lib.core_kwargs(config))
    out_TBO, _ = core.unroll(jnp.swapaxes(x_BTD, 0, 1),
                             core.initial_state(x_BTD.shape[0]))
    return hk.Linear(config.width)(out_TBO[-1])

  model = hk.without_apply_rng(hk.transform(forward))

  def mse(params, batch):
    x_BTD, target_BD = batch
    return jnp.mean((model.apply(params, x_BTD) - target_BD) ** 2)

  def loss(params, carry, rng, batch):
    del rng
    return mse(params, batch), ({}, carry)

  def evaluate(params, carry, batch):
    return {"loss": mse(params, batch)}, carry

  held_out = _Batches(config.copy_and_resolve_references())
  held_out.set_state({"index": 10**6})
  return Task(init=lambda rng, batch: model.init(rng, batch[0]), loss=loss,
              train_iterator=_Batches(config), evaluate=evaluate,
              eval_splits={"eval": [next(held_out)]})
