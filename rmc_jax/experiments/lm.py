"""Word-level language modelling: `--config=lm:VARIANT`.

Variants:
  synthetic:   (default) a built-in Markov corpus with a known entropy rate;
               small RMC; runs on a CPU in minutes, no data needed.
  small:       WikiText-2-sized: `--config.data_dir=DIR` with WikiText-2 files.
  wikitext103: the paper's WikiText-103 run: RMC with 2500 units
               (1 slot, 4 heads of 625, 5 MLP layers, 1 block), Adam 1e-3,
               gradient clipping 0.1, truncated BPTT 100, batch 64 per device
               x 6 devices, the full 267,735-word vocabulary with an adaptive
               softmax (20k/40k/200k).
  gutenberg:   the same model on PG-19 (`--config.data_dir=DIR`), 250k words.
  gigaword:    the same model on English Gigaword v5, 250k words.
Choices the paper leaves open (embedding size, softmax, gating, dropout) are
ours; see WORKSPACE_NOTES.md.

The corpus is read (or reused from the token cache), the training stream is
split into `batch_size` contiguous lanes walked in segments of
`unroll_length` tokens, and the recurrent state is carried from one segment
to the next in `TrainState.carry` (reset at the start of every epoch).
Evaluation walks a whole split with the state carried and reports per-token
loss (nats) and perplexity over every token of the split; 'eval' is the
validation split, 'test' is evaluated once at the end of training.

Each process reads only its own lanes (`process_rows`) of every batch.

Batches: dicts of batch-major arrays, inputs_BT and targets_BT int32,
mask_BT float32 (1 on real targets), reset_B bool (start of a lane).
"""

from __future__ import annotations

import math
import os

import haiku as hk
import jax.numpy as jnp
import ml_collections

from rmc_jax.experiments.base import ResultsSpec
from rmc_jax.lm import batcher as batcher_lib
from rmc_jax.lm import cache as cache_lib
from rmc_jax.lm import corpora
from rmc_jax.lm import synthetic
from rmc_jax.lm.model import LanguageModel
from rmc_jax.training import config as config_lib
from rmc_jax.training import precision
from rmc_jax.training.config import ConfigError
from rmc_jax.training.mesh import process_rows
from rmc_jax.training.task import BatchIterator, Task

NAME = "lm"
VARIANTS = ("synthetic", "small", "wikitext103", "gutenberg", "gigaword")
RESULTS = ResultsSpec(
    title="Language modelling", split="test", metric="perplexity",
    higher_is_better=False,
    metrics={"perplexity": "perplexity", "loss": "loss (nats/token)"},
    paper={
        # Table 2: perplexities (the paper gives only a test number for
        # GigaWord).
        "columns": ("WikiText-103 valid", "WikiText-103 test",
                    "Gutenberg valid", "Gutenberg test", "GigaWord test"),
        "rows": {"LSTM (Rae et al., 2018)": (34.1, 34.3, 41.8, 45.5, 43.7),
                 "RMC": (30.8, 31.6, 39.2, 42.0, 38.3)},
    })


def get_config(variant: str = "synthetic") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ConfigError(f"unknown {NAME} variant {variant!r}; expected one of "
                      f"{VARIANTS}")
  c = config_lib.base_config(NAME)
  c.dataset = "synthetic"
  c.data_dir = ""
  c.cache_dir = "~/.cache/rmc_jax/lm"
  c.reader_options = {}
  c.vocab_size = 0  # Maximum vocabulary size; 0 keeps every training word.
  c.min_count = 1
  c.unroll_length = 100
  c.random_offsets = False
  c.embed_size = 512
  c.softmax = "adaptive"  # or "full"
  c.cutoffs = (20_000, 40_000, 200_000)
  c.div_value = 4.0
  # Compute each adaptive-softmax tail only for the rows that need it (far
  # less memory with 100k+ word tails; see rmc_jax/lm/adaptive_softmax.py).
  c.adaptive_packed = False
  c.input_dropout = 0.0
  c.output_dropout = 0.0
  c.tie_embeddings = False
  c.eval_batch_size = 64
  c.learning_rate = 1e-3
  c.grad_clip_norm = 0.1
  c.batch_size = 384  # 64 per device x 6 devices, as in the paper.
  c.num_steps = 500_000
  c.log_every = 100
  c.eval_every = 10_000
  c.checkpoint_every = 2_000
  # remat: recompute the core's forward in its backward pass; with the 64 x
  # 100 batch per device this keeps the step's memory below that of plain
  # autodiff (measurements in WORKSPACE_NOTES.md).
  c.rmc.update(mem_slots=1, num_heads=4, head_size=625,
               attention_mlp_layers=5, num_blocks=1, gate_style="unit",
               remat=True)
  c.lstm.update(hidden_sizes=(2048,))

  if variant == "synthetic":
    c.reader_options = dict(num_words=32, order=2, branching=3,
                            eos_prob=0.05, seed=0, train_tokens=500_000,
                            valid_tokens=20_000, test_tokens=20_000)
    c.softmax = "full"
    c.cutoffs = ()
    c.embed_size = 32
    c.batch_size = 32
    c.eval_batch_size = 32
    c.unroll_length = 32
    c.grad_clip_norm = 1.0
    c.num_steps = 1_500
    c.log_every = 50
    c.eval_every = 500
    c.checkpoint_every = 500
    c.rmc.update(mem_slots=2, num_heads=2, head_size=32,
                 attention_mlp_layers=2, remat=False)
    c.lstm.update(hidden_sizes=(128,))
  elif variant == "small":
    c.dataset = "wikitext"
    c.cutoffs = (2_000, 10_000)
    c.embed_size = 256
    c.batch_size = 32
    c.eval_batch_size = 32
    c.num_steps = 20_000
    c.eval_every = 2_000
    c.input_dropout = 0.25
    c.output_dropout = 0.25
    c.rmc.update(mem_slots=1, num_heads=4, head_size=128,
                 attention_mlp_layers=3, remat=False)
    c.lstm.update(hidden_sizes=(650,))
  elif variant == "wikitext103":
    c.dataset = "wikitext"
    c.reader_options = dict(shuffle_seed=0)  # The paper shuffles articles.
  elif variant in ("gutenberg", "gigaword"):
    c.dataset = "pg19" if variant == "gutenberg" else "gigaword"
    c.vocab_size = 250_000
    c.reader_options = dict(shuffle_seed=0)
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  config_lib.validate(config)
  try:
    corpora.canonical_dataset(config.dataset)
  except corpora.DataError as e:
    raise ConfigError(f"--config.dataset: {e}") from None
  if config.softmax not in ("adaptive", "full"):
    raise ConfigError(f"--config.softmax={config.softmax!r}: expected "
                      "'adaptive' or 'full'.")
  if config.tie_embeddings and config.softmax != "full":
    raise ConfigError("--config.tie_embeddings=true needs "
                      "--config.softmax=full.")
  if config.vocab_size and config.vocab_size < 2:
    raise ConfigError(f"--config.vocab_size={config.vocab_size}: expected 0 "
                      "(all words) or at least 2 (<unk> and <eos>).")
  if config.unroll_length < 1 or config.embed_size < 1:
    raise ConfigError("--config.unroll_length and --config.embed_size must "
                      "be positive.")
  if config.dataset != "synthetic" and not config.data_dir:
    raise ConfigError(f"--config.data_dir is required for dataset "
                      f"{config.dataset!r}.")


def matmul_width(config: ml_collections.ConfigDict) -> int:
  """Widest matmul outside the core, for the CPU plan: the softmax (its head
  with the adaptive softmax) or the embedding; before the corpus is read, an
  unbounded vocabulary counts as wide."""
  if config.softmax == "adaptive" and config.cutoffs:
    softmax = config.cutoffs[0]
  elif config.vocab_size:
    softmax = config.vocab_size
  elif config.dataset == "synthetic":
    softmax = config.reader_options.get("num_words", 2**31)
  else:  # Every training word: unknown until the corpus is read.
    softmax = 2**31
  return max(softmax, config.embed_size)


def make_model(config: ml_collections.ConfigDict,
               vocab_size: int) -> LanguageModel:
  """The LanguageModel of a config (call inside hk.transform)."""
  return LanguageModel(
      vocab_size=vocab_size, embed_size=config.embed_size,
      core_name=config.core, core_kwargs=config_lib.core_kwargs(config),
      softmax=config.softmax, cutoffs=tuple(config.cutoffs),
      div_value=config.div_value, input_dropout=config.input_dropout,
      output_dropout=config.output_dropout,
      tie_embeddings=config.tie_embeddings,
      adaptive_packed=config.adaptive_packed)


def load_corpus(config: ml_collections.ConfigDict) -> cache_lib.Corpus:
  """The tokenised corpus of a config (built once, then memory-mapped)."""
  return cache_lib.load_corpus(
      config.dataset, config.data_dir or None,
      os.path.expanduser(config.cache_dir),
      vocab_size=config.vocab_size or None, min_count=config.min_count,
      reader_options=dict(config.reader_options or {}))


def true_entropy(config: ml_collections.ConfigDict) -> float | None:
  """The synthetic corpus's entropy rate (nats/token); None for real text."""
  if config.dataset != "synthetic":
    return None
  options = {k: v for k, v in dict(config.reader_options or {}).items()
             if not k.endswith("_tokens")}
  return synthetic.MarkovSource(**options).entropy_rate()


def build_task(config: ml_collections.ConfigDict, vocab_size: int,
               train_iterator: BatchIterator | None,
               eval_splits: dict | None = None,
               entropy: float | None = None) -> Task:
  """The LM Task on given batches (`make_task` reads them from the corpus;
  benchmarks pass random ones)."""

  def forward(batch, state, is_training):
    return make_model(config, vocab_size)(
        batch["inputs"], batch["targets"], batch["reset"], state, is_training)

  model = hk.transform(precision.scoped(forward, config.precision))
  initial_state = hk.transform(precision.scoped(
      lambda batch_size: make_model(config, vocab_size).initial_state(
          batch_size), config.precision))

  def init_carry(batch_size):
    return initial_state.apply({}, None, batch_size)

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
    if entropy is not None:
      metrics["loss_above_entropy"] = metrics["loss"] - entropy
    if "examples_per_sec" in metrics:
      metrics["tokens_per_sec"] = (metrics["examples_per_sec"]
                                   * config.unroll_length)
    return metrics

  return Task(init=init, loss=loss, train_iterator=train_iterator,
              evaluate=evaluate, eval_splits=dict(eval_splits or {}),
              init_carry=init_carry, summarize=summarize)


def make_task(config: ml_collections.ConfigDict) -> Task:
  validate(config)
  corpus = load_corpus(config)
  vocab_size = len(corpus.vocab)
  if config.softmax == "adaptive" and config.cutoffs and \
      max(config.cutoffs) >= vocab_size:
    raise ConfigError(
        f"--config.cutoffs={tuple(config.cutoffs)}: every cutoff must be below "
        f"the vocabulary size ({vocab_size}); lower them or raise "
        "--config.vocab_size.")
  try:
    train = batcher_lib.TBPTTBatcher(
        corpus.splits["train"], config.batch_size, config.unroll_length,
        random_offsets=config.random_offsets, seed=config.seed,
        rows=process_rows(config.batch_size))
  except ValueError as e:
    raise ConfigError(f"the train split is too short for --config.batch_size="
                      f"{config.batch_size} x --config.unroll_length="
                      f"{config.unroll_length}: {e}") from None
  try:
    valid, test = (batcher_lib.EvalBatches(corpus.splits[split],
                                           config.eval_batch_size,
                                           config.unroll_length,
                                           rows=process_rows(
                                               config.eval_batch_size))
                   for split in ("valid", "test"))
  except ValueError as e:
    raise ConfigError(f"an evaluation split (valid/test) is unusable: {e}") \
        from None
  return build_task(config, vocab_size, train, {"eval": valid, "test": test},
                    entropy=true_entropy(config))
