"""Tests of damaged checkpoints, another model, unusable directories, failed
saves and read-only opening (rmc_jax.training.checkpoint).

Damage is real: files of a saved checkpoint are truncated, emptied, deleted
or overwritten on disk, as a partial copy or a full disk would leave them.
"""

from __future__ import annotations

import asyncio
import errno
import glob
import logging
import os
import subprocess
import sys
import textwrap
import types

import jax
import jax.numpy as jnp
import pytest
from absl import logging as absl_logging
from orbax.checkpoint._src.path import atomicity_types
from orbax.checkpoint._src.serialization import serialization

from rmc_jax.training import checkpoint as checkpoint_lib
from rmc_jax.training.checkpoint import (DAMAGED_DIR, CheckpointDamagedError,
                                         CheckpointDirError,
                                         CheckpointMismatchError,
                                         CheckpointNotFoundError,
                                         CheckpointSaveError, Checkpointer,
                                         ensure_writable_dir)
from tests.helpers import REPO_ROOT, subprocess_env
from tests.test_checkpoint import assert_trees_equal, ckpt_dir, make_state

TMP_SUFFIX = atomicity_types.TMP_DIR_SUFFIX


def make_run(path: str, steps=(1, 2, 3), max_to_keep: int | None = 3) -> None:
  """Saves make_state(step) with iterator {'index': step} at each step."""
  with Checkpointer(path, max_to_keep=max_to_keep) as ckpt:
    for step in steps:
      assert ckpt.save(step, make_state(step), {"index": step})


def abstract_state():
  return jax.eval_shape(lambda: make_state(0))


def array_files(path: str, step: int) -> list[str]:
  """The files holding the state's arrays (OCDBT data files)."""
  files = sorted(glob.glob(os.path.join(path, str(step), "state", "d", "*")))
  assert files, os.listdir(os.path.join(path, str(step), "state"))
  return files


def truncate(path: str, step: int) -> None:
  """A partial copy: every data file cut to a third."""
  for f in array_files(path, step):
    os.truncate(f, os.path.getsize(f) // 3)


def empty(path: str, step: int) -> None:
  for f in array_files(path, step):
    os.truncate(f, 0)


def corrupt(path: str, step: int) -> None:
  """Same size, garbage in the middle (e.g. a bad block)."""
  for f in array_files(path, step):
    with open(f, "r+b") as fh:
      data = bytearray(fh.read())
      for i in range(len(data) // 4, len(data) // 2):
        data[i] ^= 0x5A
      fh.seek(0)
      fh.write(bytes(data))


def delete_arrays(path: str, step: int) -> None:
  for f in array_files(path, step):
    os.remove(f)


def cut_manifest(path: str, step: int) -> None:
  manifest = os.path.join(path, str(step), "state", "manifest.ocdbt")
  os.truncate(manifest, 10)


def bad_tree_metadata(path: str, step: int) -> None:
  with open(os.path.join(path, str(step), "state", "_METADATA"), "w") as f:
    f.write('{"tree_metadata": {')


def bad_iterator(path: str, step: int) -> None:
  item = os.path.join(path, str(step), checkpoint_lib.ITERATOR_ITEM)
  for f in os.listdir(item):
    if f != checkpoint_lib.COMMIT_MARKER:
      with open(os.path.join(item, f), "w") as fh:
        fh.write('{"index": 3')


def snapshot(path: str) -> dict[str, tuple]:
  """Every entry under `path`: kind, size and mtime (ns)."""
  result = {}
  for root, dirs, files in os.walk(path):
    for name in dirs + files:
      full = os.path.join(root, name)
      st = os.lstat(full)
      result[os.path.relpath(full, path)] = (
          os.path.isdir(full), st.st_size if not os.path.isdir(full) else 0,
          st.st_mtime_ns)
  st = os.lstat(path)
  result["."] = (True, 0, st.st_mtime_ns)
  return result


def step_dirs(path: str) -> list[str]:
  return sorted(n for n in os.listdir(path) if n.isdigit())


# -- 1. Damaged checkpoints are moved aside; the newest good one is used -------


@pytest.mark.parametrize("damage, problem", [
    (truncate, "state"),
    (empty, "state"),
    (corrupt, "state"),
    (delete_arrays, "state"),
    (cut_manifest, "state"),
    (bad_tree_metadata, "state"),
    (bad_iterator, "iterator"),
])
def test_damaged_latest_falls_back_to_previous(tmp_path, caplog, damage,
                                               problem):
  path = ckpt_dir(tmp_path)
  make_run(path)
  damage(path, 3)
  with Checkpointer(path) as ckpt:
    assert ckpt.all_steps() == [1, 2, 3]  # Complete (marker), not yet read.
    with caplog.at_level(logging.WARNING):
      state, iterator_state, step, skipped = ckpt.restore_latest_good(
          abstract_state())
    assert step == 2 and iterator_state == {"index": 2}
    assert_trees_equal(state, make_state(2))
    assert [(d.step, d.problem) for d in skipped] == [(3, problem)]
    moved = os.path.join(path, DAMAGED_DIR, f"3.{problem}")
    assert os.fspath(skipped[0].moved_to) == moved
    assert skipped[0].reason and "\n" not in skipped[0].reason
    # Moved, not deleted; no longer a step, here or after reopening.
    assert os.path.exists(os.path.join(moved, checkpoint_lib.COMMIT_MARKER))
    assert step_dirs(path) == ["1", "2"]
    assert ckpt.all_steps() == [1, 2]
  warnings = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING and "damaged" in r.getMessage()]
  assert len(warnings) == 1, warnings
  assert "step 3" in warnings[0] and problem in warnings[0]
  assert moved in warnings[0] and "\n" not in warnings[0]
  with Checkpointer(path) as ckpt:
    assert ckpt.all_steps() == [1, 2]
    assert ckpt.restore_latest_good(abstract_state()).skipped == ()


def test_array_data_failing_after_good_metadata_is_damage(tmp_path,
                                                         monkeypatch):
  """A chunk that fails to read while every header is fine (e.g. a corrupt
  compressed chunk) is damage found by the restore itself."""
  path = ckpt_dir(tmp_path)
  make_run(path, steps=(1, 2))
  real = serialization.async_deserialize

  async def read_or_fail(*args, **kwargs):
    spec = str(args[1] if len(args) > 1 else kwargs.get("tensorstore_spec"))
    if f"{os.sep}2{os.sep}state" in spec:
      raise ValueError("DATA_LOSS: Error decoding chunk: corrupt")
    return await real(*args, **kwargs)

  monkeypatch.setattr(serialization, "async_deserialize", read_or_fail)
  with Checkpointer(path) as ckpt:
    state, iterator_state, step, skipped = ckpt.restore_latest_good(
        abstract_state())
  assert (step, iterator_state) == (1, {"index": 1})
  assert_trees_equal(state, make_state(1))
  assert [(d.step, d.problem) for d in skipped] == [(2, "state")]
  assert "DATA_LOSS: Error decoding chunk" in skipped[0].reason
  assert os.path.isdir(os.path.join(path, DAMAGED_DIR, "2.state"))


def test_training_on_after_fallback_never_touches_damaged(tmp_path):
  path = ckpt_dir(tmp_path)
  make_run(path, max_to_keep=2)  # Steps 2 and 3 kept.
  truncate(path, 3)
  damaged_before = None
  with Checkpointer(path, max_to_keep=2) as ckpt:
    assert ckpt.restore_latest_good(abstract_state()).step == 2
    damaged_before = snapshot(os.path.join(path, DAMAGED_DIR))
    # The run continues: step 3 again, then more, with deletions.
    for step in (3, 4, 5, 6):
      assert ckpt.save(step, make_state(step), {"index": step})
    assert ckpt.all_steps() == [5, 6]
  assert step_dirs(path) == ["5", "6"]
  assert snapshot(os.path.join(path, DAMAGED_DIR)) == damaged_before
  with Checkpointer(path, max_to_keep=2) as ckpt:
    state, iterator_state, step, skipped = ckpt.restore_latest_good(
        abstract_state())
  assert (step, iterator_state, skipped) == (6, {"index": 6}, ())
  assert_trees_equal(state, make_state(6))


def test_several_damaged_fall_back_to_oldest_good(tmp_path):
  path = ckpt_dir(tmp_path)
  make_run(path)
  truncate(path, 3)
  bad_iterator(path, 2)
  with Checkpointer(path) as ckpt:
    state, iterator_state, step, skipped = ckpt.restore_latest_good(
        make_state(0))  # A concrete target works as well.
    assert (step, iterator_state) == (1, {"index": 1})
    assert_trees_equal(state, make_state(1))
    assert [(d.step, d.problem) for d in skipped] == [(3, "state"),
                                                      (2, "iterator")]
    assert ckpt.all_steps() == [1]
  assert sorted(os.listdir(os.path.join(path, DAMAGED_DIR))) == [
      "2.iterator", "3.state"]


def test_damaged_twice_at_one_step_keeps_both(tmp_path):
  path = ckpt_dir(tmp_path)
  make_run(path, steps=(1, 2))
  truncate(path, 2)
  with Checkpointer(path) as ckpt:
    ckpt.restore_latest_good(abstract_state())
    ckpt.save(2, make_state(2), {"index": 2})
  truncate(path, 2)
  with Checkpointer(path) as ckpt:
    skipped = ckpt.restore_latest_good(abstract_state()).skipped
  assert os.path.basename(skipped[0].moved_to) == "2.state.1"
  assert sorted(os.listdir(os.path.join(path, DAMAGED_DIR))) == [
      "2.state", "2.state.1"]


def test_nothing_readable_raises_and_moves_nothing(tmp_path):
  path = ckpt_dir(tmp_path)
  make_run(path)
  for step in (1, 2, 3):
    truncate(path, step)
  before = snapshot(path)
  with Checkpointer(path) as ckpt:
    with pytest.raises(CheckpointDamagedError) as info:
      ckpt.restore_latest_good(abstract_state())
    assert ckpt.all_steps() == [1, 2, 3]
  message = str(info.value)
  assert "\n" not in message
  assert path in message and "steps 3, 2, 1" in message
  assert "nothing was moved or deleted" in message
  assert [d.step for d in info.value.damaged] == [3, 2, 1]
  assert snapshot(path) == before


def test_restore_of_a_damaged_step_raises_without_moving(tmp_path):
  path = ckpt_dir(tmp_path)
  make_run(path)
  corrupt(path, 2)
  before = snapshot(path)
  with Checkpointer(path) as ckpt:
    with pytest.raises(CheckpointDamagedError) as info:
      ckpt.restore(2, target=abstract_state())
    state, iterator_state, step = ckpt.restore(target=abstract_state())
  message = str(info.value)
  assert "\n" not in message and "step 2" in message and path in message
  assert (step, iterator_state) == (3, {"index": 3})
  assert_trees_equal(state, make_state(3))
  assert snapshot(path) == before


def test_no_checkpoint_at_all(tmp_path):
  with Checkpointer(ckpt_dir(tmp_path)) as ckpt:
    with pytest.raises(CheckpointNotFoundError):
      ckpt.restore_latest_good(abstract_state())


# -- 2. Another model is not damage ---------------------------------------------


def wider_state():
  """make_state with a wider dense layer: another model."""
  def build():
    state = make_state(0)
    params = dict(state.params, dense={"w": jnp.zeros((4, 5), jnp.float32),
                                       "b": jnp.zeros((5,), jnp.bfloat16)})
    return state._replace(params=params)
  return jax.eval_shape(build)


def test_other_model_raises_mismatch_and_changes_nothing(tmp_path):
  path = ckpt_dir(tmp_path)
  make_run(path)
  before = snapshot(path)
  with Checkpointer(path) as ckpt:
    for restore in (lambda t: ckpt.restore_latest_good(t),
                    lambda t: ckpt.restore(target=t)):
      with pytest.raises(CheckpointMismatchError) as info:
        restore(wider_state())
      error = info.value
      message = str(error)
      assert "\n" not in message
      assert "step 3" in message and path in message
      assert "params.dense.b is (3,) bfloat16 in the checkpoint but (5,) " \
             "bfloat16 in the model" in message, message
      assert "config.json" in message and "new workdir" in message
      assert (error.step, error.path) == (3, "params.dense.b")
      assert (error.saved, error.new) == ("(3,) bfloat16", "(5,) bfloat16")
      assert isinstance(error, ValueError)
  assert snapshot(path) == before


def test_other_dtype_or_missing_leaf_is_a_mismatch(tmp_path):
  path = ckpt_dir(tmp_path)
  make_run(path, steps=(1,))
  int16_embed = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, jnp.int16)
      if x.dtype == jnp.int32 and x.shape == (5,) else x, abstract_state())
  with Checkpointer(path) as ckpt:
    with pytest.raises(CheckpointMismatchError, match=r"params\.embed is "
                       r"\(5,\) int32 in the checkpoint but \(5,\) int16"):
      ckpt.restore_latest_good(int16_embed)
    with_carry = jax.eval_shape(lambda: make_state(0, carry=True))
    with pytest.raises(CheckpointMismatchError,
                       match=r"carry is missing in the checkpoint but \(2, 3\) "
                       "float32"):
      ckpt.restore_latest_good(with_carry)
    fewer = abstract_state()._replace(params={})
    with pytest.raises(CheckpointMismatchError,
                       match=r"params\.dense\.b is \(3,\) bfloat16 in the "
                       r"checkpoint but missing in the model being built \(2 "
                       r"more leaves differ\)"):
      ckpt.restore_latest_good(fewer)


def test_mismatch_behind_a_damaged_latest_moves_nothing(tmp_path):
  path = ckpt_dir(tmp_path)
  make_run(path)
  bad_tree_metadata(path, 3)  # No metadata to compare: damaged.
  before = snapshot(path)
  with Checkpointer(path) as ckpt:
    with pytest.raises(CheckpointMismatchError, match="step 2"):
      ckpt.restore_latest_good(wider_state())
  assert snapshot(path) == before


# -- 3. Unusable directories and failed saves -----------------------------------


def test_file_in_the_way_is_a_dir_error(tmp_path):
  a_file = tmp_path / "workdir"
  a_file.write_text("not a directory")
  for path, named in ((a_file, a_file), (a_file / "checkpoints", a_file)):
    with pytest.raises(CheckpointDirError) as info:
      Checkpointer(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert message.startswith(f"Cannot use {path} as a directory: ")
    assert message.endswith("it is a file." if named == path else
                            f"{named} is a file.")
    with pytest.raises(CheckpointDirError):
      ensure_writable_dir(path)
    with pytest.raises(CheckpointDirError):
      Checkpointer(path, read_only=True)
  assert a_file.read_text() == "not a directory"


def test_directory_that_cannot_be_created_is_a_dir_error():
  path = "/proc/rmc_jax_no_such_dir/checkpoints"
  with pytest.raises(CheckpointDirError, match="Cannot create directory "
                     "/proc/rmc_jax_no_such_dir/checkpoints: "):
    Checkpointer(path)


def test_directory_not_writable_is_a_dir_error(tmp_path):
  path = tmp_path / "checkpoints"
  path.mkdir()
  path.chmod(0o555)
  try:
    if os.access(path, os.W_OK):
      pytest.skip("permissions do not apply to this user (root)")
    with pytest.raises(CheckpointDirError, match=f"{path} is not writable"):
      Checkpointer(path)
    Checkpointer(path, read_only=True).close()  # Reading is fine.
  finally:
    path.chmod(0o755)


def test_ensure_writable_dir_creates_parents(tmp_path):
  path = ensure_writable_dir(tmp_path / "a" / "b")
  assert path == os.fspath(tmp_path / "a" / "b") and os.path.isdir(path)


def fail_after_first_array(monkeypatch, calls: list) -> None:
  """Makes Orbax's array writes fail with ENOSPC after the first one."""
  real = serialization.async_serialize_from_host

  async def write_or_fail(*args, **kwargs):
    calls.append(1)
    if len(calls) > 1:
      raise OSError(errno.ENOSPC, "No space left on device")
    return await real(*args, **kwargs)

  monkeypatch.setattr(serialization, "async_serialize_from_host",
                      write_or_fail)


def test_save_that_fails_partway_is_never_taken_as_good(tmp_path,
                                                        monkeypatch):
  path = ckpt_dir(tmp_path)
  make_run(path, steps=(1,))
  calls = []
  with Checkpointer(path) as ckpt:
    with monkeypatch.context() as m:
      fail_after_first_array(m, calls)
      with pytest.raises(CheckpointSaveError) as info:
        ckpt.save(2, make_state(2), {"index": 2})
    assert len(calls) > 1  # Some arrays were written before the failure.
    message = str(info.value)
    assert "\n" not in message and info.value.step == 2
    assert "step 2" in message and "No space left on device" in message
    assert "latest complete checkpoint: step 1" in message
    # What the failed save left: a partial, unlisted tmp directory.
    partial = os.path.join(path, f"2{TMP_SUFFIX}")
    assert glob.glob(os.path.join(partial, "**", "d", "*"), recursive=True)
    assert ckpt.latest_step() == 1
  with Checkpointer(path) as ckpt:
    assert ckpt.latest_step() == 1
    state, iterator_state, step, skipped = ckpt.restore_latest_good(
        abstract_state())
    assert (step, iterator_state, skipped) == (1, {"index": 1}, ())
    assert_trees_equal(state, make_state(1))
    # Saving again works and replaces the partial directory.
    assert ckpt.save(2, make_state(2), {"index": 2})
    assert ckpt.all_steps() == [1, 2]
    assert_trees_equal(ckpt.restore(target=abstract_state())[0], make_state(2))
  assert not glob.glob(os.path.join(path, f"*{TMP_SUFFIX}"))


def test_save_retried_in_the_same_checkpointer(tmp_path, monkeypatch):
  path = ckpt_dir(tmp_path)
  with Checkpointer(path) as ckpt:
    ckpt.save(1, make_state(1), {"index": 1})
    with monkeypatch.context() as m:
      fail_after_first_array(m, [])
      with pytest.raises(CheckpointSaveError):
        ckpt.save(2, make_state(2), {"index": 2})
    assert ckpt.save(2, make_state(2), {"index": 2})
    assert ckpt.all_steps() == [1, 2]
    assert_trees_equal(ckpt.restore(target=abstract_state())[0], make_state(2))


# -- 4. No stray tracebacks -------------------------------------------------------

_ERRORS_SCRIPT = textwrap.dedent("""
    import errno, glob, os, sys
    import jax, jax.numpy as jnp
    from orbax.checkpoint._src.serialization import serialization
    from rmc_jax.training.checkpoint import Checkpointer

    root = sys.argv[1]
    # Many leaves, so that many tensorstore reads are in flight on failure.
    def state(width):
      return {f"layer{i}": {"w": jnp.full((width, 8), float(i)),
                            "b": jnp.zeros((8,))} for i in range(24)}
    path = os.path.join(root, "checkpoints")
    with Checkpointer(path) as ckpt:
      for step in (1, 2):
        ckpt.save(step, state(4), {"index": step})
    for step in (1, 2):
      for f in glob.glob(os.path.join(path, str(step), "state", "d", "*")):
        os.truncate(f, os.path.getsize(f) // 3)
    other = os.path.join(root, "other")
    with Checkpointer(other) as ckpt:
      ckpt.save(1, state(4), {"index": 1})
    a_file = os.path.join(root, "a_file")
    open(a_file, "w").close()

    def save_full_disk(ckpt):
      async def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
      serialization.async_serialize_from_host = fail
      ckpt.save(2, state(4), {"index": 2})

    cases = {
        "damaged": (path, lambda c: c.restore_latest_good(state(4))),
        "damaged_step": (path, lambda c: c.restore(2, target=state(4))),
        "mismatch": (other, lambda c: c.restore_latest_good(state(6))),
        "dir": (os.path.join(a_file, "checkpoints"), None),
        "save": (other, save_full_disk),
    }
    case = sys.argv[2]
    directory, action = cases[case]
    try:
      with Checkpointer(directory) as ckpt:
        action(ckpt)
    except Exception as e:
      print(f"{type(e).__name__}: {e}")
      sys.exit(2)
    print("no error")
    """)


def test_errors_print_one_clean_exception(tmp_path):
  """Each error: its one-line message, exit 2, and nothing on stderr."""
  env = subprocess_env()
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
  expected = {
      "damaged": "CheckpointDamagedError: No checkpoint in",
      "damaged_step": "CheckpointDamagedError: Checkpoint of step 2",
      "mismatch": "CheckpointMismatchError: Checkpoint of step 1",
      "dir": "CheckpointDirError: Cannot use",
      "save": "CheckpointSaveError: Saving the checkpoint of step 2",
  }
  for case, start in expected.items():
    root = tmp_path / case
    root.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", _ERRORS_SCRIPT, os.fspath(root), case],
        env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 2, (case, result.stdout, result.stderr[-3000:])
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(start), (case, lines)
    assert "Traceback" not in result.stderr, (case, result.stderr[-3000:])
    assert "Event loop is closed" not in result.stderr, case
    assert "ERROR" not in result.stderr, (case, result.stderr[-3000:])


def test_closed_loop_reports_are_dropped_and_others_kept(monkeypatch):
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  monkeypatch.setattr(checkpoint_lib, "_closed_loop_filter_installed", False)
  checkpoint_lib._install_closed_loop_filter()
  checkpoint_lib._install_closed_loop_filter()  # Idempotent.
  loop = asyncio.new_event_loop()
  loop.close()
  try:
    loop.call_soon_threadsafe(lambda: None)  # What a late tensorstore result does.
  except RuntimeError as e:
    closed = e
  report = lambda e: types.SimpleNamespace(
      exc_type=type(e), exc_value=e, exc_traceback=e.__traceback__,
      err_msg=None, object=None)
  sys.unraisablehook(report(closed))
  assert seen == []
  other = RuntimeError("Event loop is closed")  # Not from call_soon_threadsafe.
  for error in (other, ValueError("something else")):
    sys.unraisablehook(report(error))
  assert [r.exc_value for r in seen] == [other, error]


def test_orbax_thread_error_log_is_silenced_only_during_calls():
  logger = absl_logging.get_absl_logger()
  record = logging.LogRecord(
      "absl", logging.ERROR, __file__, 1,
      "[process=%d][thread=%s][operation_id=%s] _SignalingThread.run() raised "
      "an exception: %s", (0, "t", 1, "boom"), None)
  with checkpoint_lib._orbax_call():
    assert not logger.filter(record)
  assert logger.filter(record)


# -- 5. Read-only opening writes nothing -------------------------------------------


def test_read_only_writes_nothing(tmp_path):
  path = ckpt_dir(tmp_path)
  make_run(path)
  truncate(path, 3)
  # What a crash (or a job still writing) leaves: must stay as it is.
  partial = os.path.join(path, f"4{TMP_SUFFIX}", "state")
  os.makedirs(partial)
  with open(os.path.join(partial, "_METADATA"), "w") as f:
    f.write("{")
  before = snapshot(path)
  with Checkpointer(path, read_only=True) as ckpt:
    assert ckpt.all_steps() == [1, 2, 3]
    state, iterator_state, step, skipped = ckpt.restore_latest_good(
        abstract_state())
    assert (step, iterator_state) == (2, {"index": 2})
    assert_trees_equal(state, make_state(2))
    assert [(d.step, d.problem, d.moved_to) for d in skipped] == [
        (3, "state", None)]
    assert_trees_equal(ckpt.restore(1, target=abstract_state())[0],
                       make_state(1))
    with pytest.raises(CheckpointDamagedError):
      ckpt.restore(3, target=abstract_state())
    with pytest.raises(CheckpointMismatchError):
      ckpt.restore_latest_good(wider_state())
    with pytest.raises(RuntimeError, match="read-only"):
      ckpt.save(4, make_state(4), {"index": 4})
    assert ckpt.all_steps() == [1, 2, 3]
  assert snapshot(path) == before


def test_read_only_of_a_missing_directory(tmp_path):
  path = ckpt_dir(tmp_path)
  with pytest.raises(CheckpointNotFoundError, match=f"{path}"):
    Checkpointer(path, read_only=True)
  assert not os.path.exists(os.path.dirname(path))
