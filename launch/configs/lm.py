"""Language-model configs: `--config=launch/configs/lm.py:VARIANT`.

Variants:
  synthetic:   (default) a built-in Markov corpus with a known entropy rate;
               small RMC; runs on a CPU in minutes, no data needed.
  small:       WikiText-2-sized: `--config.data_dir=DIR` with WikiText-2 files.
  wikitext103: the paper's WikiText-103 run (spec 4.1): RMC with 2500 units
               (1 slot, 4 heads of 625, 5 MLP layers, 1 block), Adam 1e-3,
               gradient clipping 0.1, truncated BPTT 100, batch 64 per device
               x 6 devices, the full 267,735-word vocabulary with an adaptive
               softmax (20k/40k/200k).
  gutenberg:   the same model on PG-19 (`--config.data_dir=DIR`), 250k words.
  gigaword:    the same model on English Gigaword v5, 250k words.
Choices the paper leaves open (embedding size, softmax, gating, dropout) are
ours; see WORKSPACE_NOTES.md.
"""

from rmc_jax.training.config import base_config

VARIANTS = ("synthetic", "small", "wikitext103", "gutenberg", "gigaword")


def get_config(variant: str = "synthetic"):
  if variant not in VARIANTS:
    raise ValueError(f"Unknown lm variant {variant!r}; expected one of "
                     f"{VARIANTS}.")
  c = base_config()
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
  c.eval_only = False
  c.learning_rate = 1e-3
  c.grad_clip_norm = 0.1
  c.batch_size = 384  # 64 per device x 6 devices, as in the paper.
  c.num_steps = 500_000
  c.log_every = 100
  c.eval_every = 10_000
  c.checkpoint_every = 2_000
  # remat: recompute the core's forward in its backward pass; with the 64 x
  # 100 batch per device this keeps the step's memory below that of plain
  # autodiff (WORKSPACE_NOTES.md, issue 8).
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
