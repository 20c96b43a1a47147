"""Word-level language model: embedding -> memory core -> (adaptive) softmax.

The recurrent state is carried across truncated-BPTT segments by the caller
(`TrainState.carry` in the training loop): `forward` takes the state at the
start of the segment and returns the state at its end (gradients stopped),
and resets the lanes whose `reset_B` flag is set (start of an epoch) to the
core's initial state first.
"""

from __future__ import annotations

from typing import Any, Mapping

import haiku as hk
import jax
import jax.numpy as jnp

from rmc_jax.cores import make_core, select_state
from rmc_jax.lm.adaptive_softmax import AdaptiveSoftmax, FullSoftmax


class LanguageModel(hk.Module):
  """Embedding, a core from `make_core`, dropout and a (adaptive) softmax.

  Parameters: `embed/embeddings` [V, E]; the core's (under its own name);
  `output_projection` [H, E] only when tying embeddings (the softmax then
  reuses the embedding matrix); the softmax layer's.
  """

  def __init__(self, vocab_size: int, embed_size: int, core_name: str,
               core_kwargs: Mapping[str, Any], softmax: str = "adaptive",
               cutoffs: tuple[int, ...] = (), div_value: float = 4.0,
               input_dropout: float = 0.0, output_dropout: float = 0.0,
               tie_embeddings: bool = False, adaptive_packed: bool = False,
               name: str | None = "lm"):
    super().__init__(name=name)
    if softmax not in ("adaptive", "full"):
      raise ValueError(f"softmax must be 'adaptive' or 'full', got {softmax!r}.")
    if tie_embeddings and softmax != "full":
      raise ValueError("tie_embeddings needs softmax='full'.")
    self.vocab_size = vocab_size
    self.tie_embeddings = tie_embeddings
    self._input_dropout = input_dropout
    self._output_dropout = output_dropout
    self.embed = hk.Embed(vocab_size, embed_size, name="embed")
    self.core = make_core(core_name, **core_kwargs)
    if tie_embeddings:
      self._projection = hk.Linear(embed_size, name="output_projection")
    elif softmax == "full":
      self._softmax = FullSoftmax(vocab_size, name="softmax")
    else:
      # Packed tails compute each tail cluster only for the rows whose
      # target is in it (much less memory for 200k-word tails).
      self._softmax = AdaptiveSoftmax(vocab_size, tuple(cutoffs), div_value,
                                      name="softmax",
                                      compute_tail_for_all=not adaptive_packed)

  def initial_state(self, batch_size: int) -> Any:
    return self.core.initial_state(batch_size)

  def __call__(self, inputs_BT: jax.Array, targets_BT: jax.Array,
               reset_B: jax.Array, state: Any, is_training: bool
               ) -> tuple[jax.Array, Any]:
    """Returns (per-token negative log-likelihood [B, T], final state)."""
    b, t = inputs_BT.shape
    state = select_state(reset_B, self.core.initial_state(b), state)
    x_TBE = self.embed(inputs_BT.T)
    if is_training and self._input_dropout:
      x_TBE = hk.dropout(hk.next_rng_key(), self._input_dropout, x_TBE)
    h_TBH, state = self.core.unroll(x_TBE, state)
    if is_training and self._output_dropout:
      h_TBH = hk.dropout(hk.next_rng_key(), self._output_dropout, h_TBH)
    h_NH = jnp.swapaxes(h_TBH, 0, 1).reshape(b * t, -1)
    targets_N = targets_BT.reshape(-1)
    if self.tie_embeddings:
      logits_NV = self._projection(h_NH) @ self.embed.embeddings.T
      nll_N = -jnp.take_along_axis(jax.nn.log_softmax(logits_NV),
                                   targets_N[:, None], axis=-1)[:, 0]
    else:
      nll_N = self._softmax.nll(h_NH, targets_N)
    return nll_N.reshape(b, t), jax.lax.stop_gradient(state)

  def next_token_log_probs(self, inputs_B: jax.Array, state: Any
                           ) -> tuple[jax.Array, Any]:
    """One step for sampling: (log-probabilities [B, V], next state)."""
    h_BH, state = self.core(self.embed(inputs_B), state)
    if self.tie_embeddings:
      logits = self._projection(h_BH) @ self.embed.embeddings.T
      return jax.nn.log_softmax(logits), state
    return self._softmax.log_probs(h_BH), state
