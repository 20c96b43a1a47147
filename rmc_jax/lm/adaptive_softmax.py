"""Adaptive softmax (Grave et al., 2017) and a full softmax with the same API.

Adaptive softmax ("Efficient softmax approximation for GPUs") splits a
frequency-sorted vocabulary of V words at cutoffs c_1 < ... < c_K into a head
(the shortlist [0, c_1)) and K tail clusters, tail cluster k holding the words
[c_(k+1), c_(k+2)) with c_(K+1) = V (k counts from 0 here):

  head:   log p(y | h)          = log_softmax(W_h h + b_h)[y]      y < c_1
  tail k: log p(y | h)          = log_softmax(W_h h + b_h)[c_1 + k]
                                  + log_softmax(U_k P_k h + b_k)[y - c_(k+1)]

The head has c_1 + K outputs: the shortlist words, then one logit per tail
cluster. P_k is a [D, D_k] projection with D_k = round(D / div_value**(k+1))
(at least 1), U_k a [D_k, S_k] output layer for the cluster's S_k words. The
model is a proper distribution over all V words for every parameter value.
With no cutoffs there is one cluster and the head is a full softmax.

Cost per token, in multiply-adds (D = hidden size):
  full softmax:   D * V
  head:           D * (c_1 + K)
  tail k:         D * D_k + D_k * S_k        (D * S_k without tail_projection)
For the paper's WikiText-103 setting (V = 267735, cutoffs 20000/40000/200000,
div_value 4) and D = 1024: full 274.2M; head 20.5M; tails 5.4M + 10.3M + 1.1M
(D_k = 256, 64, 16), so 37.3M when every tail is evaluated for every token,
7.4x less than the full softmax. The largest tail (160k words x 64) dominates
the tails. A tail cluster is only *needed* for the tokens whose target is in
it (typically a few percent of the tokens for Zipfian text), but with static
shapes picking a variable number of rows is not free, so two modes are offered:

* `compute_tail_for_all=True` (default): each tail's logits are computed for
  all N rows and its log-probability gathered at the target. Exact, simple,
  no control flow; costs N * sum_k (D * D_k + D_k * S_k) and keeps the
  [N, S_k] logits of every tail for the backward pass (for N = 6400 rows and
  S_k = 160000 that is 4 GB in float32: mind it on accelerators).
* `compute_tail_for_all=False`: the rows whose target is in tail k are packed
  (`jnp.nonzero` with a static size) into ceil(N / C_k) chunks of C_k =
  ceil(tail_capacity_k * N) rows, and `lax.scan` runs the chunks, each behind
  a `lax.cond` that skips chunks past the last such row and each
  rematerialised (`jax.checkpoint`) so that only one [C_k, S_k] logits block
  is live. Always exact, whatever the batch; costs about
  max(1, ceil(n_k / C_k)) * C_k * (D * D_k + D_k * S_k) for the n_k rows in
  cluster k, plus the recomputation in the backward pass (one more forward of
  the used chunks). Under `vmap` the conds become selects (all chunks run).

`log_probs` always builds the full [N, V] matrix (O(N * V) memory and about
the cost of the all-rows mode): meant for tests, sampling, and small
vocabularies; training and evaluation use `loss` / `nll`.

Every method accepts any leading shape ([..., D] hidden, [...] targets); the
names below say [N, D] for the flattened rows. Matmuls run in the dtype of
the weights as fetched (an `hk.mixed_precision` policy's compute dtype, e.g.
bfloat16, else the parameters' float32); every log-softmax and the results
are float32. Targets outside [0, V) give NaN per-token NLLs (masked ones are
ignored by `loss`, so padding may use any id, e.g. -1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np


class LossAux(NamedTuple):
  """Extra outputs of `loss`.

  Attributes:
    nll: [N] (or the targets' leading shape) per-token negative
      log-likelihood in nats, masked tokens included (NaN for invalid ids).
    sum_nll: [] sum of the NLL over the masked-in tokens (mask-weighted).
    num_tokens: [] sum of the mask (N without a mask); perplexity over a whole
      split is exp(sum of sum_nll / sum of num_tokens).
  """

  nll: jax.Array
  sum_nll: jax.Array
  num_tokens: jax.Array


class _Affine(hk.Module):
  """Holds the parameters of one affine map `x @ w (+ b)`.

  `w` [fan_in, output_size] is truncated normal with stddev 1/sqrt(fan_in)
  (as `hk.Linear` and the rest of rmc_jax), `b` [output_size] is zero.
  """

  def __init__(self, with_bias: bool, name: str):
    super().__init__(name=name)
    self._with_bias = with_bias

  def __call__(self, fan_in: int, output_size: int
               ) -> tuple[jax.Array, jax.Array | None]:
    """Returns (w [fan_in, output_size], b [output_size] or None)."""
    w = hk.get_parameter(
        "w", [fan_in, output_size], jnp.float32,
        init=hk.initializers.TruncatedNormal(stddev=1.0 / math.sqrt(fan_in)))
    b = None
    if self._with_bias:
      b = hk.get_parameter("b", [output_size], jnp.float32, init=jnp.zeros)
    return w, b


class _TailParams(NamedTuple):
  """Parameters of one tail cluster (projection is None without one)."""

  projection_DP: jax.Array | None
  output_PS: jax.Array
  bias_S: jax.Array


def _affine(x_ND: jax.Array, w_DM: jax.Array, b_M: jax.Array | None
            ) -> jax.Array:
  """x @ w (+ b) in the weights' dtype: [N, D] -> [N, M]."""
  y_NM = jnp.dot(x_ND.astype(w_DM.dtype), w_DM)
  if b_M is not None:
    y_NM = y_NM + b_M.astype(w_DM.dtype)
  return y_NM


def _tail_logits(params: _TailParams, hidden_ND: jax.Array) -> jax.Array:
  """A tail cluster's logits, float32 [N, S]."""
  x_NP = hidden_ND
  if params.projection_DP is not None:
    x_NP = _affine(hidden_ND, params.projection_DP, None)
  return _affine(x_NP, params.output_PS, params.bias_S).astype(jnp.float32)


def _picked_log_prob(logits_NM: jax.Array, index_N: jax.Array) -> jax.Array:
  """log_softmax(logits)[n, index[n]] for every row, [N] float32.

  Computed as logit - logsumexp, so the [N, M] log-softmax is never formed.
  `index_N` must be in [0, M).
  """
  logits_NM = logits_NM.astype(jnp.float32)
  picked_N = jnp.take_along_axis(logits_NM, index_N[:, None], axis=-1)[:, 0]
  return picked_N - jax.nn.logsumexp(logits_NM, axis=-1)


def _flatten_inputs(hidden: jax.Array, targets: jax.Array | None,
                    owner: str) -> tuple[jax.Array, jax.Array | None]:
  """Checks shapes; returns hidden [N, D] and targets [N] (int32)."""
  hidden = jnp.asarray(hidden)
  if hidden.ndim < 1:
    raise ValueError(f"{owner}: hidden must have shape [..., D], got "
                     f"{hidden.shape}.")
  hidden_ND = hidden.reshape(-1, hidden.shape[-1])
  if targets is None:
    return hidden_ND, None
  targets = jnp.asarray(targets)
  if targets.shape != hidden.shape[:-1]:
    raise ValueError(f"{owner}: targets shape {targets.shape} must equal the "
                     f"leading shape of hidden {hidden.shape[:-1]}.")
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(f"{owner}: targets must be integer ids, got dtype "
                     f"{targets.dtype}.")
  return hidden_ND, targets.reshape(-1).astype(jnp.int32)


def _masked_mean(nll: jax.Array, mask: jax.Array | None,
                 owner: str) -> tuple[jax.Array, LossAux]:
  """Mask-weighted mean NLL; masked-out entries (even NaN) are ignored."""
  if mask is None:
    weights = jnp.ones(nll.shape, jnp.float32)
  else:
    mask = jnp.asarray(mask)
    if mask.shape != nll.shape:
      raise ValueError(f"{owner}: mask shape {mask.shape} must equal the "
                       f"targets shape {nll.shape}.")
    weights = mask.astype(jnp.float32)
  keep = weights != 0
  sum_nll = jnp.sum(jnp.where(keep, nll, 0.0) * weights)
  num_tokens = jnp.sum(weights)
  safe_count = jnp.where(num_tokens > 0, num_tokens, 1.0)
  mean = jnp.where(num_tokens > 0, sum_nll / safe_count, 0.0)
  return mean, LossAux(nll, sum_nll, num_tokens)


def _check_vocab_size(vocab_size: Any, owner: str) -> int:
  if (isinstance(vocab_size, bool)
      or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1):
    raise ValueError(f"{owner}: vocab_size must be a positive integer, got "
                     f"{vocab_size!r}.")
  return int(vocab_size)


class AdaptiveSoftmax(hk.Module):
  """Adaptive softmax output layer over a frequency-sorted vocabulary.

  Word ids must be sorted by decreasing frequency (as `rmc_jax.lm.vocab`
  does): the head holds the most frequent c_1 words.

  Parameters (paths under this module's name, default 'adaptive_softmax',
  e.g. 'adaptive_softmax/~/head/w'; K tail clusters, S_k words in tail k):
    `head/{w,b}`: [D, c_1 + K], [c_1 + K]; column i < c_1 is word i, column
      c_1 + k the tail cluster k (c_1 = V and K = 0 without cutoffs).
    `tail_{k}_projection/w`: [D, D_k] with D_k = max(1, floor(D /
      div_value**(k+1) + 0.5)); only with tail_projection. No bias: a
      projection bias would only add a per-word constant, which
      `tail_{k}_output/b` already provides.
    `tail_{k}_output/{w,b}`: [D_k, S_k], [S_k] (D_k = D without projection).
  Count: D (c_1 + K) + (c_1 + K) + sum_k (D D_k + D_k S_k + S_k), or
  + sum_k (D S_k + S_k) without projections (see `num_params`).
  """

  def __init__(
      self,
      vocab_size: int,
      cutoffs: Sequence[int] = (20000, 40000, 200000),
      div_value: float = 4.0,
      tail_projection: bool = True,
      name: str | None = "adaptive_softmax",
      *,
      compute_tail_for_all: bool = True,
      tail_capacity: float | Sequence[float] = 0.25,
  ):
    """Constructs the layer.

    Args:
      vocab_size: V, the number of words (ids 0..V-1).
      cutoffs: strictly increasing ids in (0, V): the first is the shortlist
        size, each one starts a tail cluster. Empty: one cluster, a full
        softmax.
      div_value: tail cluster k (from 0) projects D to D / div_value**(k+1)
        dimensions (rounded half up, at least 1); must be >= 1.
      tail_projection: use the projections; False feeds the hidden state to
        every tail's output layer directly (D x S_k weights each).
      name: module name.
      compute_tail_for_all: evaluate every tail cluster for every row in
        `loss`/`nll` (True), or only for chunks of the rows whose target is
        in it (False); see the module docstring for the costs. Both exact.
      tail_capacity: with compute_tail_for_all=False, the chunk size of each
        tail as a fraction of the N rows (one value or one per tail cluster),
        in (0, 1]. Best set just above the cluster's share of the tokens.

    Raises:
      ValueError: on a bad vocab_size, cutoffs (not strictly increasing
        integers in (0, vocab_size)), div_value or tail_capacity.
    """
    owner = "AdaptiveSoftmax"
    self.vocab_size = _check_vocab_size(vocab_size, owner)
    if isinstance(cutoffs, (str, bytes)) or not isinstance(
        cutoffs, (Sequence, np.ndarray)):
      raise ValueError(f"{owner}: cutoffs must be a sequence of integers, got "
                       f"{cutoffs!r}.")
    cutoffs = list(cutoffs)
    for c in cutoffs:
      if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
        raise ValueError(f"{owner}: cutoffs must be integers, got {cutoffs!r}.")
    cutoffs = [int(c) for c in cutoffs]
    if any(b <= a for a, b in zip(cutoffs, cutoffs[1:])):
      raise ValueError(f"{owner}: cutoffs must be strictly increasing, got "
                       f"{cutoffs}.")
    if cutoffs and not (0 < cutoffs[0] and cutoffs[-1] < self.vocab_size):
      raise ValueError(f"{owner}: cutoffs must lie in (0, vocab_size="
                       f"{self.vocab_size}), got {cutoffs}.")
    if not (isinstance(div_value, (int, float, np.number))
            and math.isfinite(div_value) and div_value >= 1.0):
      raise ValueError(f"{owner}: div_value must be a finite number >= 1, got "
                       f"{div_value!r}.")
    self.cutoffs = tuple(cutoffs)
    self.div_value = float(div_value)
    self.tail_projection = bool(tail_projection)
    self.compute_tail_for_all = bool(compute_tail_for_all)
    bounds = list(self.cutoffs) + [self.vocab_size]
    # Word ranges [lo, hi) of the tail clusters.
    self.tail_bounds = tuple(zip(bounds[:-1], bounds[1:]))
    self.num_tail_clusters = len(self.tail_bounds)
    self.shortlist_size = bounds[0]
    self.head_size = self.shortlist_size + self.num_tail_clusters

    k = self.num_tail_clusters
    is_fraction = lambda c: (isinstance(c, (int, float, np.number))
                             and not isinstance(c, bool) and 0.0 < c <= 1.0)
    if isinstance(tail_capacity, Sequence):
      caps = list(tail_capacity)
    else:
      caps = [tail_capacity] * k
    if len(caps) != k or not all(is_fraction(c) for c in caps):
      raise ValueError(f"{owner}: tail_capacity must be a fraction in (0, 1] "
                       f"or {k} of them (one per tail cluster), got "
                       f"{tail_capacity!r}.")
    self.tail_capacity = tuple(float(c) for c in caps)
    super().__init__(name=name)

    self._head = _Affine(with_bias=True, name="head")
    self._tail_projections = [
        _Affine(with_bias=False, name=f"tail_{i}_projection")
        for i in range(k)] if self.tail_projection else None
    self._tail_outputs = [_Affine(with_bias=True, name=f"tail_{i}_output")
                          for i in range(k)]

  # -- Sizes -----------------------------------------------------------------

  def projection_sizes(self, hidden_size: int) -> tuple[int, ...]:
    """D_k of every tail cluster for hidden size D (D without projections)."""
    if not self.tail_projection:
      return (hidden_size,) * self.num_tail_clusters
    return tuple(
        max(1, int(math.floor(hidden_size / self.div_value**(i + 1) + 0.5)))
        for i in range(self.num_tail_clusters))

  def num_params(self, hidden_size: int) -> int:
    """Number of parameters for hidden size D (see the class docstring)."""
    d = hidden_size
    total = d * self.head_size + self.head_size
    for (lo, hi), p in zip(self.tail_bounds, self.projection_sizes(d)):
      if self.tail_projection:
        total += d * p
      total += p * (hi - lo) + (hi - lo)
    return total

  # -- Public methods --------------------------------------------------------

  def log_probs(self, hidden_ND: jax.Array) -> jax.Array:
    """Full log-probabilities over the vocabulary, [..., D] -> [..., V].

    O(N * V) time and memory: for tests, sampling and small vocabularies.
    """
    lead = hidden_ND.shape[:-1]
    hidden_ND, _ = _flatten_inputs(hidden_ND, None, "AdaptiveSoftmax")
    head_lp_NH, tails = self._evaluate_params(hidden_ND)
    c = self.shortlist_size
    pieces = [head_lp_NH[:, :c]]
    for k, params in enumerate(tails):
      tail_lp_NS = jax.nn.log_softmax(
          _tail_logits(params, hidden_ND), axis=-1)
      pieces.append(head_lp_NH[:, c + k, None] + tail_lp_NS)
    return jnp.concatenate(pieces, axis=-1).reshape(*lead, self.vocab_size)

  def nll(self, hidden_ND: jax.Array, targets_N: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood in nats, [..., D], [...] -> [...].

    NaN where a target is outside [0, V).
    """
    lead = targets_N.shape
    hidden_ND, targets_N = _flatten_inputs(hidden_ND, targets_N,
                                           "AdaptiveSoftmax")
    return self._nll_flat(hidden_ND, targets_N).reshape(lead)

  def loss(self, hidden_ND: jax.Array, targets_N: jax.Array,
           mask_N: jax.Array | None = None) -> tuple[jax.Array, LossAux]:
    """Mean NLL over the masked-in tokens, and the per-token details.

    Args:
      hidden_ND: [..., D] hidden states.
      targets_N: [...] integer word ids.
      mask_N: optional [...] bool or float weights (1 = counts); masked-out
        tokens may have any target id. Without one every token counts.

    Returns:
      (loss [], LossAux); the loss is sum(mask * nll) / sum(mask), 0 when the
      mask is all zero.
    """
    nll = self.nll(hidden_ND, targets_N)
    return _masked_mean(nll, mask_N, "AdaptiveSoftmax")

  # -- Internals -------------------------------------------------------------

  def _params(self, hidden_size: int
              ) -> tuple[tuple[jax.Array, jax.Array], list[_TailParams]]:
    """Fetches (creating at init) every parameter."""
    head = self._head(hidden_size, self.head_size)
    tails = []
    sizes = self.projection_sizes(hidden_size)
    for k, ((lo, hi), p) in enumerate(zip(self.tail_bounds, sizes)):
      projection = None
      if self.tail_projection:
        projection, _ = self._tail_projections[k](hidden_size, p)
      w, b = self._tail_outputs[k](p, hi - lo)
      tails.append(_TailParams(projection, w, b))
    return head, tails

  def _evaluate_params(self, hidden_ND: jax.Array
                       ) -> tuple[jax.Array, list[_TailParams]]:
    """Head log-softmax [N, c_1 + K] (float32) and the tail parameters."""
    (w, b), tails = self._params(hidden_ND.shape[-1])
    head_logits_NH = _affine(hidden_ND, w, b)
    return jax.nn.log_softmax(head_logits_NH.astype(jnp.float32), -1), tails

  def _nll_flat(self, hidden_ND: jax.Array, targets_N: jax.Array) -> jax.Array:
    """Per-token NLL for flat hidden [N, D] and int32 targets [N]."""
    n = hidden_ND.shape[0]
    c = self.shortlist_size
    head_lp_NH, tails = self._evaluate_params(hidden_ND)
    # Head column of each target: the word itself or its cluster's logit.
    cluster_N = jnp.zeros_like(targets_N)
    for lo, _ in self.tail_bounds:
      cluster_N = cluster_N + (targets_N >= lo).astype(jnp.int32)
    head_index_N = jnp.where(targets_N < c, targets_N, c + cluster_N - 1)
    head_index_N = jnp.clip(head_index_N, 0, self.head_size - 1)
    log_prob_N = jnp.take_along_axis(head_lp_NH, head_index_N[:, None],
                                     axis=-1)[:, 0]
    for k, ((lo, hi), params) in enumerate(zip(self.tail_bounds, tails)):
      in_cluster_N = (targets_N >= lo) & (targets_N < hi)
      local_N = jnp.clip(targets_N - lo, 0, hi - lo - 1)
      if self.compute_tail_for_all or n == 0:
        tail_lp_N = _picked_log_prob(
            _tail_logits(params, hidden_ND), local_N)
      else:
        tail_lp_N = self._packed_tail_log_prob(
            params, hidden_ND, local_N, in_cluster_N, self.tail_capacity[k])
      log_prob_N = log_prob_N + jnp.where(in_cluster_N, tail_lp_N, 0.0)
    valid_N = (targets_N >= 0) & (targets_N < self.vocab_size)
    return jnp.where(valid_N, -log_prob_N, jnp.nan)

  def _packed_tail_log_prob(self, params: _TailParams, hidden_ND: jax.Array,
                            local_N: jax.Array, in_cluster_N: jax.Array,
                            capacity: float) -> jax.Array:
    """Tail log-prob at local_N for the in-cluster rows ([N], 0 elsewhere).

    The in-cluster rows are packed into `num_chunks` chunks of C rows; chunks
    past the last in-cluster row are skipped by `lax.cond`.
    """
    n, d = hidden_ND.shape
    chunk = max(1, min(n, math.ceil(capacity * n)))
    num_chunks = -(-n // chunk)
    count = jnp.sum(in_cluster_N.astype(jnp.int32))
    rows_M = jnp.nonzero(in_cluster_N, size=num_chunks * chunk,
                         fill_value=0)[0]
    valid_M = jnp.arange(num_chunks * chunk) < count
    hidden_KCD = hidden_ND[rows_M].reshape(num_chunks, chunk, d)
    local_KC = local_N[rows_M].reshape(num_chunks, chunk)
    starts_K = jnp.arange(num_chunks, dtype=jnp.int32) * chunk
    @jax.checkpoint
    def compute(p, h_CD, local_C):
      return _picked_log_prob(_tail_logits(p, h_CD), local_C)

    def skip(p, h_CD, local_C):
      del p, h_CD
      return jnp.zeros(local_C.shape, jnp.float32)

    def body(carry, xs):
      h_CD, local_C, start = xs
      lp_C = jax.lax.cond(start < count, compute, skip, params, h_CD, local_C)
      return carry, lp_C

    _, lp_KC = jax.lax.scan(body, None, (hidden_KCD, local_KC, starts_K))
    lp_M = jnp.where(valid_M, lp_KC.reshape(-1), 0.0)
    return jnp.zeros((n,), jnp.float32).at[rows_M].add(lp_M)


class FullSoftmax(hk.Module):
  """Ordinary softmax over the whole vocabulary, with AdaptiveSoftmax's API.

  Parameters: `output/{w,b}` [D, V], [V] under this module's name (default
  'full_softmax'); D V + V in all. Costs D * V multiply-adds per token and
  keeps the [N, V] logits for the backward pass.
  """

  def __init__(self, vocab_size: int, name: str | None = "full_softmax"):
    """Constructs the layer.

    Args:
      vocab_size: V, the number of words.
      name: module name.

    Raises:
      ValueError: if vocab_size is not a positive integer.
    """
    vocab_size = _check_vocab_size(vocab_size, "FullSoftmax")
    super().__init__(name=name)
    self.vocab_size = vocab_size
    self._output = _Affine(with_bias=True, name="output")

  def num_params(self, hidden_size: int) -> int:
    """D V + V."""
    return hidden_size * self.vocab_size + self.vocab_size

  def _logits(self, hidden_ND: jax.Array) -> jax.Array:
    """Float32 logits [N, V]."""
    w, b = self._output(hidden_ND.shape[-1], self.vocab_size)
    return _affine(hidden_ND, w, b).astype(jnp.float32)

  def log_probs(self, hidden_ND: jax.Array) -> jax.Array:
    """Log-probabilities, [..., D] -> [..., V]."""
    lead = hidden_ND.shape[:-1]
    hidden_ND, _ = _flatten_inputs(hidden_ND, None, "FullSoftmax")
    return jax.nn.log_softmax(self._logits(hidden_ND), axis=-1).reshape(
        *lead, self.vocab_size)

  def nll(self, hidden_ND: jax.Array, targets_N: jax.Array) -> jax.Array:
    """Per-token NLL in nats, [..., D], [...] -> [...].

    NaN where a target is outside [0, V).
    """
    lead = targets_N.shape
    hidden_ND, targets_N = _flatten_inputs(hidden_ND, targets_N, "FullSoftmax")
    index_N = jnp.clip(targets_N, 0, self.vocab_size - 1)
    nll_N = -_picked_log_prob(self._logits(hidden_ND), index_N)
    valid_N = (targets_N >= 0) & (targets_N < self.vocab_size)
    return jnp.where(valid_N, nll_N, jnp.nan).reshape(lead)

  def loss(self, hidden_ND: jax.Array, targets_N: jax.Array,
           mask_N: jax.Array | None = None) -> tuple[jax.Array, LossAux]:
    """As `AdaptiveSoftmax.loss`."""
    nll = self.nll(hidden_ND, targets_N)
    return _masked_mean(nll, mask_N, "FullSoftmax")
