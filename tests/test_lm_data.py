"""Tests of the language-modelling data side: rmc_jax.lm.{corpora,synthetic,vocab,cache,batcher}.

Every corpus format is exercised on a small fixture written here in its real
on-disk format; the real WikiText-2 valid/test files are used when the shared
data folder exists (skipped otherwise).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import pathlib
import re
import sys
import types

import numpy as np
import pytest

from rmc_jax.lm import batcher as batcher_lib
from rmc_jax.lm import cache as cache_lib
from rmc_jax.lm import corpora
from rmc_jax.lm import synthetic
from rmc_jax.lm.corpora import DataError
from rmc_jax.lm.vocab import Vocab

SHARED_WT2 = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"

# A WikiText fixture: 20 lines, 59 tokens under line.split() + ['<eos>'].
# Articles: preamble (line 1, 1 token), Alpha (lines 2-11, 36 tokens; its
# section heading and the formula line are not article starts), Beta (lines
# 12-16, 12 tokens), Gamma (lines 17-20, 10 tokens).
WIKI_LINES = [
    " ",
    " = Alpha = ",
    " ",
    " Alpha is a letter . ",
    " ",
    " = = History = = ",
    " ",
    " It was used @-@ widely . ",
    " = 1 x and y C = ",
    " ",
    " ",
    " = Beta = ",
    " ",
    " Beta follows Ωmega . ",
    " ",
    " ",
    " = Gamma = ",
    " ",
    " Gamma <unk> . ",
    " ",
]
WIKI_TEXT = "".join(line + "\n" for line in WIKI_LINES)
WIKI_NUM_TOKENS = 59
WIKI_ARTICLES = {"preamble": (0, 1), "Alpha": (1, 11), "Beta": (11, 16), "Gamma": (16, 20)}


def _write(path: pathlib.Path, data: str | bytes) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  if isinstance(data, str):
    data = data.encode("utf-8")
  path.write_bytes(data)
  return path


def _q(path) -> str:
  """A path as a regular expression matching itself."""
  return re.escape(str(path))


def _flat(sequences) -> list[str]:
  return [w for words in sequences for w in words]


@pytest.fixture
def wiki_dir(tmp_path: pathlib.Path) -> pathlib.Path:
  """wiki.{train,valid,test}.tokens: the fixture as train, small valid/test."""
  d = tmp_path / "wt"
  _write(d / "wiki.train.tokens", WIKI_TEXT)
  _write(d / "wiki.valid.tokens", " \n = Delta = \n Alpha unseenword . \n")
  _write(d / "wiki.test.tokens", " Beta is a letter . \n")
  return d


# -- WikiText ---------------------------------------------------------------------


@pytest.mark.skipif(not SHARED_WT2.is_dir(), reason="shared WikiText-2 data absent")
@pytest.mark.parametrize("split,expected", [("valid", 217_646), ("test", 245_569)])
def test_wikitext_real_counts(tmp_path, split, expected):
  d = tmp_path / "wt2"
  d.mkdir()
  os.symlink(SHARED_WT2 / f"{split}.txt", d / f"{split}.txt")
  os.symlink(SHARED_WT2 / f"{split}.txt", d / "train.txt")
  reader = corpora.make_reader("wikitext-2", d)
  assert reader.family == "txt"
  assert sum(len(w) for w in reader.sequences(split)) == expected
  # Shuffling the same file as 'train': same tokens, 60 articles kept whole.
  shuffled = list(corpora.make_reader("wt2", d, shuffle_seed=1).sequences("train"))
  assert sum(len(w) for w in shuffled) == expected
  original = list(reader.sequences(split))
  assert sorted(map(tuple, shuffled)) == sorted(map(tuple, original))
  starts, _ = corpora._article_offsets(str(d / "train.txt"))
  assert len(starts) == 60


def test_wikitext_fixture_counts_and_families(tmp_path):
  for name in ("wiki.train.tokens", "wiki.train.raw", "train.txt"):
    d = tmp_path / name
    _write(d / name, WIKI_TEXT)
    reader = corpora.make_reader("wikitext", d)
    sequences = list(reader.sequences("train"))
    assert len(sequences) == 20
    assert sum(map(len, sequences)) == WIKI_NUM_TOKENS
    assert sequences[0] == ["<eos>"]
    assert sequences[13] == ["Beta", "follows", "Ωmega", ".", "<eos>"]
    assert all(words[-1] == "<eos>" for words in sequences)
  # The first family present wins; its other splits must exist.
  d = tmp_path / "mixed"
  _write(d / "wiki.valid.tokens", WIKI_TEXT)
  _write(d / "train.txt", WIKI_TEXT)
  with pytest.raises(DataError, match=r"missing WikiText split file .*wiki\.train\.tokens"):
    corpora.make_reader("wikitext", d).sequences("train")


def _split_articles(sequences: list[list[str]]) -> list[tuple[str, list[list[str]]]]:
  """Cuts a fixture stream at the article headings: [(title, sequences)]."""
  heads = [i for i, w in enumerate(sequences)
           if len(w) == 4 and w[0] == w[2] == "=" and w[1] in WIKI_ARTICLES]
  bounds = [0] + heads + [len(sequences)]
  return [("preamble" if i == 0 else sequences[bounds[i]][1], sequences[bounds[i]:bounds[i + 1]])
          for i in range(len(bounds) - 1)]


def test_wikitext_article_shuffling(wiki_dir):
  original = list(corpora.read_split("wikitext", wiki_dir, "train"))
  assert _split_articles(original) == [
      (title, original[a:b]) for title, (a, b) in WIKI_ARTICLES.items()]
  orders = set()
  for seed in range(8):
    shuffled = list(corpora.read_split("wikitext", wiki_dir, "train", shuffle_seed=seed))
    assert sum(map(len, shuffled)) == WIKI_NUM_TOKENS
    articles = _split_articles(shuffled)
    assert articles[0] == ("preamble", original[:1])
    for title, chunk in articles:
      a, b = WIKI_ARTICLES[title]
      assert chunk == original[a:b], title  # Articles stay intact.
    assert sorted(t for t, _ in articles) == sorted(WIKI_ARTICLES)
    orders.add(tuple(t for t, _ in articles))
    again = list(corpora.read_split("wikitext", wiki_dir, "train", shuffle_seed=seed))
    assert again == shuffled  # Deterministic by seed.
  assert len(orders) > 1
  # Only the training split is shuffled.
  assert list(corpora.read_split("wikitext", wiki_dir, "valid", shuffle_seed=3)) == \
      list(corpora.read_split("wikitext", wiki_dir, "valid"))


@pytest.mark.parametrize("shuffle_seed", [None, 0])
def test_wikitext_undecodable_bytes(tmp_path, shuffle_seed):
  path = _write(tmp_path / "wt" / "train.txt", b" \n = A = \n \n ok \xff bad \n")
  reader = corpora.make_reader("wikitext", tmp_path / "wt", shuffle_seed=shuffle_seed)
  with pytest.raises(DataError, match=rf"{_q(path)}: invalid UTF-8 at byte offset 16 "):
    list(reader.sequences("train"))


# -- PG-19 ------------------------------------------------------------------------


@pytest.fixture
def pg19_dir(tmp_path: pathlib.Path) -> pathlib.Path:
  d = tmp_path / "pg19"
  _write(d / "train" / "9.txt", "The first line of a\nwrapped paragraph, here.\n\nSecond paragraph!\n")
  _write(d / "train" / "10.txt", "Don't stop...\n\n\n  \nEnd\n")
  _write(d / "train" / "100.txt", "\ufeffCafé au lait\r\nnext line\r\n")
  _write(d / "validation" / "5.txt", "Valid book.\n")
  _write(d / "test" / "7.txt", "Test book.\n")
  _write(d / "metadata.csv", '9,"Title, with comma",1890,http://www.gutenberg.org/ebooks/9\n'
         "10,Plain,1901,http://www.gutenberg.org/ebooks/10\n")
  return d


PG19_TRAIN_PARAGRAPHS = [
    ["The", "first", "line", "of", "a", "wrapped", "paragraph", ",", "here", ".", "<eos>"],
    ["Second", "paragraph", "!", "<eos>"],
    ["Don", "'", "t", "stop", ".", ".", ".", "<eos>"],
    ["End", "<eos>"],
    ["Café", "au", "lait", "next", "line", "<eos>"],
]


def test_pg19_reader(pg19_dir):
  reader = corpora.make_reader("pg19", pg19_dir)
  assert [os.path.basename(p) for p in reader.source_files("train")] == \
      ["9.txt", "10.txt", "100.txt"]  # Numeric id order.
  assert list(reader.sequences("train")) == PG19_TRAIN_PARAGRAPHS
  assert list(reader.sequences("valid")) == [["Valid", "book", ".", "<eos>"]]
  assert list(reader.sequences("test")) == [["Test", "book", ".", "<eos>"]]
  lines = list(corpora.read_split("pg19", pg19_dir, "train", eos="line"))
  assert lines[:3] == [["The", "first", "line", "of", "a", "<eos>"],
                       ["wrapped", "paragraph", ",", "here", ".", "<eos>"],
                       ["Second", "paragraph", "!", "<eos>"]]
  assert len(lines) == 7
  orders = set()
  for seed in range(6):
    shuffled = list(corpora.read_split("pg19", pg19_dir, "train", shuffle_seed=seed))
    assert sorted(map(tuple, shuffled)) == sorted(map(tuple, PG19_TRAIN_PARAGRAPHS))
    orders.add(tuple(map(tuple, shuffled)))
  assert len(orders) > 1
  metadata = corpora.read_pg19_metadata(pg19_dir)
  assert metadata["9"] == corpora.PG19Book("9", "Title, with comma", 1890,
                                           "http://www.gutenberg.org/ebooks/9")
  assert sorted(metadata) == ["10", "9"]


def test_pg19_errors(pg19_dir, tmp_path):
  (pg19_dir / "validation" / "5.txt").unlink()
  with pytest.raises(DataError, match=r"no <book_id>\.txt books in PG-19 split folder .*validation"):
    corpora.read_split("pg19", pg19_dir, "valid")
  (pg19_dir / "validation").rmdir()
  with pytest.raises(DataError, match=r"missing PG-19 split folder .*validation"):
    corpora.read_split("pg19", pg19_dir, "valid")
  _write(pg19_dir / "test" / "7.txt", "\n \n")
  with pytest.raises(DataError, match=r"PG-19 split folder .*test is empty"):
    list(corpora.read_split("pg19", pg19_dir, "test"))
  _write(pg19_dir / "train" / "10.txt", b"ok\n\xc3(\n")
  with pytest.raises(DataError, match=r"10\.txt: invalid UTF-8 at byte offset 3"):
    list(corpora.read_split("pg19", pg19_dir, "train"))
  _write(pg19_dir / "metadata.csv", "9,only three,1890\n")
  with pytest.raises(DataError, match=r"metadata\.csv:1: expected 4 fields"):
    corpora.read_pg19_metadata(pg19_dir)
  with pytest.raises(DataError, match=r"no PG-19 split folder .* in .*empty"):
    (tmp_path / "empty").mkdir()
    corpora.make_reader("pg19", tmp_path / "empty")


# -- Gigaword ---------------------------------------------------------------------

GIGA_NYT_199407 = """<DOC id="NYT_ENG_19940701.0001" type="story" >
<HEADLINE>
HEAD WORDS
</HEADLINE>
<DATELINE>
NEW YORK, July 1
</DATELINE>
<TEXT>
<P>
AT&AMP;T said it would
cut jobs &LR;about 500&RR;.
</P>
<P>
He said, &QUOT;No.&QUOT;
</P>
</TEXT>
</DOC>
<DOC id="NYT_ENG_19940701.0002" type="advis" >
<TEXT>
<P>
Advisory text.
</P>
</TEXT>
</DOC>
<DOC id="NYT_ENG_19940701.0003" type="multi" >
<TEXT>
<P>
Multi text.
</P>
</TEXT>
</DOC>
"""
GIGA_APW_200001 = """<DOC id="APW_ENG_20000101.0001" type="other" >
<TEXT>
<P>
Other text.
</P>
</TEXT>
</DOC>
<DOC id="APW_ENG_20000101.0002" type="story" >
<TEXT>
Plain text without P.
</TEXT>
</DOC>
"""
GIGA_NYT_199408 = """<DOC id="NYT_ENG_19940801.0001" type="story" >
<TEXT>
<P>
August story.
</P>
</TEXT>
</DOC>
"""


@pytest.fixture
def giga_dir(tmp_path: pathlib.Path) -> pathlib.Path:
  d = tmp_path / "gigaword"
  for rel, text in [("nyt_eng/nyt_eng_199407.gz", GIGA_NYT_199407),
                    ("apw_eng/apw_eng_200001.gz", GIGA_APW_200001),
                    ("nyt_eng/nyt_eng_199408.gz", GIGA_NYT_199408)]:
    _write(d / "data" / rel, gzip.compress(text.encode("utf-8")))
  return d


def test_gigaword_reader(giga_dir):
  reader = corpora.make_reader("gigaword", giga_dir, valid_files=["apw_eng_200001.gz"],
                               test_files=["nyt_eng_199408.gz"])
  assert list(reader.sequences("train")) == [
      ["AT", "&", "T", "said", "it", "would", "cut", "jobs", "(", "about", "500", ")", ".",
       "<eos>"],
      ["He", "said", ",", '"', "No", ".", '"', "<eos>"]]
  assert list(reader.sequences("valid")) == [["Plain", "text", "without", "P", ".", "<eos>"]]
  assert list(reader.sequences("test")) == [["August", "story", ".", "<eos>"]]
  everything = corpora.make_reader("gigaword", giga_dir / "data",  # The data/ folder itself.
                                   doc_types=("story", "multi"), valid_files=[],
                                   test_files=["nyt_eng_199408.gz"])
  train = list(everything.sequences("train"))
  assert ["Multi", "text", ".", "<eos>"] in train and ["Advisory", "text", ".", "<eos>"] not in train
  assert train[0] == ["Plain", "text", "without", "P", ".", "<eos>"]  # apw_eng sorts first.


def test_gigaword_hash_split(giga_dir):
  reader = corpora.make_reader("gigaword", giga_dir, valid_fraction=0.3, test_fraction=0.2)
  names = [f"src_eng_{i:06d}.gz" for i in range(400)]
  splits = [reader.split_of(n) for n in names]
  for name, split in zip(names, splits):
    u = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64
    assert split == ("test" if u < 0.2 else "valid" if u < 0.5 else "train")
  assert 0.1 < splits.count("test") / 400 < 0.3 and 0.2 < splits.count("valid") / 400 < 0.4
  default = corpora.make_reader("gigaword", giga_dir)
  assert [default.split_of(n) for n in names] == [default.split_of(n) for n in names]
  with pytest.raises(DataError, match=r"Gigaword split 'valid' has no files under .*data"):
    corpora.make_reader("gigaword", giga_dir, valid_fraction=0.0).sequences("valid")


def test_gigaword_errors(giga_dir, tmp_path):
  with pytest.raises(DataError, match=r"held-out Gigaword files not found .*nope\.gz"):
    corpora.make_reader("gigaword", giga_dir, valid_files=["nope.gz"])
  bad = _write(giga_dir / "data" / "nyt_eng" / "nyt_eng_199407.gz", b"not gzip at all")
  reader = corpora.make_reader("gigaword", giga_dir, valid_files=["apw_eng_200001.gz"],
                               test_files=["nyt_eng_199408.gz"])
  with pytest.raises(DataError, match=rf"{_q(bad)}: corrupt or truncated gzip"):
    list(reader.sequences("train"))
  _write(bad, gzip.compress(GIGA_NYT_199407.encode())[:-30])
  with pytest.raises(DataError, match=rf"{_q(bad)}: corrupt or truncated gzip"):
    list(reader.sequences("train"))
  _write(bad, gzip.compress(GIGA_NYT_199407.encode()[:200]))
  with pytest.raises(DataError, match=rf"{_q(bad)}: ends inside <DOC id='NYT_ENG_19940701.0001'>"):
    list(reader.sequences("train"))
  _write(bad, gzip.compress(b'<DOC id="A" type="story">\n<TEXT>\n\xe9t\xe9\n'))
  with pytest.raises(DataError, match=rf"{_q(bad)}: invalid UTF-8 at decompressed byte offset 33"):
    list(reader.sequences("train"))
  (tmp_path / "nogz" / "data" / "nyt_eng").mkdir(parents=True)
  with pytest.raises(DataError, match=r"no Gigaword files .* under .*nogz"):
    corpora.make_reader("gigaword", tmp_path / "nogz")


def test_tokenizer_and_entities():
  assert corpora.regex_tokenize("It's 3.5 km—wow!") == \
      ["It", "'", "s", "3", ".", "5", "km", "—", "wow", "!"]
  assert corpora.unescape_sgml("a &AMP; b &amp; &LT;x&GT; &QUOT;&LR;&RR; &eacute; &#65; &FOO;") \
      == 'a & b & <x> "() é A &FOO;'


# -- Plain text and TFDS ----------------------------------------------------------


def test_text_reader(tmp_path):
  d = tmp_path / "text"
  _write(d / "train.txt", "a b\n\n c  d e \n")
  _write(d / "valid.txt", "x, y\n")
  assert list(corpora.read_split("text", d, "train")) == [["a", "b", "<eos>"],
                                                          ["c", "d", "e", "<eos>"]]
  assert list(corpora.read_split("text", d, "valid", tokenizer="regex")) == \
      [["x", ",", "y", "<eos>"]]
  with pytest.raises(DataError, match=rf"missing split file {_q(d / 'test.txt')}"):
    corpora.read_split("text", d, "test")
  _write(d / "test.txt", "\n\n")
  with pytest.raises(DataError, match=rf"split file {_q(d / 'test.txt')} is empty"):
    list(corpora.read_split("text", d, "test"))


@pytest.mark.parametrize("module", ["tensorflow", "tensorflow_datasets"])
def test_tfds_missing_is_one_line_naming_the_extra(monkeypatch, module):
  monkeypatch.setitem(sys.modules, "tensorflow", _fake_tensorflow([]))
  monkeypatch.setitem(sys.modules, module, None)  # import -> ImportError
  with pytest.raises(corpora.OptionalDependencyError) as info:
    corpora.make_reader("tfds:pg19")
  message = str(info.value)
  assert "\n" not in message and "'tfds:pg19'" in message and module in message
  assert "pip install -e .[tfds]" in message
  assert isinstance(info.value, DataError)  # The launchers' one-line errors.


def _fake_tensorflow(events: list) -> types.ModuleType:
  """A `tensorflow` module with the device calls the reader makes, logged."""
  visible = {"GPU": ["gpu:0"], "TPU": ["tpu:0"], "CPU": ["cpu:0"]}
  tf = types.ModuleType("tensorflow")
  tf.config = types.SimpleNamespace(
      get_visible_devices=lambda kind: list(visible[kind]),
      set_visible_devices=lambda devices, kind: (
          events.append(("hide", kind)), visible.__setitem__(kind, devices)))
  return tf


def _fake_tfds(monkeypatch, events: list) -> None:
  fake = types.ModuleType("tensorflow_datasets")

  def load(name, split, data_dir, shuffle_files, download):
    events.append(("load", name, split, data_dir, shuffle_files, download))
    if split == "test":
      raise RuntimeError("Dataset pg19 not found.\nDetails...")
    return [{"book_text": b"One para\nwrapped.\n\nTwo.", "book_id": b"1"},
            {"book_text": b"Three!", "book_id": b"2"}]

  fake.load = load
  fake.as_numpy = iter
  monkeypatch.setitem(sys.modules, "tensorflow", _fake_tensorflow(events))
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)


def test_tfds_reader_with_fake_module(monkeypatch):
  events = []
  _fake_tfds(monkeypatch, events)
  reader = corpora.make_reader("tfds:pg19", None)
  assert list(reader.sequences("valid")) == [["One", "para", "wrapped", ".", "<eos>"],
                                             ["Two", ".", "<eos>"], ["Three", "!", "<eos>"]]
  # TensorFlow is kept off the accelerators before any dataset is built.
  assert events == [("hide", "GPU"), ("hide", "TPU"),
                    ("load", "pg19", "validation", None, False, False)]
  with pytest.raises(DataError, match=r"could not load TFDS 'pg19' split 'test': "
                                      r"RuntimeError: Dataset pg19 not found\.$"):
    reader.sequences("test")


def test_tfds_ignores_shuffle_seed_with_a_warning(monkeypatch):
  _fake_tfds(monkeypatch, [])
  warnings = []
  monkeypatch.setattr(corpora.logging, "warning",
                      lambda fmt, *args: warnings.append(fmt % args))
  reader = corpora.make_reader("tfds:pg19", None, shuffle_seed=0, eos="line")
  assert warnings == ["tfds:pg19 ignores the reader option shuffle_seed=0: "
                      "TFDS examples are read in their stored order."]
  assert reader.settings() == corpora.make_reader("tfds:pg19", None,
                                                  eos="line").settings()
  with pytest.raises(DataError, match=r"^dataset 'tfds:pg19' has no reader option "
                                      r"'shufle_seed'; its options: text_key, "):
    corpora.make_reader("tfds:pg19", None, shufle_seed=0)


# Books of a tiny TFDS dataset, per TFDS split.
TFDS_BOOKS = {"train": ["The cat sat.\n\nThe dog\nran off.", "A cat ran!"],
              "validation": ["The dog sat."], "test": ["A dog, a cat."]}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> pathlib.Path:
  """TFDS_BOOKS prepared by TFDS itself, in its on-disk format, under a name
  no installed builder has (so it is read back from the files alone)."""
  tfds = pytest.importorskip(
      "tensorflow_datasets", reason="needs the tfds extra (pip install -e .[tfds])")
  pytest.importorskip("tensorflow", reason="needs the tfds extra (pip install -e .[tfds])")
  data_dir = tmp_path_factory.mktemp("tfds")
  with tfds.core.registered.skip_registration():

    class TinyBooks(tfds.core.GeneratorBasedBuilder):
      """TFDS_BOOKS with PG-19's features."""

      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(
            {"book_text": tfds.features.Text(), "book_id": tfds.features.Text()}))

      def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in TFDS_BOOKS}

      def _generate_examples(self, split):
        for i, text in enumerate(TFDS_BOOKS[split]):
          yield f"{split}{i}", {"book_text": text, "book_id": f"{split}{i}"}

    TinyBooks(data_dir=str(data_dir)).download_and_prepare()
  return data_dir


def test_tfds_reader_reads_a_prepared_dataset(tfds_dir, tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  reader = corpora.make_reader("tfds:tiny_books", tfds_dir, shuffle_seed=0)
  train = list(reader.sequences("train"))
  # TFDS may store examples in another order than they were generated.
  assert sorted(train) == sorted([["The", "cat", "sat", ".", "<eos>"],
                                  ["The", "dog", "ran", "off", ".", "<eos>"],
                                  ["A", "cat", "ran", "!", "<eos>"]])
  assert list(reader.sequences("valid")) == [["The", "dog", "sat", ".", "<eos>"]]
  assert tf.config.get_visible_devices("GPU") == []
  assert tf.config.get_visible_devices("TPU") == []
  corpus = cache_lib.load_corpus("tfds:tiny_books", str(tfds_dir), str(tmp_path),
                                 reader_options={"shuffle_seed": 0})
  # ',' and 'a' are not training words.
  assert corpus.vocab.decode(corpus.splits["test"]) == [
      "A", "dog", "<unk>", "<unk>", "cat", ".", "<eos>"]
  with pytest.raises(DataError, match=r"^could not load TFDS 'tiny_books' split "
                                      r"'test': .*$"):
    corpora.make_reader("tfds:tiny_books", tmp_path / "elsewhere").sequences("test")


def test_unknown_reader_options_are_one_line_errors(tmp_path, wiki_dir):
  with pytest.raises(DataError, match=r"^dataset 'wikitext' has no reader option "
                                      r"'bogus'; its options: shuffle_seed$"):
    corpora.make_reader("wikitext", wiki_dir, bogus=1)
  with pytest.raises(DataError, match=r"^dataset 'synthetic' has no reader option "
                                      r"'bogus'; its options: num_words, "):
    corpora.make_reader("synthetic", None, bogus=1)


# -- Bad input --------------------------------------------------------------------


def test_bad_input_errors_name_the_path(tmp_path, wiki_dir):
  missing = tmp_path / "nowhere"
  with pytest.raises(DataError, match=rf"WikiText data dir {_q(missing)} does not exist"):
    corpora.make_reader("wikitext", missing)
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match=rf"no WikiText split files .* in {_q(tmp_path / 'empty')}$"):
    corpora.make_reader("wikitext", tmp_path / "empty")
  with pytest.raises(DataError, match=r"is not a directory"):
    corpora.make_reader("wikitext", wiki_dir / "wiki.train.tokens")
  _write(wiki_dir / "wiki.test.tokens", b"")
  with pytest.raises(DataError, match=rf"WikiText split file {_q(wiki_dir / 'wiki.test.tokens')} "
                                      r"is empty"):
    list(corpora.read_split("wikitext", wiki_dir, "test"))
  (wiki_dir / "wiki.test.tokens").unlink()
  with pytest.raises(DataError, match=rf"missing WikiText split file {_q(wiki_dir)}/wiki\.test"):
    corpora.read_split("wikitext", wiki_dir, "test")
  with pytest.raises(DataError, match=r"unknown dataset 'wikitxt'"):
    corpora.make_reader("wikitxt", wiki_dir)
  with pytest.raises(DataError, match=r"unknown dataset 'wikitxt'"):
    cache_lib.load_corpus("wikitxt", wiki_dir, tmp_path / "cache")
  with pytest.raises(ValueError, match=r"split must be one of"):
    corpora.read_split("wikitext", wiki_dir, "validation")


# -- Vocabulary -------------------------------------------------------------------


def test_vocab_order_limits_and_unk(tmp_path):
  counts = {"b": 3, "a": 3, "c": 5, "d": 1, "e": 2, "<eos>": 4, "<unk>": 2}
  vocab = Vocab.build(counts)
  assert vocab.words == ("<unk>", "<eos>", "c", "a", "b", "e", "d")  # Ties alphabetical.
  assert vocab.counts.tolist() == [2, 4, 5, 3, 3, 2, 1]
  small = Vocab.build(counts, max_size=4)
  assert small.words == ("<unk>", "<eos>", "c", "a")
  assert small.counts.tolist() == [2 + 3 + 2 + 1, 4, 5, 3]  # Left-out words count as <unk>.
  assert small.counts.sum() == sum(counts.values())
  frequent = Vocab.build(counts, min_count=3)
  assert frequent.words == ("<unk>", "<eos>", "c", "a", "b")
  assert Vocab.build(counts, max_size=2).words == ("<unk>", "<eos>")
  ids = small.encode(["c", "b", "<eos>", "zzz", "<unk>", "a"])
  assert ids.dtype == np.int32 and ids.tolist() == [2, 0, 1, 0, 0, 3]
  assert small.decode(ids) == ["c", "<unk>", "<eos>", "<unk>", "<unk>", "a"]
  built = Vocab.from_sequences([["x", "y", "<eos>"], ["y", "<eos>"]])
  assert built.words == ("<unk>", "<eos>", "y", "x") and built.counts.tolist() == [0, 2, 2, 1]
  for bad in [dict(max_size=1), dict(min_count=0)]:
    with pytest.raises(ValueError):
      Vocab.build(counts, **bad)
  with pytest.raises(ValueError, match="start with"):
    Vocab(["a", "<unk>", "<eos>"])
  with pytest.raises(ValueError, match="whitespace"):
    Vocab(["<unk>", "<eos>", "a b"])


def test_vocab_save_load(tmp_path):
  vocab = Vocab.build({"Ωmega": 2, "tab": 1, "<eos>": 3})
  path = tmp_path / "vocab.txt"
  vocab.save(path)
  assert path.read_text(encoding="utf-8") == "<unk>\t0\n<eos>\t3\nΩmega\t2\ntab\t1\n"
  assert Vocab.load(path) == vocab
  assert [p.name for p in tmp_path.iterdir()] == ["vocab.txt"]  # No temporary left.
  _write(path, "<unk>\t0\n<eos>\t3\nbroken line\n")
  with pytest.raises(DataError, match=rf"{_q(path)}:3: expected"):
    Vocab.load(path)
  _write(path, "<unk>\t0\n<eos>\t3\nx\t1\nx\t1\n")
  with pytest.raises(DataError, match=rf"{_q(path)}: duplicate"):
    Vocab.load(path)


# -- Token cache ------------------------------------------------------------------


def _expected_ids(reader_dir, split, vocab, **options):
  return vocab.encode(_flat(corpora.read_split("wikitext", reader_dir, split, **options)))


def test_cache_build_then_hit(wiki_dir, tmp_path, monkeypatch):
  cache_dir = tmp_path / "cache"
  corpus = cache_lib.load_corpus("wikitext", wiki_dir, cache_dir)
  assert not corpus.from_cache and corpus.cache_status == "missing"
  assert corpus.vocab.words[:4] == ("<unk>", "<eos>", "=", ".")
  assert "unseenword" not in corpus.vocab and "Delta" not in corpus.vocab
  for split in corpora.SPLITS:
    array_N = corpus.splits[split]
    assert isinstance(array_N, np.memmap) and array_N.dtype == np.int32
    np.testing.assert_array_equal(array_N, _expected_ids(wiki_dir, split, corpus.vocab))
  assert corpus.splits["train"].shape == (WIKI_NUM_TOKENS,)
  assert corpus.vocab.counts.sum() == WIKI_NUM_TOKENS
  entry = pathlib.Path(corpus.path)
  assert sorted(p.name for p in entry.iterdir()) == \
      ["manifest.json", "test.npy", "train.npy", "valid.npy", "vocab.txt"]
  manifest = json.loads((entry / "manifest.json").read_text())
  assert manifest["splits"]["valid"]["num_tokens"] == corpus.splits["valid"].shape[0]
  assert manifest["splits"]["valid"]["sha256"] == \
      hashlib.sha256((entry / "valid.npy").read_bytes()).hexdigest()

  def must_not_read(self, split):
    raise AssertionError("the cache hit read a source file")

  monkeypatch.setattr(corpora.WikiTextReader, "sequences", must_not_read)
  for verify in (True, False):
    again = cache_lib.load_corpus("wikitext", wiki_dir, cache_dir, verify=verify)
    assert again.from_cache and again.cache_status == "hit" and again.path == corpus.path
    assert again.vocab == corpus.vocab
    for split in corpora.SPLITS:
      np.testing.assert_array_equal(again.splits[split], corpus.splits[split])


def test_cache_small_chunks_match(wiki_dir, tmp_path, monkeypatch):
  """Spilling, counting and remapping in many chunks gives the same entry."""
  whole = cache_lib.load_corpus("wikitext", wiki_dir, tmp_path / "a")
  monkeypatch.setattr(cache_lib, "_CHUNK", 7)
  chunked = cache_lib.load_corpus("wikitext", wiki_dir, tmp_path / "b")
  assert chunked.vocab == whole.vocab
  for split in corpora.SPLITS:
    np.testing.assert_array_equal(chunked.splits[split], whole.splits[split])


def _flip_last_byte(path: pathlib.Path) -> None:
  data = bytearray(path.read_bytes())
  data[-1] ^= 0x01
  path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,reason", [
    (lambda e: _flip_last_byte(e / "valid.npy"), "corrupt: valid.npy fails its sha256 check"),
    (lambda e: (e / "train.npy").write_bytes((e / "train.npy").read_bytes()[:-8]),
     "corrupt: train.npy has"),
    (lambda e: (e / "test.npy").unlink(), "corrupt: test.npy is missing"),
    (lambda e: _flip_last_byte(e / "vocab.txt"), "corrupt: vocab.txt fails"),
    (lambda e: (e / "manifest.json").write_text("{not json"), "corrupt: JSONDecodeError"),
    (lambda e: (e / "manifest.json").unlink(), "missing"),
])
def test_cache_corruption_is_rebuilt(wiki_dir, tmp_path, damage, reason):
  cache_dir = tmp_path / "cache"
  good = cache_lib.load_corpus("wikitext", wiki_dir, cache_dir)
  expected = {s: np.array(a) for s, a in good.splits.items()}
  damage(pathlib.Path(good.path))
  rebuilt = cache_lib.load_corpus("wikitext", wiki_dir, cache_dir)
  assert not rebuilt.from_cache and rebuilt.cache_status.startswith(reason), rebuilt.cache_status
  for split, array_N in expected.items():
    np.testing.assert_array_equal(rebuilt.splits[split], array_N)
  assert cache_lib.load_corpus("wikitext", wiki_dir, cache_dir).from_cache


def test_cache_staleness(wiki_dir, tmp_path):
  cache_dir = tmp_path / "cache"
  first = cache_lib.load_corpus("wikitext", wiki_dir, cache_dir)
  valid = wiki_dir / "wiki.valid.tokens"
  st = valid.stat()
  os.utime(valid, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touch
  touched = cache_lib.load_corpus("wikitext", wiki_dir, cache_dir)
  assert touched.cache_status.startswith("stale: source files changed")
  assert touched.path == first.path
  with open(valid, "a", encoding="utf-8") as f:
    f.write(" Alpha Alpha \n")
  grown = cache_lib.load_corpus("wikitext", wiki_dir, cache_dir)
  assert grown.cache_status.startswith("stale") and grown.splits["valid"].shape[0] == \
      first.splits["valid"].shape[0] + 3
  assert cache_lib.load_corpus("wikitext", wiki_dir, cache_dir).from_cache
  # Other settings: a separate entry, built fresh, never the old one.
  small = cache_lib.load_corpus("wikitext", wiki_dir, cache_dir, vocab_size=5)
  assert not small.from_cache and small.path != first.path and len(small.vocab) == 5
  np.testing.assert_array_equal(small.splits["train"], _expected_ids(wiki_dir, "train", small.vocab))
  rare = cache_lib.load_corpus("wikitext", wiki_dir, cache_dir, min_count=2)
  assert not rare.from_cache and all(c >= 2 for c in rare.vocab.counts[2:])
  shuffled = cache_lib.load_corpus("wikitext", wiki_dir, cache_dir,
                                   reader_options={"shuffle_seed": 1})
  assert not shuffled.from_cache and shuffled.path not in (first.path, small.path, rare.path)
  np.testing.assert_array_equal(shuffled.splits["train"],
                                _expected_ids(wiki_dir, "train", shuffled.vocab, shuffle_seed=1))
  assert not list(pathlib.Path(cache_dir).glob("*/*.tmp-*"))


def test_cache_failed_build_leaves_no_entry(wiki_dir, tmp_path):
  _write(wiki_dir / "wiki.test.tokens", b" fine \n \xfe \n")
  cache_dir = tmp_path / "cache"
  with pytest.raises(DataError, match=r"wiki\.test\.tokens: invalid UTF-8 at byte offset 8"):
    cache_lib.load_corpus("wikitext", wiki_dir, cache_dir)
  (entry,) = pathlib.Path(cache_dir).iterdir()
  assert list(entry.iterdir()) == []  # No manifest, no temporaries.
  with pytest.raises(ValueError, match="including 'train'"):
    cache_lib.load_corpus("wikitext", wiki_dir, cache_dir, splits=("valid",))


def test_cache_synthetic_and_pg19(tmp_path, pg19_dir):
  options = dict(num_words=12, order=1, branching=3, seed=5, train_tokens=3000,
                 valid_tokens=500, test_tokens=500)
  corpus = cache_lib.load_corpus("synthetic", None, tmp_path / "cache", reader_options=options)
  source = synthetic.MarkovSource(num_words=12, order=1, branching=3, seed=5)
  words = corpus.vocab.decode(corpus.splits["valid"])
  assert words == [source.words[i] for i in source.sample_ids("valid", 500)]
  assert cache_lib.load_corpus("synthetic", None, tmp_path / "cache",
                               reader_options=options).from_cache
  batch = next(batcher_lib.TBPTTBatcher(corpus.splits["train"], 4, 16))
  assert type(batch["inputs"]) is np.ndarray  # A copy, not a view of the memory map.
  assert batch["inputs"].dtype == np.int32 and batch["inputs"].shape == (4, 16)
  pg = cache_lib.load_corpus("pg19", pg19_dir, tmp_path / "cache", splits=("train", "valid"))
  assert sorted(pg.splits) == ["train", "valid"]
  assert pg.vocab.decode(pg.splits["train"]) == _flat(PG19_TRAIN_PARAGRAPHS)
  assert pg.vocab.decode(pg.splits["valid"]) == ["<unk>", "<unk>", ".", "<eos>"]


# -- TBPTT batches ----------------------------------------------------------------


def test_batcher_lanes_cover_stream_in_order():
  N, B, T = 103, 4, 5
  tokens = np.arange(N, dtype=np.int32)  # Ids name their own positions.
  batcher = batcher_lib.TBPTTBatcher(tokens, B, T)
  L = (N - 1) // B
  S = L // T
  assert batcher.lane_len == L and batcher.segments_in_epoch(0) == S
  batches = [next(batcher) for _ in range(S)]
  assert batcher.get_state()["epoch"] == 1 and batcher.get_state()["segment"] == 0
  inputs_BN = np.concatenate([b["inputs"] for b in batches], axis=1)
  targets_BN = np.concatenate([b["targets"] for b in batches], axis=1)
  for b in range(B):
    np.testing.assert_array_equal(inputs_BN[b], np.arange(b * L, b * L + S * T))
  np.testing.assert_array_equal(targets_BN, inputs_BN + 1)
  for i, batch in enumerate(batches):
    assert batch["inputs"].dtype == np.int32 and batch["targets"].dtype == np.int32
    assert batch["mask"].dtype == np.float32 and (batch["mask"] == 1).all()
    assert batch["reset"].dtype == bool and batch["reset"].shape == (B,)
    assert batch["reset"].all() == (i == 0) and batch["reset"].any() == (i == 0)
  again = next(batcher)  # Epoch 1 starts over (no random offsets).
  assert again["reset"].all()
  np.testing.assert_array_equal(again["inputs"], batches[0]["inputs"])


def test_batcher_random_offsets_and_resume():
  tokens = (np.arange(500) * 7 % 31).astype(np.int32)
  make = lambda: batcher_lib.TBPTTBatcher(tokens, 3, 8, random_offsets=True, seed=11)
  batcher = make()
  offsets = {batcher.offset(e) for e in range(12)}
  assert len(offsets) > 1 and all(0 <= o < 8 for o in offsets)
  reference = [next(batcher) for _ in range(60)]  # Several epochs.
  resets = [i for i, b in enumerate(reference) if b["reset"].all()]
  ends = np.cumsum([batcher.segments_in_epoch(e) for e in range(len(resets))])
  assert resets == [0] + ends[:-1].tolist()
  for k in (0, 7, 20, 21, 45):
    first = make()
    for _ in range(k):
      next(first)
    state = json.loads(json.dumps(first.get_state()))
    assert first.is_first_segment == (k in resets)
    resumed = make()
    resumed.set_state(state)
    for i in range(k, 60):
      got = next(resumed)
      for key in ("inputs", "targets", "mask", "reset"):
        np.testing.assert_array_equal(got[key], reference[i][key])
  other = batcher_lib.TBPTTBatcher(tokens, 4, 8)
  with pytest.raises(ValueError, match="batch_size=3 but this batcher has batch_size=4"):
    other.set_state(state)
  with pytest.raises(ValueError, match="shorter than seq_len"):
    batcher_lib.TBPTTBatcher(tokens[:20], 4, 8)


@pytest.mark.parametrize("N,B,T", [(103, 4, 5), (101, 4, 5), (50, 3, 100), (5, 8, 2), (2, 1, 1),
                                   (1000, 7, 13)])
def test_eval_batches_cover_every_target_once(N, B, T):
  tokens = np.arange(N, dtype=np.int32)
  batches = batcher_lib.EvalBatches(tokens, B, T)
  seen = []
  for i, batch in enumerate(batches):
    assert batch["inputs"].shape == batch["targets"].shape == batch["mask"].shape == (B, T)
    assert batch["reset"].all() == (i == 0) and batch["reset"].any() == (i == 0)
    valid = batch["mask"] > 0
    np.testing.assert_array_equal(batch["targets"][valid], batch["inputs"][valid] + 1)
    assert (batch["inputs"][~valid] == 0).all() and (batch["targets"][~valid] == 0).all()
    seen.append(batch)
  assert len(seen) == len(batches) == math.ceil(math.ceil((N - 1) / B) / T)
  targets = np.concatenate([b["targets"][b["mask"] > 0] for b in seen])
  assert sorted(targets.tolist()) == list(range(1, N))  # Every target exactly once.
  assert sum(b["mask"].sum() for b in seen) == N - 1
  # Each lane continues itself: row b of consecutive batches is contiguous.
  inputs_BN = np.concatenate([b["inputs"] for b in seen], axis=1)
  mask_BN = np.concatenate([b["mask"] for b in seen], axis=1) > 0
  for b in range(B):
    lane = inputs_BN[b][mask_BN[b]]
    assert (np.diff(lane) == 1).all() and mask_BN[b][:lane.size].all()
  # Exact mean loss of a fixed "model": masked sum / mask sum = direct mean.
  loss_of = lambda ids: np.log1p(ids.astype(np.float64) % 5)
  masked = sum((loss_of(b["targets"]) * b["mask"]).sum() for b in seen) / (N - 1)
  assert masked == pytest.approx(loss_of(tokens[1:]).mean())


# -- Synthetic corpus -------------------------------------------------------------


def test_synthetic_is_deterministic():
  a = synthetic.MarkovSource(num_words=20, order=2, branching=3, seed=3)
  b = synthetic.MarkovSource(num_words=20, order=2, branching=3, seed=3)
  c = synthetic.MarkovSource(num_words=20, order=2, branching=3, seed=4)
  np.testing.assert_array_equal(a.probs_CJ, b.probs_CJ)
  ids = a.sample_ids("train", 5000)
  np.testing.assert_array_equal(ids, b.sample_ids("train", 5000))
  assert not np.array_equal(a.probs_CJ, c.probs_CJ)
  assert not np.array_equal(ids[:1000], c.sample_ids("train", 5000)[:1000])
  assert not np.array_equal(ids[:1000], a.sample_ids("valid", 5000)[:1000])
  longer = a.sample_ids("train", 20000)
  np.testing.assert_array_equal(longer[:ids.size], ids)  # Prefix-consistent.
  # Whole sentences, minimal: dropping the last sentence goes below the request.
  assert ids[-1] == 0 and ids.size >= 5000
  assert np.flatnonzero(ids == 0)[-2] + 1 < 5000
  sentences = list(a.sentences("train", 5000))
  assert [a.words.index(w) for w in _flat(sentences)] == ids.tolist()
  assert all(s[-1] == "<eos>" and "<eos>" not in s[:-1] for s in sentences)


def test_synthetic_entropy_rate_exact():
  # One successor word: the only uncertainty is <eos>, a Bernoulli(p) per token.
  p = 0.2
  single = synthetic.MarkovSource(num_words=10, order=2, branching=1, eos_prob=p, seed=1)
  assert single.entropy_rate() == pytest.approx(-p * math.log(p) - (1 - p) * math.log(1 - p),
                                                abs=1e-12)
  # First order: the stationary distribution is the left eigenvector of the
  # token transition matrix.
  source = synthetic.MarkovSource(num_words=16, order=1, branching=4, eos_prob=0.1, seed=2)
  A = source.alphabet_size
  P_AA = np.zeros((A, A))
  for context in range(A):
    P_AA[context, source.successors_CJ[context]] = source.probs_CJ[context]
  np.testing.assert_allclose(P_AA.sum(axis=1), 1.0)
  values, vectors = np.linalg.eig(P_AA.T)
  pi = np.real(vectors[:, np.argmin(np.abs(values - 1))])
  pi /= pi.sum()
  np.testing.assert_allclose(source.stationary_distribution(), pi, atol=1e-10)
  assert source.entropy_rate() == pytest.approx(pi @ source.context_entropies(), abs=1e-10)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_synthetic_true_model_log_loss_matches_entropy_rate(order):
  source = synthetic.MarkovSource(num_words=16, order=order, branching=3, eos_prob=0.1,
                                  seed=order)
  ids = source.sample_ids("train", 200_000)
  log_loss = -source.log_probs(ids).mean()
  assert abs(log_loss - source.entropy_rate()) < 0.01, (log_loss, source.entropy_rate())


def test_synthetic_bigram_estimate_approaches_entropy_rate():
  source = synthetic.MarkovSource(num_words=16, order=1, branching=3, eos_prob=0.1, seed=7)
  A = source.alphabet_size
  train = source.sample_ids("train", 300_000).astype(np.int64)
  valid = source.sample_ids("valid", 100_000).astype(np.int64)
  counts_AA = np.bincount(train[:-1] * A + train[1:], minlength=A * A).reshape(A, A) + 0.01
  counts_AA[0] += np.bincount([train[0]], minlength=A)  # The stream starts after an <eos>.
  P_AA = counts_AA / counts_AA.sum(axis=1, keepdims=True)
  previous = np.concatenate([[0], valid[:-1]])
  cross_entropy = -np.log(P_AA[previous, valid]).mean()
  H = source.entropy_rate()
  assert H - 0.01 < cross_entropy < H + 0.02, (cross_entropy, H)
  # The smaller the sample, the worse the estimate (it approaches H from above on average).
  tiny = np.bincount(train[:2000][:-1] * A + train[:2000][1:], minlength=A * A).reshape(A, A) + 0.01
  tiny_ce = -np.log((tiny / tiny.sum(axis=1, keepdims=True))[previous, valid]).mean()
  assert tiny_ce > cross_entropy
