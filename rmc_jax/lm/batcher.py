"""Truncated-BPTT batches of a token stream.

Every batch is a dict of NumPy arrays with the batch axis first:

  'inputs':  int32 [B, T]   token ids
  'targets': int32 [B, T]   the next token of each input
  'mask':    float32 [B, T] 1 where the target counts, 0 on padding
  'reset':   bool [B]       True on the first segment of a pass (epoch or
                            evaluation), where the recurrent state must be
                            reset to its initial value; otherwise the state
                            carried from the previous batch continues the lane

Layout. A stream of N tokens gives N - 1 (input, target) pairs,
pair p = (tokens[p], tokens[p + 1]). The pairs are cut into B contiguous
lanes; row b of consecutive batches walks lane b in order, T pairs at a time,
so the carried state of row b always belongs to the tokens just before.

* Training (`TBPTTBatcher`): lane length L = (N - 1) // B, lane b holds
  pairs [b L, (b + 1) L) (the last (N - 1) % B pairs are never used). Epoch e
  starts at an offset o_e into every lane (0, or with `random_offsets` drawn
  uniformly from [0, T) by a generator seeded with (seed, e), so truncation
  points move between epochs) and has S_e = (L - o_e) // T full segments
  (the remaining < T pairs of each lane are skipped that epoch); segment s
  covers lane pairs [o_e + s T, o_e + (s + 1) T). The mask is all ones. The
  iterator cycles epochs forever; its position is (epoch, segment), saved by
  `get_state` and restored by `set_state`, and batch (e, s) is a pure
  function of the stream, the layout and (seed, e), so a resumed run sees
  exactly the batches an uninterrupted one would.
* Evaluation (`EvalBatches`): every pair exactly once. Lane length
  L' = ceil((N - 1) / B), lane b holds pairs [b L', (b + 1) L') clipped to
  N - 1, and there are ceil(L' / T) segments; positions past the end of the
  stream (the tail of the last lanes, the end of the last segment) are padded
  with id 0 and mask 0. Summing the per-token loss times the mask over all
  batches and dividing by the mask's sum (= N - 1) gives the exact per-token
  loss of the split, with each lane's state carried from its own start. The
  first token of the stream is context only (with WikiText it is the
  '<eos>' of the blank first line).

Tokens may be a read-only memory map: batches gather only the B x T entries
they need.

Rows. With `rows` (a slice of [0, B), e.g. a process's
`rmc_jax.training.mesh.process_rows(B)`) a batcher yields only those rows of
every batch, i.e. reads only those lanes of the stream; the layout, the
position and the saved state are those of the whole B-lane batcher, so the
rows of every process put together are the global batches.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from rmc_jax.checks import check_int

__all__ = ["TBPTTBatcher", "EvalBatches"]


def _check_rows(rows: slice | None, batch_size: int) -> range:
  """The lanes `rows` names (all of them for None); a non-empty step-1 slice."""
  lanes = range(batch_size) if rows is None else range(batch_size)[rows]
  if not lanes or lanes.step != 1:
    raise ValueError(f"rows {rows} must be a non-empty contiguous slice of "
                     f"the {batch_size} lanes")
  return lanes


def _check_tokens(tokens: Any) -> np.ndarray:
  tokens_N = tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens)
  if tokens_N.ndim != 1 or not np.issubdtype(tokens_N.dtype, np.integer):
    raise ValueError(f"tokens must be a 1-D integer array, got {tokens_N.dtype} "
                     f"{tokens_N.shape}")
  return tokens_N


class TBPTTBatcher(Iterator[dict]):
  """Infinite, resumable training batches of a token stream (see module docstring).

  Attributes:
    batch_size: B, the global batch (number of lanes).
    seq_len: T, pairs per segment.
    lane_len: L = (N - 1) // B pairs per lane.
    lanes: the lanes (rows) every batch holds, of [0, B).
    epoch, segment: the position of the batch the next `__next__` returns.
  """

  def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, *,
               random_offsets: bool = False, seed: int = 0,
               rows: slice | None = None) -> None:
    """Raises ValueError unless every lane holds at least one full segment (L >= T)."""
    self.tokens = _check_tokens(tokens)
    self.batch_size = check_int("batch_size", batch_size, 1)
    self.seq_len = check_int("seq_len", seq_len, 1)
    self.random_offsets = bool(random_offsets)
    self.seed = check_int("seed", seed, 0)
    self.lane_len = (self.tokens.shape[0] - 1) // self.batch_size
    if self.lane_len < self.seq_len:
      raise ValueError(
          f"a stream of {self.tokens.shape[0]} tokens gives lanes of {self.lane_len} "
          f"pairs at batch_size {self.batch_size}, shorter than seq_len {self.seq_len}")
    self.lanes = _check_rows(rows, self.batch_size)
    self._lane_starts_B1 = (np.asarray(self.lanes, dtype=np.int64)
                            * self.lane_len)[:, None]
    self._steps_1T = np.arange(self.seq_len, dtype=np.int64)[None, :]
    self.epoch = 0
    self.segment = 0

  def offset(self, epoch: int) -> int:
    """o_e, the pair offset at which epoch `epoch` starts in every lane."""
    if not self.random_offsets:
      return 0
    return int(np.random.default_rng([self.seed, epoch]).integers(0, self.seq_len))

  def segments_in_epoch(self, epoch: int) -> int:
    """S_e = (L - o_e) // T >= 1."""
    return (self.lane_len - self.offset(epoch)) // self.seq_len

  def batch_at(self, epoch: int, segment: int) -> dict[str, np.ndarray]:
    """Batch (epoch, segment) without moving the iterator."""
    epoch, segment = check_int("epoch", epoch, 0), check_int("segment", segment, 0)
    if segment >= self.segments_in_epoch(epoch):
      raise ValueError(f"epoch {epoch} has {self.segments_in_epoch(epoch)} segments, "
                       f"asked for segment {segment}")
    start = self.offset(epoch) + segment * self.seq_len
    pairs_BT = self._lane_starts_B1 + start + self._steps_1T
    return {
        "inputs": self.tokens[pairs_BT].astype(np.int32),
        "targets": self.tokens[pairs_BT + 1].astype(np.int32),
        "mask": np.ones((len(self.lanes), self.seq_len), np.float32),
        "reset": np.full((len(self.lanes),), segment == 0),
    }

  @property
  def is_first_segment(self) -> bool:
    """True if the next batch starts an epoch (its 'reset' flags are True)."""
    return self.segment == 0

  def __iter__(self) -> TBPTTBatcher:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.segment >= self.segments_in_epoch(self.epoch):
      self.epoch, self.segment = self.epoch + 1, 0
    batch = self.batch_at(self.epoch, self.segment)
    self.segment += 1
    if self.segment >= self.segments_in_epoch(self.epoch):
      self.epoch, self.segment = self.epoch + 1, 0
    return batch

  def _layout(self) -> dict[str, Any]:
    return {"num_tokens": int(self.tokens.shape[0]), "batch_size": self.batch_size,
            "seq_len": self.seq_len, "random_offsets": self.random_offsets,
            "seed": self.seed}

  def get_state(self) -> dict[str, Any]:
    """JSON position {'epoch', 'segment'} plus the layout it refers to
    ('num_tokens', 'batch_size', 'seq_len', 'random_offsets', 'seed')."""
    return {"epoch": self.epoch, "segment": self.segment, **self._layout()}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Restores a `get_state` position.

    Raises ValueError if 'epoch'/'segment' are missing or out of range, or if a
    layout key present in `state` differs from this batcher's (resuming on a
    different stream or batch shape would silently change the data).
    """
    if not isinstance(state, Mapping) or not {"epoch", "segment"} <= state.keys():
      raise ValueError(f"state must be a mapping with keys 'epoch' and 'segment', "
                       f"got {state!r}")
    for name, value in self._layout().items():
      if name in state and state[name] != value:
        raise ValueError(f"iterator state has {name}={state[name]!r} but this batcher "
                         f"has {name}={value!r}")
    epoch = check_int("epoch", state["epoch"], 0)
    segment = check_int("segment", state["segment"], 0)
    if segment > self.segments_in_epoch(epoch):
      raise ValueError(f"segment {segment} is beyond epoch {epoch}'s "
                       f"{self.segments_in_epoch(epoch)} segments")
    self.epoch, self.segment = epoch, segment


class EvalBatches:
  """Finite evaluation batches covering every pair of a stream once (see module docstring).

  A re-iterable sequence: `len()`, indexing and iteration, batches built on demand.

  Attributes:
    batch_size: B. seq_len: T.
    lane_len: L' = ceil((N - 1) / B).
    num_targets: N - 1, the sum of all masks (of all B lanes).
    lanes: the lanes (rows) every batch holds, of [0, B).
  """

  def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, *,
               rows: slice | None = None) -> None:
    """Raises ValueError for a stream of fewer than 2 tokens."""
    self.tokens = _check_tokens(tokens)
    self.batch_size = check_int("batch_size", batch_size, 1)
    self.seq_len = check_int("seq_len", seq_len, 1)
    self.num_targets = self.tokens.shape[0] - 1
    if self.num_targets < 1:
      raise ValueError(f"an evaluation stream needs at least 2 tokens, got "
                       f"{self.tokens.shape[0]}")
    self.lane_len = math.ceil(self.num_targets / self.batch_size)
    self.lanes = _check_rows(rows, self.batch_size)
    self._num_batches = math.ceil(self.lane_len / self.seq_len)

  def __len__(self) -> int:
    return self._num_batches

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = operator.index(index)
    if index < 0:
      index += self._num_batches
    if not 0 <= index < self._num_batches:
      raise IndexError(f"batch {index} out of range [0, {self._num_batches})")
    steps_1T = index * self.seq_len + np.arange(self.seq_len, dtype=np.int64)[None, :]
    lane_starts_B1 = (np.asarray(self.lanes, dtype=np.int64) * self.lane_len)[:, None]
    pairs_BT = lane_starts_B1 + steps_1T
    valid_BT = (steps_1T < self.lane_len) & (pairs_BT < self.num_targets)
    safe_BT = np.where(valid_BT, pairs_BT, 0)
    return {
        "inputs": np.where(valid_BT, self.tokens[safe_BT], 0).astype(np.int32),
        "targets": np.where(valid_BT, self.tokens[safe_BT + 1], 0).astype(np.int32),
        "mask": valid_BT.astype(np.float32),
        "reset": np.full((len(self.lanes),), index == 0),
    }

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    for index in range(self._num_batches):
      yield self[index]
