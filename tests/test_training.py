"""Tests for the shared training stack (rmc_jax.training) on Nth-farthest.

Covers the guarantees the loop documents: data parallelism over a DataMesh
equals one device, k steps + k resumed steps == 2k steps, a non-finite loss
stops the run without checkpointing anything computed after it, SIGTERM leaves
a restorable checkpoint, plus the optimiser schedule and config validation.

Models are tiny and runs a few steps long: the machine has 2 shared cores. The
in-process loop tests use a small LSTM because it compiles several times faster
than the RMC and the loop does not depend on the core; the multi-device
loss/gradient check and the SIGTERM test use a small RMC.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest


from rmc_jax.experiments import nth_farthest as nth_experiment
from rmc_jax.tasks import nth_farthest
from rmc_jax.training import config as config_lib
from rmc_jax.training import loop
from rmc_jax.training import runs
from rmc_jax.training import steps
from rmc_jax.training.checkpoint import Checkpointer
from rmc_jax.training.mesh import DataMesh
from tests.helpers import REPO_ROOT, TINY_NTH_FLAGS, subprocess_env

def tiny_config(core: str = "rmc", **overrides):
  """The launcher's `cpu` variant shrunk to a model that compiles quickly."""
  c = nth_experiment.get_config("cpu")
  c.core = core
  c.batch_size = 16
  c.num_objects = 3
  c.num_features = 2
  c.mlp_sizes = (16,)
  c.rmc.update(mem_slots=2, head_size=8, num_heads=2)
  c.lstm.hidden_sizes = (8,)
  c.eval_batches = 1
  c.eval_batch_size = 16
  c.log_every = 1
  c.eval_every = 1000
  c.checkpoint_every = 1000
  c.update(overrides)
  return c


def restore_checkpoint(workdir: str, config, step: int | None = None):
  """(state, iterator_state, step) restored from WORKDIR/checkpoints into the
  abstract state the loop builds (nothing is computed)."""
  target = steps.abstract_train_state(nth_experiment.make_task(config),
                                      config, DataMesh())
  with Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    return ckpt.restore(step, target=target)


def checkpoint_steps(workdir: str) -> list[int]:
  with Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    return ckpt.all_steps()


def rows(workdir: str, split: str) -> list[dict]:
  return [r for r in runs.read_jsonl(
      os.path.join(workdir, "metrics.jsonl")) if r["split"] == split]


def read_summary(workdir: str) -> dict:
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    return json.load(f)


def max_abs_diff(a, b) -> float:
  diffs = jax.tree.map(
      lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) -
                                       np.asarray(y, np.float64)), initial=0)),
      a, b)
  return max(jax.tree.leaves(diffs), default=0.0)


def adam_state(opt_state) -> optax.ScaleByAdamState:
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
  (adam,) = [s for s in jax.tree.leaves(opt_state, is_leaf=is_adam)
             if is_adam(s)]
  return adam


# -- 1a. Data parallelism: 8 devices == 1 device ------------------------------


def _multi_device_main(tmpdir: str) -> dict:
  """Runs in a subprocess with 8 fake CPU devices; returns results as JSON."""
  devices = jax.devices()
  out = dict(num_devices=len(devices))

  # Loss and gradients of one global batch, sharded over 8 devices or on 1.
  config = tiny_config("rmc")
  task = nth_experiment.make_task(config)
  batch = task.train_iterator.iterator.batch_at(0)
  params = jax.jit(task.init)(jax.random.PRNGKey(1), batch)
  rng = jax.random.PRNGKey(2)
  grad_fn = jax.jit(jax.value_and_grad(
      lambda p, b: task.loss(p, (), rng, b)[0]))
  losses, grads = {}, {}
  for n in (8, 1):
    mesh = DataMesh(devices[:n])
    sharded = mesh.shard_batch(batch)
    loss, g = grad_fn(mesh.replicate(params), sharded)
    losses[n], grads[n] = float(loss), jax.tree.map(np.asarray, g)
    out[f"batch_devices_{n}"] = len(sharded[0].sharding.device_set)
    out[f"shard_rows_{n}"] = sorted(
        {s.data.shape[0] for s in sharded[0].addressable_shards})
  out["loss"] = losses
  out["grad_diff"] = max_abs_diff(grads[8], grads[1])
  out["grad_max"] = max(float(np.max(np.abs(x)))
                        for x in jax.tree.leaves(grads[1]))

  # Whole training runs: same losses, same final parameters. These use the
  # LSTM: in the RMC the key half of qkv_layer_norm's offset has an exactly
  # zero gradient (softmax ignores a shift common to all keys), and Adam,
  # which divides by the gradient's own scale, turns the ~1e-9 reduction-order
  # noise there into steps of up to the learning rate that differ between the
  # device counts (~1e-4 apart after 4 steps): nothing to do with the loop.
  runs = {}
  for n in (8, 1):
    cfg = tiny_config("lstm", num_steps=4, log_every=1, checkpoint_every=2,
                      eval_every=2)
    workdir = os.path.join(tmpdir, f"devices{n}")
    summary = loop.train(nth_experiment.make_task(cfg), cfg, workdir,
                         DataMesh(devices[:n])).summary
    state, iterator_state, step = restore_checkpoint(workdir, cfg)
    runs[n] = dict(summary=summary, state=state, step=step,
                   iterator_state=iterator_state,
                   midway=restore_checkpoint(workdir, cfg, step=2)[0],
                   train=[(r["step"], r["loss"], r["grad_norm"], r["accuracy"])
                          for r in rows(workdir, "train")],
                   eval=[(r["step"], r["loss"], r["accuracy"])
                         for r in rows(workdir, "eval")])
  out["train_rows"] = {n: r["train"] for n, r in runs.items()}
  out["eval_rows"] = {n: r["eval"] for n, r in runs.items()}
  out["summary_devices"] = {n: r["summary"]["num_devices"]
                            for n, r in runs.items()}
  out["ckpt_step"] = {n: r["step"] for n, r in runs.items()}
  out["iterator_state"] = {n: r["iterator_state"] for n, r in runs.items()}
  out["param_diff"] = max_abs_diff(runs[8]["state"].params,
                                   runs[1]["state"].params)
  out["opt_state_diff"] = max_abs_diff(runs[8]["state"].opt_state,
                                       runs[1]["state"].opt_state)
  out["param_change"] = max_abs_diff(runs[1]["state"].params,
                                     runs[1]["midway"].params)

  # A batch that does not split over the devices is refused up front.
  errors = {}
  try:
    DataMesh(devices).check_batch_size(12)
  except ValueError as e:
    errors["check_batch_size"] = str(e)
  bad = tiny_config("rmc", batch_size=12, num_steps=1)
  bad_workdir = os.path.join(tmpdir, "bad_batch")
  try:
    loop.train(nth_experiment.make_task(bad), bad, bad_workdir, DataMesh(devices))
  except ValueError as e:
    errors["train"] = str(e)
  out["errors"] = errors
  out["bad_workdir_created"] = os.path.exists(bad_workdir)
  DataMesh(devices).check_batch_size(16)  # Divides: no error.
  return out


@pytest.fixture(scope="module")
def multi_device(tmp_path_factory):
  tmpdir = str(tmp_path_factory.mktemp("multi_device"))
  code = ("import json, sys\n"
          "from tests.test_training import _multi_device_main\n"
          "print('RESULT=' + json.dumps(_multi_device_main(sys.argv[1])))\n")
  proc = subprocess.run([sys.executable, "-c", code, tmpdir], cwd=REPO_ROOT,
                        env=subprocess_env(8), capture_output=True, text=True,
                        timeout=400, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT=")]
  return json.loads(line[len("RESULT="):])


def test_multi_device_loss_and_grads_match_one_device(multi_device):
  r = multi_device
  assert r["num_devices"] == 8
  # The batch really is split: 16 rows as 8 shards of 2 (vs 1 shard of 16).
  assert r["batch_devices_8"] == 8 and r["shard_rows_8"] == [2]
  assert r["batch_devices_1"] == 1 and r["shard_rows_1"] == [16]
  loss8, loss1 = r["loss"]["8"], r["loss"]["1"]
  assert math.isfinite(loss1) and loss1 > 0
  assert abs(loss8 - loss1) <= 1e-5, (loss8, loss1)
  assert r["grad_max"] > 1e-3  # Non-trivial gradients are being compared.
  assert r["grad_diff"] <= 1e-5, r["grad_diff"]


def test_multi_device_training_matches_one_device(multi_device):
  r = multi_device
  assert r["summary_devices"] == {"8": 8, "1": 1}
  assert r["ckpt_step"] == {"8": 4, "1": 4}
  assert r["iterator_state"]["8"] == r["iterator_state"]["1"] == {
      "seed": 0, "index": 4}
  train8, train1 = r["train_rows"]["8"], r["train_rows"]["1"]
  assert [row[0] for row in train1] == [1, 2, 3, 4]
  assert [row[0] for row in train8] == [1, 2, 3, 4]
  np.testing.assert_allclose(np.array(train8)[:, 1:], np.array(train1)[:, 1:],
                             rtol=0, atol=1e-5)
  eval8, eval1 = r["eval_rows"]["8"], r["eval_rows"]["1"]
  assert [row[0] for row in eval1] == [2, 4]
  np.testing.assert_allclose(np.array(eval8), np.array(eval1), rtol=0,
                             atol=1e-5)
  assert r["param_change"] > 1e-4  # Steps 3-4 moved the parameters...
  assert r["param_diff"] <= 1e-5, r["param_diff"]  # ...identically.
  assert r["opt_state_diff"] <= 1e-5, r["opt_state_diff"]


def test_batch_that_does_not_divide_is_refused(multi_device):
  errors = multi_device["errors"]
  assert set(errors) == {"check_batch_size", "train"}
  for message in errors.values():
    assert "batch_size=12" in message and "8" in message, message
  assert not multi_device["bad_workdir_created"]


# -- 1b. Resume equivalence ---------------------------------------------------


def test_resumed_run_equals_uninterrupted_run(tmp_path):
  k = 3
  straight = str(tmp_path / "straight")
  resumed = str(tmp_path / "resumed")

  def run(workdir, num_steps):
    cfg = tiny_config("lstm", num_steps=num_steps, log_every=1,
                      checkpoint_every=k)
    # A fresh task each time, as a relaunched process would build it.
    return loop.train(nth_experiment.make_task(cfg), cfg, workdir).summary

  assert run(straight, 2 * k)["step"] == 2 * k
  assert run(resumed, k)["step"] == k
  assert checkpoint_steps(resumed) == [k]
  summary = run(resumed, 2 * k)
  assert summary["status"] == "completed" and summary["step"] == 2 * k

  straight_train = rows(straight, "train")
  resumed_train = rows(resumed, "train")
  # The second run continued at step k + 1 rather than starting again.
  assert [r["step"] for r in resumed_train] == list(range(1, 2 * k + 1))
  assert [r["step"] for r in straight_train] == list(range(1, 2 * k + 1))
  for key in ("loss", "grad_norm", "accuracy"):
    np.testing.assert_allclose([r[key] for r in resumed_train],
                               [r[key] for r in straight_train],
                               rtol=0, atol=1e-6, err_msg=key)
  (straight_eval,) = [r for r in rows(straight, "eval") if r["step"] == 2 * k]
  (resumed_eval,) = [r for r in rows(resumed, "eval") if r["step"] == 2 * k]
  assert resumed_eval["loss"] == pytest.approx(straight_eval["loss"], abs=1e-6)

  # The changed num_steps was recorded; the first config was kept beside it.
  saved = {}
  for name in os.listdir(resumed):
    if name.startswith("config.") and name.endswith(".json"):
      with open(os.path.join(resumed, name), encoding="utf-8") as f:
        saved[name] = json.load(f)["num_steps"]
  assert saved.pop("config.json") == 2 * k
  assert list(saved.values()) == [k]

  cfg = tiny_config("lstm")
  state_a, iter_a, step_a = restore_checkpoint(straight, cfg)
  state_b, iter_b, step_b = restore_checkpoint(resumed, cfg)
  assert step_a == step_b == 2 * k
  assert iter_a == iter_b == {"seed": 0, "index": 2 * k}
  assert int(state_b.step) == 2 * k
  assert int(adam_state(state_b.opt_state).count) == 2 * k
  assert max_abs_diff(state_a.params, state_b.params) <= 1e-6
  assert max_abs_diff(state_a.opt_state, state_b.opt_state) <= 1e-6
  np.testing.assert_array_equal(state_a.rng, state_b.rng)
  # The parameters did change over the second half (not a trivial match).
  state_k, _, _ = restore_checkpoint(straight, cfg, step=k)
  assert max_abs_diff(state_k.params, state_a.params) > 1e-5


# -- 1c. A non-finite loss stops the run -------------------------------------


class _PoisonedIterator:
  """The Nth-farthest train iterator with NaN inputs in batch `bad_index`."""

  def __init__(self, inner: nth_farthest.NthFarthestIterator, bad_index: int):
    self._inner = inner
    self._bad_index = bad_index

  def __iter__(self):
    return self

  def __next__(self):
    index = self._inner.get_state()["index"]
    inputs, labels = next(self._inner)
    if index == self._bad_index:
      inputs = np.full_like(inputs, np.nan)
    return inputs, labels

  def get_state(self):
    return self._inner.get_state()

  def set_state(self, state):
    self._inner.set_state(state)


def test_non_finite_loss_stops_before_checkpointing_it(tmp_path):
  workdir = str(tmp_path)
  # Checkpoints at 3 and 6; batch index 7 is consumed by step 8. With
  # log_every > num_steps the loss is only checked when syncing for the
  # checkpoint at step 9, so the error must find step 8 inside that window.
  cfg = tiny_config("lstm", num_steps=12, log_every=100, checkpoint_every=3,
                    eval_every=100)
  task = nth_experiment.make_task(cfg)
  task.train_iterator = _PoisonedIterator(task.train_iterator, bad_index=7)
  with pytest.raises(loop.NonFiniteLossError) as info:
    loop.train(task, cfg, workdir)
  message = str(info.value)
  assert re.search(r"\bat step 8\b", message), message
  assert "Last good checkpoint: step 6" in message, message

  assert checkpoint_steps(workdir) == [3, 6]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  state, iterator_state, step = restore_checkpoint(workdir, cfg)
  assert step == 6 and int(state.step) == 6
  assert iterator_state == {"seed": 0, "index": 6}
  for leaf in jax.tree.leaves((state.params, state.opt_state)):
    assert np.all(np.isfinite(leaf))
  assert read_summary(workdir)["status"] == "non_finite_loss"


# -- 1d. SIGTERM leaves a restorable checkpoint -------------------------------


def _has_train_row(path: str) -> bool:
  if not os.path.exists(path):
    return False
  with open(path, encoding="utf-8") as f:
    return '"split": "train"' in f.read()


def test_sigterm_saves_a_restorable_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  cmd = [sys.executable, "-m", "launch.train",
         "--config=nth_farthest:cpu", f"--workdir={workdir}",
         "--config.num_steps=100000", "--config.log_every=2",
         "--config.eval_every=100000", "--config.checkpoint_every=100000",
         *TINY_NTH_FLAGS]
  with open(tmp_path / "stderr.txt", "w+", encoding="utf-8") as stderr:
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=stderr)
    try:
      deadline = time.monotonic() + 240
      while not _has_train_row(metrics_path):
        assert proc.poll() is None, "launcher exited before training"
        assert time.monotonic() < deadline, "no training progress in time"
        time.sleep(0.2)
      proc.send_signal(signal.SIGTERM)
      returncode = proc.wait(timeout=60)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
    stderr.seek(0)
    log = stderr.read()
  assert returncode == 0, log[-4000:]
  assert "Traceback" not in log

  summary = read_summary(workdir)
  assert summary["status"] == "interrupted", summary
  step = summary["step"]
  assert 0 < step < 100000
  # The stop itself was logged.
  assert rows(workdir, "train")[-1]["step"] == step

  state, iterator_state, restored_step = restore_checkpoint(
      workdir, tiny_config("rmc"))
  assert restored_step == step
  assert int(state.step) == step
  assert int(adam_state(state.opt_state).count) == step
  assert iterator_state == {"seed": 0, "index": step}
  for leaf in jax.tree.leaves(state.params):
    assert np.all(np.isfinite(leaf))


class _SignalDuringEval(DataMesh):
  """A DataMesh that sends SIGTERM to this process when placing an eval batch.

  Evaluation runs after the loop has decided whether this step saves, so the
  signal lands in the middle of a step, as a real one can.
  """

  def __init__(self, eval_batch_size: int):
    super().__init__()
    self._eval_batch_size = eval_batch_size
    self.sent = 0

  def shard_batch(self, batch):
    if batch[0].shape[0] == self._eval_batch_size and not self.sent:
      self.sent += 1
      os.kill(os.getpid(), signal.SIGTERM)
    return super().shard_batch(batch)


def test_sigterm_in_the_middle_of_a_step_still_saves(tmp_path):
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("signal handlers need the main thread")
  workdir = str(tmp_path)
  cfg = tiny_config("lstm", num_steps=20, log_every=100, eval_every=5,
                    checkpoint_every=100, eval_batch_size=8)
  mesh = _SignalDuringEval(eval_batch_size=8)
  received = []
  # Catches the signal should train() not handle it, instead of killing pytest.
  previous = signal.signal(signal.SIGTERM, lambda *_: received.append(1))
  try:
    summary = loop.train(nth_experiment.make_task(cfg), cfg, workdir,
                         mesh).summary
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert mesh.sent == 1 and not received
  assert summary["status"] == "interrupted"
  step = summary["step"]
  assert 5 <= step < 20
  # The loop's promise: SIGTERM saves a checkpoint (at the step it stops at).
  assert checkpoint_steps(workdir) == [step]
  state, iterator_state, _ = restore_checkpoint(workdir, cfg)
  assert int(state.step) == step
  assert iterator_state == {"seed": 0, "index": step}


# -- 1e. Gradient accumulation ------------------------------------------------


def test_accumulated_micro_batches_make_the_big_batch_update():
  """grad_accum_steps=4 on a batch of 16 == one batch of 16, step for step."""
  mesh = DataMesh()
  states = {}
  for k in (1, 4):
    cfg = tiny_config("lstm", grad_accum_steps=k, grad_clip_norm=1.0)
    task = nth_experiment.make_task(cfg)
    state = steps.init_train_state(task, cfg, mesh)
    train_step = steps.make_train_step(task, cfg, mesh, state)
    losses = []
    for _ in range(3):
      state, metrics = train_step(state,
                                  mesh.shard_batch(next(task.train_iterator)))
      losses.append((float(metrics["loss"]), float(metrics["accuracy"]),
                     float(metrics["grad_norm"])))
    states[k] = (jax.device_get(state), losses)
  np.testing.assert_allclose(states[4][1], states[1][1], rtol=1e-5, atol=1e-6)
  assert max_abs_diff(states[4][0].params, states[1][0].params) <= 1e-6
  assert max_abs_diff(states[4][0].opt_state, states[1][0].opt_state) <= 1e-6
  initial = steps.init_train_state(task, cfg, mesh).params
  assert max_abs_diff(states[4][0].params, initial) > 1e-4  # It moved.
  bad = tiny_config("lstm", grad_accum_steps=3)
  with pytest.raises(config_lib.ConfigError, match="grad_accum_steps=3"):
    config_lib.validate(bad)


# -- 1f. Config: the schedule and validation ----------------------------------


def sonnet_learning_rate(t, lr, min_lr, decay_steps=10_000, rate=0.9):
  return max(lr * rate ** (t / decay_steps), min_lr)


@pytest.mark.parametrize("min_lr", [8e-5, 0.0])
def test_schedule_is_sonnets(min_lr):
  config = config_lib.base_config("nth_farthest")
  config.learning_rate = 1e-4
  config.min_learning_rate = min_lr
  config.lr_decay_steps = 10_000
  config.lr_decay_rate = 0.9
  _, schedule = config_lib.make_optimizer(config)
  # 0.9**(t/1e4) reaches 0.8 near t = 21180: the floor binds after that.
  for t in (0, 1, 5_000, 10_000, 20_000, 21_000, 22_000, 50_000, 200_000):
    expected = sonnet_learning_rate(t, 1e-4, min_lr)
    assert float(schedule(t)) == pytest.approx(expected, rel=1e-5), t
  if min_lr:
    assert float(schedule(50_000)) == pytest.approx(min_lr, rel=1e-6)


def test_cpu_and_paper_schedules():
  cpu = nth_experiment.get_config("cpu")
  _, schedule = config_lib.make_optimizer(cpu)
  for t in (0, 100_000):
    assert float(schedule(t)) == pytest.approx(5e-4, rel=1e-6)
  paper = nth_experiment.get_config("paper")
  _, schedule = config_lib.make_optimizer(paper)
  for t in (0, 15_000, 40_000):
    assert float(schedule(t)) == pytest.approx(
        sonnet_learning_rate(t, 1e-4, 8e-5), rel=1e-5)


def test_optimizer_steps_by_the_scheduled_learning_rate():
  config = config_lib.base_config("nth_farthest")
  config.learning_rate = 1e-2
  config.min_learning_rate = 0.0
  config.lr_decay_steps = 10
  config.lr_decay_rate = 0.5
  optimizer, _ = config_lib.make_optimizer(config)
  params = {"w": jnp.zeros(3)}
  grads = {"w": jnp.array([2.0, -3.0, 0.5])}
  state = optimizer.init(params)
  for t in range(3):
    updates, state = optimizer.update(grads, state, params)
    # A constant gradient makes Adam's step -lr(t) * sign(g).
    np.testing.assert_allclose(updates["w"],
                               -1e-2 * 0.5 ** (t / 10) * np.sign(grads["w"]),
                               rtol=1e-4)


def test_gradient_clipping_happens_before_adam():
  params = {"w": jnp.zeros(2)}
  grads = {"w": jnp.array([3.0, 4.0])}  # Global norm 5.
  for clip_norm, seen in ((1.0, [0.6, 0.8]), (0.0, [3.0, 4.0])):
    config = config_lib.base_config("nth_farthest")
    config.grad_clip_norm = clip_norm
    optimizer, _ = config_lib.make_optimizer(config)
    _, state = optimizer.update(grads, optimizer.init(params), params)
    adam = adam_state(state)
    # Adam's first moment after one step is (1 - b1) * the gradient it saw.
    np.testing.assert_allclose(adam.mu["w"], 0.1 * np.array(seen), rtol=1e-6)


@pytest.mark.parametrize("field,value", [
    ("num_steps", 0),
    ("batch_size", -1),
    ("log_every", 0),
    ("checkpoint_every", 0),
    ("core", "bogus"),
])
def test_validate_names_the_bad_field(field, value):
  config = nth_experiment.get_config("cpu")
  config_lib.validate(config)  # The shipped config is valid...
  config[field] = value
  with pytest.raises(config_lib.ConfigError, match=rf"--config\.{field}="):
    config_lib.validate(config)


def test_validate_rejects_bad_learning_rates():
  for field, value in (("learning_rate", 0.0), ("min_learning_rate", -1.0),
                       ("grad_clip_norm", -1.0)):
    config = config_lib.base_config("nth_farthest")
    config[field] = value
    with pytest.raises(config_lib.ConfigError, match=field):
      config_lib.validate(config)
