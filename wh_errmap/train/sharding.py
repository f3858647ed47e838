"""One mesh of every device of every process, with a 'data' and a 'space' axis.

The batch is split over 'data'; each volume is split along its first spatial axis (X) over
'space', and XLA partitions the convolutions of that axis itself (halo exchange between
neighbouring devices). So the paper's batch of 2 volumes still uses 8 devices (a 2 x 4
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

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from wh_errmap.errors import UserError

DATA_AXIS = "data"
SPACE_AXIS = "space"
LR_SCALING_RULES = ("none", "linear", "sqrt")
# Least voxels of X per device where the last stride-2 convolution reads (1/4 of the
# input's resolution). With fewer, XLA (0.10, CPU) computed wrong kernel gradients for the
# stride-2 convolutions of a volume split over 8 devices (e.g. X = 32 or 24 on 8 devices:
# errors of 20-40% of the gradient; X = 40 and above on 8, or 16 on 4, were exact).
MIN_SPLIT_VOXELS = 2
SPLIT_LEVEL = 4
CROP_FIELDS = {"seg3d": "input.crop_3d", "seg2d": "input.crop_2d",
               "predictor": "input.crop_predictor"}


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


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one model's training batch is laid out on the devices.

  batch: global batch (all processes); data x space = devices; per_process: rows each
  process reads; lr_factor: multiplies the learning rate (per-device batch sizing only).
  """
  batch: int
  data: int
  space: int
  per_process: int
  lr_factor: float = 1.0

  def mesh(self, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    return make_mesh(devices, self.space)

  def describe(self) -> str:
    split = f"{self.data} x {self.space} mesh (data x space)" if self.space > 1 else \
        f"{self.data} device(s)"
    return f"batch {self.batch} on {split}"


def parse_space(value: Any) -> int | str:
  """mesh.space: a positive integer or "auto"."""
  if value == "auto":
    return value
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise UserError(f"mesh.space must be a positive integer or 'auto', got {value!r}")
  return value


def plan_layout(batch: int, space: int | str, *, num_devices: int, num_processes: int = 1,
                batch_setting: str = "batch_size") -> Layout:
  """Chooses the (data, space) mesh for a global batch, or says which setting to change.

  space: devices per volume, or "auto": the fewest (data = the largest divisor of the
  device count that also divides the batch and is a multiple of the process count).
  batch_setting: the config field that set the batch, named in errors.
  Raises UserError (one line naming the setting) when the batch cannot be laid out.
  """
  space = parse_space(space)
  if batch < 1:
    raise UserError(f"{batch_setting} must be positive, got {batch}")
  if batch % num_processes:
    raise UserError(f"{batch_setting}={batch} does not split over {num_processes} processes: "
                    f"use a multiple of {num_processes}")
  if space == "auto":
    candidates = [d for d in range(num_devices, 0, -1)
                  if num_devices % d == 0 and batch % d == 0 and d % num_processes == 0]
    if not candidates:
      raise UserError(f"{batch_setting}={batch} cannot be laid out on {num_devices} devices "
                      f"of {num_processes} processes: use a multiple of {num_processes}")
    data = candidates[0]
    return Layout(batch, data, num_devices // data, batch // num_processes)
  if num_devices % space:
    raise UserError(f"mesh.space={space} does not divide the {num_devices} devices: use a "
                    f"divisor of {num_devices} or mesh.space=auto")
  data = num_devices // space
  if batch % data or data % num_processes:
    hint = _suggest_space(batch, num_devices, num_processes)
    raise UserError(f"{batch_setting}={batch} does not split over {data} device rows "
                    f"({num_devices} devices, mesh.space={space}): set {hint}, or a "
                    f"{batch_setting} that is a multiple of {data}")
  return Layout(batch, data, space, batch // num_processes)


def _suggest_space(batch: int, num_devices: int, num_processes: int) -> str:
  try:
    auto = plan_layout(batch, "auto", num_devices=num_devices, num_processes=num_processes)
  except UserError:
    return "mesh.space=auto"
  return f"mesh.space={auto.space} (or mesh.space=auto)"


def lr_factor(rule: str, global_batch: int, reference_batch: int) -> float:
  """Learning-rate multiplier when the global batch differs from the configured one.

  "linear": global / reference (Goyal et al. 2017, for SGD); "sqrt": its square root (the
  usual rule for Adam); "none": 1.
  """
  if rule not in LR_SCALING_RULES:
    raise UserError(f"optim.lr_scaling must be one of {', '.join(LR_SCALING_RULES)}, "
                    f"got {rule!r}")
  ratio = global_batch / reference_batch
  return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[rule]


def model_layout(config: Any, name: str, *, num_devices: int | None = None,
                 num_processes: int | None = None) -> Layout:
  """The Layout of model `name` ("seg3d", "seg2d", "predictor") from an experiment config.

  train.<name>.per_device_batch_size > 0 asks for plain data parallelism: the global
  batch is that times the device count, one device per row (mesh.space is ignored), and
  the learning rate is scaled by optim.lr_scaling from train.<name>.batch_size to it.
  Otherwise train.<name>.batch_size is the global batch, laid out by mesh.space.
  """
  num_devices = jax.device_count() if num_devices is None else num_devices
  num_processes = jax.process_count() if num_processes is None else num_processes
  schedule = config.train[name]
  per_device = schedule.get("per_device_batch_size", 0)
  if per_device:
    if isinstance(per_device, bool) or not isinstance(per_device, int) or per_device < 0:
      raise UserError(f"train.{name}.per_device_batch_size must be a non-negative integer, "
                      f"got {per_device!r}")
    batch = per_device * num_devices
    layout = plan_layout(batch, 1, num_devices=num_devices, num_processes=num_processes,
                         batch_setting=f"train.{name}.per_device_batch_size")
    factor = lr_factor(config.optim.get("lr_scaling", "none"), batch, schedule.batch_size)
    return dataclasses.replace(layout, lr_factor=factor)
  layout = plan_layout(schedule.batch_size, config.get("mesh", {}).get("space", 1),
                       num_devices=num_devices, num_processes=num_processes,
                       batch_setting=f"train.{name}.batch_size")
  field = CROP_FIELDS[name]
  check_split(config.input[field.split(".")[1]][0], layout.space, f"{field}[0]")
  return layout


def check_split(length: int, space: int, setting: str) -> None:
  """Refuses to split an X axis of `length` voxels over `space` devices when a device
  would hold under MIN_SPLIT_VOXELS voxels at 1/SPLIT_LEVEL resolution (see there)."""
  if space > 1 and length < MIN_SPLIT_VOXELS * SPLIT_LEVEL * space:
    most = max(1, length // (MIN_SPLIT_VOXELS * SPLIT_LEVEL))
    raise UserError(f"{setting}={length} voxels are too few to split over mesh.space={space} "
                    f"devices (at least {MIN_SPLIT_VOXELS * SPLIT_LEVEL} per device): use "
                    f"mesh.space={most} or less, or larger crops")
