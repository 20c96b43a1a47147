"""Encoder-decoder model and loss for Learning to Execute.

The encoder runs a core over the one-hot program characters with its `unroll`,
masked per sample so that each state stops after its program's last character
(Sonnet's `dynamic_rnn` with sequence lengths). The decoder is the same core,
started from that state, run for T_out steps on zero inputs (non-autoregressive,
the paper's best) or on the shifted targets (teacher forcing). Every decoder
output goes through an MLP with ReLU after every layer (the paper's 4 x 256),
then a Linear to the logits.

Loss: softmax cross-entropy averaged over the real (unpadded) target
characters. Metrics: per-character accuracy over real characters and
whole-sequence accuracy (every character of a target right).
"""

from __future__ import annotations

from typing import Any, Mapping

import haiku as hk
import jax
import jax.numpy as jnp
import optax

from rmc_jax.cores import make_core
from rmc_jax.tasks import learn_to_execute as lte


def encode(core: hk.RNNCore, tokens_in_BT: jax.Array,
           lengths_in_B: jax.Array) -> Any:
  """The core's state after each program's last character.

  Args:
    core: the core, run over the one-hot characters [T_in, B, V] by its
      `unroll` from `initial_state(B)`.
    tokens_in_BT: int [B, T_in] program characters, padded after each length.
    lengths_in_B: int [B] program lengths in [1, T_in].

  Returns:
    The core's state (leaves [B, ...]): the steps at t >= lengths_in_B[b]
    are masked out, so row b stops at its own last character.
  """
  b, t_in = tokens_in_BT.shape
  inputs_TBV = jax.nn.one_hot(tokens_in_BT.T, lte.VOCAB_SIZE)
  mask_TB = lte.length_mask(lengths_in_B, t_in, bool).T
  _, state = core.unroll(inputs_TBV, core.initial_state(b), mask_TB=mask_TB)
  return state


def forward(batch: lte.LTEBatch, core_name: str,
            core_kwargs: Mapping[str, Any], mlp_sizes: tuple[int, ...],
            teacher_forcing: bool) -> jax.Array:
  """An LTEBatch ([B, T] arrays) -> logits [B, T_out, V] (in hk.transform).

  The core reads the batch time-major: one transpose each way.
  """
  b, t_out = batch.tokens_out.shape
  core = make_core(core_name, **core_kwargs)
  state = encode(core, batch.tokens_in, batch.lengths_in)
  if teacher_forcing:
    dec_TBV = jax.nn.one_hot(batch.decoder_inputs.T, lte.VOCAB_SIZE)
  else:
    dec_TBV = jnp.zeros((t_out, b, lte.VOCAB_SIZE))
  outputs_TBO, _ = core.unroll(dec_TBV, state)
  head = hk.nets.MLP(list(mlp_sizes), activate_final=True, name="head_mlp")
  logits_TBV = hk.Linear(lte.VOCAB_SIZE, name="logits")(head(outputs_TBO))
  return jnp.swapaxes(logits_TBV, 0, 1)


def loss_and_metrics(logits_BTV: jax.Array, batch: lte.LTEBatch
                     ) -> tuple[jax.Array, dict]:
  """Masked cross-entropy and per-character / per-sequence accuracy."""
  targets_BT = batch.tokens_out
  mask_BT = lte.length_mask(batch.lengths_out, targets_BT.shape[1],
                            jnp.float32)
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
