"""One mesh of every device of every process, with a 'data' and a 'space' axis, and how
arrays are laid out on it.

The batch is split over 'data'; each volume is split along its first spatial axis (X) over
'space', and XLA partitions the convolutions of that axis itself (halo exchange between
neighbouring devices). So a batch of 2 volumes (the default) still uses 8 devices (a 2 x 4
mesh), and a volume too large for one device's memory is spread over several.

Why jit + NamedSharding rather than shard_map or pmap: the installed JAX builds pmap on jit
+ shard_map and recommends jit with shardings. With the batch sharded and the state
replicated, XLA inserts the gradient all-reduce itself, and batch-norm statistics are those
of the global batch (a mean over a sharded axis, batch or space, is a cross-device
reduction), so 1 device and a 2 x 4 mesh run the same mathematics. Under shard_map the
gradient of a replicated parameter already comes back summed over the axis (an extra pmean
would scale the update by the device count), an easy mistake the automatic path avoids.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from wh_errmap.errors import UserError

DATA_AXIS = "data"
SPACE_AXIS = "space"
# Least voxels of X per device where the last stride-2 convolution reads (1/4 of the
# input's resolution). With fewer, XLA (0.10, CPU) computed wrong kernel gradients for the
# stride-2 convolutions of a volume split over 8 devices (e.g. X = 32 or 24 on 8 devices:
# errors of 20-40% of the gradient; X = 40 and above on 8, or 16 on 4, were exact).
MIN_SPLIT_VOXELS = 2
SPLIT_LEVEL = 4


def make_mesh(devices: Sequence[jax.Device] | None = None, space: int = 1) -> jax.sharding.Mesh:
  """A (data, space) mesh over `devices` (default: all devices of all processes).

  Devices are ordered by process, so each process's devices form whole rows of the 'data'
  axis whenever the row count is a multiple of the process count (`plan_layout` checks it):
  each process then feeds its own rows of the batch.
  """
  devices = list(jax.devices() if devices is None else devices)
  if space < 1 or len(devices) % space:
    raise ValueError(f"a space axis of {space} does not divide {len(devices)} devices")
  devices.sort(key=lambda d: (d.process_index, d.id))
  grid = np.asarray(devices, dtype=object).reshape(len(devices) // space, space)
  return jax.sharding.Mesh(grid, (DATA_AXIS, SPACE_AXIS),
                           axis_types=(jax.sharding.AxisType.Auto,) * 2)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data'; nothing split over 'space'."""
  return NamedSharding(mesh, P(DATA_AXIS))


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int) -> NamedSharding:
  """Sharding of one batch array with `ndim` dimensions, (N, ...).

  Rows go over 'data'. Arrays with spatial axes, (N, X, Y[, Z][, C]) (ndim >= 3), are also
  split along X over 'space'; per-sample vectors ((N,), (N, k)) are not.
  """
  if ndim >= 3 and mesh.shape[SPACE_AXIS] > 1:
    return NamedSharding(mesh, P(DATA_AXIS, SPACE_AXIS))
  return data_sharded(mesh)


def batch_shardings(mesh: jax.sharding.Mesh, batch: Any) -> Any:
  """`batch_sharding` for every leaf of a pytree of arrays (or ShapeDtypeStructs)."""
  return jax.tree.map(lambda x: batch_sharding(mesh, len(x.shape)), batch)


def volume_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """One unbatched volume, (X, Y, Z[, C]), split along X over the mesh's 'space' axis."""
  return NamedSharding(mesh, P(SPACE_AXIS) if mesh.shape[SPACE_AXIS] > 1 else P())


def global_batch(mesh: jax.sharding.Mesh, local_batch: Any) -> Any:
  """Turns this process's rows of a batch (a pytree of NumPy arrays) into global arrays.

  The global batch is the local one times the number of processes, laid out by
  `batch_sharding`; its rows must split over the mesh's 'data' axis (`plan_layout` makes
  layouts that do).
  """
  def to_global(x):
    x = np.asarray(x)
    global_rows = x.shape[0] * jax.process_count()
    if global_rows % mesh.shape[DATA_AXIS]:
      raise ValueError(f"a global batch of {global_rows} does not split over the "
                       f"{mesh.shape[DATA_AXIS]} rows of the mesh's data axis")
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x,
                                                  (global_rows, *x.shape[1:]))

  return jax.tree.map(to_global, local_batch)


def check_split(length: int, space: int, setting: str) -> None:
  """Refuses to split an X axis of `length` voxels over `space` devices when a device
  would hold under MIN_SPLIT_VOXELS voxels at 1/SPLIT_LEVEL resolution (see there)."""
  if space > 1 and length < MIN_SPLIT_VOXELS * SPLIT_LEVEL * space:
    most = max(1, length // (MIN_SPLIT_VOXELS * SPLIT_LEVEL))
    raise UserError(f"{setting}={length} voxels are too few to split over mesh.space={space} "
                    f"devices (at least {MIN_SPLIT_VOXELS * SPLIT_LEVEL} per device): use "
                    f"mesh.space={most} or less, or larger crops")
