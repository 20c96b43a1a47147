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
  `restore`, `reload` and `close` with the same arguments in the same order:
  Orbax puts barriers inside them, each process writes its own array shards,
  and only the primary process (process 0) creates directories, writes
  metadata, commits and deletes. All processes must see the same filesystem.
  Not thread-safe, and not safe for two jobs writing one directory.
* PRNG keys. Raw ``uint32`` keys (``jax.random.PRNGKey``) are plain arrays.
  New-style typed keys (``jax.random.key``) are supported as well: Orbax
  stores their key data and implementation name and restores typed keys of
  the same implementation when the target leaf is a typed key (concrete or
  abstract from ``jax.eval_shape``).
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Mapping
from typing import Any

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


class CheckpointNotFoundError(FileNotFoundError):
  """Raised when restoring a step that has no complete checkpoint."""


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


class Checkpointer:
  """Keeps the last `max_to_keep` complete (TrainState, iterator) checkpoints.

  Wraps `orbax.checkpoint.CheckpointManager`, configured for synchronous,
  atomic saves; see the module docstring for the guarantees. The step list
  reflects the directory when this object was opened plus the saves and
  deletions made through it; `reload()` rescans the directory.
  """

  def __init__(self, directory: str | os.PathLike[str], *,
               max_to_keep: int | None = 3,
               save_interval_steps: int = 1) -> None:
    """Opens the checkpoint directory, creating it (and parents) if needed.

    Args:
      directory: where step directories live, normally ``WORKDIR/checkpoints``.
      max_to_keep: how many of the newest checkpoints to keep; None keeps all.
      save_interval_steps: without ``force``, ``save(step, ...)`` only writes
        when ``step % save_interval_steps == 0``.

    Leftovers of interrupted saves (``*.orbax-checkpoint-tmp``) are deleted in
    the background; the next `save` waits for that.
    """
    if max_to_keep is not None and (isinstance(max_to_keep, bool) or
                                    operator.index(max_to_keep) < 1):
      # Orbax's LatestN(0) would delete the checkpoint just written.
      raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
    if operator.index(save_interval_steps) < 1:
      raise ValueError("save_interval_steps must be >= 1, got "
                       f"{save_interval_steps}")
    # Orbax requires absolute local paths; keep remote ones (gs://...) as given.
    path = os.fspath(directory)
    self._directory = epath.Path(path if "://" in path else os.path.abspath(path))
    self._save_interval_steps = int(save_interval_steps)
    options = ocp.CheckpointManagerOptions(
        # `max_to_keep=` is deprecated in 0.12 in favour of a policy object.
        preservation_policy=ocp.checkpoint_managers.LatestN(n=max_to_keep),
        create=True,
        # Synchronous, so that `save` returns only once the step is committed.
        enable_async_checkpointing=False,
        # Deletes `*.orbax-checkpoint-tmp` left by saves cut short by a crash.
        cleanup_tmp_directories=True,
    )
    self._manager = ocp.CheckpointManager(self._directory, options=options)
    # step -> whether its directory holds the commit marker; saves a stat per
    # step on every latest_step() call.
    self._committed: dict[int, bool] = {}
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
    """Returns the steps that have a complete checkpoint, ascending."""
    self._check_open()
    return sorted(s for s in self._manager.all_steps() if self._is_committed(s))

  def latest_step(self) -> int | None:
    """Returns the newest step with a complete checkpoint, or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def reload(self) -> None:
    """Rescans the directory (only needed if something else changed it)."""
    self._check_open()
    self._manager.reload()
    self._committed.clear()

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
      ValueError: `step` is older than the latest checkpoint (continuing from
        an older checkpoint would interleave two histories: delete the newer
        ones or use a fresh directory), or `iterator_state` does not
        round-trip through JSON.
      TypeError: `iterator_state` is not a JSON-serialisable dict.
    """
    self._check_open()
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
    saved = self._manager.save(
        step,
        args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardSave(state),
            ITERATOR_ITEM: ocp.args.JsonSave(iterator_state),
        }),
        # The decision was made above. Orbax's own policy would also skip any
        # step <= its latest one, which may be an uncommitted directory.
        force=True,
    )
    # A no-op for a synchronous manager; keeps the "complete on return"
    # guarantee from silently depending on the async setting.
    self._manager.wait_until_finished()
    if saved:
      self._committed[step] = True
    return bool(saved)

  def restore(self, step: int | None = None, *,
              target: PyTree) -> tuple[PyTree, dict[str, Any], int]:
    """Returns `(state, iterator_state, step)` from `step` (default: latest).

    `target` must have the pytree structure of the saved state; its leaves
    may be concrete arrays or `jax.ShapeDtypeStruct`s (e.g. from
    `jax.eval_shape`). Restored leaves get the target's dtype, and its
    sharding when the leaf has one (a jax.Array, or a ShapeDtypeStruct with
    `.sharding`). A ShapeDtypeStruct without sharding is restored onto the
    sharding recorded in the checkpoint if it was saved from a jax.Array (the
    devices must exist now), else as a numpy array. Python scalar leaves come
    back as Python scalars. Must be called by all processes.

    Raises:
      CheckpointNotFoundError: no complete checkpoint for `step` (or none at
        all when `step` is None).
      ValueError: `target`'s structure, or a leaf's shape, does not match the
        checkpoint.
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
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardRestore(target),
            ITERATOR_ITEM: ocp.args.JsonRestore(),
        }),
    )
    state = restored[STATE_ITEM]
    # Orbax checks names and shapes, but e.g. an array target leaf where None
    # was saved (a run without recurrent carry) silently comes back as None.
    expected, actual = jax.tree.structure(target), jax.tree.structure(state)
    if expected != actual:
      raise ValueError(
          f"Checkpoint at step {step} has a different pytree structure than "
          f"the target.\n  target: {expected}\n  restored: {actual}")
    iterator_state = restored[ITERATOR_ITEM]
    if not isinstance(iterator_state, dict):
      raise ValueError(
          f"Checkpoint at step {step} has no valid {ITERATOR_ITEM!r} item.")
    return state, iterator_state, step

  def close(self) -> None:
    """Waits for pending Orbax work and releases it; idempotent."""
    if not self._closed:
      self._closed = True
      self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()
