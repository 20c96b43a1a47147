"""Argument checks, seeded random streams and the seeded batch iterator shared by the data generators."""

from __future__ import annotations

import operator
from typing import Any, Iterator

import numpy as np

MAX_SEED = 2**32  # Seeds are one uint32 word of a generator's entropy.


def check_int(name: str, value: Any, minimum: int,
              maximum: int | None = None) -> int:
  """`value` as a Python int; ValueError naming `name` unless an integer in
  [minimum, maximum] (bools are rejected)."""
  bound = f" >= {minimum}" + (f" and <= {maximum}" if maximum is not None
                              else "")
  if isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name} must be an integer{bound}, got {value!r}")
  try:
    as_int = operator.index(value)
  except TypeError:
    raise ValueError(f"{name} must be an integer{bound}, got {value!r}") \
        from None
  if as_int < minimum or (maximum is not None and as_int > maximum):
    raise ValueError(f"{name} must be an integer{bound}, got {as_int}")
  return as_int


def check_seed(seed: Any, name: str = "seed") -> int:
  """A seed: an integer in [0, 2**32)."""
  return check_int(name, seed, 0, MAX_SEED - 1)


def batch_rng(stream: int, seed: int, index: int) -> np.random.Generator:
  """The generator of batch `index` of `stream` under `seed`.

  Always four uint32 words of entropy (stream, seed, low and high halves of
  index): distinct triples never share a stream, unlike variable-length
  lists such as [seed, k] and [seed, k, 0], which SeedSequence zero-pads to
  the same entropy.
  """
  if not 0 <= index < 2**64:
    raise ValueError(f"batch index must be in [0, 2**64), got {index}")
  return np.random.default_rng([stream, seed, index & 0xFFFFFFFF, index >> 32])


class SeededBatches(Iterator[Any]):
  """Batches that are a pure function of (seed, index): `batch_at(index)`.

  Subclasses define `batch_at`; iteration yields batch 0, 1, ... and the
  position is the index of the next batch (plus whatever the subclass adds
  to `get_state`).
  """

  def __init__(self, seed: Any):
    self._seed = check_seed(seed)
    self._index = 0

  @property
  def seed(self) -> int:
    return self._seed

  @property
  def index(self) -> int:
    """Index of the batch the next `__next__` call returns."""
    return self._index

  def batch_at(self, index: int) -> Any:
    raise NotImplementedError

  def __next__(self) -> Any:
    batch = self.batch_at(self._index)
    self._index += 1
    return batch
