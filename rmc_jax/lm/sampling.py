"""Sampling text from a trained language model, carrying its recurrent state."""

from __future__ import annotations

from typing import Any, Callable

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from rmc_jax.lm.model import LanguageModel


def sample(params: Any, make_model: Callable[[], LanguageModel],
           prompt_ids: np.ndarray, length: int, temperature: float = 1.0,
           top_k: int = 0, seed: int = 0) -> np.ndarray:
  """Continues `prompt_ids` ([P] int32, P >= 1) by `length` sampled tokens.

  `make_model()` builds the trained LanguageModel (inside hk.transform). The
  prompt is read with the state carried, then tokens are drawn one at a time
  from softmax(log_probs / temperature), restricted to the top_k most likely
  when top_k > 0.
  """
  def step(token_B, state):
    return make_model().next_token_log_probs(token_B, state)

  step_fn = jax.jit(hk.without_apply_rng(hk.transform(step)).apply)
  state = hk.transform(lambda: make_model().initial_state(1)).apply({}, None)
  log_probs = None
  for token in prompt_ids:
    log_probs, state = step_fn(params, jnp.asarray([token], jnp.int32), state)
  rng = jax.random.PRNGKey(seed)
  out = []
  for _ in range(length):
    logits = log_probs[0] / max(temperature, 1e-6)
    if top_k:
      threshold = jax.lax.top_k(logits, top_k)[0][-1]
      logits = jnp.where(logits < threshold, -jnp.inf, logits)
    rng, key = jax.random.split(rng)
    token = int(jax.random.categorical(key, logits))
    out.append(token)
    log_probs, state = step_fn(params, jnp.asarray([token], jnp.int32), state)
  return np.asarray(out, np.int32)
