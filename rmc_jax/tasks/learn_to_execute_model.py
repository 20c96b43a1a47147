"""Encoder-decoder model, loss and Task for Learning to Execute (spec section 3).

The encoder runs a core over the one-hot program characters, freezing its
state after each program's last character (Sonnet's `dynamic_rnn` with
sequence lengths). The decoder is the same core, started from that state, run
for T_out steps on zero inputs (non-autoregressive, the paper's best) or on
the shifted targets (teacher forcing). Every decoder output goes through an
MLP of 4 x 256 with ReLU after every layer, then a Linear to the logits.

Loss: softmax cross-entropy averaged over the real (unpadded) target
characters. Metrics: per-character accuracy over real characters and
whole-sequence accuracy (every character of a target right).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmc_jax.cores import make_core, select_state
from rmc_jax.tasks import learn_to_execute as lte
from rmc_jax.training import config as config_lib
from rmc_jax.training.loop import Task


def masked_unroll(core: hk.RNNCore, inputs_TBD: jax.Array, mask_TB: jax.Array,
                  state: Any) -> Any:
  """Runs `core` over time, keeping the state unchanged where mask is 0.

  Returns the state after each sequence's last unmasked step.
  """

  def step(state, xs):
    x_BD, m_B = xs
    _, new_state = core(x_BD, state)
    return select_state(m_B > 0, new_state, state), None

  state, _ = hk.scan(step, state, (inputs_TBD, mask_TB))
  return state


def forward(batch: Mapping[str, jax.Array], core_name: str,
            core_kwargs: Mapping[str, Any], mlp_sizes: tuple[int, ...],
            teacher_forcing: bool) -> jax.Array:
  """Batch-major token batch -> logits [B, T_out, V] (inside hk.transform)."""
  tokens_in_BT = batch["tokens_in"]
  b, t_in = tokens_in_BT.shape
  t_out = batch["tokens_out"].shape[1]
  core = make_core(core_name, **core_kwargs)
  inputs_TBV = jax.nn.one_hot(tokens_in_BT.T, lte.VOCAB_SIZE)
  mask_in_TB = (jnp.arange(t_in)[:, None] < batch["lengths_in"][None, :])
  state = masked_unroll(core, inputs_TBV, mask_in_TB.astype(jnp.float32),
                        core.initial_state(b))
  if teacher_forcing:
    dec_TBV = jax.nn.one_hot(batch["decoder_inputs"].T, lte.VOCAB_SIZE)
  else:
    dec_TBV = jnp.zeros((t_out, b, lte.VOCAB_SIZE))
  outputs_TBO, _ = core.unroll(dec_TBV, state)
  head = hk.nets.MLP(list(mlp_sizes), activate_final=True, name="head_mlp")
  logits_TBV = hk.Linear(lte.VOCAB_SIZE, name="logits")(head(outputs_TBO))
  return jnp.swapaxes(logits_TBV, 0, 1)


def loss_and_metrics(logits_BTV: jax.Array, batch: Mapping[str, jax.Array]
                     ) -> tuple[jax.Array, dict]:
  """Masked cross-entropy and per-character / per-sequence accuracy."""
  targets_BT = batch["tokens_out"]
  t_out = targets_BT.shape[1]
  mask_BT = (jnp.arange(t_out)[None, :]
             < batch["lengths_out"][:, None]).astype(jnp.float32)
  ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV,
                                                          targets_BT)
  num_chars = jnp.maximum(mask_BT.sum(), 1.0)
  loss = (ce_BT * mask_BT).sum() / num_chars
  correct_BT = (jnp.argmax(logits_BTV, -1) == targets_BT).astype(jnp.float32)
  char_accuracy = (correct_BT * mask_BT).sum() / num_chars
  wrong_B = ((1.0 - correct_BT) * mask_BT).sum(-1)
  sequence_accuracy = (wrong_B == 0).astype(jnp.float32).mean()
  return loss, {"char_accuracy": char_accuracy,
                "sequence_accuracy": sequence_accuracy}


def batch_major(batch: lte.LTEBatch) -> dict[str, np.ndarray]:
  """An LTEBatch as a dict of batch-major arrays (the loop splits axis 0)."""
  return {"tokens_in": batch.tokens_in.T, "tokens_out": batch.tokens_out.T,
          "decoder_inputs": batch.decoder_inputs.T,
          "lengths_in": batch.lengths_in, "lengths_out": batch.lengths_out}


class _BatchMajorIterator:
  """Yields the LTE iterator's batches batch-major; same saveable position."""

  def __init__(self, iterator: lte.LearnToExecuteIterator):
    self.iterator = iterator

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return batch_major(next(self.iterator))

  def get_state(self) -> dict:
    return self.iterator.get_state()

  def set_state(self, state: dict) -> None:
    self.iterator.set_state(state)


def make_task(config: Any) -> Task:
  """The training-loop Task for a launcher config (launch/configs/learn_to_execute.py)."""
  iterator = lte.LearnToExecuteIterator(
      config.batch_size, config.task, config.max_length, config.max_nesting,
      curriculum=config.curriculum, seed=config.seed,
      loss_threshold=config.curriculum_loss_threshold,
      min_tries=config.curriculum_min_tries)
  model = hk.transform(functools.partial(
      forward, core_name=config.core,
      core_kwargs=config_lib.core_kwargs(config),
      mlp_sizes=tuple(config.mlp_sizes),
      teacher_forcing=config.teacher_forcing))

  def loss(params, carry, rng, batch):
    value, metrics = loss_and_metrics(model.apply(params, rng, batch), batch)
    return value, (metrics, carry)

  def evaluate(params, carry, batch):
    value, metrics = loss_and_metrics(model.apply(params, None, batch), batch)
    return dict(metrics, loss=value), carry

  def observe(train_metrics):
    iterator.update_curriculum(train_metrics["loss"])

  eval_set = iterator.eval_batch(config.eval_samples)
  size = config.eval_batch_size
  eval_batches = [batch_major(eval_set.slice(i, i + size))
                  for i in range(0, config.eval_samples, size)]
  return Task(init=lambda rng, batch: model.init(rng, batch), loss=loss,
              train_iterator=_BatchMajorIterator(iterator), evaluate=evaluate,
              eval_batches=eval_batches, observe=observe)
