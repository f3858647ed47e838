"""How each model's training batch is laid out on the mesh (`utils.mesh`): the (data, space)
split of every device for a global batch, per-device batch sizing and its learning-rate
scaling, checked against the config before any work starts.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax

from wh_errmap.errors import UserError
from wh_errmap.utils.mesh import check_split, make_mesh

LR_SCALING_RULES = ("none", "linear", "sqrt")
CROP_FIELDS = {"seg3d": "input.crop_3d", "seg2d": "input.crop_2d",
               "predictor": "input.crop_predictor"}

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


