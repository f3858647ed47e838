"""Training crops computed on the device from volumes held in device memory.

The preprocessed training set is small (16 cases of about 120 x 120 x 90 voxels, ~100 MB), so
it can live on the accelerator: `stack_volumes` pads all cases to one (K, X, Y, Z) array, the
grain stream yields only each sample's random parameters (`pipeline.train_dataset(...,
output="params")`), and `crop_batch`, inside the jitted step, computes the crops that the host
path (`pipeline.RandAxialSlice`, `RandAffineCrop`, `RandFlip`) computes with scipy.

No grain or scipy here: this module runs where only jax is installed.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wh_errmap.data.volumes import (IMAGE_PAD_VALUE, LABEL_PAD_VALUE, TrainingCase, check_case,
                                    training_volumes)

# Without a device memory size to go by, the training set goes on the device up to this.
DEVICE_DATA_DEFAULT_BUDGET = 2 * 1024**3
# Share of a device's memory the stacked training set may take with input.on_device="auto".
DEVICE_DATA_MEMORY_SHARE = 0.25


def use_device_data(setting: Any, cases: Sequence[TrainingCase]) -> bool:
  """Whether training crops are made on the device (input.on_device).

  "auto": on GPU/TPU when the stacked training set takes at most DEVICE_DATA_MEMORY_SHARE
  of one device's memory; on the CPU the host path (grain + scipy), whose crops the runs
  recorded so far were trained on. True / False force either path.
  """
  if isinstance(setting, bool):
    return setting
  if setting != "auto":
    raise ValueError(f"input.on_device must be 'auto', True or False, got {setting!r}")
  if jax.default_backend() == "cpu":
    return False
  stats = jax.local_devices()[0].memory_stats() or {}
  budget = (stats["bytes_limit"] * DEVICE_DATA_MEMORY_SHARE if "bytes_limit" in stats
            else DEVICE_DATA_DEFAULT_BUDGET)
  return volumes_nbytes(cases) <= budget


def _stacked_shape(cases: Sequence[TrainingCase]) -> tuple[int, int, int, int]:
  """(K, X, Y, Z) with (X, Y, Z) the largest extent of any case along each axis."""
  if not cases:
    raise ValueError("no cases to stack")
  for case in cases:
    check_case(case)
  shapes = np.array([case.image.shape for case in cases])
  return (len(cases), *(int(n) for n in shapes.max(axis=0)))


def volumes_nbytes(cases: Sequence[TrainingCase]) -> int:
  """Bytes that `stack_volumes(cases)` takes (image, label and shape arrays), without stacking.

  Lets a caller decide whether the training set fits in device memory.
  """
  stacked = _stacked_shape(cases)
  return int(np.prod(stacked)) * (np.dtype(np.float32).itemsize + np.dtype(np.uint8).itemsize) \
      + stacked[0] * 3 * np.dtype(np.int32).itemsize


def stack_volumes(cases: Sequence[TrainingCase]) -> dict[str, np.ndarray]:
  """All cases in one array each, padded at the far end to the largest shape.

  -> {"image": (K, X, Y, Z) float32, padded with IMAGE_PAD_VALUE; "label": (K, X, Y, Z) uint8,
  padded with LABEL_PAD_VALUE; "shape": (K, 3) int32, each case's own (X, Y, Z)}, with K =
  len(cases) in their order, so `case` indices of `train_dataset(cases, output="params")`
  index it. Cases may differ in shape (the preprocessing crop grows for large hearts);
  `crop_batch` reads pad values outside each case's own shape, whatever the padding holds.
  Labels must fit in uint8 (classes 0..7).
  """
  stacked = _stacked_shape(cases)
  volumes = training_volumes(cases)
  image = np.full(stacked, IMAGE_PAD_VALUE, np.float32)
  label = np.full(stacked, LABEL_PAD_VALUE, np.uint8)
  for k, ((case_image, case_label), case) in enumerate(zip(volumes, cases)):
    if case_label.size and (case_label.min() < 0 or case_label.max() > 255):
      raise ValueError(f"case {case.case_id}: label values outside uint8 "
                       f"[{case_label.min()}, {case_label.max()}]")
    region = (k, *(slice(0, n) for n in case_image.shape))
    image[region] = case_image
    label[region] = case_label
  shape = np.array([case_image.shape for case_image, _ in volumes], np.int32)
  return {"image": image, "label": label, "shape": shape}


def _axis_taps(origin: jax.Array, scale: jax.Array, size: jax.Array, flip: jax.Array,
               crop: int, linear: bool) -> list[tuple[jax.Array, jax.Array, jax.Array | None]]:
  """Where one axis of the crop reads the case: [(index (crop,) int32, valid (crop,) bool,
  weight (crop,) float32 or None)], two taps (linear) or one (nearest neighbour).

  Output voxel i samples position c_i = (i + o * s) * (1 / s): scipy's own form of o + i / s,
  (i + o / m) * m with m = 1 / s, in which XLA rewrites o / (1 / s) into o * s anyway. A linear
  sample mixes voxels floor(c) and floor(c) + 1; a nearest one reads floor(c + 0.5), rounding
  ties up as scipy's order=0 does, computed from the exact fraction c - floor(c) since c + 0.5
  itself can round up to the next integer in float32. A tap is valid inside [0, size); its
  index is clipped there so that the gather stays in bounds. A flip reverses the taps:
  flipping the crop is reading the positions backwards.
  """
  position = ((jnp.arange(crop, dtype=jnp.float32) + origin.astype(jnp.float32) * scale)
              * (1.0 / scale))
  position = jnp.where(flip, position[::-1], position)
  low = jnp.floor(position)
  frac = position - low
  low = low.astype(jnp.int32)
  if linear:
    taps = [(low, 1.0 - frac), (low + 1, frac)]
  else:
    taps = [(jnp.where(frac >= 0.5, low + 1, low), None)]
  return [(jnp.clip(index, 0, size - 1), (index >= 0) & (index < size), weight)
          for index, weight in taps]


def _resample(volume: jax.Array, case: jax.Array, z: jax.Array | None,
              taps: Sequence[Sequence[tuple[jax.Array, jax.Array, jax.Array | None]]],
              pad: float | int) -> jax.Array:
  """One case of volume (K, X, Y, Z), axial slice z for 2D, sampled at the separable `taps`
  of each crop axis (_axis_taps) -> (*crop) with volume's dtype.

  One axis at a time: the first gathers from the stacked array only the rows the crop reads;
  each later one takes along its axis of the previous result. Reading `pad` where a tap is
  invalid, at every axis, is the same as sampling a volume extended by `pad` (the weights of
  each axis sum to 1), which is scipy's mode="grid-constant".
  """
  out = None
  for axis, axis_taps in enumerate(taps):
    total = None
    for index, valid, weight in axis_taps:
      if axis == 0:
        values = volume[case, index] if z is None else volume[case, index, :, z]
      else:
        values = jnp.take(out, index, axis=axis, mode="clip")
      trailing = (1,) * (values.ndim - axis - 1)
      values = jnp.where(valid.reshape(-1, *trailing), values, jnp.asarray(pad, volume.dtype))
      if weight is not None:
        values = weight.reshape(-1, *trailing) * values
      total = values if total is None else total + values
    out = total
  return out


def crop_batch(volumes: Mapping[str, jax.Array], params: Mapping[str, jax.Array],
               crop_size: Sequence[int]) -> dict[str, jax.Array]:
  """The training crops of `params`, computed on the device; jit with crop_size static.

  volumes: `stack_volumes(cases)` (on the device): "image" (K, X, Y, Z) float32, "label"
  (K, X, Y, Z) integer, "shape" (K, 3) int32.
  params: a batch of `train_dataset(cases, output="params")`, d = len(crop_size) in (2, 3):
  "case" (B,) int, "scale" (B,) float32, "origin" (B, d) int, "flip" (B, d) bool, and for
  d == 2 "slice" (B,) int (the axial slice z).
  -> {"image": (B, *crop_size, 1) float32, "label": (B, *crop_size) int32}, what
  `pipeline.train_dataset(cases, output="crops")` yields for the same samples: the 2D path
  first takes axial slice z; output voxel i samples the case at origin + i / scale along each
  axis, the image linearly and the label by nearest neighbour, reading IMAGE_PAD_VALUE /
  LABEL_PAD_VALUE outside the case's own shape; then flips along the axes `flip` marks.
  With scale 1 the crops equal the host's exactly. Otherwise positions are float32 here and
  float64 in scipy (from a float64 scale): images differ by rounding (~1e-5), and a plane of
  the label crop whose position lies within rounding (~1e-5 voxel) of a nearest-neighbour tie
  (c + 0.5 an integer) may take the neighbouring plane: about 3e-6 of positions for scales
  drawn from a range; for a fixed scale whose positions hit exact ties (0.8 or 1.2, not 0.9 or
  1.1) float rounding decides each tie, in scipy as here, and up to ~4% of them differ.
  """
  crop_size = tuple(int(c) for c in crop_size)
  d = len(crop_size)
  if d not in (2, 3):
    raise ValueError(f"crop_size must have 2 (axial slices) or 3 entries, got {crop_size}")
  missing = {"image", "label", "shape"} - set(volumes)
  if missing:
    raise ValueError(f"volumes lack {sorted(missing)}; build them with stack_volumes")
  if volumes["image"].ndim != 4 or volumes["label"].shape != volumes["image"].shape:
    raise ValueError(f"volumes need equal (K, X, Y, Z) image and label, got "
                     f"{volumes['image'].shape} and {volumes['label'].shape}")
  needed = {"case", "scale", "origin", "flip"} | ({"slice"} if d == 2 else set())
  missing = needed - set(params)
  if missing:
    raise ValueError(f"params for a {d}D crop lack {sorted(missing)}")
  batch = params["case"].shape
  if (len(batch) != 1 or params["scale"].shape != batch
      or params["origin"].shape != (*batch, d) or params["flip"].shape != (*batch, d)
      or (d == 2 and params["slice"].shape != batch)):
    raise ValueError(f"params do not fit a batch of {d}D crops: "
                     f"{ {key: tuple(params[key].shape) for key in sorted(needed)} }")
  # Host arrays (numpy) become jax arrays here, so that traced case indices can index them.
  volumes = {key: jnp.asarray(volumes[key]) for key in ("image", "label", "shape")}

  def one(case, scale, origin, flip, z):
    size = volumes["shape"][case]
    image_taps, label_taps = (
        [_axis_taps(origin[a], scale, size[a], flip[a], crop_size[a], linear)
         for a in range(d)] for linear in (True, False))
    image = _resample(volumes["image"], case, z, image_taps, IMAGE_PAD_VALUE)
    label = _resample(volumes["label"], case, z, label_taps, LABEL_PAD_VALUE)
    return image[..., None], label.astype(jnp.int32)

  scale = jnp.asarray(params["scale"], jnp.float32)
  z = params["slice"] if d == 2 else None
  image, label = jax.vmap(one, in_axes=(0, 0, 0, 0, None if z is None else 0))(
      params["case"], scale, params["origin"], params["flip"], z)
  return {"image": image, "label": label}
