"""One 1-D 'data' device mesh: batches split across devices.

Works unchanged on one CPU, several local accelerators and several hosts
(after `jax.distributed.initialize()`). Each process feeds only the rows of
every global batch that its own devices hold: `process_rows(B)` names them
(a contiguous block, the same for every mesh over all devices), the data
iterators produce only those rows, and `DataMesh.shard_batch` assembles the
global array from every process's rows.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def process_rows(global_batch_size: int) -> slice:
  """The rows [p B / P, (p + 1) B / P) of a global batch that process p feeds.

  P = jax.process_count(); one process feeds every row. Raises ValueError
  unless P divides `global_batch_size`.
  """
  count = jax.process_count()
  if global_batch_size < 1 or global_batch_size % count:
    raise ValueError(f"a global batch of {global_batch_size} does not split "
                     f"over {count} processes.")
  per_process = global_batch_size // count
  start = jax.process_index() * per_process
  return slice(start, start + per_process)


class DataMesh:
  """The device mesh and the two shardings every launcher needs."""

  def __init__(self, devices: list[jax.Device] | None = None):
    """Raises ValueError unless `devices` (default: all) are grouped by
    process in process order, the same number per process (so that a
    process's devices hold its `process_rows`)."""
    devices = jax.devices() if devices is None else devices
    owners = [d.process_index for d in devices]
    per_process = len(devices) // jax.process_count()
    if owners != [i // per_process for i in range(len(devices))] or \
        per_process * jax.process_count() != len(devices):
      raise ValueError("DataMesh needs the same number of devices from every "
                       "process, grouped by process in process order; got "
                       f"devices of processes {owners}.")
    # Auto axis type: with the Explicit default, hk.Embed's gather fails
    # sharding-type checks under jit.
    self.mesh = jax.make_mesh((len(devices),), (DATA_AXIS,),
                              axis_types=(jax.sharding.AxisType.Auto,),
                              devices=devices)
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P(DATA_AXIS))

  @property
  def num_devices(self) -> int:
    return self.mesh.size

  def check_batch_size(self, global_batch_size: int,
                       flag: str = "batch_size") -> None:
    """Raises ValueError unless the global batch splits evenly over devices."""
    if global_batch_size < 1 or global_batch_size % self.num_devices:
      raise ValueError(
          f"{flag}={global_batch_size} must be a positive multiple of the "
          f"number of devices ({self.num_devices}).")

  def shard_batch(self, batch: Any) -> Any:
    """The global batch of every process's rows (`process_rows`).

    `batch`: a pytree of host arrays whose leading axis holds this process's
    rows, B / P of them; returns global jax.Arrays with leading axis B,
    split over the devices. Every process must call it, in the same order.
    """

    def put(x):
      x = np.asarray(x)
      global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
      return jax.make_array_from_process_local_data(self.batch_sharding, x,
                                                    global_shape)

    return jax.tree.map(put, batch)

  def replicate(self, tree: Any) -> Any:
    return jax.device_put(tree, self.replicated)
