"""One data-parallel mesh over every device of every process.

Why jit + NamedSharding rather than shard_map or pmap: the installed JAX (0.10) builds pmap
on jit + shard_map and recommends jit with shardings for data parallelism. With the batch
sharded over the 'data' axis and the state replicated, XLA inserts the gradient all-reduce
itself, and batch-norm statistics are computed over the global batch (a mean over a sharded
axis is a cross-device reduction), so 1 device and 8 devices run the same mathematics.
Under shard_map the gradient of a replicated parameter already comes back summed over the
axis (an extra pmean would scale the update by the device count), an easy mistake the
automatic path avoids.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: list | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh named 'data' over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,),
                           axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over the devices."""
  return NamedSharding(mesh, P(DATA_AXIS))


def global_batch(mesh: jax.sharding.Mesh, local_batch: Any) -> Any:
  """Turns this process's rows of a batch (a pytree of NumPy arrays) into global arrays.

  The global batch size is the local one times the number of processes; it must divide
  evenly over the devices.
  """
  sharding = data_sharded(mesh)

  def to_global(x):
    x = np.asarray(x)
    global_rows = x.shape[0] * jax.process_count()
    if global_rows % mesh.size:
      raise ValueError(f"global batch of {global_rows} does not split over {mesh.size} devices")
    return jax.make_array_from_process_local_data(sharding, x, (global_rows, *x.shape[1:]))

  return jax.tree.map(to_global, local_batch)
