"""Sampling text from a trained language model, carrying its recurrent state."""

from __future__ import annotations

from typing import Any, Callable

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from rmc_jax.lm.model import LanguageModel


def check_options(temperature: float, top_k: int, top_p: float) -> None:
  """Raises ValueError unless temperature > 0, top_k >= 0 and 0 < top_p <= 1."""
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature!r}")
  if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) \
      or top_k < 0:
    raise ValueError(f"top_k must be an integer >= 0 (0: all tokens), got "
                     f"{top_k!r}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1] (1: all tokens), got {top_p!r}")


def filter_logits(log_probs_V: jax.Array, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """The logits [V] that `sample` draws a token from.

  In order: the log-probabilities are divided by `temperature`; with
  top_k > 0 only the top_k most likely tokens are kept (ties with the k-th
  are kept too); with top_p < 1 only the nucleus of what remains is kept:
  the smallest set of most likely tokens whose probability (after the two
  steps before) is at least top_p. Removed tokens get -inf.
  """
  logits_V = log_probs_V / temperature
  if top_k:
    threshold = jax.lax.top_k(logits_V, top_k)[0][-1]
    logits_V = jnp.where(logits_V < threshold, -jnp.inf, logits_V)
  if top_p < 1:
    order_V = jnp.argsort(-logits_V)
    probs_V = jax.nn.softmax(logits_V[order_V])
    # A token is in the nucleus when the tokens before it hold less than top_p.
    mass_before_V = jnp.concatenate([jnp.zeros((1,), probs_V.dtype),
                                     jnp.cumsum(probs_V)[:-1]])
    keep_V = jnp.zeros(logits_V.shape, bool).at[order_V].set(
        mass_before_V < top_p)
    logits_V = jnp.where(keep_V, logits_V, -jnp.inf)
  return logits_V


def sample(params: Any, make_model: Callable[[], LanguageModel],
           prompt_ids: np.ndarray, length: int, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> np.ndarray:
  """Continues `prompt_ids` ([P] int32, P >= 1) by `length` sampled tokens.

  `make_model()` builds the trained LanguageModel (inside hk.transform). The
  prompt is read with the state carried, then tokens are drawn one at a time
  from `filter_logits(log_probs, temperature, top_k, top_p)`: top_k=1 is
  greedy decoding. Raises ValueError for bad options (`check_options`).
  """
  check_options(temperature, top_k, top_p)

  def step(token_B, state):
    return make_model().next_token_log_probs(token_B, state)

  step_fn = jax.jit(hk.without_apply_rng(hk.transform(step)).apply)
  pick = jax.jit(lambda key, log_probs_V: jax.random.categorical(
      key, filter_logits(log_probs_V, temperature, top_k, top_p)))
  state = hk.transform(lambda: make_model().initial_state(1)).apply({}, None)
  log_probs = None
  for token in prompt_ids:
    log_probs, state = step_fn(params, jnp.asarray([token], jnp.int32), state)
  rng = jax.random.PRNGKey(seed)
  out = []
  for _ in range(length):
    rng, key = jax.random.split(rng)
    token = int(pick(key, log_probs[0]))
    out.append(token)
    log_probs, state = step_fn(params, jnp.asarray([token], jnp.int32), state)
  return np.asarray(out, np.int32)
