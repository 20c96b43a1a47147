"""Word vocabulary of a language-modelling corpus.

Ids: 0 = '<unk>', 1 = '<eos>', then the other words by decreasing training
count, ties broken by the words' code-point order (`sorted`), so the same
counts always give the same ids. Frequency order also suits adaptive softmax
cut-offs. Built once from the training split (`Vocab.build`):

* `min_count`: words seen fewer times are left out (mapped to <unk>);
* `max_size`: at most this many entries *including* <unk> and <eos>; the
  least frequent words beyond it are left out.

`counts[i]` is the training count of entry i; `counts[0]` is the number of
training tokens that map to <unk> (literal '<unk>' tokens, as in WikiText,
plus every left-out word), so `counts.sum()` is the number of training tokens.

File format (`save` / `load`): UTF-8 text, line i = ``word<TAB>count`` for id
i, nothing else. Words never contain whitespace (they come from
whitespace-splitting or regex tokenisation), which `Vocab` enforces.
"""

from __future__ import annotations

import collections
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from rmc_jax.lm.corpora import DataError

__all__ = ["Vocab", "UNK", "EOS", "UNK_ID", "EOS_ID"]

UNK = "<unk>"
EOS = "<eos>"
UNK_ID = 0
EOS_ID = 1


class Vocab:
  """An immutable word <-> id mapping (see module docstring for the id order).

  Attributes:
    words: tuple of the entries, index = id; words[0] == '<unk>', words[1] == '<eos>'.
    counts: int64 [len(words)], training counts (zeros if unknown).
  """

  unk_id = UNK_ID
  eos_id = EOS_ID

  def __init__(self, words: Sequence[str], counts: Sequence[int] | None = None) -> None:
    """Wraps an explicit word list; raises ValueError unless it starts with
    '<unk>', '<eos>' and holds distinct, non-empty, whitespace-free words."""
    words = tuple(words)
    if words[:2] != (UNK, EOS):
      raise ValueError(f"a vocabulary must start with {UNK!r}, {EOS!r}, got {words[:2]}")
    index = {}
    for i, word in enumerate(words):
      if not isinstance(word, str) or not word or word != "".join(word.split()):
        raise ValueError(f"vocabulary entry {i} is not a non-empty word without "
                         f"whitespace: {word!r}")
      if index.setdefault(word, i) != i:
        raise ValueError(f"duplicate vocabulary entry {word!r} at ids {index[word]} and {i}")
    counts_V = np.zeros(len(words), np.int64) if counts is None else \
        np.asarray(counts, dtype=np.int64)
    if counts_V.shape != (len(words),) or (counts_V < 0).any():
      raise ValueError(f"counts must be {len(words)} non-negative integers")
    self.words = words
    self.counts = counts_V
    self.counts.setflags(write=False)
    self._index = index

  # -- Construction -------------------------------------------------------------

  @classmethod
  def build(cls, counts: Mapping[str, int], max_size: int | None = None,
            min_count: int = 1) -> Vocab:
    """Vocabulary of the words in `counts` (word -> training count).

    Raises ValueError if max_size < 2 or min_count < 1.
    """
    if max_size is not None and (isinstance(max_size, bool) or int(max_size) != max_size
                                 or max_size < 2):
      raise ValueError(f"max_size must be None or an integer >= 2, got {max_size!r}")
    if isinstance(min_count, bool) or int(min_count) != min_count or min_count < 1:
      raise ValueError(f"min_count must be an integer >= 1, got {min_count!r}")
    candidates = [(w, c) for w, c in counts.items() if w not in (UNK, EOS) and c > 0]
    candidates.sort(key=lambda wc: (-wc[1], wc[0]))
    kept = [wc for wc in candidates if wc[1] >= min_count]
    if max_size is not None:
      kept = kept[:int(max_size) - 2]
    unk_count = counts.get(UNK, 0) + sum(c for _, c in candidates) - sum(c for _, c in kept)
    words = [UNK, EOS] + [w for w, _ in kept]
    return cls(words, [unk_count, counts.get(EOS, 0)] + [c for _, c in kept])

  @classmethod
  def from_sequences(cls, sequences: Iterable[Sequence[str]], max_size: int | None = None,
                     min_count: int = 1) -> Vocab:
    """`build` from the counts of the words in `sequences` (e.g. a reader's train split)."""
    counter: collections.Counter[str] = collections.Counter()
    for words in sequences:
      counter.update(words)
    return cls.build(counter, max_size, min_count)

  # -- Lookup -------------------------------------------------------------------

  def __len__(self) -> int:
    return len(self.words)

  def __contains__(self, word: object) -> bool:
    return word in self._index

  def __eq__(self, other: object) -> bool:
    return (isinstance(other, Vocab) and self.words == other.words
            and np.array_equal(self.counts, other.counts))

  def __repr__(self) -> str:
    return f"Vocab({len(self)} words: {', '.join(self.words[:6])}{', ...' if len(self) > 6 else ''})"

  def id_of(self, word: str) -> int:
    """The id of `word`, or 0 (<unk>) if it is not in the vocabulary."""
    return self._index.get(word, UNK_ID)

  def encode(self, words: Iterable[str]) -> np.ndarray:
    """int32 [N]: the ids of `words`, <unk> (0) for unknown ones."""
    get = self._index.get
    return np.fromiter((get(w, UNK_ID) for w in words), dtype=np.int32)

  def decode(self, ids: Iterable[int] | np.ndarray) -> list[str]:
    """The words of `ids`; raises IndexError for an id outside [0, len)."""
    ids_N = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids_N.size and (ids_N.min() < 0 or ids_N.max() >= len(self.words)):
      raise IndexError(f"ids must be in [0, {len(self.words)})")
    return [self.words[i] for i in ids_N.tolist()]

  # -- Files --------------------------------------------------------------------

  def save(self, path: str) -> None:
    """Writes the vocabulary atomically (temporary file + os.replace)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
      with open(tmp, "x", encoding="utf-8", newline="\n") as f:
        for word, count in zip(self.words, self.counts.tolist()):
          f.write(f"{word}\t{count}\n")
      os.replace(tmp, path)
    except BaseException:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise

  @classmethod
  def load(cls, path: str) -> Vocab:
    """Reads a file written by `save`; DataError naming the file (and line) if malformed."""
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise DataError(f"missing vocabulary file {path}")
    words, counts = [], []
    try:
      with open(path, encoding="utf-8", newline="\n") as f:
        for line_number, line in enumerate(f, 1):
          fields = line.rstrip("\n").split("\t")
          if len(fields) != 2 or not fields[1].isdigit():
            raise DataError(f"{path}:{line_number}: expected 'word<TAB>count', got {line!r}")
          words.append(fields[0])
          counts.append(int(fields[1]))
    except UnicodeDecodeError as e:
      raise DataError(f"{path}: invalid UTF-8 ({e.reason})") from None
    try:
      return cls(words, counts)
    except ValueError as e:
      raise DataError(f"{path}: {e}") from None
