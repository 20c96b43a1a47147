"""One 1-D 'data' device mesh: parameters replicated, batches split across devices.

Works unchanged on one CPU, several local accelerators and several hosts (after
`jax.distributed.initialize()`): every process passes its own slice of the
global batch and `shard_batch` assembles the global array.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


class DataMesh:
  """The device mesh and the two shardings every launcher needs."""

  def __init__(self, devices: list[jax.Device] | None = None):
    devices = jax.devices() if devices is None else devices
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

  def process_slice(self, global_batch_size: int) -> slice:
    """The rows of a global batch that this process feeds."""
    per_process = global_batch_size // jax.process_count()
    start = jax.process_index() * per_process
    return slice(start, start + per_process)

  def shard_batch(self, batch: Any) -> Any:
    """Places a host batch (a pytree of arrays with a leading global-batch axis).

    Every process holds the same global batch (iterators are seeded
    identically); each contributes only its own rows.
    """

    def put(x):
      x = np.asarray(x)
      local = x[self.process_slice(x.shape[0])]
      return jax.make_array_from_process_local_data(self.batch_sharding, local,
                                                    x.shape)

    return jax.tree.map(put, batch)

  def replicate(self, tree: Any) -> Any:
    return jax.device_put(tree, self.replicated)
