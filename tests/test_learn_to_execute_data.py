"""Tests for the Learning to Execute data (rmc_jax.tasks.learn_to_execute).

Program targets are checked against an independent recursive-descent
evaluator written here (exact Python ints), and, for the tasks without For,
also against Python's own `eval` of the program made into Python syntax.
"""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest

from rmc_jax.tasks import learn_to_execute as lte

PROGRAM_TASKS = ["ADDITION", "ALGEBRA", "CONTROL", "ALL", "ALG_CTRL"]
MEMORY_TASKS = ["COPY", "REVERSE", "DOUBLE"]
# (literal length L, nesting N) at which every sample of a check is drawn.
LEVELS = [(5, 2), (3, 3), (1, 1), (1, 4), (2, 4), (6, 3)]
NUM_SAMPLES = 2000
# Characters that name each op in a program text.
OP_MARKERS = {"Add": "+", "Sub": "-", "Mul": "*", "If": "if", "For": "for"}


# -- Independent evaluator -----------------------------------------------------


class _Parser:
  """Recursive descent over the program grammar, with Python semantics:

    program := 'x=' cond 'for[' digits ']x+=' cond   (value: a + k * b)
             | cond
    cond    := arith [ 'if' arith ('<' | '>') arith 'else' cond ]
    arith   := term (('+' | '-') term)*
    term    := atom ('*' atom)*
    atom    := digits | '(' program ')'
  """

  def __init__(self, text: str):
    self.text, self.pos = text, 0

  def _peek(self, token: str) -> bool:
    return self.text.startswith(token, self.pos)

  def _expect(self, token: str) -> None:
    assert self._peek(token), (token, self.text, self.pos)
    self.pos += len(token)

  def parse(self) -> int:
    value = self.program()
    assert self.pos == len(self.text), (self.text, self.pos)
    return value

  def program(self) -> int:
    if self._peek("x="):
      self._expect("x=")
      start = self.cond()
      self._expect("for[")
      count = self.number()
      self._expect("]x+=")
      step = self.cond()
      return start + count * step
    return self.cond()

  def cond(self) -> int:
    value = self.arith()
    if not self._peek("if"):
      return value
    self._expect("if")
    left = self.arith()
    comparator = self.text[self.pos]
    assert comparator in "<>", self.text
    self.pos += 1
    right = self.arith()
    self._expect("else")
    other = self.cond()
    holds = left < right if comparator == "<" else left > right
    return value if holds else other

  def arith(self) -> int:
    value = self.term()
    while self.pos < len(self.text) and self.text[self.pos] in "+-":
      if self._peek("+="):  # Belongs to the For loop body.
        break
      sign = self.text[self.pos]
      self.pos += 1
      operand = self.term()
      value = value + operand if sign == "+" else value - operand
    return value

  def term(self) -> int:
    value = self.atom()
    while self._peek("*"):
      self.pos += 1
      value *= self.atom()
    return value

  def atom(self) -> int:
    if self._peek("("):
      self.pos += 1
      value = self.program()
      self._expect(")")
      return value
    return self.number()

  def number(self) -> int:
    match = re.compile(r"\d+").match(self.text, self.pos)
    assert match, (self.text, self.pos)
    self.pos = match.end()
    return int(match.group())


def _evaluate(program: str) -> int:
  return _Parser(program).parse()


def test_evaluator_on_hand_written_programs():
  assert _evaluate("12+34") == 46
  assert _evaluate("(12-34)*5") == -110
  assert _evaluate("1if2<3else4") == 1
  assert _evaluate("1if2>3else4") == 4
  assert _evaluate("x=5for[3]x+=7") == 26
  assert _evaluate("x=(x=1for[2]x+=3)for[4]x+=5") == 27
  assert _evaluate("(x=1for[2]x+=3)if4<5else6") == 7
  assert _evaluate("((9-8)*7)+6") == 13


def _texts_at(task: str, length: int, nesting: int, seed: int,
              num: int = NUM_SAMPLES) -> list[tuple[str, str]]:
  rng = np.random.default_rng(seed)
  return lte.generate_texts(rng, task, [length] * num, [nesting] * num)


def _op_counts(program: str) -> dict[str, int]:
  """How many times each op appears in a program text."""
  stripped = program.replace("x+=", "")  # For's increment is not an Add.
  return {
      "Add": stripped.count("+"), "Sub": stripped.count("-"),
      "Mul": stripped.count("*"), "If": program.count("if"),
      "For": program.count("for"),
  }


# -- Vocabulary and tokens -----------------------------------------------------


def test_vocabulary():
  vocab = lte.VOCABULARY
  assert len(vocab) == 45 == lte.VOCAB_SIZE
  assert vocab[:4] == ("_unk_", "_null_", "_eos_", "|")
  assert list(vocab[4:]) == sorted(vocab[4:])
  assert len(set(vocab)) == 45
  singles = set("0123456789+-*=:/() x|<>[]~!.ifornelsag")
  assert {s for s in vocab if len(s) == 1} == singles
  assert {s for s in vocab if len(s) > 1} == {
      "_unk_", "_null_", "_eos_", "if", "for", "else", "range"}
  assert vocab[lte.PAD_ID] == "." and vocab[lte.SOS_ID] == "~"
  assert vocab[lte.EOS_ID] == "!"


def test_token_round_trip():
  rng = np.random.default_rng(0)
  chars = np.array([s for s in lte.VOCABULARY if len(s) == 1])
  for _ in range(200):
    text = "".join(rng.choice(chars, rng.integers(0, 60)))
    ids = lte.encode(text)
    assert ids.dtype == np.int32 and ids.shape == (len(text),)
    assert lte.decode(ids) == text
  for program, target in _texts_at("ALL", 5, 3, seed=1, num=200):
    assert lte.decode(lte.encode(program)) == program
    assert lte.decode(lte.encode(target)) == target
  assert lte.decode(lte.encode("")) == ""


def test_encode_rejects_unknown_characters():
  for bad in ["12#3", "abc", "1\n2", "é"]:
    with pytest.raises(ValueError):
      lte.encode(bad)
  with pytest.raises(ValueError):
    lte.decode([45])


# -- Sequence lengths ----------------------------------------------------------


def test_sequence_lengths():
  assert lte.sequence_lengths("alg_ctrl", 5, 2) == (57, 10)
  for task in PROGRAM_TASKS:
    for length, nesting in LEVELS:
      expected_in = ((3 * length + 10) * (nesting - 1) + (4 * length + 10)
                     + 2 * (nesting - 1))
      assert lte.sequence_lengths(task, length, nesting) == (expected_in,
                                                             2 * length)
  for length in (1, 5, 9):
    assert lte.sequence_lengths("copy", length, 1) == (length + 1, length + 1)
    assert lte.sequence_lengths("REVERSE", length, 1) == (length + 1,
                                                          length + 1)
    assert lte.sequence_lengths("Double", length, 1) == (length + 1,
                                                         2 * length + 1)


def test_memory_tasks_need_nesting_one():
  for task in MEMORY_TASKS:
    with pytest.raises(ValueError, match="max_nesting"):
      lte.sequence_lengths(task, 5, 2)
    with pytest.raises(ValueError, match="max_nesting"):
      lte.LearnToExecuteIterator(4, task, 5, 2)
    with pytest.raises(ValueError):
      lte.generate_texts(np.random.default_rng(0), task, [3], [2])


def test_bad_arguments():
  with pytest.raises(ValueError, match="unknown task"):
    lte.LearnToExecuteIterator(4, "division", 5, 2)
  with pytest.raises(ValueError, match="unknown curriculum"):
    lte.LearnToExecuteIterator(4, "all", 5, 2, curriculum="random")
  with pytest.raises(ValueError):
    lte.LearnToExecuteIterator(4, "all", 0, 2)
  with pytest.raises(ValueError):
    lte.LearnToExecuteIterator(4, "all", lte.MAX_LITERAL_LENGTH + 1, 1)
  with pytest.raises(ValueError):
    lte.LearnToExecuteIterator(0, "all", 5, 2)
  with pytest.raises(ValueError):
    lte.LearnToExecuteIterator(4, "all", 5, 2, seed=-1)
  # Task names are case-insensitive and TaskType members are accepted.
  it = lte.LearnToExecuteIterator(2, lte.TaskType.ALG_CTRL, 2, 2)
  assert it.task == "ALG_CTRL"
  assert lte.LearnToExecuteIterator(2, "alg_Ctrl", 2, 2).task == "ALG_CTRL"


# -- Program generator ---------------------------------------------------------


@pytest.mark.parametrize("task", PROGRAM_TASKS)
def test_program_targets_match_independent_evaluator(task):
  allowed = set(lte.TASK_OPS[task])
  for seed, (length, nesting) in enumerate(LEVELS):
    modulus = 10 ** (length + 1)
    t_in, t_out = lte.sequence_lengths(task, length, nesting)
    seen_ops = set()
    for program, target in _texts_at(task, length, nesting, seed):
      value = _evaluate(program)
      assert target == str(value % modulus), (program, target, value)
      if "For" not in allowed:  # Valid Python once 'if'/'else' are spaced.
        python = program.replace("if", " if ").replace("else", " else ")
        assert eval(python, {"__builtins__": {}}) == value, program
      counts = _op_counts(program)
      assert sum(counts.values()) == nesting, (program, counts)
      seen_ops |= {op for op, c in counts.items() if c}
      # Fresh literals have exactly L digits (For's loop count has one).
      literals = re.findall(r"\d+", re.sub(r"\[\d\]", "", program))
      assert all(len(x) == length and x[0] != "0" for x in literals), program
      loop_counts = re.findall(r"\[(\d+)\]", program)
      assert all(k in "123456789" and len(k) == 1 for k in loop_counts)
      # One pair of parentheses per popped sub-expression, outer stripped.
      assert program.count("(") == program.count(")") == nesting - 1
      assert len(program) <= t_in and 1 <= len(target) <= min(length + 1,
                                                               t_out)
    assert seen_ops <= allowed
    assert seen_ops == allowed, (task, length, nesting, seen_ops)


def test_if_uses_both_comparators_and_both_branches():
  pairs = _texts_at("CONTROL", 3, 1, seed=7)
  ifs = [p for p, _ in pairs if "if" in p]
  assert any("<" in p for p in ifs) and any(">" in p for p in ifs)
  taken = [_evaluate(p) == int(p.split("if")[0]) for p in ifs]
  assert 0.3 < np.mean(taken) < 0.7
  loops = [int(k) for p, _ in pairs for k in re.findall(r"\[(\d)\]", p)]
  assert set(loops) == set(range(1, 10))


def test_first_operand_pops_previous_expression():
  # The popped sub-expression is always the first operand of the next op.
  for program, _ in _texts_at("ALL", 2, 3, seed=3, num=500):
    assert program.startswith("(") or program.startswith("x=(")


@pytest.mark.parametrize("task", MEMORY_TASKS)
def test_memory_targets(task):
  for length in (1, 4, 5, 8):
    for program, target in _texts_at(task, length, 1, seed=length):
      assert re.fullmatch(r"[1-9]\d*", program) and len(program) == length
      expected = {"COPY": program, "REVERSE": program[::-1],
                  "DOUBLE": program + program}[task]
      assert target == expected


def test_generate_code_is_seeded():
  a = lte.generate_code(np.random.default_rng(5), "all", 4, 3)
  b = lte.generate_code(np.random.default_rng(5), "all", 4, 3)
  assert a == b and _evaluate(a[0]) % 10**5 == int(a[1])


# -- Batches -------------------------------------------------------------------


@pytest.mark.parametrize("task,length,nesting", [
    ("ALG_CTRL", 5, 2), ("ALL", 3, 3), ("ADDITION", 1, 1),
    ("COPY", 5, 1), ("REVERSE", 2, 1), ("DOUBLE", 5, 1)])
def test_batch_layout(task, length, nesting):
  t_in, t_out = lte.sequence_lengths(task, length, nesting)
  batch, pairs = lte.generate_batch(np.random.default_rng(0), 300, task,
                                    length, nesting,
                                    lte.make_curriculum("mix", length,
                                                        nesting),
                                    return_text=True)
  assert batch.tokens_in.shape == (300, t_in)
  assert batch.tokens_out.shape == batch.decoder_inputs.shape == (300, t_out)
  for array in batch:
    assert array.dtype == np.int32
  assert batch.lengths_in.shape == batch.lengths_out.shape == (300,)
  assert batch.lengths_in.min() >= 1 and batch.lengths_in.max() <= t_in
  assert batch.lengths_out.min() >= 1 and batch.lengths_out.max() <= t_out
  for tokens, lengths, mask in ((batch.tokens_in, batch.lengths_in,
                                 batch.mask_in),
                                (batch.tokens_out, batch.lengths_out,
                                 batch.mask_out)):
    steps = np.arange(tokens.shape[1])[None, :]
    padded = steps >= lengths[:, None]
    assert np.all(tokens[padded] == lte.PAD_ID)
    assert np.all(tokens[~padded] != lte.PAD_ID)
    assert mask.dtype == np.float32 and np.array_equal(mask, ~padded)
  assert np.all(batch.decoder_inputs[:, 0] == lte.SOS_ID)
  assert np.array_equal(batch.decoder_inputs[:, 1:], batch.tokens_out[:, :-1])
  for i in range(300):
    assert lte.sample_text(batch, i) == pairs[i]
    assert len(pairs[i][0]) == batch.lengths_in[i]
  part = batch.slice(10, 20)
  assert part.batch_size == 10 and lte.sample_text(part, 0) == pairs[10]


def test_too_long_sequences_raise():
  with pytest.raises(ValueError, match="too large"):
    lte.encode_batch([("123+456", "579")], 6, 4)
  with pytest.raises(ValueError, match="too large"):
    lte.encode_batch([("1+2", "12345")], 6, 4)


def test_lengths_never_exceed_bounds_at_max_level():
  for task in PROGRAM_TASKS:
    for length, nesting in [(1, 6), (5, 2), (6, 3)]:
      t_in, _ = lte.sequence_lengths(task, length, nesting)
      batch = lte.eval_batch(task, length, nesting, num_samples=1000, seed=2)
      assert batch.lengths_in.max() <= t_in
      assert batch.lengths_out.max() <= length + 1


def test_length_mask_with_jax():
  jnp = pytest.importorskip("jax.numpy")
  lengths = np.array([0, 2, 5], np.int32)
  expected = lte.length_mask(lengths, 4)
  assert np.array_equal(np.asarray(lte.length_mask(jnp.asarray(lengths), 4)),
                        expected)
  assert expected.tolist() == [[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]


# -- Curricula -----------------------------------------------------------------


def _feed(curriculum, losses):
  """Feeds losses; returns the level after each update."""
  levels = []
  for loss in losses:
    curriculum.update(loss)
    levels.append(curriculum.level)
  return levels


@pytest.mark.parametrize("name", ["naive", "combine"])
def test_curriculum_advances_on_plateau(name):
  curriculum = lte.make_curriculum(name, 3, 2, loss_threshold=0.1,
                                   min_tries=10)
  assert curriculum.level == (1, 1) and curriculum.window_size == 10
  levels = _feed(curriculum, [1.0] * 9)
  assert levels[-1] == (1, 1)  # Fewer than min_tries losses seen.
  assert curriculum.update(1.0) and curriculum.level == (2, 1)
  # Small noise around a plateau still counts as a plateau.
  rng = np.random.default_rng(0)
  levels = _feed(curriculum, 2.0 + 0.01 * rng.standard_normal(100))
  distinct = list(dict.fromkeys(levels))
  assert distinct == [(2, 1), (3, 1), (3, 2)]
  assert levels.index((3, 1)) == 9 and levels.index((3, 2)) == 19
  assert max(l for l, _ in levels) <= 3 and max(n for _, n in levels) <= 2
  assert not curriculum.update(2.0) and curriculum.level == (3, 2)


@pytest.mark.parametrize("name", ["naive", "combine"])
def test_curriculum_waits_while_loss_falls(name):
  curriculum = lte.make_curriculum(name, 5, 2, loss_threshold=0.1,
                                   min_tries=10)
  levels = _feed(curriculum, 5.0 * 0.8 ** np.arange(200))
  assert set(levels) == {(1, 1)}
  # Then a plateau: advances after min_tries more losses.
  levels = _feed(curriculum, [0.5] * 10)
  assert levels[-1] == (2, 1)
  # A rising loss (divergence) does not advance either.
  assert set(_feed(curriculum, 1.25 ** np.arange(50))) == {(2, 1)}


def test_curriculum_window_and_min_tries():
  assert lte.make_curriculum("naive", 3, 1, min_tries=3).window_size == 5
  assert lte.make_curriculum("naive", 3, 1, min_tries=20).window_size == 10
  assert lte.make_curriculum("naive", 3, 1, min_tries=0).window_size == 5
  curriculum = lte.make_curriculum("naive", 3, 1, min_tries=3)
  levels = _feed(curriculum, [1.0, 1.0, 1.0])
  assert levels == [(1, 1), (1, 1), (2, 1)]
  with pytest.raises(ValueError):
    curriculum.update(float("nan"))


def test_naive_samples_at_level_and_combine_below():
  rng = np.random.default_rng(0)
  naive = lte.make_curriculum("naive", 5, 3)
  combine = lte.make_curriculum("combine", 5, 3)
  state = {"name": "combine", "max_length": 5, "max_nesting": 3, "length": 4,
           "nesting": 2, "window": [], "num_tries": 0}
  combine.set_state(state)
  naive.set_state(dict(state, name="naive"))
  lengths, nestings = naive.sample_levels(rng, 1000)
  assert set(lengths.tolist()) == {4} and set(nestings.tolist()) == {2}
  lengths, nestings = combine.sample_levels(rng, 1000)
  assert set(lengths.tolist()) == {1, 2, 3, 4}
  assert set(nestings.tolist()) == {1, 2}


def test_mix_and_baseline():
  rng = np.random.default_rng(0)
  mix = lte.make_curriculum("MIX", 6, 3)
  lengths, nestings = mix.sample_levels(rng, 5000)
  pairs = set(zip(lengths.tolist(), nestings.tolist()))
  assert pairs == {(l, n) for l in range(1, 7) for n in range(1, 4)}
  assert abs(np.mean(lengths) - 3.5) < 0.1 and abs(np.mean(nestings) - 2) < 0.1
  baseline = lte.make_curriculum("baseline", 6, 3)
  lengths, nestings = baseline.sample_levels(rng, 100)
  assert set(lengths.tolist()) == {6} and set(nestings.tolist()) == {3}
  for curriculum in (mix, baseline):
    assert not any(curriculum.update(1.0) for _ in range(50))
    assert curriculum.level == (6, 3)


def test_curriculum_state_round_trip():
  curriculum = lte.make_curriculum("combine", 5, 2, min_tries=10)
  _feed(curriculum, [1.0] * 10 + [0.9, 0.7, 0.6])
  state = json.loads(json.dumps(curriculum.get_state()))
  assert state["length"] == 2 and state["window"] == [0.9, 0.7, 0.6]
  restored = lte.make_curriculum("combine", 5, 2, min_tries=10)
  restored.set_state(state)
  assert restored.get_state() == curriculum.get_state()
  losses = [0.6] * 12
  assert _feed(restored, losses) == _feed(curriculum, losses)
  with pytest.raises(ValueError):
    lte.make_curriculum("naive", 5, 2).set_state(state)  # Other kind.
  with pytest.raises(ValueError):
    lte.make_curriculum("combine", 4, 2).set_state(state)  # Other maxima.
  with pytest.raises(ValueError):
    restored.set_state(dict(state, length=6))


# -- Iterator ------------------------------------------------------------------


def _assert_same(a: lte.LTEBatch, b: lte.LTEBatch) -> None:
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def test_iterator_is_seeded():
  a = lte.LearnToExecuteIterator(64, "all", 5, 2, seed=3)
  b = lte.LearnToExecuteIterator(64, "all", 5, 2, seed=3)
  c = lte.LearnToExecuteIterator(64, "all", 5, 2, seed=4)
  first_a, first_b, first_c = next(a), next(b), next(c)
  _assert_same(first_a, first_b)
  assert not np.array_equal(first_a.tokens_in, first_c.tokens_in)
  assert not np.array_equal(first_a.tokens_in, next(a).tokens_in)
  assert a.index == 2
  _assert_same(a.batch_at(0), first_a)


@pytest.mark.parametrize("curriculum", ["mix", "combine", "naive",
                                        "baseline"])
def test_iterator_resume_reproduces_batches(curriculum):
  def run(it, num_batches):
    out = []
    for _ in range(num_batches):
      batch = next(it)
      out.append(batch)
      it.update_curriculum(1.0)  # A plateau: the level keeps rising.
    return out

  it = lte.LearnToExecuteIterator(32, "alg_ctrl", 4, 3, curriculum=curriculum,
                                  seed=11, min_tries=3)
  run(it, 7)
  state = json.loads(json.dumps(it.get_state()))
  expected = run(it, 12)
  resumed = lte.LearnToExecuteIterator(32, "alg_ctrl", 4, 3,
                                       curriculum=curriculum, seed=0,
                                       min_tries=3)
  resumed.set_state(state)
  assert resumed.index == 7 and resumed.seed == 11
  for want, got in zip(expected, run(resumed, 12)):
    _assert_same(want, got)
  if curriculum in ("combine", "naive"):
    assert it.curriculum.level == (4, 3)
  with pytest.raises(ValueError):
    resumed.set_state({"seed": 1, "index": 0})


def test_naive_iterator_follows_level():
  it = lte.LearnToExecuteIterator(200, "all", 3, 2, curriculum="naive",
                                  min_tries=5)
  batch, pairs = it.batch_at(0, return_text=True)
  assert all("(" not in p for p, _ in pairs)  # Level (1, 1): no nesting.
  assert all(len(x) == 1 for p, _ in pairs
             for x in re.findall(r"\d+", re.sub(r"\[\d\]", "", p)))
  assert batch.tokens_in.shape == (200, lte.sequence_lengths("all", 3, 2)[0])
  for _ in range(5):
    it.update_curriculum(0.3)
  assert it.curriculum.level == (2, 1)


def test_eval_batch():
  it = lte.LearnToExecuteIterator(128, "alg_ctrl", 5, 2, seed=0)
  batch, pairs = it.eval_batch(2000, return_text=True)
  again = lte.eval_batch("ALG_CTRL", 5, 2, num_samples=2000, seed=0)
  _assert_same(batch, again)
  assert batch.tokens_in.shape == (2000, 57)
  for program, target in pairs:  # Every sample at the maxima.
    assert program.count("(") == 1
    literals = re.findall(r"\d+", program)
    assert all(len(x) == 5 for x in literals)
    assert target == str(_evaluate(program) % 10**6)
  assert not np.array_equal(batch.tokens_in[:128],
                            it.batch_at(0).tokens_in)


def test_generation_speed_sanity():
  # Not a timing assertion (shared CPUs): just runs the sizes that matter and
  # reports the time with `pytest -s`.
  for batch_size in (128, 1600):
    it = lte.LearnToExecuteIterator(batch_size, "all", 5, 2)
    start = time.perf_counter()
    for _ in range(3):
      batch = next(it)
    per_batch_ms = (time.perf_counter() - start) / 3 * 1e3
    print(f"batch {batch_size}: {per_batch_ms:.1f} ms")
    assert batch.tokens_in.shape == (batch_size, 57)
