"""Tokenised corpora cached as int32 .npy files: `load_corpus`.

The first `load_corpus` call reads every split once, builds the vocabulary
from the training split and writes, into one cache entry directory,

  <cache_dir>/<dataset>-<16 hex digits of sha256(key)>/
    train.npy, valid.npy, test.npy   int32 [num_tokens] token ids
    vocab.txt                        `Vocab.save` format
    manifest.json                    written last

Later calls memory-map the arrays (``np.load(mmap_mode='r')``) and start in
about the time it takes to hash them (`verify=True`, ~1 GB/s) or instantly
(`verify=False`: sizes and headers only).

The key (`cache_key`) holds the dataset, the reader's settings (absolute
data dir, options such as shuffling, reader version), the vocabulary
settings, the splits and the cache format version; the entry directory is
named after its hash, so different settings get different entries. The
manifest also records a fingerprint of the source files (relative path,
size, mtime_ns of each) and, per file, its sha256, byte size and token
count. An entry is used only if the manifest parses, its key equals the
expected key, the fingerprint equals the current one, and every file has the
recorded size (and sha256 when verifying) and shape; anything else (corrupt,
truncated, stale: a source file touched or modified, a source file added or
removed) is logged and the entry is rebuilt in place. The fingerprint uses
sizes and modification times, not contents: a rewrite that keeps both is
not detected (pass `rebuild=True`).

Writes are atomic: every file is written under a unique temporary name and
moved into place with `os.replace`; the old manifest is deleted before a
rebuild starts and the new one is written after all other files, so a crash
leaves either no manifest (rebuilt next time) or a consistent entry.
Processes building the same entry at once produce identical files, so they
cannot corrupt each other. Old entries (other keys) are never deleted.

Building streams: token ids are interned while reading (one pass per
split; the training counts come from `np.bincount` over the interned ids),
spilled to disk in chunks of 4M tokens and remapped to vocabulary ids
chunk by chunk, so memory holds the set of distinct words plus a few chunks,
never a whole split.
"""

from __future__ import annotations

import array
import dataclasses
import hashlib
import io
import json
import os
import re
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from absl import logging
import numpy as np

from rmc_jax.lm import corpora
from rmc_jax.lm.corpora import DataError
from rmc_jax.lm.vocab import Vocab

__all__ = ["Corpus", "load_corpus", "cache_key", "CACHE_FORMAT"]

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
VOCAB_FILE = "vocab.txt"
_CHUNK = 1 << 22  # Tokens per spilled chunk (16 MiB of int32).
_INT32 = np.dtype("<i4")


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A tokenised corpus.

  Attributes:
    vocab: the vocabulary built from the training split.
    splits: {split: int32 [num_tokens] read-only memory-mapped token ids}.
    path: the cache entry directory the arrays live in.
    from_cache: True if an existing entry was used, False if it was (re)built.
    cache_status: 'hit', or why it was built ('missing', 'stale: ...',
      'corrupt: ...', 'rebuild requested').
  """

  vocab: Vocab
  splits: dict[str, np.ndarray]
  path: str
  from_cache: bool
  cache_status: str


def _json_ready(value: Any) -> Any:
  """Round-trips through JSON so key comparisons see what the manifest will hold."""
  return json.loads(json.dumps(value, sort_keys=True))


def cache_key(reader: corpora.CorpusReader, vocab_size: int | None, min_count: int,
              splits: Sequence[str]) -> dict[str, Any]:
  """The JSON key of a cache entry (see module docstring)."""
  return _json_ready({
      "cache_format": CACHE_FORMAT,
      "reader": reader.settings(),
      "vocab": {"max_size": vocab_size, "min_count": min_count},
      "splits": list(splits),
  })


def _fingerprint(reader: corpora.CorpusReader, splits: Sequence[str]) -> dict[str, list]:
  """{split: [[relative path, size, mtime_ns], ...]} of the source files."""
  result = {}
  for split in splits:
    entries = []
    for path in reader.source_files(split):
      st = os.stat(path)
      name = os.path.relpath(path, reader.data_dir) if reader.data_dir else path
      entries.append([name, st.st_size, st.st_mtime_ns])
    result[split] = entries
  return result


def _entry_dir(cache_dir: str, dataset: str, key: Mapping[str, Any]) -> str:
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()
  slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset)
  return os.path.join(cache_dir, f"{slug}-{digest[:16]}")


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _tmp_name(path: str) -> str:
  return f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


# -- Reading an entry -------------------------------------------------------------


def _load_entry(entry: str, key: Mapping[str, Any], fingerprint: Mapping[str, Any],
                splits: Sequence[str], verify: bool
                ) -> tuple[Vocab, dict[str, np.ndarray]] | str:
  """The entry's (vocab, arrays), or a string saying why it cannot be used."""
  manifest_path = os.path.join(entry, MANIFEST)
  if not os.path.exists(manifest_path):
    return "missing"
  try:
    with open(manifest_path, encoding="utf-8") as f:
      manifest = json.load(f)
    if manifest.get("key") != key:
      return "stale: settings differ from the manifest's"
    if manifest.get("sources") != fingerprint:
      return "stale: source files changed (size, mtime or file list)"
    files = {"vocab": manifest["vocab"], **{s: manifest["splits"][s] for s in splits}}
    for what, info in files.items():
      path = os.path.join(entry, info["file"])
      if not os.path.isfile(path):
        return f"corrupt: {info['file']} is missing"
      if os.path.getsize(path) != info["bytes"]:
        return f"corrupt: {info['file']} has {os.path.getsize(path)} bytes, expected {info['bytes']}"
      if (verify or what == "vocab") and _sha256(path) != info["sha256"]:
        return f"corrupt: {info['file']} fails its sha256 check"
    vocab = Vocab.load(os.path.join(entry, manifest["vocab"]["file"]))
    if len(vocab) != manifest["vocab"]["size"]:
      return "corrupt: vocabulary size differs from the manifest's"
    arrays = {}
    for split in splits:
      info = manifest["splits"][split]
      array_N = np.load(os.path.join(entry, info["file"]), mmap_mode="r", allow_pickle=False)
      if array_N.dtype != _INT32 or array_N.shape != (info["num_tokens"],):
        return (f"corrupt: {info['file']} holds {array_N.dtype} {array_N.shape}, expected "
                f"int32 ({info['num_tokens']},)")
      arrays[split] = array_N
    return vocab, arrays
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"corrupt: {type(e).__name__}: {e}"


# -- Building an entry ------------------------------------------------------------


class _Interner:
  """Provisional ids of words, in first-seen order (ids[word] = index)."""

  def __init__(self) -> None:
    self.ids: dict[str, int] = {}

  def extend(self, buffer: array.array, words: list[str]) -> None:
    """Appends the ids of `words` to `buffer`, interning new words."""
    start = len(buffer)
    try:
      buffer.extend(map(self.ids.__getitem__, words))  # Fast path: all words known.
    except KeyError:
      del buffer[start:]
      ids = self.ids
      for word in words:
        if word not in ids:
          ids[word] = len(ids)
      buffer.extend(map(ids.__getitem__, words))


def _spill(sequences: Iterable[list[str]], interner: _Interner, raw_path: str,
           count: bool) -> tuple[int, np.ndarray]:
  """Writes the provisional ids of `sequences` as raw int32 to `raw_path`.

  Returns (number of tokens, int64 counts per provisional id, or an empty array
  if not `count`).
  """
  counts = np.zeros(0, np.int64)
  total = 0
  buffer = array.array("i")
  assert buffer.itemsize == 4
  with open(raw_path, "wb") as f:

    def flush() -> None:
      nonlocal counts, total, buffer
      if not buffer:
        return
      if count:
        chunk_counts = np.bincount(np.frombuffer(buffer, dtype=np.int32),
                                   minlength=len(interner.ids))
        chunk_counts[:counts.size] += counts
        counts = chunk_counts
      buffer.tofile(f)
      total += len(buffer)
      buffer = array.array("i")

    for words in sequences:
      interner.extend(buffer, words)
      if len(buffer) >= _CHUNK:
        flush()
    flush()
  return total, counts


def _write_npy(raw_path: str, num_tokens: int, remap: np.ndarray, out_path: str) -> dict:
  """Remaps a raw provisional-id file into an int32 .npy (atomically); returns its manifest info."""
  header = io.BytesIO()
  np.lib.format.write_array_header_1_0(
      header, {"descr": np.lib.format.dtype_to_descr(_INT32), "fortran_order": False,
               "shape": (num_tokens,)})
  digest = hashlib.sha256(header.getvalue())
  tmp = _tmp_name(out_path)
  try:
    with open(raw_path, "rb") as src, open(tmp, "wb") as dst:
      dst.write(header.getvalue())
      while True:
        chunk = np.fromfile(src, dtype=np.int32, count=_CHUNK)
        if not chunk.size:
          break
        data = remap[chunk].astype(_INT32, copy=False).tobytes()
        digest.update(data)
        dst.write(data)
    os.replace(tmp, out_path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return {"file": os.path.basename(out_path), "sha256": digest.hexdigest(),
          "bytes": os.path.getsize(out_path), "num_tokens": num_tokens}


def _build_entry(entry: str, reader: corpora.CorpusReader, key: Mapping[str, Any],
                 fingerprint: Mapping[str, Any], splits: Sequence[str],
                 vocab_size: int | None, min_count: int) -> None:
  """Reads the splits, builds the vocabulary and writes the entry (manifest last)."""
  os.makedirs(entry, exist_ok=True)
  manifest_path = os.path.join(entry, MANIFEST)
  if os.path.exists(manifest_path):
    os.remove(manifest_path)
  start = time.perf_counter()
  interner = _Interner()
  raw_paths = {s: _tmp_name(os.path.join(entry, f"{s}.ids")) for s in splits}
  try:
    sizes, train_counts = {}, None
    for split in splits:
      sizes[split], counts = _spill(reader.sequences(split), interner, raw_paths[split],
                                    count=split == "train")
      if split == "train":
        train_counts = counts
      logging.info("Read %s %s: %d tokens (%.1f s).", reader.name, split, sizes[split],
                   time.perf_counter() - start)
    words = list(interner.ids)
    vocab = Vocab.build({words[i]: int(c) for i, c in enumerate(train_counts.tolist()) if c},
                        vocab_size, min_count)
    remap = np.array([vocab.id_of(w) for w in words], dtype=np.int32)
    split_info = {s: _write_npy(raw_paths[s], sizes[s], remap,
                                os.path.join(entry, f"{s}.npy")) for s in splits}
  finally:
    for path in raw_paths.values():
      if os.path.exists(path):
        os.remove(path)
  vocab_path = os.path.join(entry, VOCAB_FILE)
  vocab.save(vocab_path)
  manifest = {
      "key": key,
      "sources": fingerprint,
      "vocab": {"file": VOCAB_FILE, "sha256": _sha256(vocab_path),
                "bytes": os.path.getsize(vocab_path), "size": len(vocab)},
      "splits": split_info,
      "build_seconds": round(time.perf_counter() - start, 3),
      "created_unix": int(time.time()),
  }
  tmp = _tmp_name(manifest_path)
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(tmp, manifest_path)


# -- Public entry point -----------------------------------------------------------


def load_corpus(dataset: str, data_dir: str | None, cache_dir: str,
                vocab_size: int | None = None, min_count: int = 1, *,
                reader_options: Mapping[str, Any] | None = None,
                splits: Sequence[str] = corpora.SPLITS, verify: bool = True,
                rebuild: bool = False) -> Corpus:
  """Tokenised `splits` of `dataset`, from the cache when it is valid.

  Args:
    dataset: a name accepted by `corpora.make_reader` ('wikitext', 'pg19',
      'gigaword', 'text', 'synthetic', 'tfds:NAME', aliases).
    data_dir: the corpus directory (None for 'synthetic'; optional TFDS dir).
    cache_dir: where cache entries live (created if needed).
    vocab_size: maximum vocabulary size including <unk> and <eos> (None: all).
    min_count: minimum training count of a vocabulary word.
    reader_options: keyword options of the reader (e.g. shuffle_seed).
    splits: the splits to tokenise; must include 'train' (the vocabulary
      comes from it).
    verify: check every array's sha256 on load (cost: one read of the files).
    rebuild: ignore any existing entry.

  Returns:
    A `Corpus` whose arrays are int32, read-only, memory-mapped.

  Raises:
    DataError: bad input (see `corpora`); ValueError: bad arguments.
  """
  splits = tuple(splits)
  if "train" not in splits or len(set(splits)) != len(splits) or \
      any(s not in corpora.SPLITS for s in splits):
    raise ValueError(f"splits must be distinct names from {corpora.SPLITS} including "
                     f"'train', got {splits}")
  reader = corpora.make_reader(dataset, data_dir, **dict(reader_options or {}))
  key = cache_key(reader, vocab_size, min_count, splits)
  fingerprint = _json_ready(_fingerprint(reader, splits))
  cache_dir = os.path.abspath(os.fspath(cache_dir))
  if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
    raise DataError(f"cache dir {cache_dir} is not a directory")
  entry = _entry_dir(cache_dir, reader.name, key)
  status = "rebuild requested" if rebuild else None
  if not rebuild:
    loaded = _load_entry(entry, key, fingerprint, splits, verify)
    if not isinstance(loaded, str):
      logging.info("Loaded %s from the cache %s.", reader.name, entry)
      return Corpus(loaded[0], loaded[1], entry, True, "hit")
    status = loaded
  if status != "missing":
    logging.warning("Rebuilding the token cache %s: %s.", entry, status)
  # Validate vocabulary settings before the (possibly long) read.
  Vocab.build({}, vocab_size, min_count)
  _build_entry(entry, reader, key, fingerprint, splits, vocab_size, min_count)
  loaded = _load_entry(entry, key, fingerprint, splits, verify=False)
  if isinstance(loaded, str):
    raise DataError(f"the token cache {entry} could not be read back after building "
                    f"it: {loaded}")
  return Corpus(loaded[0], loaded[1], entry, False, status)
