"""A synthetic word-level corpus whose entropy rate is known exactly.

`MarkovSource` is a seeded, sparse, sentence-level Markov source of order k
over an alphabet of ``A = num_words + 1`` tokens: id 0 is ``'<eos>'`` and ids
``1..num_words`` are the words ``'w1' .. 'w<num_words>'``.

* The context of a token is the last k tokens *of its sentence*; positions
  before the sentence start count as ``<eos>``. Emitting ``<eos>`` ends the
  sentence and resets the context to all-``<eos>`` (context code 0), so
  sentences are i.i.d. and the stream is a Markov chain on contexts that
  returns to context 0 after every sentence (one recurrent class, aperiodic).
* Every context c has ``branching + 1`` possible successors: ``<eos>`` with
  probability ``eos_prob`` (so sentence lengths, ``<eos>`` included, are
  Geometric(eos_prob) with mean ``1 / eos_prob``) and ``branching`` distinct
  words drawn uniformly at random, sharing ``1 - eos_prob`` with weights from
  Dirichlet(alpha) (floored at 1e-6 and renormalised, so none is zero).
* Entropy rate (nats/token), exact up to ~1e-12:
  ``H = -sum_c pi(c) sum_w P(w|c) log P(w|c)``, with ``pi`` the stationary
  distribution of contexts, computed as the expected number of visits to each
  context per sentence divided by the expected sentence length (the series
  sum_n e_0 Q^n over non-<eos> transitions Q, which shrinks by exactly
  ``1 - eos_prob`` per term).

The transition tables are dense over the ``C = A**order`` context codes
(code of context (t_1, ..., t_k), most recent last: sum_j t_j A^(k-j)), so
``C`` is limited to 2**22. Generation is vectorised over 1024 sentences at a
time; split s (train/valid/test) is drawn from its own generator derived from
(seed, s), and a split of ``n`` tokens is the shortest run of whole sentences
with at least ``n`` tokens, so a longer split extends a shorter one with the
same seed (prefix-consistent).

Shape suffixes: C = contexts, J = successors per context, N = tokens,
L = sentences generated in parallel.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from rmc_jax.checks import check_int

__all__ = ["MarkovSource"]

EOS = "<eos>"
_MAX_CONTEXTS = 2**22
_LANES = 1024  # Sentences generated in parallel; fixed so streams are stable.
_TABLE_STREAM = 0
_SPLIT_STREAMS = {"train": 1, "valid": 2, "test": 3}


class MarkovSource:
  """Seeded sparse order-k sentence-level Markov source (see module docstring).

  Attributes:
    num_words, order, branching, eos_prob, alpha, seed: the configuration.
    alphabet_size: A = num_words + 1.
    num_contexts: C = A ** order.
    successors_CJ: int32 [C, branching + 1]; column 0 is <eos> (id 0), the
      other columns are distinct word ids in [1, num_words].
    probs_CJ: float64 [C, branching + 1], rows sum to 1, all entries > 0.
    words: tuple of the A token strings, index = source id.
  """

  def __init__(self, num_words: int = 64, order: int = 1, branching: int = 4,
               eos_prob: float = 0.05, alpha: float = 0.5, seed: int = 0) -> None:
    """Builds the tables from `seed`; raises ValueError for bad settings."""
    self.num_words = check_int("num_words", num_words, 1)
    self.order = check_int("order", order, 1)
    self.branching = check_int("branching", branching, 1)
    self.seed = check_int("seed", seed, 0)
    if self.branching > self.num_words:
      raise ValueError(f"branching ({branching}) must be <= num_words ({num_words})")
    if not 0.0 < float(eos_prob) < 1.0:
      raise ValueError(f"eos_prob must be in (0, 1), got {eos_prob!r}")
    if not float(alpha) > 0.0:
      raise ValueError(f"alpha must be > 0, got {alpha!r}")
    self.eos_prob, self.alpha = float(eos_prob), float(alpha)
    self.alphabet_size = A = self.num_words + 1
    if A**self.order > _MAX_CONTEXTS:
      raise ValueError(f"(num_words + 1) ** order = {A**self.order} contexts exceeds "
                       f"the dense-table limit {_MAX_CONTEXTS}")
    self.num_contexts = C = A**self.order
    self.words = (EOS,) + tuple(f"w{i}" for i in range(1, A))

    rng = np.random.default_rng([self.seed, _TABLE_STREAM])
    J = self.branching + 1
    successors_CJ = np.zeros((C, J), np.int32)
    for start in range(0, C, 4096):  # Chunked: C * num_words floats at most 4096 rows.
      stop = min(C, start + 4096)
      keys = rng.random((stop - start, self.num_words))
      picks = np.argpartition(keys, self.branching - 1, axis=1)[:, :self.branching]
      successors_CJ[start:stop, 1:] = np.sort(picks, axis=1) + 1
    weights = np.maximum(rng.dirichlet(np.full(self.branching, self.alpha), size=C), 1e-6)
    weights /= weights.sum(axis=1, keepdims=True)
    probs_CJ = np.empty((C, J))
    probs_CJ[:, 0] = self.eos_prob
    probs_CJ[:, 1:] = (1.0 - self.eos_prob) * weights
    self.successors_CJ, self.probs_CJ = successors_CJ, probs_CJ
    self._cum_CJ = np.cumsum(probs_CJ, axis=1)
    self._entropy_rate: float | None = None

  # -- Exact quantities --------------------------------------------------------

  def context_entropies(self) -> np.ndarray:
    """float64 [C]: entropy (nats) of the next token given each context."""
    return -(self.probs_CJ * np.log(self.probs_CJ)).sum(axis=1)

  def stationary_distribution(self, tol: float = 1e-14) -> np.ndarray:
    """float64 [C]: the stationary distribution pi of contexts (sums to 1).

    Expected visits per sentence, sum_n e_0 Q^n, truncated once the remaining
    mass (exactly (1 - eos_prob)^n) is below `tol`; then normalised.
    """
    C, A = self.num_contexts, self.alphabet_size
    word_next_CJ = (np.arange(C)[:, None] * A + self.successors_CJ[:, 1:]) % C
    visits_C = np.zeros(C)
    mass_C = np.zeros(C)
    mass_C[0] = 1.0
    while mass_C.sum() > tol:
      visits_C += mass_C
      mass_C = np.bincount(word_next_CJ.ravel(),
                           weights=(mass_C[:, None] * self.probs_CJ[:, 1:]).ravel(),
                           minlength=C)
    return visits_C / visits_C.sum()

  def entropy_rate(self) -> float:
    """Exact entropy rate of the token stream in nats/token (cached)."""
    if self._entropy_rate is None:
      self._entropy_rate = float(self.stationary_distribution() @ self.context_entropies())
    return self._entropy_rate

  def context_codes(self, ids_N: np.ndarray) -> np.ndarray:
    """int64 [N]: the context code of every position of a token stream.

    The stream is taken to start at a sentence start (as generated streams do).
    """
    ids_N = np.asarray(ids_N, dtype=np.int64)
    N, A = ids_N.shape[0], self.alphabet_size
    positions = np.arange(N)
    # Index of the last <eos> strictly before each position (-1 at the start).
    last_eos = np.maximum.accumulate(np.where(ids_N == 0, positions, -1))
    last_eos_before = np.concatenate([[-1], last_eos[:-1]])
    words_before = positions - last_eos_before - 1  # Words of this sentence so far.
    codes_N = np.zeros(N, np.int64)
    for lag in range(1, self.order + 1):
      previous = np.concatenate([np.zeros(lag, np.int64), ids_N[:-lag]])[:N]
      codes_N += np.where(words_before >= lag, previous, 0) * A**(lag - 1)
    return codes_N

  def log_probs(self, ids_N: np.ndarray) -> np.ndarray:
    """float64 [N]: log P(token_t | its context) under the true source.

    -inf where a token is impossible in its context. The mean over a long
    generated stream converges to `entropy_rate()`.
    """
    ids_N = np.asarray(ids_N, dtype=np.int64)
    codes_N = self.context_codes(ids_N)
    hits_NJ = self.successors_CJ[codes_N] == ids_N[:, None]
    found_N = hits_NJ.any(axis=1)
    logp_N = np.log(self.probs_CJ[codes_N, hits_NJ.argmax(axis=1)])
    return np.where(found_N, logp_N, -np.inf)

  # -- Sampling ----------------------------------------------------------------

  def sample_ids(self, split: str, num_tokens: int) -> np.ndarray:
    """int32 [N]: whole sentences of `split`, N >= num_tokens minimal, ends with <eos>.

    Deterministic in (seed, split); a larger `num_tokens` extends the stream.
    """
    if split not in _SPLIT_STREAMS:
      raise ValueError(f"split must be one of {sorted(_SPLIT_STREAMS)}, got {split!r}")
    num_tokens = check_int("num_tokens", num_tokens, 1)
    rng = np.random.default_rng([self.seed, _SPLIT_STREAMS[split]])
    C, A, J = self.num_contexts, self.alphabet_size, self.branching + 1
    pieces, total = [], 0
    while total < num_tokens:
      context_L = np.zeros(_LANES, np.int64)
      active_L = np.ones(_LANES, bool)
      steps = []
      while active_L.any():
        u_L = rng.random(_LANES)
        j_L = np.minimum((u_L[:, None] >= self._cum_CJ[context_L]).sum(axis=1), J - 1)
        token_L = self.successors_CJ[context_L, j_L].astype(np.int64)
        steps.append(np.where(active_L, token_L, -1))
        context_L = np.where(token_L == 0, 0, (context_L * A + token_L) % C)
        active_L &= token_L != 0
      tokens_LS = np.stack(steps, axis=1)
      piece = tokens_LS[tokens_LS >= 0]  # Row-major: sentence of lane 0, lane 1, ...
      pieces.append(piece)
      total += piece.size
    ids = np.concatenate(pieces)
    eos_positions = np.flatnonzero(ids == 0)
    end = eos_positions[np.searchsorted(eos_positions, num_tokens - 1)] + 1
    return ids[:end].astype(np.int32)

  def sentences(self, split: str, num_tokens: int) -> Iterator[list[str]]:
    """The words of `sample_ids(split, num_tokens)`, one list per sentence ending in '<eos>'."""
    ids = self.sample_ids(split, num_tokens)
    words = np.asarray(self.words, dtype=object)[ids]
    bounds = np.flatnonzero(ids == 0) + 1
    start = 0
    for stop in bounds.tolist():
      yield words[start:stop].tolist()
      start = stop

  def settings(self) -> dict[str, Any]:
    """JSON description of the source (everything the samples depend on)."""
    return dict(num_words=self.num_words, order=self.order, branching=self.branching,
                eos_prob=self.eos_prob, alpha=self.alpha, seed=self.seed)
