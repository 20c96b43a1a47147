"""Streaming readers of word-level language-modelling corpora.

A reader turns one split ('train' | 'valid' | 'test') of a corpus into an
iterator of lists of words, one list per line or paragraph, each ending with
'<eos>'. Readers stream: files are read line by line (bytes decoded one line
at a time, so an undecodable byte is reported with its file and byte offset);
no file is ever loaded whole.

Datasets (`make_reader(dataset, data_dir, **options)`):

* 'wikitext' (aliases 'wikitext-103', 'wikitext-2', 'wt103', 'wt2'):
  `data_dir` holds `wiki.{train,valid,test}.tokens`, or `wiki.*.raw`, or
  `train.txt/valid.txt/test.txt` (the first family with any file present is
  used). Every line, blank lines included, gives ``line.split() + ['<eos>']``
  (the standard convention: WT-103 valid 217,646 tokens, test 245,569). Lines
  end at b'\\n' only. Option `shuffle_seed`: shuffle the *training* split at
  article level (seeded permutation); an article starts at a single-'='
  heading line ``' = Title = '`` whose neighbouring lines are blank (formula
  lines such as ``' = 1 <unk> and <unk> C = '`` inside articles are not
  headings) and runs to the next article heading; lines before the first
  heading stay first. Articles are read back by seeking, so shuffling costs
  one extra scan and no memory beyond one article.
* 'pg19': `data_dir` holds `train/`, `validation/`, `test/` folders of
  `<book_id>.txt` (split 'valid' reads `validation/`) and an optional
  header-less `metadata.csv` (see `read_pg19_metadata`). Books are read in
  increasing numeric id order (non-numeric names after, sorted); option
  `shuffle_seed` permutes the training books. Tokenisation: `regex_tokenize`
  (option `tokenizer='whitespace'` for `str.split`). Option `eos`:
  'paragraph' (default) yields one sequence per paragraph (a maximal run of
  non-blank lines, its Gutenberg line wrapping joined), so '<eos>' marks
  paragraph ends rather than the arbitrary ~70-character wrap points; 'line'
  yields one per non-blank line. Blank lines never produce tokens.
* 'gigaword' (English Gigaword v5): `data_dir` holds `data/<source>/*.gz` (or
  is that `data/` folder), gzip'd SGML. Only documents whose `type` is in
  `doc_types` (default ('story',)) are kept; each paragraph of their <TEXT>
  (each <P>...</P>, or a run of text directly inside <TEXT>) is one sequence:
  the lines joined with spaces, SGML entities unescaped (`unescape_sgml`),
  tokenised with `regex_tokenize`, '<eos>' appended. Headlines and datelines
  are dropped. The split is by file: either explicit file names
  (`valid_files`, `test_files`; the rest is train), or by a hash of the file
  name: u = first 8 bytes of sha256(name) / 2**64; test if u <
  `test_fraction`, valid if u < test_fraction + `valid_fraction`, train
  otherwise (defaults 0.005 each, i.e. about 5 of Gigaword v5's ~1,000
  monthly files each; deterministic and independent of the directory).
  Files are read in sorted relative-path order; `shuffle_seed` permutes the
  training files.
* 'text': `data_dir` holds `train.txt`, `valid.txt`, `test.txt`; every
  non-blank line is one sequence (blank lines are skipped), tokenised with
  `str.split` by default (option `tokenizer='regex'`).
* 'tfds:NAME' (e.g. 'tfds:pg19', 'tfds:lm1b'): TensorFlow Datasets, imported
  lazily (with TensorFlow kept off GPUs and TPUs, which stay JAX's); a
  one-line `OptionalDependencyError` names the optional extra when
  TensorFlow or TFDS is missing. `data_dir` is the TFDS data dir (None:
  TFDS's default). Each example's text feature (`text_key`, default the first of
  'book_text', 'text' present) is split into lines and treated like a PG-19
  book (`eos` and `tokenizer` options as for 'pg19'). Split names map
  'valid' -> 'validation' unless `split_names` says otherwise (lm1b has no
  validation split: pass split_names={'valid': 'test'} or similar).
  No download happens unless `download=True`. Options of the local readers
  that do not apply to TFDS (`shuffle_seed`: examples are read in their
  stored order) are ignored with a warning.
* 'synthetic': `MarkovSource` (see rmc_jax.lm.synthetic); `data_dir` must be
  None; options are the source's settings plus `train_tokens`,
  `valid_tokens`, `test_tokens`.

Errors: bad input raises `DataError` (a ValueError) with a one-line message
naming the file or directory: missing or empty data dir, unrecognised
layout, missing split file or folder, empty split, undecodable bytes (file
and byte offset), corrupt gzip data, unknown dataset name or reader option. Readers check
paths eagerly (in the constructor and in `sequences`/`source_files`); an
empty split is detected when its iterator is exhausted.
"""

from __future__ import annotations

import abc
import csv
import dataclasses
import gzip
import hashlib
import html
import inspect
import io
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, BinaryIO

from absl import logging
import numpy as np

from rmc_jax.lm import synthetic

__all__ = [
    "SPLITS",
    "EOS",
    "DataError",
    "OptionalDependencyError",
    "regex_tokenize",
    "whitespace_tokenize",
    "unescape_sgml",
    "CorpusReader",
    "WikiTextReader",
    "PG19Reader",
    "PG19Book",
    "read_pg19_metadata",
    "GigawordReader",
    "TextReader",
    "TFDSReader",
    "SyntheticReader",
    "DATASETS",
    "canonical_dataset",
    "make_reader",
    "read_split",
]

SPLITS = ("train", "valid", "test")
EOS = "<eos>"


class DataError(ValueError):
  """Bad corpus input; the one-line message names the file or directory."""


class OptionalDependencyError(DataError, ImportError):
  """An optional dependency (e.g. tensorflow-datasets) is not installed; the
  one-line message names the extra to install."""


# -- Tokenisation ----------------------------------------------------------------

_WORD_RE = re.compile(r"\w+|[^\w\s]")


def regex_tokenize(text: str) -> list[str]:
  r"""Words and punctuation as separate tokens: ``re.findall(r"\w+|[^\w\s]", text)``.

  A token is a maximal run of Unicode word characters (letters, digits,
  underscore) or a single other non-space character: "Don't stop..." ->
  ['Don', "'", 't', 'stop', '.', '.', '.']. Case is kept; no normalisation.
  """
  return _WORD_RE.findall(text)


def whitespace_tokenize(text: str) -> list[str]:
  """``text.split()``: for already tokenised corpora (WikiText, LM1B)."""
  return text.split()


_TOKENIZERS: dict[str, Callable[[str], list[str]]] = {
    "regex": regex_tokenize, "whitespace": whitespace_tokenize}


def _tokenizer(name: str) -> Callable[[str], list[str]]:
  if name not in _TOKENIZERS:
    raise ValueError(f"tokenizer must be one of {sorted(_TOKENIZERS)}, got {name!r}")
  return _TOKENIZERS[name]


_ENTITY_RE = re.compile(r"&(#[0-9]+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*);")
# Entities of Gigaword's SGML, matched case-insensitively. LR/RR are taken to
# be the round brackets; anything else goes through `html.unescape` and is
# kept verbatim if that does not know it.
_SGML_ENTITIES = {"AMP": "&", "LT": "<", "GT": ">", "QUOT": '"', "APOS": "'",
                  "LR": "(", "RR": ")"}


def _replace_entity(match: re.Match) -> str:
  name = match.group(1)
  known = _SGML_ENTITIES.get(name.upper())
  if known is not None:
    return known
  return html.unescape(match.group(0))


def unescape_sgml(text: str) -> str:
  """Replaces SGML entities: &AMP; &LT; &GT; &QUOT; &APOS; &LR; ( &RR; ) in any
  case, numeric ones and HTML named ones; unknown entities are kept as they are."""
  if "&" not in text:
    return text
  return _ENTITY_RE.sub(_replace_entity, text)


# -- Low-level streaming ----------------------------------------------------------


def _decoded_lines(stream: BinaryIO, path: str, base_offset: int = 0,
                   what: str = "byte offset") -> Iterator[str]:
  """Yields the lines of a binary stream (split at b'\\n', newline kept), decoded as UTF-8.

  A UTF-8 byte-order mark at offset 0 is dropped. Raises DataError naming
  `path` and the byte offset of the first undecodable byte.
  """
  offset = base_offset
  for raw in stream:
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise DataError(f"{path}: invalid UTF-8 at {what} {offset + e.start} "
                      f"({e.reason})") from None
    if offset == 0 and line.startswith("\ufeff"):
      line = line[1:]
    offset += len(raw)
    yield line


def _check_split(split: str) -> str:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  return split


def _check_dir(data_dir: Any, what: str) -> str:
  """Returns the absolute path of an existing directory, or raises DataError."""
  if data_dir is None:
    raise DataError(f"{what}: a data_dir is required")
  path = os.path.abspath(os.fspath(data_dir))
  if not os.path.exists(path):
    raise DataError(f"{what} data dir {path} does not exist")
  if not os.path.isdir(path):
    raise DataError(f"{what} data dir {path} is not a directory")
  return path


def _nonempty(sequences: Iterable[list[str]], where: str) -> Iterator[list[str]]:
  """Passes `sequences` through; raises DataError at the end if there were none."""
  empty = True
  for words in sequences:
    empty = False
    yield words
  if empty:
    raise DataError(f"{where} is empty (no text)")


def _paragraphs(lines: Iterable[str], tokenize: Callable[[str], list[str]],
                eos: str) -> Iterator[list[str]]:
  """Sequences of a book: one per paragraph (eos='paragraph') or non-blank line."""
  if eos == "line":
    for line in lines:
      words = tokenize(line)
      if words:
        words.append(EOS)
        yield words
    return
  words: list[str] = []
  for line in lines:
    if line.strip():
      words.extend(tokenize(line))
    elif words:
      words.append(EOS)
      yield words
      words = []
  if words:
    words.append(EOS)
    yield words


def _check_eos(eos: str) -> str:
  if eos not in ("paragraph", "line"):
    raise ValueError(f"eos must be 'paragraph' or 'line', got {eos!r}")
  return eos


def _check_seed(seed: Any) -> int | None:
  if seed is None:
    return None
  if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) \
      or seed < 0:
    raise ValueError(f"shuffle_seed must be None or an integer >= 0, got {seed!r}")
  return int(seed)


# -- The reader interface ---------------------------------------------------------


class CorpusReader(abc.ABC):
  """One corpus on disk (or generated): its splits as streams of word lists.

  Attributes:
    name: canonical dataset name (part of the cache key).
    version: bumped whenever the token stream a reader produces changes,
      which invalidates caches built by older versions.
    data_dir: absolute path of the corpus directory (None if not on disk).
  """

  name: str = ""
  version: int = 1
  data_dir: str | None = None

  @abc.abstractmethod
  def source_files(self, split: str) -> list[str]:
    """Absolute paths of the files split `split` is read from (for cache keys).

    Raises DataError if the split's files are missing.
    """

  @abc.abstractmethod
  def sequences(self, split: str) -> Iterator[list[str]]:
    """The split's token stream: lists of words, each ending with '<eos>'.

    Paths are checked before the iterator is returned; decoding errors and an
    empty split raise DataError during iteration.
    """

  def settings(self) -> dict[str, Any]:
    """JSON description of everything the token stream depends on besides file contents."""
    return {"dataset": self.name, "version": self.version, "data_dir": self.data_dir}


# -- WikiText ---------------------------------------------------------------------

_WIKITEXT_FAMILIES = (("tokens", "wiki.{}.tokens"), ("raw", "wiki.{}.raw"),
                      ("txt", "{}.txt"))


def _is_heading_candidate(stripped: bytes) -> bool:
  """True for b'= Title =' (single '='), not for b'= = Section = ='."""
  return (len(stripped) >= 3 and stripped.startswith(b"= ") and stripped.endswith(b" =")
          and not stripped.startswith(b"= =") and not stripped.endswith(b"= ="))


def _article_offsets(path: str) -> tuple[list[int], int]:
  """Byte offsets of the article heading lines of a WikiText file, and its size.

  A heading counts as an article start when the lines around it are blank
  (or it is at the start/end of the file).
  """
  starts: list[int] = []
  offset = 0
  previous_blank = True
  pending: int | None = None  # Offset of a candidate heading awaiting its next line.
  with open(path, "rb") as f:
    for raw in f:
      stripped = raw.strip()
      if pending is not None and not stripped:
        starts.append(pending)
      pending = offset if previous_blank and _is_heading_candidate(stripped) else None
      previous_blank = not stripped
      offset += len(raw)
  if pending is not None:
    starts.append(pending)
  return starts, offset


class WikiTextReader(CorpusReader):
  """WikiText-103 / WikiText-2 (see module docstring)."""

  name = "wikitext"
  version = 1

  def __init__(self, data_dir: str, shuffle_seed: int | None = None) -> None:
    self.data_dir = _check_dir(data_dir, "WikiText")
    self.shuffle_seed = _check_seed(shuffle_seed)
    for family, pattern in _WIKITEXT_FAMILIES:
      if any(os.path.isfile(os.path.join(self.data_dir, pattern.format(s)))
             for s in SPLITS):
        self.family, self._pattern = family, pattern
        break
    else:
      raise DataError(
          f"no WikiText split files (wiki.{{train,valid,test}}.tokens, "
          f"wiki.*.raw or train/valid/test.txt) in {self.data_dir}")

  def source_files(self, split: str) -> list[str]:
    path = os.path.join(self.data_dir, self._pattern.format(_check_split(split)))
    if not os.path.isfile(path):
      raise DataError(f"missing WikiText split file {path}")
    return [path]

  def sequences(self, split: str) -> Iterator[list[str]]:
    (path,) = self.source_files(split)
    if split == "train" and self.shuffle_seed is not None:
      stream = self._shuffled(path)
    else:
      stream = self._in_order(path)
    return _nonempty(stream, f"WikiText split file {path}")

  def _in_order(self, path: str) -> Iterator[list[str]]:
    with open(path, "rb") as f:
      for line in _decoded_lines(f, path):
        words = line.split()
        words.append(EOS)
        yield words

  def _shuffled(self, path: str) -> Iterator[list[str]]:
    starts, size = _article_offsets(path)
    bounds = [0] + starts + [size]
    preamble = [(0, bounds[1])]
    articles = [(bounds[i], bounds[i + 1]) for i in range(1, len(bounds) - 1)]
    order = np.random.default_rng(self.shuffle_seed).permutation(len(articles))
    with open(path, "rb") as f:
      for start, stop in preamble + [articles[i] for i in order]:
        if stop <= start:
          continue
        f.seek(start)
        block = io.BytesIO(f.read(stop - start))
        for line in _decoded_lines(block, path, base_offset=start):
          words = line.split()
          words.append(EOS)
          yield words

  def settings(self) -> dict[str, Any]:
    return dict(super().settings(), family=self.family, shuffle_seed=self.shuffle_seed)


# -- PG-19 ------------------------------------------------------------------------

_PG19_SPLIT_DIRS = {"train": "train", "valid": "validation", "test": "test"}


@dataclasses.dataclass(frozen=True)
class PG19Book:
  """One row of PG-19's metadata.csv."""

  book_id: str
  title: str
  publication_date: int | None
  link: str


def read_pg19_metadata(data_dir: str) -> dict[str, PG19Book]:
  """Parses `data_dir/metadata.csv` (no header: book_id,short_book_title,publication_date,book_link).

  Returns {book_id: PG19Book}; raises DataError naming the file (and line)
  if it is missing, undecodable or has a row without exactly 4 fields.
  """
  path = os.path.join(_check_dir(data_dir, "PG-19"), "metadata.csv")
  if not os.path.isfile(path):
    raise DataError(f"missing PG-19 metadata file {path}")
  books: dict[str, PG19Book] = {}
  with open(path, "rb") as f:
    rows = csv.reader(_decoded_lines(f, path))
    try:
      for row in rows:
        if not row:
          continue
        if len(row) != 4:
          raise DataError(f"{path}:{rows.line_num}: expected 4 fields "
                          f"(book_id,short_book_title,publication_date,book_link), "
                          f"got {len(row)}")
        book_id, title, date, link = (field.strip() for field in row)
        books[book_id] = PG19Book(book_id, title, int(date) if date.isdigit() else None,
                                  link)
    except csv.Error as e:
      raise DataError(f"{path}:{rows.line_num}: malformed CSV ({e})") from None
  return books


def _book_order(name: str) -> tuple[int, int, str]:
  stem = name[:-len(".txt")]
  return (0, int(stem), stem) if stem.isdigit() else (1, 0, stem)


class PG19Reader(CorpusReader):
  """PG-19 (see module docstring)."""

  name = "pg19"
  version = 1

  def __init__(self, data_dir: str, eos: str = "paragraph", tokenizer: str = "regex",
               shuffle_seed: int | None = None) -> None:
    self.data_dir = _check_dir(data_dir, "PG-19")
    self.eos = _check_eos(eos)
    self.tokenizer = tokenizer
    self._tokenize = _tokenizer(tokenizer)
    self.shuffle_seed = _check_seed(shuffle_seed)
    if not any(os.path.isdir(os.path.join(self.data_dir, d))
               for d in _PG19_SPLIT_DIRS.values()):
      raise DataError(f"no PG-19 split folder (train/, validation/, test/) in {self.data_dir}")

  def source_files(self, split: str) -> list[str]:
    folder = os.path.join(self.data_dir, _PG19_SPLIT_DIRS[_check_split(split)])
    if not os.path.isdir(folder):
      raise DataError(f"missing PG-19 split folder {folder}")
    names = sorted((n for n in os.listdir(folder) if n.endswith(".txt")), key=_book_order)
    if not names:
      raise DataError(f"no <book_id>.txt books in PG-19 split folder {folder}")
    return [os.path.join(folder, n) for n in names]

  def sequences(self, split: str) -> Iterator[list[str]]:
    paths = self.source_files(split)
    if split == "train" and self.shuffle_seed is not None:
      paths = [paths[i] for i in np.random.default_rng(self.shuffle_seed).permutation(len(paths))]
    folder = os.path.dirname(paths[0])
    return _nonempty(self._books(paths), f"PG-19 split folder {folder}")

  def _books(self, paths: list[str]) -> Iterator[list[str]]:
    for path in paths:
      with open(path, "rb") as f:
        yield from _paragraphs(_decoded_lines(f, path), self._tokenize, self.eos)

  def settings(self) -> dict[str, Any]:
    return dict(super().settings(), eos=self.eos, tokenizer=self.tokenizer,
                shuffle_seed=self.shuffle_seed)


# -- Gigaword ---------------------------------------------------------------------

_TAG_RE = re.compile(r"<[^<>]*>")
_ATTR_RE = re.compile(r'(\w+)\s*=\s*"([^"]*)"')


def _hash_fraction(name: str) -> float:
  """Deterministic u in [0, 1) from a file name (first 8 bytes of its sha256)."""
  digest = hashlib.sha256(name.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


class GigawordReader(CorpusReader):
  """English Gigaword v5 (see module docstring)."""

  name = "gigaword"
  version = 1

  def __init__(self, data_dir: str, valid_files: Sequence[str] | None = None,
               test_files: Sequence[str] | None = None, valid_fraction: float = 0.005,
               test_fraction: float = 0.005, doc_types: Sequence[str] = ("story",),
               tokenizer: str = "regex", shuffle_seed: int | None = None) -> None:
    self.data_dir = _check_dir(data_dir, "Gigaword")
    self.tokenizer = tokenizer
    self._tokenize = _tokenizer(tokenizer)
    self.doc_types = tuple(sorted(t.lower() for t in doc_types))
    self.shuffle_seed = _check_seed(shuffle_seed)
    root = os.path.join(self.data_dir, "data")
    self._root = root if os.path.isdir(root) else self.data_dir
    files = []
    for source in sorted(os.listdir(self._root)):
      folder = os.path.join(self._root, source)
      if os.path.isdir(folder):
        files += [os.path.join(source, n) for n in sorted(os.listdir(folder))
                  if n.endswith(".gz")]
    if not files:
      raise DataError(f"no Gigaword files (data/<source>/<source>_<yyyymm>.gz) "
                      f"under {self.data_dir}")
    self._files = files  # Relative to self._root, sorted.
    if valid_files is not None or test_files is not None:
      self.holdout: dict[str, Any] = {
          "valid_files": sorted(os.path.basename(n) for n in valid_files or ()),
          "test_files": sorted(os.path.basename(n) for n in test_files or ())}
      both = set(self.holdout["valid_files"]) & set(self.holdout["test_files"])
      if both:
        raise ValueError(f"files in both valid_files and test_files: {sorted(both)}")
      present = {os.path.basename(f) for f in files}
      absent = [n for n in self.holdout["valid_files"] + self.holdout["test_files"]
                if n not in present]
      if absent:
        raise DataError(f"held-out Gigaword files not found under {self._root}: {absent}")
    else:
      if not (0 <= valid_fraction and 0 <= test_fraction
              and valid_fraction + test_fraction < 1):
        raise ValueError(f"need valid_fraction, test_fraction >= 0 with sum < 1, got "
                         f"{valid_fraction}, {test_fraction}")
      self.holdout = {"valid_fraction": float(valid_fraction),
                      "test_fraction": float(test_fraction)}

  def split_of(self, file_name: str) -> str:
    """The split a Gigaword file (base name, e.g. 'nyt_eng_199407.gz') belongs to."""
    name = os.path.basename(file_name)
    if "valid_files" in self.holdout:
      if name in self.holdout["valid_files"]:
        return "valid"
      return "test" if name in self.holdout["test_files"] else "train"
    u = _hash_fraction(name)
    if u < self.holdout["test_fraction"]:
      return "test"
    if u < self.holdout["test_fraction"] + self.holdout["valid_fraction"]:
      return "valid"
    return "train"

  def source_files(self, split: str) -> list[str]:
    _check_split(split)
    paths = [os.path.join(self._root, f) for f in self._files if self.split_of(f) == split]
    if not paths:
      raise DataError(f"Gigaword split {split!r} has no files under {self._root} "
                      f"(hold-out {self.holdout}, {len(self._files)} files); pass "
                      f"valid_files/test_files or other fractions")
    return paths

  def sequences(self, split: str) -> Iterator[list[str]]:
    paths = self.source_files(split)
    if split == "train" and self.shuffle_seed is not None:
      paths = [paths[i] for i in np.random.default_rng(self.shuffle_seed).permutation(len(paths))]
    return _nonempty(self._files_stream(paths), f"Gigaword split {split!r} under {self._root}")

  def _files_stream(self, paths: list[str]) -> Iterator[list[str]]:
    for path in paths:
      yield from self._parse(path)

  def _parse(self, path: str) -> Iterator[list[str]]:
    """Paragraphs of the kept documents of one gzip'd SGML file."""
    doc_id: str | None = None
    keep = in_text = False
    buffer: list[str] = []

    def flush() -> Iterator[list[str]]:
      if buffer:
        words = self._tokenize(unescape_sgml(" ".join(buffer)))
        buffer.clear()
        if words:
          words.append(EOS)
          yield words

    try:
      with gzip.open(path, "rb") as f:
        for line in _decoded_lines(f, path, what="decompressed byte offset"):
          position = 0
          for match in _TAG_RE.finditer(line):
            if keep and in_text:
              text = line[position:match.start()]
              if text.strip():
                buffer.append(text.strip())
            position = match.end()
            tag = match.group(0)[1:-1].strip()
            closing = tag.startswith("/")
            tag_name = tag.lstrip("/").split(None, 1)[0].upper() if tag.strip("/") else ""
            if tag_name == "DOC" and not closing:
              if doc_id is not None:
                raise DataError(f"{path}: <DOC> opened inside <DOC id={doc_id!r}>")
              attrs = dict(_ATTR_RE.findall(tag))
              doc_id = attrs.get("id", "?")
              keep = attrs.get("type", "").lower() in self.doc_types
              in_text = False
            elif tag_name == "DOC":
              yield from flush()
              doc_id, keep, in_text = None, False, False
            elif tag_name == "TEXT":
              yield from flush()
              in_text = not closing
            elif tag_name == "P":
              yield from flush()
          if keep and in_text:
            text = line[position:].strip()
            if text:
              buffer.append(text)
    except (OSError, EOFError, zlib.error) as e:
      raise DataError(f"{path}: corrupt or truncated gzip data ({e})") from None
    if doc_id is not None:
      raise DataError(f"{path}: ends inside <DOC id={doc_id!r}> (truncated file?)")

  def settings(self) -> dict[str, Any]:
    return dict(super().settings(), holdout=self.holdout, doc_types=list(self.doc_types),
                tokenizer=self.tokenizer, shuffle_seed=self.shuffle_seed)


# -- Plain text -------------------------------------------------------------------


class TextReader(CorpusReader):
  """A dir with train.txt, valid.txt, test.txt; one sequence per non-blank line."""

  name = "text"
  version = 1

  def __init__(self, data_dir: str, tokenizer: str = "whitespace") -> None:
    self.data_dir = _check_dir(data_dir, "text")
    self.tokenizer = tokenizer
    self._tokenize = _tokenizer(tokenizer)
    if not any(os.path.isfile(os.path.join(self.data_dir, f"{s}.txt")) for s in SPLITS):
      raise DataError(f"no split files (train.txt, valid.txt, test.txt) in {self.data_dir}")

  def source_files(self, split: str) -> list[str]:
    path = os.path.join(self.data_dir, f"{_check_split(split)}.txt")
    if not os.path.isfile(path):
      raise DataError(f"missing split file {path}")
    return [path]

  def sequences(self, split: str) -> Iterator[list[str]]:
    (path,) = self.source_files(split)
    return _nonempty(self._lines(path), f"split file {path}")

  def _lines(self, path: str) -> Iterator[list[str]]:
    with open(path, "rb") as f:
      for line in _decoded_lines(f, path):
        words = self._tokenize(line)
        if words:
          words.append(EOS)
          yield words

  def settings(self) -> dict[str, Any]:
    return dict(super().settings(), tokenizer=self.tokenizer)


# -- TensorFlow Datasets ----------------------------------------------------------

# The `tfds` extra of setup.py.
TFDS_INSTALL_HINT = "pip install -e .[tfds] (tensorflow-cpu and tensorflow-datasets)"
# Options of the local readers that TFDS datasets ignore, and why.
TFDS_IGNORED_OPTIONS = {
    "shuffle_seed": "TFDS examples are read in their stored order"}
_ACCELERATORS = ("GPU", "TPU")


def _import_tfds(dataset: str):
  """Imports TensorFlow (kept off GPUs and TPUs, which stay JAX's) and
  tensorflow_datasets, or raises a one-line OptionalDependencyError."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise OptionalDependencyError(
        f"dataset {dataset!r} needs TensorFlow and TensorFlow Datasets "
        f"({e.name or 'a module'} is not installed); install the optional "
        f"extra: {TFDS_INSTALL_HINT}") from None
  for kind in _ACCELERATORS:
    if tf.config.get_visible_devices(kind):
      try:
        tf.config.set_visible_devices([], kind)
      except RuntimeError as e:  # TensorFlow's runtime had already started.
        logging.warning("TensorFlow keeps its %s devices (%s).", kind, e)
  return tfds


class TFDSReader(CorpusReader):
  """A TFDS text dataset (see module docstring). Not cached by file stats: the
  cache key is the dataset name, its TFDS data_dir and the reader options."""

  version = 1

  def __init__(self, tfds_name: str, data_dir: str | None = None,
               text_key: str | None = None, split_names: Mapping[str, str] | None = None,
               eos: str = "paragraph", tokenizer: str = "regex",
               download: bool = False) -> None:
    if not tfds_name:
      raise DataError("empty TFDS dataset name: use 'tfds:NAME', e.g. 'tfds:pg19'")
    self.tfds_name = tfds_name
    self.name = f"tfds:{tfds_name}"
    self._tfds = _import_tfds(self.name)
    self.data_dir = None if data_dir is None else os.path.abspath(os.fspath(data_dir))
    self.text_key = text_key
    self.split_names = {"train": "train", "valid": "validation", "test": "test"}
    self.split_names.update(split_names or {})
    self.eos = _check_eos(eos)
    self.tokenizer = tokenizer
    self._tokenize = _tokenizer(tokenizer)
    self.download = bool(download)

  def source_files(self, split: str) -> list[str]:
    _check_split(split)
    return []

  def sequences(self, split: str) -> Iterator[list[str]]:
    tfds_split = self.split_names[_check_split(split)]
    where = f"TFDS {self.tfds_name!r} split {tfds_split!r}"
    try:
      dataset = self._tfds.load(self.tfds_name, split=tfds_split, data_dir=self.data_dir,
                                shuffle_files=False, download=self.download)
    except Exception as e:  # pylint: disable=broad-except
      first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
      raise DataError(f"could not load {where}: {type(e).__name__}: {first_line}") from None
    return _nonempty(self._examples(dataset, where), where)

  def _examples(self, dataset: Any, where: str) -> Iterator[list[str]]:
    for index, example in enumerate(self._tfds.as_numpy(dataset)):
      key = self.text_key or next((k for k in ("book_text", "text") if k in example), None)
      if key is None or key not in example:
        raise DataError(f"{where}: example {index} has no text feature "
                        f"{self.text_key or 'book_text/text'} (has {sorted(example)})")
      text = example[key]
      if isinstance(text, bytes):
        try:
          text = text.decode("utf-8")
        except UnicodeDecodeError as e:
          raise DataError(f"{where}: example {index}: invalid UTF-8 at byte offset "
                          f"{e.start} ({e.reason})") from None
      yield from _paragraphs(text.split("\n"), self._tokenize, self.eos)

  def settings(self) -> dict[str, Any]:
    return dict(super().settings(), text_key=self.text_key, split_names=self.split_names,
                eos=self.eos, tokenizer=self.tokenizer)


# -- Synthetic --------------------------------------------------------------------


class SyntheticReader(CorpusReader):
  """Sentences of a `synthetic.MarkovSource` (no files; data_dir must be None)."""

  name = "synthetic"
  version = 1

  def __init__(self, data_dir: None = None, train_tokens: int = 1_000_000,
               valid_tokens: int = 100_000, test_tokens: int = 100_000,
               **source_options: Any) -> None:
    if data_dir is not None:
      raise ValueError(f"the synthetic dataset takes no data_dir, got {data_dir!r}")
    _check_options(synthetic.MarkovSource, self.name, source_options, positional=0)
    self.source = synthetic.MarkovSource(**source_options)
    self.num_tokens = {"train": int(train_tokens), "valid": int(valid_tokens),
                       "test": int(test_tokens)}

  def source_files(self, split: str) -> list[str]:
    _check_split(split)
    return []

  def sequences(self, split: str) -> Iterator[list[str]]:
    return self.source.sentences(_check_split(split), self.num_tokens[split])

  def settings(self) -> dict[str, Any]:
    return dict(super().settings(), source=self.source.settings(), num_tokens=self.num_tokens)


# -- Registry ---------------------------------------------------------------------

DATASETS: dict[str, type[CorpusReader]] = {
    "wikitext": WikiTextReader, "pg19": PG19Reader, "gigaword": GigawordReader,
    "text": TextReader, "synthetic": SyntheticReader}
_ALIASES = {"wikitext-103": "wikitext", "wikitext-2": "wikitext", "wikitext103": "wikitext",
            "wikitext2": "wikitext", "wt103": "wikitext", "wt2": "wikitext",
            "pg-19": "pg19"}


def canonical_dataset(dataset: str) -> str:
  """The canonical name of a dataset ('wt103' -> 'wikitext'); DataError if unknown."""
  if not isinstance(dataset, str):
    raise DataError(f"dataset must be a string, got {dataset!r}")
  if dataset.startswith("tfds:"):
    return dataset
  name = _ALIASES.get(dataset.lower(), dataset.lower())
  if name not in DATASETS:
    raise DataError(f"unknown dataset {dataset!r}; expected one of "
                    f"{', '.join(sorted(DATASETS))}, an alias ({', '.join(sorted(_ALIASES))}) "
                    f"or tfds:NAME")
  return name


def _check_options(target: Callable[..., Any], dataset: str,
                   options: Mapping[str, Any], positional: int) -> None:
  """Raises DataError unless `target` (a reader class or the synthetic
  source) takes every keyword of `options`; its first `positional`
  parameters are not options."""
  params = list(inspect.signature(target).parameters.values())[positional:]
  names = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD
           or p.kind is p.KEYWORD_ONLY]
  unknown = sorted(set(options) - set(names))
  if unknown and not any(p.kind is p.VAR_KEYWORD for p in params):
    raise DataError(f"dataset {dataset!r} has no reader option "
                    f"{', '.join(map(repr, unknown))}; its options: "
                    f"{', '.join(names) or 'none'}")


def make_reader(dataset: str, data_dir: str | None = None, **options: Any) -> CorpusReader:
  """The reader of `dataset` on `data_dir` (see module docstring for options).

  Raises DataError for an unknown dataset or option or a bad data_dir,
  OptionalDependencyError (a DataError) for 'tfds:*' without TensorFlow or
  TFDS. A TFDS dataset ignores TFDS_IGNORED_OPTIONS with a warning.
  """
  name = canonical_dataset(dataset)
  if name.startswith("tfds:"):
    for key in sorted(set(options) & set(TFDS_IGNORED_OPTIONS)):
      logging.warning("%s ignores the reader option %s=%r: %s.", name, key,
                      options[key], TFDS_IGNORED_OPTIONS[key])
    options = {k: v for k, v in options.items() if k not in TFDS_IGNORED_OPTIONS}
    _check_options(TFDSReader, name, options, positional=2)
    return TFDSReader(name[len("tfds:"):], data_dir, **options)
  _check_options(DATASETS[name], name, options, positional=1)
  return DATASETS[name](data_dir, **options)


def read_split(dataset: str, data_dir: str | None, split: str,
               **options: Any) -> Iterator[list[str]]:
  """`make_reader(dataset, data_dir, **options).sequences(split)`."""
  return make_reader(dataset, data_dir, **options).sequences(split)

