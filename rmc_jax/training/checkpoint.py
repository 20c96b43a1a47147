"""Atomic, multi-host-safe checkpoints of a TrainState plus iterator state.

A checkpoint for step N lives in ``<directory>/N`` (``directory`` is normally
``WORKDIR/checkpoints``) and holds two Orbax items:

* ``state``: a pytree of jax/numpy arrays (params, optimizer state, step, rng
  key, optionally a recurrent carry), written by Orbax's standard
  (tensorstore/OCDBT) array handler;
* ``data_iterator``: a JSON dict such as ``{'seed': 0, 'index': 1234}``.

Guarantees (checked against orbax-checkpoint 0.12.8):

* Atomicity. Orbax writes everything into ``<directory>/N.orbax-checkpoint-tmp``
  (each item in its own ``<item>.orbax-checkpoint-tmp``, renamed into place),
  writes ``commit_success.txt`` into it last, then renames it to
  ``<directory>/N`` with one ``rename(2)``. (On GCS, where renames are not
  atomic, Orbax writes in place and the marker alone marks completion.) A
  crash before the rename leaves only the ``.orbax-checkpoint-tmp`` directory,
  which is never listed and is deleted the next time a `Checkpointer` is
  opened on the directory. On top of that this module counts a step as
  complete only if its directory holds ``commit_success.txt`` (Orbax skips
  that check on POSIX), so an interrupted deletion or a partial copy of a
  step directory is ignored too. Orbax does not fsync: this is atomicity
  against process death (SIGKILL, OOM, preemption), not durability against a
  power loss of the storage host.
* Synchronous saves. Async checkpointing is off: when `Checkpointer.save`
  returns, the checkpoint is committed and checkpoints beyond `max_to_keep`
  are deleted, so the caller may exit right away (e.g. after SIGTERM). Call
  `save` from the training loop, not from inside a signal handler.
* Multi-host. Every process must create the `Checkpointer` and call `save`,
  `restore`, `restore_latest_good` and `close` with the same arguments in
  the same order: Orbax puts barriers inside them, each process writes its
  own array shards, and only the primary process (process 0) creates
  directories, writes metadata, commits, deletes and moves damaged
  checkpoints aside. All processes must see the same filesystem, and a
  damaged file must fail on every process (a read that fails on only some
  processes leaves the others waiting in Orbax's barrier). Not thread-safe,
  and not safe for two jobs writing one directory.
* PRNG keys. Raw ``uint32`` keys (``jax.random.PRNGKey``) are plain arrays.
  New-style typed keys (``jax.random.key``) are supported as well: Orbax
  stores their key data and implementation name and restores typed keys of
  the same implementation when the target leaf is a typed key (concrete or
  abstract from ``jax.eval_shape``).

What is checked on restore (`Checkpointer.restore`, `restore_latest_good`):

* The model. Before any array is read, the tree recorded in the checkpoint's
  metadata (leaf paths, shapes, dtypes) is compared with the target. A
  difference means another model (e.g. another layer size), not damage:
  `CheckpointMismatchError` names the first differing leaf, and nothing on
  disk changes.
* Damage. The iterator state and every array are then read back; an
  unreadable metadata file, a truncated, missing or corrupted array file or
  a broken iterator state makes the checkpoint damaged. `restore_latest_good`
  then moves each damaged checkpoint newer than the newest good one to
  ``<directory>/damaged/<step>.<problem>`` (never deleted; not a step name,
  so neither listed nor touched by `max_to_keep`) with one warning line, and
  resumes from the good one. When none can be read it raises
  `CheckpointDamagedError` and moves nothing.

Other failures are one exception with a one-line message as well:
`CheckpointDirError` for a directory that cannot be used (a file in the way,
not writable), raised before Orbax touches it, and `CheckpointSaveError` for
a save that fails partway (e.g. a full disk), whose partial step stays an
unlisted ``.orbax-checkpoint-tmp`` directory. A failed Orbax read or write
can leave tensorstore operations in flight that complete after Orbax closed
their event loop; tensorstore reports each as an unraisable
``RuntimeError: Event loop is closed``. Opening a `Checkpointer` installs,
once per process, a `sys.unraisablehook` that drops exactly those reports
(raised by asyncio's ``call_soon_threadsafe``) and passes every other one to
the previous hook. Orbax's worker threads also log, with a traceback, each
exception that Orbax then raises in the calling thread; while a `Checkpointer`
call runs, those log records are dropped. So the one exception is all the
user sees.

``Checkpointer(directory, read_only=True)`` (for sampling and analysis)
writes nothing: it neither creates nor cleans directories, refuses `save`,
and `restore_latest_good` skips damaged checkpoints without moving them.
"""

from __future__ import annotations

import contextlib
import json
import operator
import os
import sys
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

PyTree = Any

# Item names inside a step directory; renaming them breaks old checkpoints.
STATE_ITEM = "state"
ITERATOR_ITEM = "data_iterator"

# Orbax's completion marker (`atomicity_types.COMMIT_SUCCESS_FILE` in 0.12.8).
# Copied because it lives in a private module; a test keeps the two equal.
COMMIT_MARKER = "commit_success.txt"

# Subdirectory of the checkpoint directory that damaged steps are moved to.
DAMAGED_DIR = "damaged"


class CheckpointNotFoundError(FileNotFoundError):
  """Raised when restoring a step that has no complete checkpoint."""


class CheckpointDirError(OSError):
  """The checkpoint directory cannot be used; one line naming the path.

  Raised by `Checkpointer(...)` (and `ensure_writable_dir`) before Orbax
  touches the directory: a file is in the way of it or of a parent, it
  cannot be created, or it is not writable (readable, when read-only).
  """


class CheckpointMismatchError(ValueError):
  """A checkpoint holds another model than the target; nothing was changed.

  The message is one line naming the step, the directory and the first
  differing leaf with its saved and new shape/dtype. Attributes: `step`,
  `directory`, `path` (the leaf's dotted path, None for a difference in
  containers only), `saved` and `new` (e.g. ``'(64, 128) float32'`` or
  ``'missing'``).
  """

  def __init__(self, message: str, *, step: int, directory: epath.Path,
               path: str | None, saved: str | None, new: str | None) -> None:
    super().__init__(message)
    self.step, self.directory = step, directory
    self.path, self.saved, self.new = path, saved, new


class DamagedCheckpoint(NamedTuple):
  """A checkpoint that could not be read back.

  Attributes:
    step: its step.
    problem: ``'state'`` (its tree metadata, an array's header or an
      array's data cannot be read: a truncated, missing or corrupted file)
      or ``'iterator'`` (the iterator state is unreadable or not a dict).
    reason: the error, shortened to one line.
    moved_to: where it was moved, or None when it was left in place.
  """

  step: int
  problem: str
  reason: str
  moved_to: epath.Path | None = None


class CheckpointDamagedError(RuntimeError):
  """No checkpoint asked for can be read; nothing was moved or deleted.

  The message is one line naming the directory, the steps tried and what is
  wrong with the newest. Attributes: `directory`, `damaged` (a tuple of
  `DamagedCheckpoint`, newest first).
  """

  def __init__(self, message: str, *, directory: epath.Path,
               damaged: tuple[DamagedCheckpoint, ...]) -> None:
    super().__init__(message)
    self.directory, self.damaged = directory, damaged


class CheckpointSaveError(OSError):
  """A save failed partway (e.g. the disk filled up); one line, `step` set.

  Earlier checkpoints are intact and the partial step is never listed.
  """

  def __init__(self, message: str, *, step: int) -> None:
    super().__init__(message)
    self.step = step


class Restored(NamedTuple):
  """What `Checkpointer.restore_latest_good` returns."""

  state: PyTree
  iterator_state: dict[str, Any]
  step: int
  skipped: tuple[DamagedCheckpoint, ...]  # Newer, damaged; newest first.


class _Damage(Exception):
  """Internal: reading `step` failed for a reason that is not the target."""

  def __init__(self, step: int, problem: str, reason: str) -> None:
    super().__init__(f"{problem}: {reason}")
    self.step, self.problem, self.reason = step, problem, reason


def _as_step(step: Any) -> int:
  """Returns `step` as a non-negative Python int (numpy/jax ints accepted)."""
  try:
    value = operator.index(step)
  except TypeError:
    raise TypeError(f"step must be an integer, got {step!r}") from None
  if value < 0:
    raise ValueError(f"step must be >= 0, got {value}")
  return value


def _check_iterator_state(iterator_state: Any) -> dict[str, Any]:
  """Returns a copy of `iterator_state`, checked to round-trip through JSON."""
  if not isinstance(iterator_state, Mapping):
    raise TypeError("iterator_state must be a dict, got "
                    f"{type(iterator_state).__name__}")
  state = dict(iterator_state)
  try:
    encoded = json.dumps(state, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise TypeError(f"iterator_state is not JSON-serialisable: {e}") from e
  # Checked before anything is written, and so that restore returns exactly
  # what was saved (JSON silently turns tuples into lists, int keys into str).
  if json.loads(encoded) != state:
    raise ValueError("iterator_state does not round-trip through JSON exactly "
                     f"(use lists, not tuples, and str keys): {state!r}")
  return state


def _normalize_target(target: PyTree) -> PyTree:
  """Turns numpy scalars into 0-d arrays, which Orbax accepts as targets."""
  return jax.tree.map(
      lambda x: np.asarray(x) if isinstance(x, np.generic) else x, target)


def _one_line(error: BaseException, limit: int = 300) -> str:
  """`error` as one line of at most about `limit` characters.

  Tensorstore's messages end with the JSON of the spec, which is cut off;
  they nest causes left to right, so a long message keeps its end, where
  the file and the root cause are named.
  """
  text = " ".join(str(error).split()).split(" [tensorstore_spec", 1)[0]
  if len(text) > limit:
    text = "..." + text[-limit:].split(" ", 1)[-1]
  name = type(error).__name__
  return f"{name}: {text}" if text else name


# -- Leaf signatures: (shape, dtype or None) by path --------------------------

_Signature = tuple[tuple[int, ...], "np.dtype | None"]


def _target_signature(leaf: Any) -> _Signature:
  """What Orbax will record for `leaf`: typed PRNG keys as their key data.

  Python scalars have no dtype here: they come back as the target's type.
  """
  if isinstance(leaf, (bool, int, float, complex)):
    return (), None
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.eval_shape(jax.random.key_data, leaf)
  return tuple(leaf.shape), np.dtype(leaf.dtype)


def _saved_signature(metadata: Any) -> _Signature:
  if isinstance(metadata, ocp.metadata.ScalarMetadata):
    return (), None
  return tuple(metadata.shape), np.dtype(metadata.dtype)


def _saved_target(tree: PyTree) -> PyTree:
  """The abstract target of a saved tree: its leaves on the first device."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def leaf(metadata):
    if isinstance(metadata, ocp.metadata.ScalarMetadata):
      return metadata.dtype.type(0) if metadata.dtype is not None else 0
    return jax.ShapeDtypeStruct(tuple(metadata.shape), metadata.dtype,
                                sharding=device)

  return jax.tree.map(leaf, tree)


def _describe(signature: _Signature | None) -> str:
  if signature is None:
    return "missing"
  shape, dtype = signature
  return f"{shape} {dtype}" if dtype is not None else f"{shape} scalar"


def _compatible(saved: _Signature, new: _Signature) -> bool:
  return saved[0] == new[0] and (saved[1] is None or new[1] is None
                                 or saved[1] == new[1])


# -- Directories ---------------------------------------------------------------


def _is_remote(path: str) -> bool:
  return "://" in path


def _check_directory(path: str, *, read_only: bool) -> None:
  """Raises unless local `path` can serve as a (checkpoint) directory.

  Creates it (and parents) unless `read_only`.

  Raises:
    CheckpointDirError: a file is in the way, it cannot be created, or it is
      not writable (not readable, when `read_only`).
    CheckpointNotFoundError: `read_only` and it does not exist.
  """
  existing = path
  while not os.path.exists(existing) and os.path.dirname(existing) != existing:
    existing = os.path.dirname(existing)
  if os.path.exists(existing) and not os.path.isdir(existing):
    kind = "a file" if os.path.isfile(existing) else "not a directory"
    culprit = "it" if existing == path else existing
    raise CheckpointDirError(
        f"Cannot use {path} as a directory: {culprit} is {kind}.")
  if existing != path:
    if read_only:
      raise CheckpointNotFoundError(f"No checkpoint directory {path}.")
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as e:
      raise CheckpointDirError(
          f"Cannot create directory {path}: {e.strerror or e}.") from None
  mode = os.R_OK | os.X_OK if read_only else os.R_OK | os.W_OK | os.X_OK
  if not os.access(path, mode):
    raise CheckpointDirError(
        f"Directory {path} is not {'readable' if read_only else 'writable'}.")


def ensure_writable_dir(path: str | os.PathLike[str]) -> str:
  """Creates directory `path` (and parents) if needed; returns it absolute.

  For a run's workdir as well as for checkpoint directories. Remote paths
  (``gs://...``) are returned as given, unchecked.

  Raises:
    CheckpointDirError: a file is in the way of `path` or of a parent, it
      cannot be created, or it is not writable. The message is one line
      naming the path.
  """
  path = os.fspath(path)
  if _is_remote(path):
    return path
  path = os.path.abspath(path)
  _check_directory(path, read_only=False)
  return path


# -- Reports of operations abandoned by a failed Orbax call -------------------

_closed_loop_filter_installed = False


def _is_closed_loop_report(unraisable: Any) -> bool:
  """True for tensorstore's report of a result sent to a closed event loop."""
  error = unraisable.exc_value
  if not (isinstance(error, RuntimeError)
          and str(error) == "Event loop is closed"):
    return False
  tb = unraisable.exc_traceback
  while tb is not None:
    if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
      return True
    tb = tb.tb_next
  return False


def _install_closed_loop_filter() -> None:
  """Drops "Event loop is closed" reports (see the module docstring); once."""
  global _closed_loop_filter_installed
  if _closed_loop_filter_installed:
    return
  previous = sys.unraisablehook

  def hook(unraisable, previous=previous, check=_is_closed_loop_report):
    if not check(unraisable):
      previous(unraisable)

  sys.unraisablehook = hook
  _closed_loop_filter_installed = True


# Logged by Orbax's worker threads (with a traceback) for an exception that
# Orbax then raises in the calling thread: a duplicate of what the caller gets.
_REPORTED_THREAD_ERROR = "_SignalingThread.run() raised an exception"


def _not_reraised_thread_error(record: Any) -> bool:
  return _REPORTED_THREAD_ERROR not in str(record.msg)


@contextlib.contextmanager
def _orbax_call():
  """Silences Orbax's logged copies of the exception a call will raise."""
  logger = logging.get_absl_logger()
  logger.addFilter(_not_reraised_thread_error)
  try:
    yield
  finally:
    logger.removeFilter(_not_reraised_thread_error)


class Checkpointer:
  """Keeps the last `max_to_keep` complete (TrainState, iterator) checkpoints.

  Wraps `orbax.checkpoint.CheckpointManager`, configured for synchronous,
  atomic saves; see the module docstring for the guarantees. The step list
  reflects the directory when this object was opened plus the saves,
  deletions and moves made through it.
  """

  def __init__(self, directory: str | os.PathLike[str], *,
               max_to_keep: int | None = 3,
               save_interval_steps: int = 1,
               read_only: bool = False) -> None:
    """Opens the checkpoint directory, creating it (and parents) if needed.

    Args:
      directory: where step directories live, normally ``WORKDIR/checkpoints``.
      max_to_keep: how many of the newest checkpoints to keep; None keeps all.
      save_interval_steps: without ``force``, ``save(step, ...)`` only writes
        when ``step % save_interval_steps == 0``.
      read_only: open an existing directory for restoring only. Nothing is
        written into it (no directory created, nothing cleaned up, `save`
        refused, damaged checkpoints left in place); ``max_to_keep`` and
        ``save_interval_steps`` are ignored.

    Unless `read_only`, leftovers of interrupted saves
    (``*.orbax-checkpoint-tmp``) are deleted in the background; the next
    `save` waits for that.

    Raises:
      CheckpointDirError: `directory` cannot be used (a file in the way, not
        writable, or not readable when `read_only`); one line naming it.
      CheckpointNotFoundError: `read_only` and `directory` does not exist.
    """
    if not read_only:
      if max_to_keep is not None and (isinstance(max_to_keep, bool) or
                                      operator.index(max_to_keep) < 1):
        # Orbax's LatestN(0) would delete the checkpoint just written.
        raise ValueError(
            f"max_to_keep must be >= 1 or None, got {max_to_keep}")
      if operator.index(save_interval_steps) < 1:
        raise ValueError("save_interval_steps must be >= 1, got "
                         f"{save_interval_steps}")
    # Orbax requires absolute local paths; keep remote ones (gs://...) as given.
    path = os.fspath(directory)
    if not read_only:
      path = ensure_writable_dir(path)
    elif not _is_remote(path):
      path = os.path.abspath(path)
      _check_directory(path, read_only=True)
    self._directory = epath.Path(path)
    self._read_only = bool(read_only)
    self._save_interval_steps = int(save_interval_steps)
    options = ocp.CheckpointManagerOptions(
        # `max_to_keep=` is deprecated in 0.12 in favour of a policy object.
        preservation_policy=(None if read_only else
                             ocp.checkpoint_managers.LatestN(n=max_to_keep)),
        create=not read_only,
        # Synchronous, so that `save` returns only once the step is committed.
        enable_async_checkpointing=False,
        # Deletes `*.orbax-checkpoint-tmp` left by saves cut short by a crash.
        cleanup_tmp_directories=not read_only,
    )
    # Orbax's own `read_only` option is not used: it logs a warning per
    # option it overrides, and the options above already write nothing.
    _install_closed_loop_filter()
    self._manager = ocp.CheckpointManager(self._directory, options=options)
    # Reads a step's tree metadata (shapes, dtypes) without reading arrays.
    self._metadata_handler = ocp.StandardCheckpointHandler()
    # step -> whether its directory holds the commit marker; saves a stat per
    # step on every latest_step() call.
    self._committed: dict[int, bool] = {}
    self._barriers = 0
    self._closed = False

  @property
  def directory(self) -> epath.Path:
    """The directory holding the step directories."""
    return self._directory

  def _check_open(self) -> None:
    if self._closed:
      raise RuntimeError("Checkpointer is closed")

  def _is_committed(self, step: int) -> bool:
    if step not in self._committed:
      marker = self._directory / str(step) / COMMIT_MARKER
      self._committed[step] = marker.exists()
    return self._committed[step]

  def all_steps(self) -> list[int]:
    """Returns the steps that have a complete checkpoint, ascending.

    Completeness is the commit marker only; whether a step can be read back
    is checked by `restore` and `restore_latest_good`.
    """
    self._check_open()
    return sorted(s for s in self._manager.all_steps() if self._is_committed(s))

  def latest_step(self) -> int | None:
    """Returns the newest step with a complete checkpoint, or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: PyTree, iterator_state: Mapping[str, Any],
           *, force: bool = False) -> bool:
    """Writes a checkpoint for `step`; returns True iff one was written.

    When this returns True the checkpoint is complete on disk and checkpoints
    beyond `max_to_keep` are gone. Returns False without writing when `step`
    already has a complete checkpoint (e.g. a forced save on SIGTERM right
    after the periodic one: the existing checkpoint is kept, not overwritten)
    or, unless `force`, when `step` is not a multiple of `save_interval_steps`.
    Must be called by all processes.

    Raises:
      CheckpointSaveError: writing failed partway (e.g. the disk is full).
        Earlier checkpoints are intact; the partial step is never listed and
        is deleted when a `Checkpointer` is next opened here.
      ValueError: `step` is older than the latest checkpoint (continuing from
        an older checkpoint would interleave two histories: delete the newer
        ones or use a fresh directory), or `iterator_state` does not
        round-trip through JSON.
      TypeError: `iterator_state` is not a JSON-serialisable dict.
      RuntimeError: the Checkpointer is read-only or closed.
    """
    self._check_open()
    if self._read_only:
      raise RuntimeError(
          f"Checkpointer on {self._directory} is read-only: cannot save.")
    step = _as_step(step)
    iterator_state = _check_iterator_state(iterator_state)
    steps = self.all_steps()
    if step in steps:
      logging.info("Checkpoint for step %d already exists; not saving again.",
                   step)
      return False
    if steps and step < steps[-1]:
      raise ValueError(
          f"Cannot save step {step}: it is older than the latest checkpoint "
          f"(step {steps[-1]}) in {self._directory}.")
    if not force and step % self._save_interval_steps != 0:
      return False
    if step in self._manager.all_steps():
      # A final-named step directory without the commit marker (e.g. from a
      # deletion cut short). Orbax refuses to save over an existing step, so
      # remove it first; `delete` is collective, like `save`.
      logging.warning("Removing incomplete checkpoint directory for step %d "
                      "in %s.", step, self._directory)
      self._manager.delete(step)
    self._committed.pop(step, None)
    try:
      with _orbax_call():
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(**{
                STATE_ITEM: ocp.args.StandardSave(state),
                ITERATOR_ITEM: ocp.args.JsonSave(iterator_state),
            }),
            # The decision was made above. Orbax's own policy would also skip
            # any step <= its latest one, which may be an uncommitted
            # directory.
            force=True,
        )
        # A no-op for a synchronous manager; keeps the "complete on return"
        # guarantee from silently depending on the async setting.
        self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-exception-caught
      self._committed.pop(step, None)
      previous = f"step {steps[-1]}" if steps else "none"
      raise CheckpointSaveError(
          f"Saving the checkpoint of step {step} in {self._directory} failed "
          f"({_one_line(e)}); the partial step is ignored, latest complete "
          f"checkpoint: {previous}.", step=step) from e
    if saved:
      self._committed[step] = True
    return bool(saved)

  def restore(self, step: int | None = None, *,
              target: PyTree) -> tuple[PyTree, dict[str, Any], int]:
    """Returns `(state, iterator_state, step)` from `step` (default: latest).

    `target` must have the pytree structure of the saved state, and its
    leaves the saved shapes and dtypes; they may be concrete arrays or
    `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`). Restored leaves get
    the target's sharding when the leaf has one (a jax.Array, or a
    ShapeDtypeStruct with `.sharding`). A ShapeDtypeStruct without sharding
    is restored onto the sharding recorded in the checkpoint if it was saved
    from a jax.Array (the devices must exist now), else as a numpy array.
    Python scalar leaves come back as Python scalars. Nothing is written,
    whatever happens. Must be called by all processes.

    Raises:
      CheckpointNotFoundError: no complete checkpoint for `step` (or none at
        all when `step` is None).
      CheckpointMismatchError: the checkpoint holds another tree than
        `target` (checked on the metadata before any array is read).
      CheckpointDamagedError: the checkpoint cannot be read back.
    """
    self._check_open()
    if target is None:
      raise ValueError("restore needs a target pytree (abstract or concrete).")
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise CheckpointNotFoundError(
            f"No complete checkpoint found in {self._directory}.")
      step = steps[-1]
    else:
      step = _as_step(step)
      if step not in steps:
        raise CheckpointNotFoundError(
            f"No complete checkpoint for step {step} in {self._directory}; "
            f"complete steps: {steps}.")
    target = _normalize_target(target)
    try:
      state, iterator_state = self._read(step, target)
    except _Damage as d:
      damaged = DamagedCheckpoint(d.step, d.problem, d.reason)
      raise CheckpointDamagedError(
          f"Checkpoint of step {step} in {self._directory} is damaged "
          f"({d.problem}: {d.reason}).", directory=self._directory,
          damaged=(damaged,)) from None
    return state, iterator_state, step

  def restore_latest_good(self, target: PyTree | None) -> Restored:
    """Restores the newest checkpoint that reads back, setting damaged ones aside.

    `target=None` restores the tree as it was saved (for reading a run
    without building its model): dicts and tuples as recorded, every array
    on the first local device, and no model check.

    Tries the complete checkpoints newest first, each as `restore` does (the
    metadata against `target`, then the iterator state and every array).
    Damaged checkpoints newer than the first good one are moved to
    ``<directory>/damaged/<step>.<problem>`` (``.1``, ``.2``, ... appended if
    taken), never deleted, and no longer listed; each gets one warning
    line naming its step and what is wrong. A read-only Checkpointer leaves
    them in place (and warns). Must be called by all processes.

    Returns:
      `Restored(state, iterator_state, step, skipped)`, `skipped` holding the
      damaged checkpoints, newest first (empty when the latest was good).

    Raises:
      CheckpointNotFoundError: there is no complete checkpoint at all.
      CheckpointMismatchError: a checkpoint tried holds another tree than
        `target` (another model). Nothing on disk was changed.
      CheckpointDamagedError: no checkpoint can be read back. Nothing on
        disk was changed.
      CheckpointDirError: a damaged checkpoint could not be moved aside.
    """
    self._check_open()
    steps = self.all_steps()
    if not steps:
      raise CheckpointNotFoundError(
          f"No complete checkpoint found in {self._directory}.")
    target = None if target is None else _normalize_target(target)
    found: list[_Damage] = []
    for step in reversed(steps):
      try:
        state, iterator_state = self._read(step, target)
      except _Damage as d:
        found.append(d)
        continue
      skipped = self._set_aside(found, step)
      return Restored(state, iterator_state, step, skipped)
    newest = found[0]
    raise CheckpointDamagedError(
        f"No checkpoint in {self._directory} can be read back (steps "
        f"{', '.join(str(d.step) for d in found)}; step {newest.step}: "
        f"{newest.problem}: {newest.reason}); nothing was moved or deleted.",
        directory=self._directory,
        damaged=tuple(DamagedCheckpoint(d.step, d.problem, d.reason)
                      for d in found))

  def _read(self, step: int, target: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """(state, iterator_state) of `step`; writes nothing.

    Raises:
      _Damage: the step cannot be read back.
      CheckpointMismatchError: its tree is not `target`'s.
    """
    try:
      with _orbax_call():
        metadata = self._metadata_handler.metadata(
            self._directory / str(step) / STATE_ITEM)
      saved = {path: _saved_signature(m)
               for path, m in ocp.tree.to_flat_dict(metadata.tree).items()
               if m is not None}
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise _Damage(step, "state", _one_line(e)) from e
    if target is None:
      target = _saved_target(metadata.tree)
    else:
      self._check_tree(step, saved, target)
    try:
      with _orbax_call():
        iterator_state = self._manager.restore(
            step, args=ocp.args.Composite(**{
                ITERATOR_ITEM: ocp.args.JsonRestore()}))[ITERATOR_ITEM]
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise _Damage(step, "iterator", _one_line(e)) from e
    if not isinstance(iterator_state, dict):
      raise _Damage(step, "iterator",
                    f"not a JSON dict: {type(iterator_state).__name__}")
    try:
      with _orbax_call():
        state = self._manager.restore(
            step, args=ocp.args.Composite(**{
                STATE_ITEM: ocp.args.StandardRestore(target)}))[STATE_ITEM]
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise _Damage(step, "state", _one_line(e)) from e
    # The leaves matched, but e.g. an empty container where None was saved
    # (or the reverse) silently comes back as None.
    if jax.tree.structure(target) != jax.tree.structure(state):
      raise self._mismatch(
          step, None, None, None,
          "the same leaves in other containers (e.g. None instead of ())")
    return state, iterator_state

  def _check_tree(self, step: int, saved: dict[tuple[str, ...], _Signature],
                  target: PyTree) -> None:
    """Raises CheckpointMismatchError unless `saved` matches `target`'s leaves."""
    new = {path: _target_signature(leaf)
           for path, leaf in ocp.tree.to_flat_dict(target).items()}
    differences = [path for path, sig in new.items()
                   if path not in saved or not _compatible(saved[path], sig)]
    differences += [path for path in saved if path not in new]
    if differences:
      path = differences[0]
      saved_text, new_text = _describe(saved.get(path)), _describe(new.get(path))
      more = (f" ({len(differences) - 1} more leaves differ)"
              if len(differences) > 1 else "")
      raise self._mismatch(
          step, ".".join(path), saved_text, new_text,
          f"{'.'.join(path)} is {saved_text} in the checkpoint but {new_text} "
          f"in the model being built{more}")

  def _mismatch(self, step: int, path: str | None, saved: str | None,
                new: str | None, detail: str) -> CheckpointMismatchError:
    return CheckpointMismatchError(
        f"Checkpoint of step {step} in {self._directory} holds another model: "
        f"{detail}. Rerun with the config the run was saved with (its "
        "config.json) or use a new workdir.",
        step=step, directory=self._directory, path=path, saved=saved, new=new)

  def _set_aside(self, damaged: list[_Damage],
                 used: int) -> tuple[DamagedCheckpoint, ...]:
    """Moves `damaged` steps to DAMAGED_DIR (unless read-only), warning once each."""
    if not damaged:
      return ()
    if self._read_only:
      for d in damaged:
        logging.warning(
            "Checkpoint of step %d in %s is damaged (%s: %s); left in place "
            "(read-only), using step %d.", d.step, self._directory,
            d.problem, d.reason, used)
      return tuple(DamagedCheckpoint(d.step, d.problem, d.reason)
                   for d in damaged)
    aside = self._directory / DAMAGED_DIR
    # Named on every process before any move, so that all agree.
    destinations = []
    for d in damaged:
      name, n = f"{d.step}.{d.problem}", 0
      while (aside / name).exists():
        n += 1
        name = f"{d.step}.{d.problem}.{n}"
      destinations.append(aside / name)
    self._barrier("set_aside_start")
    if ocp.multihost.is_primary_host(0):
      for d, destination in zip(damaged, destinations):
        source = self._directory / str(d.step)
        try:
          aside.mkdir(parents=True, exist_ok=True)
          source.rename(destination)
        except OSError as e:
          raise CheckpointDirError(
              f"Cannot move damaged checkpoint {source} to {destination}: "
              f"{e.strerror or e}.") from None
    self._barrier("set_aside_done")
    self._manager.reload()
    self._committed.clear()
    for d, destination in zip(damaged, destinations):
      logging.warning(
          "Checkpoint of step %d in %s is damaged (%s: %s); moved it to %s, "
          "resuming from step %d.", d.step, self._directory, d.problem,
          d.reason, destination, used)
    return tuple(DamagedCheckpoint(d.step, d.problem, d.reason, destination)
                 for d, destination in zip(damaged, destinations))

  def _barrier(self, name: str) -> None:
    if jax.process_count() > 1:
      self._barriers += 1
      ocp.multihost.sync_global_processes(
          f"rmc_checkpointer_{name}_{self._barriers}")

  def close(self) -> None:
    """Waits for pending Orbax work and releases it; idempotent."""
    if not self._closed:
      self._closed = True
      try:
        self._manager.close()
      finally:
        self._metadata_handler.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()
