"""The language-modelling Task for the training loop.

Reads (or reuses from the token cache) a corpus, splits the training stream
into `batch_size` contiguous lanes walked in segments of `unroll_length`
tokens, and carries the recurrent state from one segment to the next in
`TrainState.carry` (reset at the start of every epoch). Evaluation walks a
whole split with the state carried and reports per-token loss (nats) and
perplexity over every token of the split.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from rmc_jax.lm import batcher as batcher_lib
from rmc_jax.lm import cache as cache_lib
from rmc_jax.lm import synthetic
from rmc_jax.lm.model import LanguageModel
from rmc_jax.training import config as config_lib
from rmc_jax.training.loop import Task


@dataclasses.dataclass
class LMSetup:
  """Everything a launcher needs: the Task, the vocabulary and the test batches."""

  task: Task
  corpus: cache_lib.Corpus
  test_batches: batcher_lib.EvalBatches
  true_entropy: float | None  # nats/token, for the synthetic corpus only.


def model_fn(config: Any, vocab_size: int) -> LanguageModel:
  """The LanguageModel of a config (call inside hk.transform)."""
  return LanguageModel(
      vocab_size=vocab_size, embed_size=config.embed_size,
      core_name=config.core, core_kwargs=config_lib.core_kwargs(config),
      softmax=config.softmax, cutoffs=tuple(config.cutoffs),
      div_value=config.div_value, input_dropout=config.input_dropout,
      output_dropout=config.output_dropout,
      tie_embeddings=config.tie_embeddings,
      adaptive_packed=config.adaptive_packed)


def load(config: Any) -> cache_lib.Corpus:
  """The tokenised corpus of a config (built once, then memory-mapped)."""
  options = dict(config.reader_options or {})
  return cache_lib.load_corpus(
      config.dataset, config.data_dir or None,
      os.path.expanduser(config.cache_dir),
      vocab_size=config.vocab_size or None, min_count=config.min_count,
      reader_options=options)


def make_setup(config: Any) -> LMSetup:
  """Builds the LM Task from a launcher config (launch/configs/lm.py)."""
  corpus = load(config)
  vocab_size = len(corpus.vocab)
  if config.softmax == "adaptive" and config.cutoffs and \
      max(config.cutoffs) >= vocab_size:
    raise ValueError(
        f"--config.cutoffs={tuple(config.cutoffs)}: every cutoff must be below "
        f"the vocabulary size ({vocab_size}); lower them or raise "
        "--config.vocab_size.")

  def forward(batch, state, is_training):
    lm = model_fn(config, vocab_size)
    return lm(batch["inputs"], batch["targets"], batch["reset"], state,
              is_training)

  def initial_state(batch_size):
    return model_fn(config, vocab_size).initial_state(batch_size)

  model = hk.transform(forward)
  init_state = hk.transform(initial_state)
  init_carry = functools.partial(init_state.apply, {}, None)

  def masked_mean(nll_BT, mask_BT):
    weight = mask_BT.sum()
    return (nll_BT * mask_BT).sum() / jnp.maximum(weight, 1.0), weight

  def init(rng, batch):
    return model.init(rng, batch, init_carry(batch["inputs"].shape[0]), True)

  def loss(params, carry, rng, batch):
    nll_BT, carry = model.apply(params, rng, batch, carry, True)
    value, _ = masked_mean(nll_BT, batch["mask"])
    return value, ({}, carry)

  def evaluate(params, carry, batch):
    nll_BT, carry = model.apply(params, None, batch, carry, False)
    value, weight = masked_mean(nll_BT, batch["mask"])
    return {"loss": value, "weight": weight}, carry

  def summarize(metrics):
    metrics = dict(metrics, perplexity=math.exp(min(metrics["loss"], 50.0)))
    if "examples_per_sec" in metrics:
      metrics["tokens_per_sec"] = (metrics["examples_per_sec"]
                                   * config.unroll_length)
    return metrics

  try:
    train = batcher_lib.TBPTTBatcher(
        corpus.splits["train"], config.batch_size, config.unroll_length,
        random_offsets=config.random_offsets, seed=config.seed)
  except ValueError as e:
    raise ValueError(f"the train split is too short for --config.batch_size="
                     f"{config.batch_size} x --config.unroll_length="
                     f"{config.unroll_length}: {e}") from None
  try:
    valid, test = (batcher_lib.EvalBatches(corpus.splits[split],
                                           config.eval_batch_size,
                                           config.unroll_length)
                   for split in ("valid", "test"))
  except ValueError as e:
    raise ValueError(f"an evaluation split (valid/test) is unusable: {e}") \
        from None
  task = Task(init=init, loss=loss, train_iterator=train, evaluate=evaluate,
              eval_batches=valid, init_carry=init_carry, summarize=summarize)
  entropy = None
  if config.dataset == "synthetic":
    options = {k: v for k, v in dict(config.reader_options or {}).items()
               if not k.endswith("_tokens")}
    entropy = synthetic.MarkovSource(**options).entropy_rate()
  return LMSetup(task, corpus, test, entropy)


def sample(params: Any, config: Any, vocab_size: int,
           prompt_ids: np.ndarray, length: int, temperature: float = 1.0,
           top_k: int = 0, seed: int = 0) -> np.ndarray:
  """Continues `prompt_ids` ([P] int32, P >= 1) by `length` sampled tokens.

  The prompt is read with the state carried, then tokens are drawn one at a
  time from softmax(log_probs / temperature), restricted to the top_k most
  likely when top_k > 0.
  """
  def step(token_B, state):
    lm = model_fn(config, vocab_size)
    return lm.next_token_log_probs(token_B, state)

  def initial_state():
    return model_fn(config, vocab_size).initial_state(1)

  step_fn = jax.jit(hk.without_apply_rng(hk.transform(step)).apply)
  state = hk.transform(initial_state).apply({}, None)
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
