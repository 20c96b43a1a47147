"""Word-level language modelling: corpora, vocabulary, token cache, TBPTT batches.

Submodules (import them directly; this package imports nothing eagerly):
  corpora: streaming readers (WikiText, PG-19, Gigaword, plain text, TFDS,
    synthetic) yielding lists of words per line/paragraph, '<eos>' appended.
  synthetic: a seeded sentence-level Markov source with an exact entropy rate.
  vocab: the vocabulary (0 = <unk>, 1 = <eos>, then by decreasing frequency).
  cache: `load_corpus`, the tokenised splits cached as verified int32 .npy files.
  batcher: truncated-BPTT training batches and exact evaluation batches.
  model, adaptive_softmax: the language model and its output layers.
  sampling: text generation from a trained model.
The Task that trains it is built by `rmc_jax.experiments.lm`.
"""
