"""Data for the "Learning to Execute" tasks (Zaremba & Sutskever, 2014).

As used by Santoro et al. (2018) and the Sonnet v1 example generator
(`sonnet/examples/learn_to_execute.py`). Only the data side
lives here: programs, targets, tokens, curricula and a seeded, resumable
batch iterator. The model and the launcher are elsewhere.

Programs. `generate_code(length=L, nesting=N)` builds a program bottom-up with
a stack of sub-expressions. N times: pick an op uniformly from the task's ops;
fill its operands in order, the first one popping the previous sub-expression
if there is one, every other one a fresh integer with exactly L digits,
uniform in [10^(L-1), 10^L - 1]; evaluate it and push ('(' + code + ')',
value). The program is the last push with its outer parentheses stripped.

  op       code                value
  Add      a+b                 a + b
  Sub      a-b                 a - b
  Mul      a*b                 a * b
  If       aifb<celsed         a if b < c else d   (or '>': fair coin per op)
  For      x=afor[k]x+=b       a + k * b           (k uniform in 1..9)
  Copy     v                   v
  Reverse  v                   v reversed (as a string)
  Double   v                   vv

Only `a` (the first operand) can be a popped sub-expression, so in If the
compared values b, c and the else-branch d are always fresh L-digit literals,
and in For the initial value a may be a sub-expression while the loop count k
is a single digit and the increment b a fresh literal. Intermediate values
are exact (Python ints, no modulus); the target of a program task is the
decimal text of `value mod 10^(L+1)` (never negative), with L the sample's own
literal length. The memory tasks print one L-digit literal and ask for its
copy, its reverse or itself twice. Div is not provided (no task uses it).

Tasks (names are case-insensitive strings, or `TaskType` members):

  ALGEBRA   Add, Sub, Mul             COPY     Copy
  CONTROL   If, For                   REVERSE  Reverse
  ALL       Add, Sub, Mul, If, For    DOUBLE   DoubleCopy
  ALG_CTRL  Add, Sub, If
  ADDITION  Add

Tokens. Character tokens only (Sonnet's `token_by_char=True`, which is what
the paper's Table 1 uses; word tokens are not implemented). The vocabulary is
built as the spec says: '_unk_', '_null_', '_eos_', '|' at ids 0..3, then the
sorted set of the digits '0'..'9', the literals `+ - * = : / ( ) <space> x |
< > [ ] ~ ! .`, the keywords 'if for else range' and every character of all of
these. '|' is both reserved and a literal; it is kept once, at id 3, which
gives the spec's V = 45. Multi-character symbols are in the vocabulary but are
never produced by character tokenisation. No SOS/EOS token is added to the
sequences; padding is '.'; lengths are the unpadded token counts. The decoder
inputs for teacher forcing are the padded targets shifted right by one step
behind the SOS token '~'.

Sequence lengths (fixed by the maxima, whatever the curriculum level, so the
shapes never change during training):

  program tasks  T_in  = (3L+10)(N-1) + (4L+10) + 2(N-1),  T_out = 2L
  COPY, REVERSE  T_in  = L+1,                               T_out = L+1
  DOUBLE         T_in  = L+1,                               T_out = 2L+1

(L = max_length, N = max_nesting; 57 / 10 for L=5, N=2.) With nesting above 1
the memory tasks' code gains parentheses and no longer fits T_in; Sonnet then
raises "Token sequence is too large" while sampling, so here they require
max_nesting == 1 (ValueError otherwise).

Curricula (`make_curriculum`): 'baseline' (fixed at the maxima), 'naive'
(from (1, 1): length +1 up to the maximum, then nesting +1; every sample at
the current level), 'mix' (per sample, length uniform in [1, max_length] and
nesting uniform in [1, max_nesting]; ignores losses) and 'combine' (levels
move like naive; per sample, uniform in [1, current length] and [1, current
nesting]). See `Curriculum.update` for the rule that raises the level.

Shape suffixes: B = batch, T = time step (T_in or T_out), N = nesting.
Batches are batch-major (`tokens_in` is [B, T_in]) from the generator to the
model, which reads them time-major through the core.
"""

from __future__ import annotations

import collections
import enum
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from rmc_jax.checks import batch_rng, check_int, check_seed, SeededBatches

__all__ = [
    "TaskType",
    "PROGRAM_TASKS",
    "MEMORY_TASKS",
    "TASK_OPS",
    "VOCABULARY",
    "VOCAB_SIZE",
    "PAD",
    "SOS",
    "EOS",
    "PAD_ID",
    "SOS_ID",
    "EOS_ID",
    "MAX_LITERAL_LENGTH",
    "encode",
    "decode",
    "sequence_lengths",
    "generate_texts",
    "generate_code",
    "LTEBatch",
    "length_mask",
    "encode_batch",
    "sample_text",
    "generate_batch",
    "Curriculum",
    "BaselineCurriculum",
    "NaiveCurriculum",
    "MixCurriculum",
    "CombineCurriculum",
    "make_curriculum",
    "LearnToExecuteIterator",
    "eval_batch",
]


# -- Tasks and ops -------------------------------------------------------------


class TaskType(str, enum.Enum):
  """The Learning to Execute task types (values are the canonical names)."""

  ALGEBRA = "ALGEBRA"
  CONTROL = "CONTROL"
  ALL = "ALL"
  ALG_CTRL = "ALG_CTRL"
  ADDITION = "ADDITION"
  COPY = "COPY"
  DOUBLE = "DOUBLE"
  REVERSE = "REVERSE"


PROGRAM_TASKS = frozenset({"ALGEBRA", "CONTROL", "ALL", "ALG_CTRL", "ADDITION"})
MEMORY_TASKS = frozenset({"COPY", "REVERSE", "DOUBLE"})

# Literals are integers below 10**MAX_LITERAL_LENGTH, drawn as int64.
MAX_LITERAL_LENGTH = 18

# The most operands any op takes (If: a, b, c, d).
_MAX_OPERANDS = 4


class _Op(NamedTuple):
  """An op: `build(texts, values, comparator, loop_count) -> (code, value)`.

  `texts`/`values` hold the op's `arity` operands in order (the first may be a
  parenthesised sub-expression and its exact value). `comparator` is 0 for
  '<' and 1 for '>' (used by If), `loop_count` is k in 1..9 (used by For).
  """

  name: str
  arity: int
  build: Callable[[list[str], list[Any], int, int], tuple[str, Any]]


def _build_if(texts, values, comparator, unused_loop_count):
  a, b, c, d = values
  if comparator == 0:
    return f"{texts[0]}if{texts[1]}<{texts[2]}else{texts[3]}", a if b < c else d
  return f"{texts[0]}if{texts[1]}>{texts[2]}else{texts[3]}", a if b > c else d


def _build_for(texts, values, unused_comparator, loop_count):
  return (f"x={texts[0]}for[{loop_count}]x+={texts[1]}",
          values[0] + loop_count * values[1])


_OPS = {
    "Add": _Op("Add", 2, lambda t, v, c, k: (f"{t[0]}+{t[1]}", v[0] + v[1])),
    "Sub": _Op("Sub", 2, lambda t, v, c, k: (f"{t[0]}-{t[1]}", v[0] - v[1])),
    "Mul": _Op("Mul", 2, lambda t, v, c, k: (f"{t[0]}*{t[1]}", v[0] * v[1])),
    "If": _Op("If", 4, _build_if),
    "For": _Op("For", 2, _build_for),
    # Memory ops: the value is a string (the target text itself).
    "Copy": _Op("Copy", 1, lambda t, v, c, k: (t[0], t[0])),
    "Reverse": _Op("Reverse", 1, lambda t, v, c, k: (t[0], t[0][::-1])),
    "DoubleCopy": _Op("DoubleCopy", 1, lambda t, v, c, k: (t[0], t[0] * 2)),
}

TASK_OPS: dict[str, tuple[str, ...]] = {
    "ALGEBRA": ("Add", "Sub", "Mul"),
    "CONTROL": ("If", "For"),
    "ALL": ("Add", "Sub", "Mul", "If", "For"),
    "ALG_CTRL": ("Add", "Sub", "If"),
    "ADDITION": ("Add",),
    "COPY": ("Copy",),
    "DOUBLE": ("DoubleCopy",),
    "REVERSE": ("Reverse",),
}


# -- Vocabulary and tokens -----------------------------------------------------

SOS = "~"
EOS = "!"
PAD = "."
_RESERVED = ("_unk_", "_null_", "_eos_", "|")
_LITERALS = ("+", "-", "*", "=", ":", "/", "(", ")", " ", "x", "|", "<", ">",
             "[", "]", SOS, EOS, PAD)
_KEYWORDS = ("if", "for", "else", "range")


def _build_vocabulary() -> tuple[str, ...]:
  """The 45 symbols of Sonnet's character vocabulary, in id order."""
  words = [str(d) for d in range(10)] + list(_LITERALS) + list(_KEYWORDS)
  symbols = set(words) | {ch for word in words for ch in word}
  vocab = _RESERVED + tuple(s for s in sorted(symbols) if s not in _RESERVED)
  assert len(vocab) == 45, len(vocab)
  return vocab


VOCABULARY: tuple[str, ...] = _build_vocabulary()
VOCAB_SIZE = len(VOCABULARY)
_SYMBOL_TO_ID = {symbol: i for i, symbol in enumerate(VOCABULARY)}
PAD_ID = _SYMBOL_TO_ID[PAD]
SOS_ID = _SYMBOL_TO_ID[SOS]
EOS_ID = _SYMBOL_TO_ID[EOS]

# Byte -> token id for every single-character symbol; -1 for other bytes.
_BYTE_TO_ID = np.full(256, -1, np.int32)
for _symbol, _id in _SYMBOL_TO_ID.items():
  if len(_symbol) == 1:
    _BYTE_TO_ID[ord(_symbol)] = _id
del _symbol, _id
# Token id -> character (multi-character symbols decode to themselves).
_ID_TO_SYMBOL = np.array(VOCABULARY, dtype=object)


def _text_to_ids(text: str) -> np.ndarray:
  """Character ids of `text` (uint8 bytes mapped through the table)."""
  try:
    raw = np.frombuffer(text.encode("ascii"), np.uint8)
  except UnicodeEncodeError:
    raise ValueError(f"text has a character outside the vocabulary: "
                     f"{text!r}") from None
  ids = _BYTE_TO_ID[raw]
  if ids.size and ids.min() < 0:
    bad = sorted({chr(b) for b in raw[ids < 0]})
    raise ValueError(f"characters {bad} are not in the vocabulary")
  return ids


def encode(text: str) -> np.ndarray:
  """Character tokens of `text`: int32 [len(text)], no SOS/EOS, no padding.

  Raises:
    ValueError: if a character is not a single-character vocabulary symbol.
  """
  return _text_to_ids(text)


def decode(ids: Sequence[int] | np.ndarray) -> str:
  """Concatenates the symbols of `ids` (decode(encode(s)) == s)."""
  ids = np.asarray(ids, dtype=np.int64).reshape(-1)
  if ids.size and (ids.min() < 0 or ids.max() >= VOCAB_SIZE):
    raise ValueError(f"token ids must be in [0, {VOCAB_SIZE}), got {ids}")
  return "".join(_ID_TO_SYMBOL[ids])


# -- Validation ----------------------------------------------------------------

_TRAIN_STREAM = 0
_EVAL_STREAM = 1


def _check_task(task: Any) -> str:
  """Canonical upper-case task name; ValueError for an unknown task."""
  name = task.value if isinstance(task, TaskType) else task
  if not isinstance(name, str) or name.upper() not in TASK_OPS:
    raise ValueError(f"unknown task {task!r}; expected one of "
                     f"{sorted(TASK_OPS)} (case-insensitive)")
  return name.upper()


def _check_sizes(task: Any, max_length: Any,
                 max_nesting: Any) -> tuple[str, int, int]:
  """Validates (task, max_length, max_nesting) together."""
  task = _check_task(task)
  max_length = check_int("max_length", max_length, 1, MAX_LITERAL_LENGTH)
  max_nesting = check_int("max_nesting", max_nesting, 1)
  if task in MEMORY_TASKS and max_nesting != 1:
    raise ValueError(
        f"memory task {task} needs max_nesting == 1, got {max_nesting}: with "
        "nesting the code gains parentheses and no longer fits num_steps "
        "(Sonnet raises 'Token sequence is too large')")
  return task, max_length, max_nesting


def sequence_lengths(task: Any, max_length: int,
                     max_nesting: int) -> tuple[int, int]:
  """(T_in, T_out): padded input and output lengths for the maxima.

  Every sample generated with length <= max_length and nesting <= max_nesting
  fits: for program tasks the first op's code has at most 4L+6 characters
  (If) and each further op adds at most 3L+8 (If with a popped operand),
  below the spec's (4L+10) and (3L+10)+2 allowances.
  """
  task, L, N = _check_sizes(task, max_length, max_nesting)
  if task in PROGRAM_TASKS:
    return (3 * L + 10) * (N - 1) + (4 * L + 10) + 2 * (N - 1), 2 * L
  if task == "DOUBLE":
    return L + 1, 2 * L + 1
  return L + 1, L + 1


# -- Program generator ---------------------------------------------------------


def generate_texts(rng: np.random.Generator, task: Any,
                   lengths_B: Sequence[int] | np.ndarray,
                   nestings_B: Sequence[int] | np.ndarray,
                   ) -> list[tuple[str, str]]:
  """Generates B (program_text, target_text) pairs, sample b at
  (lengths_B[b], nestings_B[b]).

  All randomness is drawn up front as arrays from `rng` (the op of every
  nesting level, four L-digit operands per level, a comparator and a loop
  count), then the texts are assembled in Python; the result is a pure
  function of the generator's state and the arguments. Draws a level does not
  use are discarded, so the distribution is Sonnet's, not its exact numbers.

  Raises:
    ValueError: unknown task, a length outside [1, MAX_LITERAL_LENGTH], a
      nesting < 1, or a memory task with nesting != 1.
  """
  task = _check_task(task)
  lengths_B = np.asarray(lengths_B, dtype=np.int64).reshape(-1)
  nestings_B = np.asarray(nestings_B, dtype=np.int64).reshape(-1)
  if lengths_B.shape != nestings_B.shape:
    raise ValueError(f"lengths_B and nestings_B differ in shape: "
                     f"{lengths_B.shape} vs {nestings_B.shape}")
  batch_size = lengths_B.size
  if batch_size == 0:
    return []
  if lengths_B.min() < 1 or lengths_B.max() > MAX_LITERAL_LENGTH:
    raise ValueError(f"lengths must be in [1, {MAX_LITERAL_LENGTH}]")
  if nestings_B.min() < 1:
    raise ValueError("nestings must be >= 1")
  if task in MEMORY_TASKS and nestings_B.max() != 1:
    raise ValueError(f"memory task {task} needs nesting 1")

  ops = [_OPS[name] for name in TASK_OPS[task]]
  num_levels = int(nestings_B.max())
  shape_BN = (batch_size, num_levels)
  low_B111 = (10 ** (lengths_B - 1))[:, None, None]
  op_BN = rng.integers(0, len(ops), shape_BN).tolist()
  operands_BNK = rng.integers(low_B111, 10 * low_B111,
                              (*shape_BN, _MAX_OPERANDS)).tolist()
  comparator_BN = rng.integers(0, 2, shape_BN).tolist()
  loop_count_BN = rng.integers(1, 10, shape_BN).tolist()

  is_program = task in PROGRAM_TASKS
  pairs = []
  for b, (length, nesting) in enumerate(zip(lengths_B.tolist(),
                                            nestings_B.tolist())):
    code = value = None
    for n in range(nesting):
      op = ops[op_BN[b][n]]
      fresh = operands_BNK[b][n][:op.arity]
      if code is None:  # Empty stack: every operand is fresh.
        values = fresh
        texts = [str(v) for v in fresh]
      else:  # The first operand pops the previous sub-expression.
        values = [value] + fresh[1:]
        texts = [code] + [str(v) for v in fresh[1:]]
      body, value = op.build(texts, values, comparator_BN[b][n],
                             loop_count_BN[b][n])
      code = "(" + body + ")"
    program = code[1:-1]
    target = str(value % 10 ** (length + 1)) if is_program else value
    pairs.append((program, target))
  return pairs


def generate_code(rng: np.random.Generator, task: Any, length: int,
                  nesting: int) -> tuple[str, str]:
  """One (program_text, target_text) pair at literal length `length` and
  nesting `nesting` (see `generate_texts`)."""
  length = check_int("length", length, 1, MAX_LITERAL_LENGTH)
  nesting = check_int("nesting", nesting, 1)
  return generate_texts(rng, task, [length], [nesting])[0]


# -- Batches -------------------------------------------------------------------


def length_mask(lengths_B: Any, num_steps: int, dtype: Any = np.float32) -> Any:
  """[B, T] mask, 1 where t < lengths_B[b], else 0, in `dtype`.

  Works on NumPy and JAX arrays alike (also under `jax.jit`).
  """
  steps_1T = np.arange(num_steps)[None, :]
  return (lengths_B[:, None] > steps_1T).astype(dtype)


class LTEBatch(NamedTuple):
  """One batch-major batch of token ids (all arrays int32).

  Attributes:
    tokens_in: [B, T_in] program characters, then PAD_ID from
      lengths_in[b] on.
    tokens_out: [B, T_out] target characters, then PAD_ID from lengths_out[b]
      on.
    decoder_inputs: [B, T_out] teacher-forcing inputs: SOS_ID at t = 0 and
      tokens_out[t - 1] at t >= 1 (padded targets shifted right; the last
      target token is dropped only when lengths_out[b] == T_out).
    lengths_in: [B] program lengths, in [1, T_in].
    lengths_out: [B] target lengths, in [1, T_out].
  """

  tokens_in: np.ndarray
  tokens_out: np.ndarray
  decoder_inputs: np.ndarray
  lengths_in: np.ndarray
  lengths_out: np.ndarray

  @property
  def batch_size(self) -> int:
    return self.tokens_in.shape[0]

  @property
  def mask_in(self) -> np.ndarray:
    """float32 [B, T_in]: 1 on program tokens, 0 on padding."""
    return length_mask(self.lengths_in, self.tokens_in.shape[1])

  @property
  def mask_out(self) -> np.ndarray:
    """float32 [B, T_out]: 1 on target tokens, 0 on padding."""
    return length_mask(self.lengths_out, self.tokens_out.shape[1])

  def slice(self, start: int, stop: int) -> LTEBatch:
    """Samples [start, stop) of the batch (e.g. to evaluate in chunks)."""
    return LTEBatch(self.tokens_in[start:stop],
                    self.tokens_out[start:stop],
                    self.decoder_inputs[start:stop],
                    self.lengths_in[start:stop], self.lengths_out[start:stop])


def _pad_and_encode(texts: Sequence[str],
                    num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens_BT int32 [B, T] padded with PAD_ID, lengths_B int32 [B])."""
  lengths_B = np.fromiter(map(len, texts), np.int32, len(texts))
  if lengths_B.size and lengths_B.max() > num_steps:
    b = int(lengths_B.argmax())
    raise ValueError(f"Token sequence is too large: {texts[b]!r} has "
                     f"{lengths_B[b]} tokens, num_steps is {num_steps}")
  ids = _text_to_ids("".join(t.ljust(num_steps, PAD) for t in texts))
  return ids.reshape(len(texts), num_steps), lengths_B


def encode_batch(pairs: Sequence[tuple[str, str]], num_steps: int,
                 num_steps_out: int) -> LTEBatch:
  """Tokenises (program_text, target_text) pairs into an `LTEBatch`.

  Raises:
    ValueError: "Token sequence is too large" if a program has more than
      num_steps characters or a target more than num_steps_out; or a character
      outside the vocabulary.
  """
  num_steps = check_int("num_steps", num_steps, 1)
  num_steps_out = check_int("num_steps_out", num_steps_out, 1)
  tokens_in, lengths_in = _pad_and_encode([p for p, _ in pairs], num_steps)
  tokens_out, lengths_out = _pad_and_encode([t for _, t in pairs],
                                            num_steps_out)
  decoder_inputs = np.empty_like(tokens_out)
  decoder_inputs[:, 0] = SOS_ID
  decoder_inputs[:, 1:] = tokens_out[:, :-1]
  return LTEBatch(tokens_in, tokens_out, decoder_inputs, lengths_in,
                  lengths_out)


def sample_text(batch: LTEBatch, i: int) -> tuple[str, str]:
  """(program_text, target_text) of sample i, decoded without padding."""
  return (decode(batch.tokens_in[i, :batch.lengths_in[i]]),
          decode(batch.tokens_out[i, :batch.lengths_out[i]]))


# -- Curricula -----------------------------------------------------------------


class Curriculum:
  """Base class: chooses each sample's (length, nesting) and moves its level.

  The level is a (length, nesting) pair within [1, max_length] x
  [1, max_nesting]; what it means for sampling depends on the subclass.
  """

  name = "base"
  _updates = False  # Whether `update` can raise the level.

  def __init__(self, max_length: int, max_nesting: int,
               loss_threshold: float = 0.1, min_tries: int = 10):
    """Raises ValueError for sizes < 1, min_tries < 0 or a bad threshold."""
    self.max_length = check_int("max_length", max_length, 1,
                                 MAX_LITERAL_LENGTH)
    self.max_nesting = check_int("max_nesting", max_nesting, 1)
    self.min_tries = check_int("min_tries", min_tries, 0)
    self.loss_threshold = float(loss_threshold)
    if not math.isfinite(self.loss_threshold):
      raise ValueError(f"loss_threshold must be finite, got {loss_threshold}")
    self.window_size = max(min(self.min_tries, 10), 5)
    self._window: collections.deque[float] = collections.deque(
        maxlen=self.window_size)
    self._num_tries = 0
    self._length, self._nesting = self._initial_level()

  def _initial_level(self) -> tuple[int, int]:
    return self.max_length, self.max_nesting

  @property
  def level(self) -> tuple[int, int]:
    """The current (length, nesting) level."""
    return self._length, self._nesting

  def sample_levels(self, rng: np.random.Generator,
                    batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(lengths_B, nestings_B) int64 [B] for the samples of one batch."""
    raise NotImplementedError

  def relative_change(self) -> float:
    """|mean of successive differences| / |mean| of the loss window.

    Sonnet compares avg(successive differences) / avg(loss) itself with the
    threshold; a falling loss makes that negative, hence always "below" the
    threshold, and the level would rise while the model is still learning
    fast. We take the absolute value, so the level only rises on a plateau
    (mean relative change per step under the threshold). An all-zero window
    counts as a plateau; fewer than two losses as no evidence (inf).
    """
    if len(self._window) < 2:
      return math.inf
    window = list(self._window)
    mean_diff = (window[-1] - window[0]) / (len(window) - 1)
    mean_loss = abs(sum(window) / len(window))
    if mean_loss == 0.0:
      return 0.0 if mean_diff == 0.0 else math.inf
    return abs(mean_diff) / mean_loss

  def update(self, loss: float) -> bool:
    """Records a training loss; returns True if the level went up.

    The losses since the last level change are kept in a window of the last
    max(min(min_tries, 10), 5). Once min_tries of them have been seen (and at
    least two), the level goes up if `relative_change()` < loss_threshold,
    and the window and count are reset. Levels never exceed the maxima; at
    the top level nothing changes. Baseline and Mix ignore the loss.

    Raises:
      ValueError: for a non-finite loss.
    """
    if not self._updates:
      return False
    loss = float(loss)
    if not math.isfinite(loss):
      raise ValueError(f"curriculum update with a non-finite loss: {loss}")
    self._window.append(loss)
    self._num_tries += 1
    if self._num_tries < self.min_tries:
      return False
    if not self.relative_change() < self.loss_threshold:
      return False
    if self._length < self.max_length:
      self._length += 1
    elif self._nesting < self.max_nesting:
      self._nesting += 1
    else:
      return False
    self._window.clear()
    self._num_tries = 0
    return True

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable state: name, maxima, level, loss window, count."""
    return {
        "name": self.name,
        "max_length": self.max_length,
        "max_nesting": self.max_nesting,
        "length": self._length,
        "nesting": self._nesting,
        "window": list(self._window),
        "num_tries": self._num_tries,
    }

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Restores `get_state()` output of a curriculum of the same kind and
    maxima; raises ValueError otherwise."""
    keys = {"name", "max_length", "max_nesting", "length", "nesting",
            "window", "num_tries"}
    if not isinstance(state, Mapping) or not keys <= state.keys():
      raise ValueError(f"curriculum state must be a mapping with keys "
                       f"{sorted(keys)}, got {state!r}")
    if (state["name"], state["max_length"], state["max_nesting"]) != (
        self.name, self.max_length, self.max_nesting):
      raise ValueError(
          f"curriculum state for {state['name']!r} at maxima "
          f"({state['max_length']}, {state['max_nesting']}) does not match "
          f"{self.name!r} at ({self.max_length}, {self.max_nesting})")
    length = check_int("length", state["length"], 1, self.max_length)
    nesting = check_int("nesting", state["nesting"], 1, self.max_nesting)
    num_tries = check_int("num_tries", state["num_tries"], 0)
    window = [float(x) for x in state["window"]]
    if len(window) > self.window_size:
      raise ValueError(f"loss window longer than {self.window_size}")
    self._length, self._nesting, self._num_tries = length, nesting, num_tries
    self._window.clear()
    self._window.extend(window)


class BaselineCurriculum(Curriculum):
  """Every sample at (max_length, max_nesting); ignores losses (TEST mode)."""

  name = "baseline"

  def sample_levels(self, rng, batch_size):
    del rng
    return (np.full(batch_size, self.max_length, np.int64),
            np.full(batch_size, self.max_nesting, np.int64))


class MixCurriculum(Curriculum):
  """Per sample: length ~ U[1, max_length], nesting ~ U[1, max_nesting].

  Ignores losses. This is the paper's curriculum. `level` reports the maxima.
  """

  name = "mix"

  def sample_levels(self, rng, batch_size):
    return (rng.integers(1, self.max_length + 1, batch_size),
            rng.integers(1, self.max_nesting + 1, batch_size))


class NaiveCurriculum(Curriculum):
  """Starts at (1, 1); every sample at the current level; see `update`."""

  name = "naive"
  _updates = True

  def _initial_level(self):
    return 1, 1

  def sample_levels(self, rng, batch_size):
    del rng
    return (np.full(batch_size, self._length, np.int64),
            np.full(batch_size, self._nesting, np.int64))


class CombineCurriculum(Curriculum):
  """Levels move like Naive; per sample, length ~ U[1, current length] and
  nesting ~ U[1, current nesting] (Sonnet's TRAIN_COMBINE default)."""

  name = "combine"
  _updates = True

  def _initial_level(self):
    return 1, 1

  def sample_levels(self, rng, batch_size):
    return (rng.integers(1, self._length + 1, batch_size),
            rng.integers(1, self._nesting + 1, batch_size))


_CURRICULA = {cls.name: cls for cls in (BaselineCurriculum, NaiveCurriculum,
                                        MixCurriculum, CombineCurriculum)}


def make_curriculum(name: str, max_length: int, max_nesting: int,
                    loss_threshold: float = 0.1,
                    min_tries: int = 10) -> Curriculum:
  """Builds a curriculum by (case-insensitive) name: 'baseline', 'naive',
  'mix' or 'combine'. Raises ValueError for an unknown name."""
  if not isinstance(name, str) or name.lower() not in _CURRICULA:
    raise ValueError(f"unknown curriculum {name!r}; expected one of "
                     f"{sorted(_CURRICULA)}")
  return _CURRICULA[name.lower()](max_length, max_nesting, loss_threshold,
                                  min_tries)


# -- Batch generation and the iterator -----------------------------------------


def generate_batch(rng: np.random.Generator, batch_size: int, task: Any,
                   max_length: int, max_nesting: int,
                   curriculum: Curriculum | None = None,
                   return_text: bool = False):
  """Draws one batch; shapes are fixed by the maxima (`sequence_lengths`).

  Args:
    rng: the batch is a pure function of its state (and the curriculum's
      level).
    batch_size: B >= 1.
    task: a task name or `TaskType`.
    max_length, max_nesting: the maxima L, N.
    curriculum: chooses each sample's (length, nesting); None means every
      sample at the maxima. Its maxima must equal (max_length, max_nesting).
    return_text: also return the raw (program_text, target_text) pairs.

  Returns:
    An `LTEBatch`, or (LTEBatch, list of B text pairs) with return_text.
  """
  batch_size = check_int("batch_size", batch_size, 1)
  task, max_length, max_nesting = _check_sizes(task, max_length, max_nesting)
  if curriculum is None:
    curriculum = BaselineCurriculum(max_length, max_nesting)
  elif (curriculum.max_length, curriculum.max_nesting) != (max_length,
                                                            max_nesting):
    raise ValueError("the curriculum's maxima differ from the batch's")
  lengths_B, nestings_B = curriculum.sample_levels(rng, batch_size)
  pairs = generate_texts(rng, task, lengths_B, nestings_B)
  batch = encode_batch(pairs, *sequence_lengths(task, max_length, max_nesting))
  return (batch, pairs) if return_text else batch


def eval_batch(task: Any, max_length: int, max_nesting: int,
               num_samples: int = 12800, seed: int = 0,
               return_text: bool = False):
  """The fixed evaluation set: `num_samples` samples at the maxima.

  The paper evaluates one batch of 12,800 at maximum length and nesting. It is
  drawn from a stream (tag 1) that no training batch uses (tag 0), so it is
  the same for a given (task, maxima, num_samples, seed) whatever the
  training run did. Use `LTEBatch.slice` to run it in chunks.
  """
  seed = check_seed(seed)
  return generate_batch(batch_rng(_EVAL_STREAM, seed, 0), num_samples, task,
                        max_length, max_nesting, None, return_text)


class LearnToExecuteIterator(SeededBatches):
  """Infinite, seeded iterator of training batches with a saveable position.

  Batch k is a pure function of (seed, k, the curriculum's level): it is drawn
  by `generate_batch` from its own generator, derived from (seed, k). Saving
  `get_state()` (seed, index and the curriculum's level and loss window) and
  calling `set_state()` on an iterator with the same configuration therefore
  reproduces the same future batches, also when the curriculum moves.
  """

  def __init__(self, batch_size: int, task: Any, max_length: int,
               max_nesting: int, curriculum: str = "mix", seed: int = 0,
               loss_threshold: float = 0.1, min_tries: int = 10):
    """See the class docstring. Raises ValueError for a bad task, size,
    curriculum or seed, or a memory task with max_nesting != 1."""
    self.batch_size = check_int("batch_size", batch_size, 1)
    self.task, self.max_length, self.max_nesting = _check_sizes(
        task, max_length, max_nesting)
    self.curriculum = make_curriculum(curriculum, self.max_length,
                                      self.max_nesting, loss_threshold,
                                      min_tries)
    self.num_steps, self.num_steps_out = sequence_lengths(
        self.task, self.max_length, self.max_nesting)
    super().__init__(seed)

  @property
  def vocab_size(self) -> int:
    return VOCAB_SIZE

  def batch_at(self, index: int, return_text: bool = False):
    """Batch `index` at the current curriculum level, without moving."""
    index = check_int("index", index, 0)
    return generate_batch(batch_rng(_TRAIN_STREAM, self._seed, index),
                          self.batch_size, self.task, self.max_length,
                          self.max_nesting, self.curriculum, return_text)

  def update_curriculum(self, loss: float) -> bool:
    """Feeds a training loss to the curriculum; True if its level went up."""
    return self.curriculum.update(loss)

  def eval_batch(self, num_samples: int = 12800, return_text: bool = False):
    """`eval_batch` for this task and maxima under this iterator's seed."""
    return eval_batch(self.task, self.max_length, self.max_nesting,
                      num_samples, self._seed, return_text)

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable: {'seed', 'index', 'curriculum': {...}}."""
    return {"seed": self._seed, "index": self._index,
            "curriculum": self.curriculum.get_state()}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Restores a `get_state()` position; ValueError if it does not fit."""
    if not isinstance(state, Mapping) or not {"seed", "index",
                                              "curriculum"} <= state.keys():
      raise ValueError(f"state must be a mapping with keys 'seed', 'index' "
                       f"and 'curriculum', got {state!r}")
    seed = check_seed(state["seed"])
    index = check_int("index", state["index"], 0)
    self.curriculum.set_state(state["curriculum"])
    self._seed, self._index = seed, index
