"""The public pieces of a training run: its state, train step and evaluator.

  task = experiments.make_task(config)
  mesh = DataMesh()
  state = init_train_state(task, config, mesh)
  train_step = make_train_step(task, config, mesh, state)
  state, metrics = train_step(state, mesh.shard_batch(next(task.train_iterator)))
  eval_metrics = Evaluator(task, mesh)(state.params, task.eval_splits["eval"])

`rmc_jax.training.loop.train` is these plus checkpoints, logging and
signals; benchmarks, tests and notebooks call the same functions.
"""

from __future__ import annotations

from typing import Any, Iterable, NamedTuple

import itertools
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import optax

from rmc_jax.training import config as config_lib
from rmc_jax.training.mesh import DATA_AXIS, DataMesh
from rmc_jax.training.task import Batch, Carry, Params, Task


class TrainState(NamedTuple):
  """Everything a training step updates; checkpointed as one pytree."""

  step: jax.Array  # int32 scalar: number of updates applied.
  params: Params
  opt_state: Any
  rng: jax.Array  # Raw uint32 key; step t uses fold_in(rng, t).
  carry: Carry  # Task-specific carried state, leading axis = batch (or ()).


def count_params(params: Params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def _fresh_state(task: Task, config: ml_collections.ConfigDict,
                 example: Batch) -> TrainState:
  optimizer, _ = config_lib.make_optimizer(config)
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  params = task.init(init_rng, example)
  carry = task.init_carry(config.batch_size) if task.init_carry else ()
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), rng=train_rng,
                    carry=carry)


# With `shard_params`, arrays of at least this many elements are split over
# the devices; smaller ones (biases, layer norms, Adam's step count) stay
# replicated: splitting them saves little memory and costs a collective each.
SHARD_MIN_ELEMENTS = 2**16


def _tiles(mesh: DataMesh, n0: int, n1: int) -> jax.sharding.Mesh:
  """The devices of `mesh`, in the same order, as an n0 x n1 grid."""
  return jax.sharding.Mesh(
      np.asarray(mesh.mesh.devices).reshape(n0, n1),
      (f"{DATA_AXIS}_0", f"{DATA_AXIS}_1"),
      axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _split_sharding(leaf: Any, mesh: DataMesh) -> NamedSharding:
  """Where `leaf` lives when split over the n devices of `mesh`.

  The first that fits: along its largest axis that n divides; along two
  axes whose sizes divide by n0 and n1 = n / n0 (a 2-D view of the same
  devices: e.g. a 2500 x 7500 matrix on 8 devices, as 2 x 4 tiles); along
  one axis over the largest proper factor f of n that divides it (each
  device holds 1/f; e.g. 2500 x 20003 on 8 devices, in quarters); else
  replicated, as are arrays under SHARD_MIN_ELEMENTS.
  """
  shape = tuple(leaf.shape)
  n = mesh.num_devices
  if n == 1 or math.prod(shape) < SHARD_MIN_ELEMENTS:
    return mesh.replicated
  spec = [None] * len(shape)
  axes = [a for a, size in enumerate(shape) if size % n == 0]
  if axes:
    spec[max(axes, key=lambda a: shape[a])] = DATA_AXIS
    return NamedSharding(mesh.mesh, P(*spec))
  factors = [f for f in range(n - 1, 1, -1) if n % f == 0]  # Largest first.
  for n0 in factors:
    for i, j in itertools.permutations(range(len(shape)), 2):
      if shape[i] % n0 == 0 and shape[j] % (n // n0) == 0:
        spec[i], spec[j] = f"{DATA_AXIS}_0", f"{DATA_AXIS}_1"
        return NamedSharding(_tiles(mesh, n0, n // n0), P(*spec))
  for f in factors:
    axes = [a for a, size in enumerate(shape) if size % f == 0]
    if axes:
      spec[max(axes, key=lambda a: shape[a])] = f"{DATA_AXIS}_1"
      return NamedSharding(_tiles(mesh, n // f, f), P(*spec))
  return mesh.replicated


def state_shardings(state: TrainState, mesh: DataMesh,
                    shard_params: bool = False) -> TrainState:
  """Where every leaf of a (concrete or abstract) state lives.

  The carry is split by batch. Parameters and optimizer state are
  replicated or, with `shard_params` (`config.shard_params`), every array
  of at least SHARD_MIN_ELEMENTS elements is split over the devices (along
  one axis, or two when no single axis divides, or over a factor of the
  device count; see `_split_sharding`; the Adam moments like their
  parameter), so each device holds about 1/n of them; XLA
  gathers a parameter where it is used and reduce-scatters its gradient.
  Used for the fresh state, restore targets and the train step alike.
  """
  if shard_params:
    place = lambda tree: jax.tree.map(lambda x: _split_sharding(x, mesh), tree)
  else:
    place = lambda tree: jax.tree.map(lambda _: mesh.replicated, tree)
  return TrainState(step=mesh.replicated, params=place(state.params),
                    opt_state=place(state.opt_state), rng=mesh.replicated,
                    carry=jax.tree.map(lambda _: mesh.batch_sharding,
                                       state.carry))


def abstract_train_state(task: Task, config: ml_collections.ConfigDict,
                         mesh: DataMesh) -> TrainState:
  """The fresh state's shapes, dtypes and shardings, computing nothing.

  A restore target: the initialiser is traced, never run.
  """
  example = task.example_batch()
  shapes = jax.eval_shape(lambda: _fresh_state(task, config, example))
  return jax.tree.map(
      lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                               sharding=sharding),
      shapes, state_shardings(shapes, mesh, config.shard_params))


def init_train_state(task: Task, config: ml_collections.ConfigDict,
                     mesh: DataMesh) -> TrainState:
  """The state at step 0 (parameters from `config.seed`), placed on `mesh`."""
  example = task.example_batch()
  abstract = jax.eval_shape(lambda: _fresh_state(task, config, example))
  shardings = state_shardings(abstract, mesh, config.shard_params)
  return jax.jit(lambda: _fresh_state(task, config, example),
                 out_shardings=shardings)()


def make_train_step(task: Task, config: ml_collections.ConfigDict,
                    mesh: DataMesh, state: TrainState):
  """The jitted update `(state, batch) -> (state, metrics)`.

  `state` (concrete or abstract) gives the pytree structure; `batch` is a
  device batch from `mesh.shard_batch` (or () without a train iterator).
  The state argument is donated. The loss is a mean over the global batch,
  so the all-reduce of the gradients gives every device the same update.
  With `config.grad_accum_steps = k > 1` the batch (and the carry) is read
  as k micro-batches, one after the other, and their gradients, losses and
  metrics are averaged: the update of the whole batch (exactly, for losses
  that are means over equally weighted rows) in the memory of one
  micro-batch. Metrics: the task's, plus loss, grad_norm and learning_rate.
  """
  optimizer, schedule = config_lib.make_optimizer(config)
  shardings = state_shardings(state, mesh, config.shard_params)
  mesh.check_batch_size(config.batch_size // config.grad_accum_steps,
                        "--config.batch_size / --config.grad_accum_steps")
  grad_fn = _accumulated(jax.value_and_grad(task.loss, has_aux=True),
                         config.grad_accum_steps)

  def step_fn(state: TrainState, batch: Batch):
    rng = jax.random.fold_in(state.rng, state.step)
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


def _accumulated(grad_fn, k: int):
  """`grad_fn(params, carry, rng, batch)` averaged over k micro-batches.

  Micro-batch i holds rows i, i + k, i + 2k, ... of the batch and carry, so
  every device's rows contribute to every micro-batch (a batch split over
  devices stays split); it uses the key fold_in(rng, i).
  """
  if k == 1:
    return grad_fn

  def split(x):  # [B, ...] -> [k, B / k, ...], micro-batch i = rows i::k.
    return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)

  def merge(x):  # The inverse of split.
    return jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])

  def accumulated(params, carry, rng, batch):
    def micro(grads_sum, xs):
      i, carry_i, batch_i = xs
      (loss, (metrics, new_carry)), grads = grad_fn(
          params, carry_i, jax.random.fold_in(rng, i), batch_i)
      grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
      return grads_sum, (loss, metrics, new_carry)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads_sum, (losses, metrics, carry) = jax.lax.scan(
        micro, zeros, (jnp.arange(k), jax.tree.map(split, carry),
                       jax.tree.map(split, batch)))
    mean = lambda x: jnp.mean(x, axis=0)
    return ((mean(losses), (jax.tree.map(mean, metrics),
                            jax.tree.map(merge, carry))),
            jax.tree.map(lambda g: g / k, grads_sum))

  return accumulated


class Evaluator:
  """Runs `task.evaluate` over a split's batches in order, carry threaded.

  Batches (this process's rows, see `Task`) are read one at a time; only
  per-batch scalar metrics are kept.
  Compiled once per batch shape.
  """

  def __init__(self, task: Task, mesh: DataMesh):
    if task.evaluate is None:
      raise ValueError("this task has no evaluate function")
    self._task = task
    self._mesh = mesh
    self._fn = None

  def _init_carry(self, batch_size: int) -> Carry:
    return self._task.init_carry(batch_size) if self._task.init_carry else ()

  def __call__(self, params: Params, batches: Iterable[Batch]) -> dict:
    """Metrics averaged over `batches` (weighted by their 'weight' entry)."""
    mesh = self._mesh
    # Collective programs start only after the ones queued before them have
    # finished on every local device, and finish before the caller goes on
    # (XLA:CPU with several processes deadlocked otherwise; see
    # training/loop.py, _MAX_STEPS_AHEAD).
    jax.block_until_ready(params)
    carry, results = None, []
    for batch in batches:
      if carry is None:
        batch_size = (int(jax.tree.leaves(batch)[0].shape[0])
                      * jax.process_count())
        mesh.check_batch_size(batch_size, "eval batch size")
        carry_sharding = jax.tree.map(
            lambda _: mesh.batch_sharding,
            jax.eval_shape(lambda: self._init_carry(batch_size)))
        carry = jax.jit(lambda: self._init_carry(batch_size),
                        out_shardings=carry_sharding)()
        if self._fn is None:
          self._fn = jax.jit(
              self._task.evaluate,
              # Parameters stay where they are (replicated or split).
              in_shardings=(None, carry_sharding, mesh.batch_sharding),
              out_shardings=(mesh.replicated, carry_sharding))
      metrics, carry = self._fn(params, carry, mesh.shard_batch(batch))
      results.append(metrics)
    if not results:
      raise ValueError("no evaluation batches")
    host = jax.device_get(jax.block_until_ready(results))
    weights = np.array([float(r.pop("weight", 1.0)) for r in host])
    total = max(weights.sum(), 1e-12)
    return {k: float(np.dot(weights, [r[k] for r in host]) / total)
            for k in host[0]}
