"""The training loop: `train(task, config, workdir)`.

It knows nothing about tasks (see `rmc_jax.training.task.Task`) and is built
from the public pieces of `rmc_jax.training.steps`. The carried state
(`TrainState.carry`) is threaded through the jitted step and checkpointed: the
language model keeps its recurrent memory there between truncated-BPTT
segments, RL keeps environment states there.

Guarantees:
  * data parallel over all devices of `DataMesh` (params replicated, batch and
    carry split on their leading axis);
  * a run on a workdir with checkpoints resumes from the latest one, with the
    iterator where it was, so k steps + k resumed steps == 2k steps;
  * SIGTERM/SIGINT save a checkpoint and return cleanly (several processes
    agree on the step to stop at: the next log or checkpoint step after
    the signal reached any of them);
  * several processes (`jax.distributed`): each feeds its own rows of the
    batch, all take part in every checkpoint (one per step), and only
    process 0 writes metrics, TensorBoard, config.json and summary.json;
    a run resumes on any number of processes and devices that divides the
    batch (the batches do not depend on them);
  * a non-finite loss stops the run (NonFiniteLossError names the step) and
    no checkpoint holds parameters computed after it;
  * the final evaluations (every split of `task.eval_splits`) use the
    parameters in memory at the end of training.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from rmc_jax.training import checkpoint as checkpoint_lib
from rmc_jax.training import metrics as metrics_lib
from rmc_jax.training.mesh import DataMesh
from rmc_jax.training.steps import abstract_train_state
from rmc_jax.training.steps import count_params
from rmc_jax.training.steps import Evaluator
from rmc_jax.training.steps import init_train_state
from rmc_jax.training.steps import make_train_step
from rmc_jax.training.steps import TrainState
from rmc_jax.training.task import Params, Task

EVAL_SPLIT = "eval"  # The split evaluated during training.

# How many train steps the host may dispatch ahead of the devices. One or two
# hide the dispatch; a long queue buys nothing and, on XLA:CPU with several
# processes (gloo), deadlocked in a collective every few hundred steps (a
# local device's step waiting for a launch queued behind it; see
# WORKSPACE_NOTES.md, "Many hosts"). Other programs with collectives (the stop
# agreement, evaluation) start only once every queued step has finished.
_MAX_STEPS_AHEAD = 2


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; the message names the step."""


@dataclasses.dataclass
class TrainResult:
  """What `train` returns: the summary (also in summary.json) and the state."""

  summary: dict
  state: TrainState


@dataclasses.dataclass
class _Window:
  """Metrics of the steps since the last host sync (still on device)."""

  start_step: int
  start_time: float
  metrics: list[dict] = dataclasses.field(default_factory=list)
  timed_from: int | None = None  # First step counted in steps/s.

  @property
  def timed_steps(self) -> int:
    return len(self.metrics) - ((self.timed_from or self.start_step)
                                - self.start_step)


def train(task: Task, config: ml_collections.ConfigDict, workdir: str,
          mesh: DataMesh | None = None) -> TrainResult:
  """Trains (or resumes) in `workdir`.

  When training completes, every split of `task.eval_splits` is evaluated on
  the final parameters and recorded under its name in metrics.jsonl and
  summary.json.

  A damaged newest checkpoint is moved aside and the newest readable one
  resumed (see `Checkpointer.restore_latest_good`).

  Raises:
    ValueError: when the batch does not divide over the devices.
    NonFiniteLossError: when the loss stops being finite.
    CheckpointMismatchError: the checkpoints hold another model.
    CheckpointDamagedError: no checkpoint can be read back.
    CheckpointDirError, CheckpointSaveError: the run directory is unusable.
  """
  mesh = mesh or DataMesh()
  mesh.check_batch_size(config.batch_size)
  workdir = checkpoint_lib.ensure_writable_dir(workdir)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                     max_to_keep=config.keep_checkpoints)
  try:
    latest = None
    if ckpt.latest_step() is not None:
      restored = ckpt.restore_latest_good(
          abstract_train_state(task, config, mesh))
      state, latest = restored.state, restored.step
      if task.train_iterator is not None:
        task.train_iterator.set_state(restored.iterator_state)
      logging.info("Resumed from %s at step %d.", ckpt.directory, latest)
    else:
      state = init_train_state(task, config, mesh)
  except BaseException:
    ckpt.close()
    raise
  # After the restore: a checkpoint of another model leaves config.json as
  # it was (the config that the error message points to).
  _save_config(config, workdir)
  num_params = count_params(state.params)
  if latest is None:
    logging.info("Starting from scratch: %s parameters.", f"{num_params:,}")

  train_step = make_train_step(task, config, mesh, state)
  evaluator = Evaluator(task, mesh) if task.evaluate is not None else None
  periodic_eval = (task.eval_splits.get(EVAL_SPLIT) if evaluator is not None
                   else None)
  summarize = task.summarize or (lambda m: m)

  step = int(state.step)
  writer = metrics_lib.MetricWriter(workdir, config.num_steps, step)
  stop = _StopSignal()
  last_saved = latest
  window = _Window(step, time.perf_counter())
  last_train, last_eval, rates = {}, {}, {}
  status = "completed"
  start_time, start_step = time.perf_counter(), step
  compile_seconds = None
  try:
    while step < config.num_steps:
      batch = (() if task.train_iterator is None
               else mesh.shard_batch(next(task.train_iterator)))
      state, step_metrics = train_step(state, batch)
      window.metrics.append(step_metrics)
      if len(window.metrics) > _MAX_STEPS_AHEAD:
        jax.block_until_ready(window.metrics[-1 - _MAX_STEPS_AHEAD])
      step += 1
      if compile_seconds is None:
        # Keep compilation out of steps/s: time the window from here.
        jax.block_until_ready(step_metrics)
        compile_seconds = time.perf_counter() - start_time
        window.start_time, window.timed_from = time.perf_counter(), step
      # Read the flag once: a signal during this step's sync or eval is
      # handled (with a save) at the next step rather than skipping the save.
      interrupted = stop.requested
      if jax.process_count() > 1:
        # All processes must stop (and save) at the same step, or they wait
        # for each other in the save: they agree on the flag at the steps
        # that sync anyway (log and checkpoint steps).
        interrupted = (step % config.log_every == 0
                       or step % config.checkpoint_every == 0) and \
            _any_process(interrupted, state)
      stopping = interrupted or step == config.num_steps
      if step % config.log_every == 0 or stopping or \
          step % config.checkpoint_every == 0:
        # Syncing here also proves every loss so far finite before any save.
        logged, rates = _flush(window, step, config.batch_size)
        window = _Window(step, time.perf_counter())
        if step % config.log_every == 0 or stopping:
          last_train = summarize(dict(logged, **rates))
          writer.write(step, "train", last_train)
          if task.observe is not None:
            task.observe(last_train)
      if periodic_eval is not None and (
          step % config.eval_every == 0 or step == config.num_steps):
        last_eval = summarize(evaluator(state.params, periodic_eval))
        writer.write(step, EVAL_SPLIT, last_eval)
        window.start_time = time.perf_counter()  # Keep eval out of steps/s.
      if step % config.checkpoint_every == 0 or stopping:
        ckpt.save(step, state, task.iterator_state(), force=True)
        last_saved = step
      if interrupted:
        status = "interrupted"
        logging.warning("Stopped by %s at step %d; checkpoint saved. Run the "
                        "same command to resume.",
                        stop.signal_name or "a signal to another process",
                        step)
        break
  except NonFiniteLossError as e:
    status = "non_finite_loss"
    raise NonFiniteLossError(
        f"{e} Last good checkpoint: "
        f"{'none' if last_saved is None else f'step {last_saved}'} in "
        f"{ckpt.directory}.") from None
  finally:
    stop.restore()
    writer.close()
    elapsed = time.perf_counter() - start_time
    summary = dict(
        status=status, step=step, num_steps=config.num_steps,
        num_params=num_params, core=config.core,
        num_devices=mesh.num_devices, num_processes=jax.process_count(), wall_seconds=elapsed,
        compile_seconds=compile_seconds,
        steps_per_sec=(step - start_step) / elapsed if elapsed > 0 else None,
        train=last_train, eval=last_eval)
    metrics_lib.write_json(os.path.join(workdir, "summary.json"), summary)
    ckpt.close()
  if status == "completed" and evaluator is not None:
    final = {split: batches for split, batches in task.eval_splits.items()
             if split != EVAL_SPLIT}
    summary.update(evaluate_and_record(task, state.params, step, workdir,
                                       final, mesh, evaluator))
  return TrainResult(summary=summary, state=state)


def evaluate_and_record(task: Task, params: Params, step: int, workdir: str,
                        splits: dict[str, Any], mesh: DataMesh,
                        evaluator: Evaluator | None = None) -> dict[str, dict]:
  """Evaluates `params` on each split and records it at `step`.

  Appends a row per split to metrics.jsonl and stores the metrics (with the
  step) under the split's name in summary.json. Returns {split: metrics}.
  """
  evaluator = evaluator or Evaluator(task, mesh)
  summarize = task.summarize or (lambda m: m)
  results = {split: dict(summarize(evaluator(params, batches)), step=step)
             for split, batches in splits.items()}
  if not results or jax.process_index() != 0:
    return results
  writer = metrics_lib.MetricWriter(workdir, step, step, progress_bar=False)
  for split, metrics in results.items():
    writer.write(step, split, metrics)
  writer.close()
  path = os.path.join(workdir, "summary.json")
  summary = {}
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      summary = json.load(f)
  summary.update(results)
  metrics_lib.write_json(path, summary)
  return results


def evaluate_run(task: Task, config: ml_collections.ConfigDict, workdir: str,
                 mesh: DataMesh | None = None) -> dict[str, dict]:
  """Evaluates the newest readable checkpoint of `workdir` on every split.

  The checkpoints are only read (a damaged newest one is skipped, not
  moved); the results are recorded as by `evaluate_and_record`.

  Raises:
    FileNotFoundError: no checkpoint.
    CheckpointMismatchError: the checkpoints hold another model than
      `config` builds.
    CheckpointDamagedError: no checkpoint can be read back.
  """
  mesh = mesh or DataMesh()
  with checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   read_only=True) as ckpt:
    restored = ckpt.restore_latest_good(
        abstract_train_state(task, config, mesh))
  return evaluate_and_record(task, restored.state.params, restored.step,
                             workdir, dict(task.eval_splits), mesh)


def _any_process(flag: bool, state: TrainState) -> bool:
  """True on every process if `flag` is True on any (a collective).

  Starts once the steps that produce `state` have finished on every local
  device (see _MAX_STEPS_AHEAD).
  """
  jax.block_until_ready(state)
  return bool(multihost_utils.process_allgather(np.int32(flag)).any())


def _flush(window: _Window, step: int,
           batch_size: int) -> tuple[dict, dict]:
  """Pulls the window's metrics to the host, checks the loss, averages."""
  host = jax.device_get(window.metrics)
  elapsed = time.perf_counter() - window.start_time
  for offset, m in enumerate(host):
    loss = float(m["loss"])
    if not math.isfinite(loss):
      raise NonFiniteLossError(
          f"Non-finite loss ({loss}) at step {window.start_step + offset + 1}.")
  mean = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
  n = window.timed_steps
  rates = (dict(steps_per_sec=n / elapsed,
                examples_per_sec=n * batch_size / elapsed) if n else {})
  return mean, rates


def _save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  path = os.path.join(workdir, "config.json")
  new = config.to_json_best_effort(indent=2, sort_keys=True)
  if os.path.exists(path) and jax.process_index() == 0:
    with open(path, encoding="utf-8") as f:
      old = f.read()
    if old.strip() != new.strip():
      os.replace(path, os.path.join(workdir, f"config.{int(time.time())}.json"))
      logging.warning("The config differs from the one saved in %s; the old "
                      "one was kept beside it.", path)
  if jax.process_index() == 0:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      f.write(new + "\n")
    os.replace(path + ".tmp", path)


class _StopSignal:
  """Turns SIGTERM/SIGINT into a flag the loop checks after every step."""

  def __init__(self):
    self.requested = False
    self.signal_name = None
    self._previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # Not the main thread: leave signals alone.
        pass

  def _handle(self, signum, frame):
    del frame
    self.requested = True
    self.signal_name = signal.Signals(signum).name

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
