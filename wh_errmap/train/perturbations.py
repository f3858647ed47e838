"""Synthetic errors made on the device from a class map, as extra training masks.

The predictor learns which voxels of a mask are wrong; the frozen segmentors (`train.masks`)
only show it the errors they happen to make. These perturbations add errors of known kinds
to any class map (usually the crop's ground truth) inside the jitted training step, with
static shapes and one independent draw per sample:

1. erode_dilate: one present structure eroded or dilated (50/50) by 1..max_radius voxels;
2. remove: one present structure becomes background;
3. swap: two present structures exchange labels;
4. shift: one present structure moved by 1..max_shift voxels (not all axes zero);
5. boundary_noise: voxels on a class boundary take a neighbour's class with a probability;
6. slice_failure: a slab of 1..max_slices slices along Z (the 2D model's slicing axis) is
   erased or moved in-plane by 1..max_slab_shift voxels.

Each kind's public function always applies it; `perturb` gates each with its rate per
sample. Neighbourhoods are the 6-neighbour cross throughout (scipy.ndimage's
generate_binary_structure(3, 1)), so r erosion steps remove what lies within city-block
distance r of another class.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Settings:
  """Rates (per-sample probabilities) and magnitudes (voxels) of the perturbations.

  Frozen and hashable: pass it to `jax.jit` as a static argument.
  """
  erode_dilate_rate: float = 0.3   # a structure grows or shrinks: the commonest failure
  max_radius: int = 3              # erosion/dilation steps, 6 mm at the paper's 2 mm voxels
  remove_rate: float = 0.05        # a structure missed entirely
  swap_rate: float = 0.05          # two structures confused (e.g. LV/RV)
  shift_rate: float = 0.1          # a structure misplaced
  max_shift: int = 4               # voxels per axis, 8 mm at 2 mm voxels
  boundary_noise_rate: float = 0.3  # ragged boundaries
  boundary_flip_prob: float = 0.2  # chance that one boundary voxel takes a neighbour's class
  slice_failure_rate: float = 0.1  # a 2D model failing on a few slices
  max_slices: int = 4              # slab thickness along Z
  max_slab_shift: int = 4          # in-plane displacement of a shifted slab

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if isinstance(field.default, float) and not 0.0 <= value <= 1.0:
        raise ValueError(f"perturbation {field.name} must lie in [0, 1], got {value}")
      if isinstance(field.default, int) and value < 1:
        raise ValueError(f"perturbation {field.name} must be >= 1, got {value}")


DEFAULTS: dict[str, float | int] = dataclasses.asdict(Settings())


def settings_from_mapping(overrides: Mapping[str, Any] | Any) -> Settings:
  """Settings from DEFAULTS updated by a config.

  Args:
    overrides: a dict or ml_collections.ConfigDict of field -> value, any subset.
  Returns:
    The Settings.
  Raises:
    ValueError: on a field Settings does not have (named), or a value out of range.
  """
  overrides = dict(overrides)
  unknown = sorted(set(overrides) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"unknown perturbation setting(s) {', '.join(unknown)}; "
                     f"known: {', '.join(DEFAULTS)}")
  values = {}
  for name, value in {**DEFAULTS, **overrides}.items():
    cast = type(DEFAULTS[name])
    if cast is int and int(value) != value:
      raise ValueError(f"perturbation {name} must be an integer, got {value}")
    values[name] = cast(value)
  return Settings(**values)


def _per_sample(fn: Callable[[jax.Array, jax.Array], jax.Array], masks: jax.Array,
                key: jax.Array) -> jax.Array:
  """fn(mask, key) on every sample of (N, X, Y, Z) masks, each with its own key."""
  return jax.vmap(fn)(masks, jax.random.split(key, masks.shape[0]))


def _pick_structures(mask: jax.Array, key: jax.Array, num_classes: int,
                     count: int) -> tuple[jax.Array, jax.Array]:
  """`count` distinct foreground classes drawn uniformly among those present in `mask`.

  Returns ((count,) int32 classes, () bool: at least `count` were present). When too few
  are present the classes are meaningless and the caller must leave the mask unchanged.
  """
  present = jnp.zeros(num_classes, bool).at[mask.ravel()].set(True).at[0].set(False)
  scores = jnp.where(present, jax.random.uniform(key, (num_classes,)), -1.0)
  return jax.lax.top_k(scores, count)[1].astype(jnp.int32), present.sum() >= count


def _neighbours(x: jax.Array, mode: str) -> list[jax.Array]:
  """The 6 face neighbours' values of every cell of a 3D array; jnp.pad's `mode` decides
  what lies beyond the volume edge."""
  padded = jnp.pad(x, 1, mode=mode)
  out = []
  for axis in range(3):
    for start in (0, 2):
      index = [slice(1, -1)] * 3
      index[axis] = slice(start, start + x.shape[axis])
      out.append(padded[tuple(index)])
  return out


def _translate(x: jax.Array, offset: jax.Array) -> jax.Array:
  """x moved by an integer (possibly traced) offset per axis; what leaves the volume is
  lost and vacated cells are 0/False (no wrap-around)."""
  valid = jnp.ones(x.shape, bool)
  for axis, size in enumerate(x.shape):
    source = jnp.arange(size) - offset[axis]
    shape = [1] * x.ndim
    shape[axis] = size
    valid &= ((source >= 0) & (source < size)).reshape(shape)
  return jnp.where(valid, jnp.roll(x, offset, axis=tuple(range(x.ndim))), jnp.zeros_like(x))


def _nonzero_offset(key: jax.Array, max_shift: int, ndim: int) -> jax.Array:
  """(ndim,) int32 offset, uniform over [-max_shift, max_shift]^ndim without the zero one."""
  side = 2 * max_shift + 1
  index = jax.random.randint(key, (), 0, side**ndim - 1)
  index += index >= (side**ndim - 1) // 2  # skip the centre, the all-zero offset
  return jnp.stack([(index // side**axis) % side - max_shift for axis in range(ndim)])


def _morph_one(mask: jax.Array, label: jax.Array, radius: jax.Array, dilate: jax.Array,
               max_radius: int) -> jax.Array:
  structure = mask == label
  # Erosion is dilation of the complement; with the volume edge outside the complement a
  # structure cut by the crop is not eroded from the cut, as scipy's border_value=1.
  grown = jax.lax.fori_loop(
      0, max_radius,
      lambda step, region: jnp.where(
          step < radius, region | jnp.any(jnp.stack(_neighbours(region, "constant")), 0),
          region),
      jnp.where(dilate, structure, ~structure))
  return jnp.where(dilate, jnp.where(grown, label, mask),
                   jnp.where(structure & grown, 0, mask))


def morph_structure(masks: jax.Array, labels: jax.Array, radii: jax.Array,
                    dilate: jax.Array, max_radius: int) -> jax.Array:
  """Erodes or dilates one given structure per sample (the explicit form of erode_dilate).

  Args:
    masks: (N, X, Y, Z) int32 class maps.
    labels, radii: (N,) int structure and number of 6-neighbour steps (<= max_radius).
    dilate: (N,) bool; True dilates (claiming any other class's voxels), False erodes
      (the removed voxels become background).
    max_radius: static bound of radii.
  Returns:
    (N, X, Y, Z) int32.
  """
  return jax.vmap(lambda *args: _morph_one(*args, max_radius))(masks, labels, radii, dilate)


def erode_dilate(masks: jax.Array, key: jax.Array, max_radius: int,
                 num_classes: int) -> jax.Array:
  """One present structure per sample eroded or dilated (50/50) by 1..max_radius steps.

  Args:
    masks: (N, X, Y, Z) int32 class maps in [0, num_classes); key: a PRNG key.
    max_radius, num_classes: static.
  Returns:
    (N, X, Y, Z) int32 (see morph_structure); samples without a structure unchanged.
  """
  def one(mask, key):
    pick_key, radius_key, dilate_key = jax.random.split(key, 3)
    labels, found = _pick_structures(mask, pick_key, num_classes, 1)
    radius = jax.random.randint(radius_key, (), 1, max_radius + 1)
    morphed = _morph_one(mask, labels[0], radius, jax.random.bernoulli(dilate_key), max_radius)
    return jnp.where(found, morphed, mask)
  return _per_sample(one, masks, key)


def remove(masks: jax.Array, key: jax.Array, num_classes: int) -> jax.Array:
  """One present structure per sample set to background. (N, X, Y, Z) int32 -> same."""
  def one(mask, key):
    labels, _ = _pick_structures(mask, key, num_classes, 1)
    return jnp.where(mask == labels[0], 0, mask)  # with none present labels[0] is 0: a no-op
  return _per_sample(one, masks, key)


def swap(masks: jax.Array, key: jax.Array, num_classes: int) -> jax.Array:
  """Two present structures per sample exchange labels; samples with fewer than two are
  unchanged. (N, X, Y, Z) int32 -> same."""
  def one(mask, key):
    (a, b), found = _pick_structures(mask, key, num_classes, 2)
    swapped = jnp.where(mask == a, b, jnp.where(mask == b, a, mask))
    return jnp.where(found, swapped, mask)
  return _per_sample(one, masks, key)


def _shift_one(mask: jax.Array, label: jax.Array, offset: jax.Array) -> jax.Array:
  structure = mask == label
  moved = _translate(structure, offset)
  return jnp.where(moved, label, jnp.where(structure, 0, mask))


def shift_structure(masks: jax.Array, labels: jax.Array, offsets: jax.Array) -> jax.Array:
  """Moves one given structure per sample (the explicit form of shift).

  Args:
    masks: (N, X, Y, Z) int32; labels: (N,) int; offsets: (N, 3) int voxels per axis.
  Returns:
    (N, X, Y, Z) int32: the vacated voxels are background, the moved ones overwrite any
    class, voxels moved out of the volume are lost.
  """
  return jax.vmap(_shift_one)(masks, labels, offsets)


def shift(masks: jax.Array, key: jax.Array, max_shift: int, num_classes: int) -> jax.Array:
  """One present structure per sample moved by a nonzero offset in [-max_shift, max_shift]
  per axis (see shift_structure). (N, X, Y, Z) int32 -> same."""
  def one(mask, key):
    pick_key, offset_key = jax.random.split(key)
    labels, found = _pick_structures(mask, pick_key, num_classes, 1)
    moved = _shift_one(mask, labels[0], _nonzero_offset(offset_key, max_shift, 3))
    return jnp.where(found, moved, mask)
  return _per_sample(one, masks, key)


def boundary_noise(masks: jax.Array, key: jax.Array, flip_prob: float,
                   num_classes: int) -> jax.Array:
  """Every voxel with a face neighbour of another class takes, with probability flip_prob,
  the class of one such neighbour drawn uniformly.

  Args:
    masks: (N, X, Y, Z) int32; key: a PRNG key.
    flip_prob: a float or a traced scalar (it needs no recompilation when it changes).
    num_classes: unused (any class map works), kept for a uniform signature.
  Returns:
    (N, X, Y, Z) int32.
  """
  del num_classes

  def one(mask, key):
    # The edge counts as the voxel's own class: a crop's border is no boundary.
    neighbours = jnp.stack(_neighbours(mask, "edge"))
    differs = neighbours != mask
    count = differs.sum(0, dtype=jnp.uint32)
    # One 32-bit draw per voxel serves both choices: random bits are the costly part on
    # the CPU (to run and, for small volumes, to compile). Low 16 bits: flip or not; high
    # 16 bits: which of the `count` differing neighbours (the rank-th in axis order).
    bits = jax.random.bits(key, mask.shape)
    flip = (count > 0) & ((bits & 0xFFFF) < flip_prob * 0x10000)
    rank = ((bits >> 16) * count) >> 16
    chosen = differs & (jnp.cumsum(differs, 0, dtype=jnp.uint32) == rank + 1)
    return jnp.where(flip, jnp.sum(jnp.where(chosen, neighbours, 0), 0), mask)
  return _per_sample(one, masks, key)


def _slab_one(mask: jax.Array, start: jax.Array, thickness: jax.Array, offset: jax.Array,
              erase: jax.Array) -> jax.Array:
  z = jnp.arange(mask.shape[-1])
  slab = (z >= start) & (z < start + thickness)
  moved = _translate(mask, jnp.concatenate([offset, jnp.zeros(1, offset.dtype)]))
  return jnp.where(slab, jnp.where(erase, 0, moved), mask)


def corrupt_slab(masks: jax.Array, starts: jax.Array, thicknesses: jax.Array,
                 offsets: jax.Array, erase: jax.Array) -> jax.Array:
  """Corrupts given slices [start, start + thickness) along Z (explicit slice_failure).

  Args:
    masks: (N, X, Y, Z) int32; starts, thicknesses: (N,) int.
    offsets: (N, 2) int in-plane (X, Y) displacement of the slab's content, used where
      erase is False; what it vacates becomes background.
    erase: (N,) bool; True sets the slab to background.
  Returns:
    (N, X, Y, Z) int32, equal to masks outside the slabs.
  """
  return jax.vmap(_slab_one)(masks, starts, thicknesses, offsets, erase)


def slice_failure(masks: jax.Array, key: jax.Array, max_slices: int, max_slab_shift: int,
                  num_classes: int) -> jax.Array:
  """A slab of 1..max_slices slices along Z per sample, at a uniform start, erased or
  (50/50) moved in-plane by a nonzero offset in [-max_slab_shift, max_slab_shift]^2.
  (N, X, Y, Z) int32 -> same. num_classes is unused, kept for a uniform signature."""
  del num_classes
  depth = masks.shape[-1]

  def one(mask, key):
    thickness_key, start_key, offset_key, erase_key = jax.random.split(key, 4)
    thickness = jax.random.randint(thickness_key, (), 1, min(max_slices, depth) + 1)
    start = jax.random.randint(start_key, (), 0, depth - thickness + 1)
    offset = _nonzero_offset(offset_key, max_slab_shift, 2)
    return _slab_one(mask, start, thickness, offset, jax.random.bernoulli(erase_key))
  return _per_sample(one, masks, key)


def perturb(masks: jax.Array, key: jax.Array, settings: Settings,
            num_classes: int) -> jax.Array:
  """Applies each kind, in the module docstring's order, to each sample with its rate.

  Args:
    masks: (N, X, Y, Z) int32 class maps in [0, num_classes).
    key: a PRNG key; each sample and kind draws independently.
    settings, num_classes: static under jax.jit (settings is hashable).
  Returns:
    (N, X, Y, Z) int32.
  """
  s = settings
  kinds = [
      (s.erode_dilate_rate, lambda m, k: erode_dilate(m, k, s.max_radius, num_classes)),
      (s.remove_rate, lambda m, k: remove(m, k, num_classes)),
      (s.swap_rate, lambda m, k: swap(m, k, num_classes)),
      (s.shift_rate, lambda m, k: shift(m, k, s.max_shift, num_classes)),
      (s.boundary_noise_rate,
       lambda m, k: boundary_noise(m, k, s.boundary_flip_prob, num_classes)),
      (s.slice_failure_rate,
       lambda m, k: slice_failure(m, k, s.max_slices, s.max_slab_shift, num_classes)),
  ]
  for (rate, apply), kind_key in zip(kinds, jax.random.split(key, len(kinds))):
    if rate == 0:  # static: a disabled kind costs nothing
      continue
    gate_key, apply_key = jax.random.split(kind_key)
    gate = jax.random.bernoulli(gate_key, rate, masks.shape[:1])
    masks = jnp.where(gate[:, None, None, None], apply(masks, apply_key), masks)
  return masks
