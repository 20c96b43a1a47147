"""The training loop every launcher shares.

It knows nothing about tasks: a `Task` supplies parameter init, a loss, a
resumable batch iterator and (optionally) evaluation batches and a carried
state. The carried state (`TrainState.carry`) is threaded through the jitted
step and checkpointed: the language model keeps its recurrent memory there
between truncated-BPTT segments, RL keeps environment states there.

Guarantees:
  * data parallel over all devices of `DataMesh` (params replicated, batch and
    carry split on their leading axis);
  * a run on a workdir with checkpoints resumes from the latest one, with the
    iterator where it was, so k steps + k resumed steps == 2k steps;
  * SIGTERM/SIGINT save a checkpoint and return cleanly;
  * a non-finite loss stops the run (NonFiniteLossError names the step) and
    no checkpoint holds parameters computed after it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any, Callable, Iterable, NamedTuple, Protocol

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rmc_jax.training import checkpoint as checkpoint_lib
from rmc_jax.training import config as config_lib
from rmc_jax.training import metrics as metrics_lib
from rmc_jax.training.mesh import DataMesh

Batch = Any
Params = Any
Carry = Any


class BatchIterator(Protocol):
  """An infinite batch iterator whose position can be saved and restored."""

  def __next__(self) -> Batch: ...

  def get_state(self) -> dict: ...

  def set_state(self, state: dict) -> None: ...


@dataclasses.dataclass
class Task:
  """What the loop needs from a task.

  Attributes:
    init: (rng, batch) -> params.
    loss: (params, carry, rng, batch) -> (scalar loss, (metrics, new carry));
      metrics is a dict of scalars averaged over the batch.
    train_iterator: yields host (NumPy) batches with a leading batch axis.
    evaluate: (params, carry, batch) -> (dict of scalar metrics averaged over
      the batch, new carry); the batches of one evaluation are run in order
      with the carry threaded through them (from `init_carry` of the eval
      batch size, or ()), so a language model can carry its state over a
      whole split. A 'weight' entry (e.g. the number of real tokens) weights
      the batch in the average; otherwise batches weigh the same. None
      disables evaluation.
    eval_batches: held-out batches (a fixed set, equal batch sizes).
    init_carry: global batch size -> initial carried state (leading axis =
      batch), or None for stateless tasks.
    observe: called on the host with the averaged training metrics at every
      log step (e.g. to advance a curriculum from the loss); its effect on
      the iterator is checkpointed with the iterator state.
    summarize: host-side metrics -> metrics with derived values (e.g.
      perplexity = exp(loss)), applied to logged train and eval metrics.
  """

  init: Callable[[jax.Array, Batch], Params]
  loss: Callable[[Params, Carry, jax.Array, Batch],
                 tuple[jax.Array, tuple[dict, Carry]]]
  train_iterator: BatchIterator
  evaluate: Callable[[Params, Carry, Batch], tuple[dict, Carry]] | None = None
  eval_batches: Iterable[Batch] = ()
  init_carry: Callable[[int], Carry] | None = None
  observe: Callable[[dict], None] | None = None
  summarize: Callable[[dict], dict] | None = None


class TrainState(NamedTuple):
  step: jax.Array  # int32 scalar: number of updates applied.
  params: Params
  opt_state: Any
  rng: jax.Array  # Raw uint32 key; step t uses fold_in(rng, t).
  carry: Carry


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; the message names the step."""


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


def count_params(params: Params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def train(task: Task, config: ml_collections.ConfigDict, workdir: str,
          mesh: DataMesh | None = None) -> dict:
  """Trains (or resumes) in `workdir`; returns the summary also written to summary.json.

  Raises:
    ValueError: when the batch does not divide over the devices.
    NonFiniteLossError: when the loss stops being finite.
  """
  mesh = mesh or DataMesh()
  mesh.check_batch_size(config.batch_size)
  os.makedirs(workdir, exist_ok=True)
  _save_config(config, workdir)
  optimizer, schedule = config_lib.make_optimizer(config)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                     max_to_keep=config.keep_checkpoints)

  fresh_iterator_state = task.train_iterator.get_state()
  example = next(task.train_iterator)
  state = _init_state(task, config, optimizer, mesh, example)
  shardings = _state_shardings(state, mesh)
  state = jax.device_put(state, shardings)
  num_params = count_params(state.params)

  latest = ckpt.latest_step()
  if latest is not None:
    state, iterator_state, _ = ckpt.restore(latest, target=state)
    task.train_iterator.set_state(iterator_state)
    logging.info("Resumed from %s at step %d.", ckpt.directory, latest)
  else:
    task.train_iterator.set_state(fresh_iterator_state)
    logging.info("Starting from scratch: %s parameters.", f"{num_params:,}")

  train_step = _make_train_step(task, optimizer, schedule, shardings, mesh)
  eval_batches = list(task.eval_batches)
  evaluator = (_Evaluator(task, eval_batches, mesh)
               if task.evaluate is not None and eval_batches else None)
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
      batch = mesh.shard_batch(next(task.train_iterator))
      state, step_metrics = train_step(state, batch)
      window.metrics.append(step_metrics)
      step += 1
      if compile_seconds is None:
        # Keep compilation out of steps/s: time the window from here.
        jax.block_until_ready(step_metrics)
        compile_seconds = time.perf_counter() - start_time
        window.start_time, window.timed_from = time.perf_counter(), step
      # Read the flag once: a signal during this step's sync or eval is
      # handled (with a save) at the next step rather than skipping the save.
      interrupted = stop.requested
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
      if evaluator is not None and (
          step % config.eval_every == 0 or step == config.num_steps):
        last_eval = summarize(evaluator(state.params))
        writer.write(step, "eval", last_eval)
        window.start_time = time.perf_counter()  # Keep eval out of steps/s.
      if step % config.checkpoint_every == 0 or stopping:
        ckpt.save(step, state, task.train_iterator.get_state(), force=True)
        last_saved = step
      if interrupted:
        status = "interrupted"
        logging.warning("Stopped by %s at step %d; checkpoint saved. Run the "
                        "same command to resume.", stop.signal_name, step)
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
        num_devices=mesh.num_devices, wall_seconds=elapsed,
        compile_seconds=compile_seconds,
        steps_per_sec=(step - start_step) / elapsed if elapsed > 0 else None,
        train=last_train, eval=last_eval)
    metrics_lib.write_json(os.path.join(workdir, "summary.json"), summary)
    ckpt.close()
  return summary


def restore_latest(task: Task, config: ml_collections.ConfigDict,
                   workdir: str, mesh: DataMesh | None = None
                   ) -> tuple[TrainState, int]:
  """(TrainState, step) of the latest checkpoint in `workdir`.

  Raises FileNotFoundError when there is none.
  """
  mesh = mesh or DataMesh()
  optimizer, _ = config_lib.make_optimizer(config)
  with checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   max_to_keep=config.keep_checkpoints) as ckpt:
    step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
    example = next(task.train_iterator)
    # Only shapes are needed: trace the init, don't run it.
    shapes = jax.eval_shape(
        lambda: _init_state(task, config, optimizer, mesh, example))
    target = jax.tree.map(
        lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                 sharding=sharding),
        shapes, _state_shardings(shapes, mesh))
    state, _, _ = ckpt.restore(step, target=target)
  return state, step


def evaluate_checkpoint(task: Task, config: ml_collections.ConfigDict,
                        workdir: str, batches: Iterable[Batch], split: str,
                        mesh: DataMesh | None = None) -> dict:
  """Evaluates the latest checkpoint of `workdir` on `batches`.

  Appends a row with `split` to metrics.jsonl and stores the metrics under
  `split` in summary.json. Raises FileNotFoundError without a checkpoint.
  """
  mesh = mesh or DataMesh()
  state, step = restore_latest(task, config, workdir, mesh)
  metrics = _Evaluator(task, list(batches), mesh)(state.params)
  if task.summarize is not None:
    metrics = task.summarize(metrics)
  writer = metrics_lib.MetricWriter(workdir, step, step, progress_bar=False)
  writer.write(step, split, metrics)
  writer.close()
  path = os.path.join(workdir, "summary.json")
  summary = {}
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      summary = json.load(f)
  summary[split] = dict(metrics, step=step)
  metrics_lib.write_json(path, summary)
  return metrics


def _init_state(task: Task, config, optimizer, mesh: DataMesh,
                example: Batch) -> TrainState:
  rng = jax.random.PRNGKey(config.seed)
  init_rng, train_rng = jax.random.split(rng)
  params = jax.jit(task.init)(init_rng, example)
  carry = task.init_carry(config.batch_size) if task.init_carry else ()
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), rng=train_rng,
                    carry=carry)


def _state_shardings(state: TrainState, mesh: DataMesh) -> TrainState:
  rep = lambda tree: jax.tree.map(lambda _: mesh.replicated, tree)
  return TrainState(step=mesh.replicated, params=rep(state.params),
                    opt_state=rep(state.opt_state), rng=mesh.replicated,
                    carry=jax.tree.map(lambda _: mesh.batch_sharding,
                                       state.carry))


def _make_train_step(task: Task, optimizer: optax.GradientTransformation,
                     schedule: optax.Schedule, shardings: TrainState,
                     mesh: DataMesh):
  """The jitted update; the loss is a mean over the global batch, so XLA's
  all-reduce of the gradients makes every device apply the same update."""

  def step_fn(state: TrainState, batch: Batch):
    rng = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(task.loss, has_aux=True)
    (loss, (metrics, carry)), grads = grad_fn(state.params, state.carry, rng,
                                              batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                   learning_rate=schedule(state.step))
    return TrainState(state.step + 1, params, opt_state, state.rng,
                      carry), metrics

  return jax.jit(step_fn, in_shardings=(shardings, mesh.batch_sharding),
                 out_shardings=(shardings, mesh.replicated),
                 donate_argnums=0)


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


class _Evaluator:
  """Runs `task.evaluate` over the eval batches in order, threading the carry."""

  def __init__(self, task: Task, batches: list[Batch], mesh: DataMesh):
    self._batches = batches
    self._mesh = mesh
    batch_size = int(jax.tree.leaves(batches[0])[0].shape[0])
    mesh.check_batch_size(batch_size, "eval batch size")
    self._init_carry = (lambda: task.init_carry(batch_size)) if \
        task.init_carry else (lambda: ())
    self._carry_sharding = jax.tree.map(lambda _: mesh.batch_sharding,
                                        self._init_carry())
    self._fn = jax.jit(task.evaluate,
                       in_shardings=(mesh.replicated, self._carry_sharding,
                                     mesh.batch_sharding),
                       out_shardings=(mesh.replicated, self._carry_sharding))

  def __call__(self, params: Params) -> dict:
    carry = jax.device_put(self._init_carry(), self._carry_sharding)
    results = []
    for batch in self._batches:
      metrics, carry = self._fn(params, carry, self._mesh.shard_batch(batch))
      results.append(metrics)
    host = jax.device_get(results)
    weights = np.array([float(r.pop("weight", 1.0)) for r in host])
    total = max(weights.sum(), 1e-12)
    return {k: float(np.dot(weights, [r[k] for r in host]) / total)
            for k in host[0]}


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
