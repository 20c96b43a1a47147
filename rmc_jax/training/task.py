"""The `Task`: everything the training stack needs from an experiment.

The stack (`rmc_jax.training.steps`, `rmc_jax.training.loop`) knows nothing
task-specific; an experiment module (`rmc_jax.experiments.*`) builds a Task
from its config with `make_task(config)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, Protocol

import jax

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
  """What the training stack needs from an experiment.

  Batches are pytrees of host (NumPy) arrays whose leading axis is the batch.
  Iterators and evaluation splits yield only this process's rows of each
  global batch (`rmc_jax.training.mesh.process_rows`; every row in a
  single-process run), and the global batches must not depend on how many
  processes and devices there are: the stack assembles the global batch
  from every process's rows and splits it over the devices.

  Attributes:
    init: (rng, batch) -> params; `batch` is an example training batch, or
      () when the task has no train_iterator.
    loss: (params, carry, rng, batch) -> (scalar loss, (metrics, new carry));
      metrics is a dict of scalars averaged over the batch.
    train_iterator: yields this process's rows of training batches; None when the jitted step makes
      its own data (RL rolls environments out inside it), in which case the
      step gets the batch (). Its state (`get_state`) is checkpointed as
      process 0's: it must be the same on every process (a position in
      the sequence of global batches, not of this process's rows).
    evaluate: (params, carry, batch) -> (dict of scalar metrics averaged over
      the batch, new carry); the batches of one evaluation run in order with
      the carry threaded through them (from `init_carry` of their batch
      size), so a language model carries its state over a whole split. A
      'weight' entry (e.g. the number of real tokens) weights the batch in
      the average; otherwise batches weigh the same.
    eval_splits: split name -> re-iterable held-out batches, evaluated with
      `evaluate`. The 'eval' split is evaluated every `eval_every` steps and
      at the end; the others (e.g. the LM's 'test') only at the end of
      training. Batches are read one at a time (nothing holds a split).
    init_carry: global batch size -> initial carried state (leading axis =
      batch), or None for stateless tasks; run under jit, placed by the
      stack.
    observe: called on the host with the averaged training metrics at every
      log step (e.g. to advance a curriculum from the loss); its effect on
      the iterator is checkpointed with the iterator state.
    summarize: host-side metrics -> metrics with derived values (e.g.
      perplexity = exp(loss)), applied to every logged row.
  """

  init: Callable[[jax.Array, Batch], Params]
  loss: Callable[[Params, Carry, jax.Array, Batch],
                 tuple[jax.Array, tuple[dict, Carry]]]
  train_iterator: BatchIterator | None = None
  evaluate: Callable[[Params, Carry, Batch], tuple[dict, Carry]] | None = None
  eval_splits: Mapping[str, Iterable[Batch]] = dataclasses.field(
      default_factory=dict)
  init_carry: Callable[[int], Carry] | None = None
  observe: Callable[[dict], None] | None = None
  summarize: Callable[[dict], dict] | None = None

  def example_batch(self) -> Batch:
    """A training batch for shapes, leaving the iterator where it was."""
    if self.train_iterator is None:
      return ()
    position = self.train_iterator.get_state()
    example = next(self.train_iterator)
    self.train_iterator.set_state(position)
    return example

  def iterator_state(self) -> dict:
    return {} if self.train_iterator is None else \
        self.train_iterator.get_state()


def take_rows(batch: Batch, rows: slice) -> Batch:
  """`rows` of a batch: the same slice of every array's leading axis."""
  return jax.tree.map(lambda x: x[rows], batch)


class ProcessRows:
  """A global-batch iterator yielding only `rows` of each of its batches.

  For generated data whose global batch is cheap to make on every process;
  position and state are those of the wrapped iterator.
  """

  def __init__(self, iterator: BatchIterator, rows: slice):
    self.iterator = iterator
    self.rows = rows

  def __iter__(self) -> ProcessRows:
    return self

  def __next__(self) -> Batch:
    return take_rows(next(self.iterator), self.rows)

  def get_state(self) -> dict:
    return self.iterator.get_state()

  def set_state(self, state: dict) -> None:
    self.iterator.set_state(state)
