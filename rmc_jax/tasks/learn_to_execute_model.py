"""Encoder-decoder model and loss for Learning to Execute.

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

from typing import Any, Mapping

import haiku as hk
import jax
import jax.numpy as jnp
import optax

from rmc_jax.cores import make_core, select_state
from rmc_jax.tasks import learn_to_execute as lte


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


def forward(batch: lte.LTEBatch, core_name: str,
            core_kwargs: Mapping[str, Any], mlp_sizes: tuple[int, ...],
            teacher_forcing: bool) -> jax.Array:
  """An LTEBatch ([B, T] arrays) -> logits [B, T_out, V] (in hk.transform).

  The core reads the batch time-major: one transpose each way.
  """
  tokens_in_BT = batch.tokens_in
  b, t_in = tokens_in_BT.shape
  t_out = batch.tokens_out.shape[1]
  core = make_core(core_name, **core_kwargs)
  inputs_TBV = jax.nn.one_hot(tokens_in_BT.T, lte.VOCAB_SIZE)
  mask_in_TB = lte.length_mask(batch.lengths_in, t_in, jnp.float32).T
  state = masked_unroll(core, inputs_TBV, mask_in_TB, core.initial_state(b))
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
