"""Whole-volume inference: the segmentors (3D directly, 2D slice by slice along Z) and the
error-map predictor.

Preprocessed volumes are about 120 x 120 x 90 voxels at 2 mm, small enough for one forward
pass on one device; the 2D model sees the axial slices as one batch (in chunks to bound
memory). Larger volumes (1 mm, or a large field of view) can be split along X over the
'space' axis of a mesh (`inference_mesh`, `place`): the same jitted functions then run on
every device of the mesh, XLA partitioning the convolutions. A volume of any shape splits:
X is edge-padded to a length that splits (`split_length`) and the outputs cropped back.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from wh_errmap.errors import UserError
from wh_errmap.models.voxresnet import SIZE_MULTIPLE, VoxResNet
from wh_errmap.utils.mesh import SPACE_AXIS, make_mesh, replicated, volume_sharding


def slicewise(model: VoxResNet, variables: Any, volume: jax.Array,
              slice_chunk: int | None = None) -> dict[str, jax.Array]:
  """Applies a 2D model to every axial (last spatial axis) slice of (N, X, Y, Z, C) volumes.

  slice_chunk: run at most this many slices at once (bounds the memory of whole-volume
  inference); None runs all slices as one batch.
  Returns {output: (N, X, Y, Z, K)} logits.
  """
  n, x, y, z, c = volume.shape
  slices = jnp.moveaxis(volume, 3, 1).reshape(n * z, x, y, c)
  if slice_chunk is None:
    outputs = model.apply(variables, slices, train=False)
  else:
    outputs = jax.lax.map(
        lambda s: jax.tree.map(lambda o: o[0], model.apply(variables, s[None], train=False)),
        slices, batch_size=slice_chunk)
  return {name: jnp.moveaxis(logits.reshape(n, z, x, y, -1), 1, 3)
          for name, logits in outputs.items()}


def predictor_input(image: jax.Array, mask: jax.Array, num_classes: int) -> jax.Array:
  """(N, *S, 1) image and (N, *S) mask -> (N, *S, 1 + num_classes) predictor input."""
  return jnp.concatenate([image, jax.nn.one_hot(mask, num_classes, dtype=image.dtype)], -1)


def inference_mesh(space: int | str) -> jax.sharding.Mesh | None:
  """The mesh whole-volume inference splits each volume over, from config mesh.space.

  1: None (one device, jit's default); "auto": every local device; n: the first n local
  devices. Local devices only: every process scores its own cases. Any volume splits over
  it: `segment_volume_with_uncertainty` and `predict_error_map` pad X (`split_length`).
  """
  if space == 1:
    return None
  devices = jax.local_devices()
  n = len(devices) if space == "auto" else int(space)
  if n > len(devices):
    raise UserError(f"mesh.space={space} is more than the {len(devices)} local devices")
  if n == 1:
    return None
  return make_mesh(devices[:n], space=n)


def split_length(length: int, mesh: jax.sharding.Mesh | None) -> int:
  """The X length a volume of `length` voxels is edge-padded to before it is split over
  `mesh` (its outputs are cropped back): a multiple of the devices and of the model's
  SIZE_MULTIPLE (so its own padding keeps the split even), and at least SIZE_MULTIPLE per
  device (which keeps the split convolutions exact; see utils.mesh.MIN_SPLIT_VOXELS).
  `length` itself without a mesh."""
  if mesh is None:
    return length
  space = mesh.shape[SPACE_AXIS]
  step = math.lcm(SIZE_MULTIPLE, space)
  return max(SIZE_MULTIPLE * space, -(-length // step) * step)


def bucket_shape(shape: Sequence[int], bucket: int) -> tuple[int, ...]:
  """`shape` rounded up to a multiple of `bucket` per axis: crops of one bucket share a
  compiled program (and can share a batch)."""
  bucket = max(1, int(bucket))
  return tuple(-(-int(n) // bucket) * bucket for n in shape)


def _edge_pad(volume: np.ndarray, shape: Sequence[int]) -> np.ndarray:
  """`volume` edge-padded at the far end of its leading axes to `shape` (as the model pads
  its own input: border voxels see replicated content)."""
  pad = [(0, n - m) for n, m in zip(shape, volume.shape)]
  pad += [(0, 0)] * (volume.ndim - len(pad))
  return np.pad(volume, pad, mode="edge") if any(p for _, p in pad) else volume


def place(mesh: jax.sharding.Mesh | None, variables: Any, *volumes: Any) -> tuple:
  """(variables, *volumes) on `mesh`: variables replicated, each volume split along X; on
  no mesh, unchanged (jit puts them on the default device)."""
  if mesh is None:
    return (variables, *volumes)
  return (jax.device_put(variables, replicated(mesh)),
          *(jax.device_put(v, volume_sharding(mesh)) for v in volumes))


@functools.partial(jax.jit, static_argnames=("model", "slice_chunk"))
def segment_logits(model: VoxResNet, variables: Any, image: jax.Array,
                   slice_chunk: int = 32) -> dict[str, jax.Array]:
  """Logits of every output for one volume.

  Args:
    model: a VoxResNet with spatial_dims 3 (whole volume) or 2 (axial slices).
    variables: {"params": ..., "batch_stats": ...}.
    image: (X, Y, Z, C) float32 preprocessed volume (C = 1 for the segmentors).
  Returns:
    {"final", "side2".."side5"} -> (X, Y, Z, num_classes) float32 logits.
  """
  if model.spatial_dims == 3:
    outputs = model.apply(variables, image[None], train=False)
    return {name: logits[0] for name, logits in outputs.items()}
  outputs = slicewise(model, variables, image[None], slice_chunk)
  return {name: logits[0] for name, logits in outputs.items()}


def segment_volume(model: VoxResNet, variables: Any, image: np.ndarray,
                   mesh: jax.sharding.Mesh | None = None) -> dict[str, np.ndarray]:
  """Label maps {"final", "side2".."side5"} -> (X, Y, Z) uint8 for a (X, Y, Z, 1) volume."""
  return {name: labels for name, (labels, _) in
          segment_volume_with_uncertainty(model, variables, image, mesh).items()}


@functools.partial(jax.jit, static_argnames=("model",))
def _labels_and_uncertainty(model: VoxResNet, variables: Any, image: jax.Array) -> dict:
  logits = segment_logits(model, variables, image)
  return {name: (jnp.argmax(value, axis=-1).astype(jnp.uint8),
                 1.0 - jnp.max(jax.nn.softmax(value, axis=-1), axis=-1))
          for name, value in logits.items()}


def segment_volume_with_uncertainty(model: VoxResNet, variables: Any, image: np.ndarray,
                                    mesh: jax.sharding.Mesh | None = None,
                                    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{output: ((X, Y, Z) uint8 labels, (X, Y, Z) float32 1 - max softmax probability)}.

  1 - max softmax is the segmentor's own, ground-truth-free estimate that a voxel of its
  mask is wrong: the uncertainty baseline the learned error map is compared with.
  mesh: split the volume along X over this mesh (see inference_mesh); None: one device.
  """
  padded = _edge_pad(np.asarray(image), inference_shape(image.shape[:3], mesh))
  outputs = _labels_and_uncertainty(model, *place(mesh, variables, jnp.asarray(padded)))
  real = tuple(slice(0, n) for n in image.shape[:3])
  return {name: (np.asarray(labels)[real], np.asarray(uncertainty)[real])
          for name, (labels, uncertainty) in outputs.items()}


def inference_shape(shape: Sequence[int], mesh: jax.sharding.Mesh | None,
                    bucket: int = SIZE_MULTIPLE) -> tuple[int, ...]:
  """The (X, Y, Z) a volume is edge-padded to before a model's jit: each axis to a multiple
  of `bucket`, X also to a length that splits over `mesh` (`split_length`).

  With the default bucket (the segmentors' whole volumes): the 3D model edge-pads its input
  to that multiple itself, so padding first computes the same thing, and scans whose shapes
  differ by less than the multiple share one compiled program (padded Z slices are slices
  of their own to the 2D model, cropped away).
  """
  x, *rest = bucket_shape(shape, bucket)
  return (split_length(x, mesh), *rest)


@functools.partial(jax.jit, static_argnames=("model", "num_classes"))
def error_probability(model: VoxResNet, variables: Any, image: jax.Array, mask: jax.Array,
                      num_classes: int) -> jax.Array:
  """The predictor's error map of one mask.

  Args:
    image: (X, Y, Z, 1) float32 preprocessed volume; mask: (X, Y, Z) int classes.
  Returns:
    (X, Y, Z) float32 probability that each voxel of `mask` is wrong.
  """
  inputs = predictor_input(image[None], mask[None], num_classes)
  return jax.nn.sigmoid(model.apply(variables, inputs, train=False)["final"][0, ..., 0])


@functools.partial(jax.jit, static_argnames=("model", "num_classes"))
def error_probabilities(model: VoxResNet, variables: Any, images: jax.Array, masks: jax.Array,
                        num_classes: int) -> jax.Array:
  """`error_probability` of a batch: images (B, X, Y, Z, 1), masks (B, X, Y, Z) ->
  (B, X, Y, Z). Each map is that of its own case alone (no statistics are shared)."""
  inputs = predictor_input(images, masks, num_classes)
  return jax.nn.sigmoid(model.apply(variables, inputs, train=False)["final"][..., 0])


def predict_error_maps(model: VoxResNet, variables: Any, images: Sequence[np.ndarray],
                       masks: Sequence[np.ndarray], num_classes: int,
                       shape_bucket: int = 1) -> list[np.ndarray]:
  """The error maps of several cases in one call: each (X, Y, Z, 1) image and (X, Y, Z) mask
  edge-padded to the batch's common bucket shape (as `predict_error_map`), the batch padded
  to a power of two by repeating its last case (one compiled program per bucket and size
  1, 2, 4, ...). Returns each case's (X, Y, Z) float32 map, cropped back."""
  shape = bucket_shape([max(m.shape[axis] for m in masks) for axis in range(3)], shape_bucket)
  size = 1 << (len(masks) - 1).bit_length()
  stacked_images = [_edge_pad(i, shape) for i in images]
  stacked_masks = [_edge_pad(np.asarray(m, np.int32), shape) for m in masks]
  stacked_images += stacked_images[-1:] * (size - len(images))
  stacked_masks += stacked_masks[-1:] * (size - len(masks))
  probs = np.asarray(error_probabilities(model, variables, jnp.asarray(np.stack(stacked_images)),
                                         jnp.asarray(np.stack(stacked_masks)), num_classes))
  return [probs[k][tuple(slice(0, int(n)) for n in m.shape)] for k, m in enumerate(masks)]


def predict_error_map(model: VoxResNet, variables: Any, image: np.ndarray, mask: np.ndarray,
                      num_classes: int, mesh: jax.sharding.Mesh | None = None,
                      shape_bucket: int = 1) -> np.ndarray:
  """`error_probability` of NumPy inputs, split over `mesh` when given; (X, Y, Z) float32.

  image: (X, Y, Z, 1); mask: (X, Y, Z). shape_bucket: pad both (edge values, as the model
  pads to a multiple of 8) to a multiple of this per axis and crop the map back, so crops
  of many sizes compile one program per bucket instead of one per size; along X also to a
  length that splits over the mesh (`split_length`).
  """
  shape = mask.shape
  padded = inference_shape(shape, mesh, shape_bucket)
  image = _edge_pad(image, padded)
  mask = _edge_pad(np.asarray(mask, np.int32), padded)
  prob = error_probability(model, *place(mesh, variables, jnp.asarray(image), jnp.asarray(mask)),
                           num_classes)
  return np.asarray(prob)[tuple(slice(0, int(n)) for n in shape)]
