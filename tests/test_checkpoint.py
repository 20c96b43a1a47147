"""Tests for rmc_jax.training.checkpoint (atomic Orbax checkpoints)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from orbax.checkpoint._src.path import atomicity, atomicity_types

from rmc_jax.training.checkpoint import (COMMIT_MARKER, CheckpointMismatchError,
                                         CheckpointNotFoundError,
                                         CheckpointSaveError, Checkpointer)

TMP_SUFFIX = atomicity_types.TMP_DIR_SUFFIX  # How Orbax names unfinished saves.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TrainState(NamedTuple):
  params: Any
  opt_state: Any
  step: Any
  rng: Any
  carry: Any = None


def make_state(seed: int = 0, carry: bool = False) -> TrainState:
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  params = {
      "dense": {
          "w": jax.random.normal(k1, (4, 3), jnp.float32),
          "b": jax.random.normal(k2, (3,), jnp.bfloat16),
      },
      "embed": jax.random.randint(k3, (5,), 0, 100, jnp.int32),
  }
  opt_state = optax.adam(1e-3).init({"dense": params["dense"]})
  # Non-trivial values, so a zero-filled target cannot pass by accident.
  opt_state = jax.tree.map(lambda x: x + 1 + seed, opt_state)
  return TrainState(
      params=params,
      opt_state=opt_state,
      step=jnp.asarray(100 + seed, jnp.int32),
      rng=jax.random.PRNGKey(seed + 7),  # Raw uint32[2] key.
      carry=jnp.full((2, 3), float(seed), jnp.float32) if carry else None,
  )


def assert_trees_equal(actual: Any, expected: Any) -> None:
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert np.asarray(a).dtype == np.asarray(e).dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def ckpt_dir(tmp_path) -> str:
  return os.fspath(tmp_path / "workdir" / "checkpoints")


def tmp_dirs(ckpt: Checkpointer) -> list[str]:
  return [p.name for p in ckpt.directory.iterdir() if TMP_SUFFIX in p.name]


def test_commit_marker_matches_orbax():
  assert COMMIT_MARKER == atomicity_types.COMMIT_SUCCESS_FILE


def test_round_trip_exact(tmp_path):
  state = make_state(1, carry=True)
  iterator_state = {"seed": 0, "index": 1234, "order": [3, 1, 2], "name": "x"}
  with Checkpointer(ckpt_dir(tmp_path), max_to_keep=3) as ckpt:
    assert ckpt.save(10, state, iterator_state) is True
    # Complete on return: final directory with its marker, no tmp directory.
    assert (ckpt.directory / "10" / COMMIT_MARKER).exists()
    assert not tmp_dirs(ckpt)
    target = jax.tree.map(jnp.zeros_like, state)
    restored, it_state, step = ckpt.restore(target=target)
  assert step == 10
  assert it_state == iterator_state
  assert isinstance(restored, TrainState)
  assert_trees_equal(restored, state)
  assert restored.rng.dtype == jnp.uint32
  np.testing.assert_array_equal(jax.random.uniform(restored.rng, (3,)),
                                jax.random.uniform(state.rng, (3,)))


def test_restore_into_eval_shape_target(tmp_path):
  state = make_state(2)
  path = ckpt_dir(tmp_path)
  with Checkpointer(path) as ckpt:
    ckpt.save(5, state, {"index": 5})
  with Checkpointer(path) as ckpt:  # A fresh object, as after a restart.
    abstract = jax.eval_shape(lambda: make_state(2))
    restored, it_state, step = ckpt.restore(5, target=abstract)
  assert (step, it_state) == (5, {"index": 5})
  assert_trees_equal(restored, state)
  for leaf in jax.tree.leaves(restored):
    assert isinstance(leaf, jax.Array)


def test_typed_prng_key_round_trip(tmp_path):
  key = jax.random.key(3)
  state = {"rng": key, "keys": jax.random.split(key, 4), "x": jnp.arange(3.0)}
  with Checkpointer(ckpt_dir(tmp_path)) as ckpt:
    ckpt.save(1, state, {})
    for target in (state, jax.eval_shape(lambda: state)):
      restored, _, _ = ckpt.restore(target=target)
      for name in ("rng", "keys"):
        leaf = restored[name]
        assert jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
        assert jax.random.key_impl(leaf) == jax.random.key_impl(key)
        np.testing.assert_array_equal(jax.random.key_data(leaf),
                                      jax.random.key_data(state[name]))
      np.testing.assert_array_equal(jax.random.normal(restored["rng"], (2,)),
                                    jax.random.normal(key, (2,)))


def test_max_to_keep_and_latest_step(tmp_path):
  path = ckpt_dir(tmp_path)
  state = make_state()
  with Checkpointer(path, max_to_keep=2) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.all_steps() == []
    for step in range(1, 6):
      assert ckpt.save(step, state, {"index": step})
      assert ckpt.latest_step() == step
    assert ckpt.all_steps() == [4, 5]
  on_disk = sorted(p.name for p in ckpt.directory.iterdir() if p.name.isdigit())
  assert on_disk == ["4", "5"]
  with Checkpointer(path, max_to_keep=2) as ckpt:
    assert ckpt.all_steps() == [4, 5]
    assert ckpt.latest_step() == 5
    _, it_state, step = ckpt.restore(4, target=state)
    assert (step, it_state) == (4, {"index": 4})


def test_same_step_twice_keeps_first(tmp_path):
  with Checkpointer(ckpt_dir(tmp_path)) as ckpt:
    first = make_state(0)
    assert ckpt.save(3, first, {"index": 3}) is True
    # E.g. a forced save on SIGTERM right after the periodic one.
    assert ckpt.save(3, make_state(1), {"index": 99}, force=True) is False
    assert ckpt.save(3, make_state(1), {"index": 99}) is False
    restored, it_state, _ = ckpt.restore(3, target=first)
    assert_trees_equal(restored, first)
    assert it_state == {"index": 3}
    assert ckpt.all_steps() == [3]


def test_save_interval_and_force(tmp_path):
  with Checkpointer(ckpt_dir(tmp_path), save_interval_steps=10) as ckpt:
    state = make_state()
    assert ckpt.save(0, state, {}) is True
    assert ckpt.save(5, state, {}) is False
    assert ckpt.save(7, state, {}, force=True) is True
    assert ckpt.save(np.int64(10), state, {}) is True
    assert ckpt.all_steps() == [0, 7, 10]


def test_saving_older_step_raises(tmp_path):
  with Checkpointer(ckpt_dir(tmp_path)) as ckpt:
    ckpt.save(20, make_state(), {})
    with pytest.raises(ValueError, match="older than the latest"):
      ckpt.save(10, make_state(), {}, force=True)


def test_restore_missing_step_raises(tmp_path):
  with Checkpointer(ckpt_dir(tmp_path)) as ckpt:
    state = make_state()
    with pytest.raises(CheckpointNotFoundError, match="No complete checkpoint"):
      ckpt.restore(target=state)
    ckpt.save(1, state, {})
    with pytest.raises(CheckpointNotFoundError, match="step 2"):
      ckpt.restore(2, target=state)
    with pytest.raises(FileNotFoundError):  # Also catchable as the builtin.
      ckpt.restore(2, target=state)


def _crash_before_commit(*args, **kwargs):
  raise RuntimeError("simulated crash before commit")


def test_crash_before_commit_is_ignored(tmp_path, monkeypatch):
  path = ckpt_dir(tmp_path)
  good, newer = make_state(0), make_state(1)
  ckpt = Checkpointer(path)
  ckpt.save(1, good, {"index": 1})
  # All data of step 2 is written, then the process "dies" just before
  # Orbax's commit (marker + rename).
  with monkeypatch.context() as m:
    m.setattr(atomicity.AtomicRenameTemporaryPath, "finalize",
              _crash_before_commit)
    with pytest.raises(CheckpointSaveError, match="simulated crash") as info:
      ckpt.save(2, newer, {"index": 2})
    assert info.value.step == 2
  # The half-written checkpoint is on disk (items still sit in their own tmp
  # directories: Orbax renames each item, then the step directory).
  tmp_dir = ckpt.directory / f"2{TMP_SUFFIX}"
  assert (tmp_dir / f"state{TMP_SUFFIX}" / "_METADATA").exists()
  assert not (ckpt.directory / "2").exists()
  assert ckpt.latest_step() == 1

  # Restart: the half-written step is ignored and the previous one restores.
  with Checkpointer(path) as ckpt2:
    assert ckpt2.all_steps() == [1]
    restored, it_state, step = ckpt2.restore(target=good)
    assert (step, it_state) == (1, {"index": 1})
    assert_trees_equal(restored, good)
    with pytest.raises(CheckpointNotFoundError):
      ckpt2.restore(2, target=good)
    # Saving again works, and the leftover tmp directory is gone.
    assert ckpt2.save(2, newer, {"index": 2})
    assert ckpt2.all_steps() == [1, 2]
    assert not tmp_dirs(ckpt2)
    assert_trees_equal(ckpt2.restore(target=good)[0], newer)


def test_in_progress_tmp_dir_is_ignored(tmp_path):
  path = ckpt_dir(tmp_path)
  state = make_state()
  with Checkpointer(path) as ckpt:
    ckpt.save(1, state, {"index": 1})
  # What a process killed mid-write of step 5 leaves behind.
  partial = os.path.join(path, f"5{TMP_SUFFIX}", "state")
  os.makedirs(partial)
  with open(os.path.join(partial, "_METADATA"), "w") as f:
    f.write('{"truncated": ')
  with Checkpointer(path) as ckpt:
    assert ckpt.latest_step() == 1
    assert ckpt.restore(target=state)[2] == 1


def test_step_dir_without_commit_marker_is_ignored(tmp_path):
  path = ckpt_dir(tmp_path)
  state, newer = make_state(0), make_state(1)
  with Checkpointer(path) as ckpt:
    ckpt.save(1, state, {"index": 1})
    ckpt.save(2, state, {"index": 2})
  # A final-named step directory without Orbax's marker (e.g. a partial copy
  # or a deletion cut short).
  shutil.copytree(os.path.join(path, "2"), os.path.join(path, "3"))
  os.remove(os.path.join(path, "3", COMMIT_MARKER))
  with Checkpointer(path) as ckpt:
    assert ckpt.all_steps() == [1, 2]
    assert ckpt.latest_step() == 2
    assert ckpt.restore(target=state)[2] == 2
    with pytest.raises(CheckpointNotFoundError):
      ckpt.restore(3, target=state)
    # Saving that step replaces the incomplete directory.
    assert ckpt.save(3, newer, {"index": 3})
    assert ckpt.all_steps() == [1, 2, 3]
    restored, it_state, _ = ckpt.restore(3, target=state)
    assert_trees_equal(restored, newer)
    assert it_state == {"index": 3}


def test_structure_mismatch_raises(tmp_path):
  with Checkpointer(ckpt_dir(tmp_path)) as ckpt:
    ckpt.save(1, make_state(carry=False), {})
    # Orbax alone would silently return carry=None here.
    with pytest.raises(CheckpointMismatchError, match="carry is missing"):
      ckpt.restore(target=make_state(carry=True))
    missing_key = make_state()._replace(
        params={"embed": jnp.zeros((5,), jnp.int32)})
    with pytest.raises(ValueError, match="params.dense.b"):
      ckpt.restore(target=missing_key)


def test_bad_iterator_state_is_rejected_before_writing(tmp_path):
  with Checkpointer(ckpt_dir(tmp_path)) as ckpt:
    state = make_state()
    with pytest.raises(ValueError, match="round-trip"):
      ckpt.save(1, state, {"order": (1, 2)})
    with pytest.raises(TypeError, match="JSON"):
      ckpt.save(1, state, {"index": np.int64(3)})
    with pytest.raises(TypeError):
      ckpt.save(1, state, [1, 2])
    assert ckpt.all_steps() == []
    assert not [p for p in ckpt.directory.iterdir() if p.name.startswith("1")]


def test_numpy_and_python_scalar_leaves(tmp_path):
  state = {"np_step": np.int32(4), "py_step": 5, "lr": 0.5,
           "x": np.ones(2, np.float32)}
  with Checkpointer(ckpt_dir(tmp_path)) as ckpt:
    ckpt.save(1, state, {})
    restored, _, _ = ckpt.restore(target=state)
  assert restored["py_step"] == 5 and restored["lr"] == 0.5
  assert np.asarray(restored["np_step"]).dtype == np.int32
  assert int(restored["np_step"]) == 4
  np.testing.assert_array_equal(restored["x"], state["x"])


def test_restore_onto_target_sharding(tmp_path):
  mesh = Mesh(np.array(jax.devices()), ("d",))
  replicated = NamedSharding(mesh, P())
  state = make_state()
  with Checkpointer(ckpt_dir(tmp_path)) as ckpt:
    ckpt.save(1, state, {})
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        state)
    restored, _, _ = ckpt.restore(target=abstract)
    for leaf in jax.tree.leaves(restored):
      assert leaf.sharding == replicated
    restored, _, _ = ckpt.restore(target=jax.device_put(state, replicated))
    for leaf in jax.tree.leaves(restored):
      assert leaf.sharding == replicated
  assert_trees_equal(restored, state)


_TWO_DEVICE_SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from rmc_jax.training.checkpoint import Checkpointer

    assert jax.device_count() == 2, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("d",))
    rows = NamedSharding(mesh, P("d", None))
    cols = NamedSharding(mesh, P(None, "d"))
    rep = NamedSharding(mesh, P())
    x = jnp.arange(32.0).reshape(4, 8)
    key = jax.random.PRNGKey(0)
    state = {"w": jax.device_put(x, rows), "rng": jax.device_put(key, rep)}
    with Checkpointer(sys.argv[1]) as ckpt:
      ckpt.save(1, state, {"index": 1})
      target = {"w": jax.ShapeDtypeStruct((4, 8), jnp.float32, sharding=cols),
                "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)}
      restored, _, _ = ckpt.restore(target=target)
    assert restored["w"].sharding == cols, restored["w"].sharding
    assert restored["rng"].sharding == rep, restored["rng"].sharding
    np.testing.assert_array_equal(restored["w"], x)
    np.testing.assert_array_equal(restored["rng"], key)
    print("OK")
    """)


def test_restore_resharded_on_two_devices(tmp_path):
  # A subprocess, because the device count is fixed when JAX starts.
  env = dict(os.environ)
  xla_flags = env.get("XLA_FLAGS", "")
  env.update(
      JAX_PLATFORMS="cpu",
      XLA_FLAGS=f"{xla_flags} --xla_force_host_platform_device_count=2",
      PYTHONPATH=os.pathsep.join(
          p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p),
  )
  result = subprocess.run(
      [sys.executable, "-c", _TWO_DEVICE_SCRIPT, ckpt_dir(tmp_path)],
      env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-4000:]
  assert result.stdout.strip().endswith("OK")


def test_close_and_context_manager(tmp_path):
  ckpt = Checkpointer(ckpt_dir(tmp_path))
  with ckpt:
    ckpt.save(1, make_state(), {})
  ckpt.close()  # Idempotent.
  with pytest.raises(RuntimeError, match="closed"):
    ckpt.save(2, make_state(), {})
  with pytest.raises(ValueError):
    Checkpointer(ckpt_dir(tmp_path), max_to_keep=0)


def test_relative_directory_works(tmp_path, monkeypatch):
  """A relative WORKDIR (e.g. `--workdir=workdirs/demo`) must be accepted."""
  monkeypatch.chdir(tmp_path)
  with Checkpointer("runs/checkpoints", max_to_keep=2) as ckpt:
    state = {"w": np.arange(3, dtype=np.float32)}
    assert ckpt.save(1, state, {"index": 1})
    restored, iterator_state, step = ckpt.restore(target=state)
  np.testing.assert_array_equal(restored["w"], state["w"])
  assert step == 1 and iterator_state == {"index": 1}
  assert (tmp_path / "runs" / "checkpoints" / "1").is_dir()
