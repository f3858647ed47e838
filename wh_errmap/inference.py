"""Whole-volume inference: the segmentors (3D directly, 2D slice by slice along Z) and the
error-map predictor.

Preprocessed volumes are about 120 x 120 x 90 voxels, small enough for one forward pass;
the 2D model sees the axial slices as one batch (in chunks to bound memory).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wh_errmap.masks import predictor_input, slicewise
from wh_errmap.models.voxresnet import VoxResNet


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


def segment_volume(model: VoxResNet, variables: Any, image: np.ndarray) -> dict[str, np.ndarray]:
  """Label maps {"final", "side2".."side5"} -> (X, Y, Z) uint8 for a (X, Y, Z, 1) volume."""
  return {name: labels for name, (labels, _) in
          segment_volume_with_uncertainty(model, variables, image).items()}


@functools.partial(jax.jit, static_argnames=("model",))
def _labels_and_uncertainty(model: VoxResNet, variables: Any, image: jax.Array) -> dict:
  logits = segment_logits(model, variables, image)
  return {name: (jnp.argmax(value, axis=-1).astype(jnp.uint8),
                 1.0 - jnp.max(jax.nn.softmax(value, axis=-1), axis=-1))
          for name, value in logits.items()}


def segment_volume_with_uncertainty(model: VoxResNet, variables: Any, image: np.ndarray,
                                    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{output: ((X, Y, Z) uint8 labels, (X, Y, Z) float32 1 - max softmax probability)}.

  1 - max softmax is the segmentor's own, ground-truth-free estimate that a voxel of its
  mask is wrong: the uncertainty baseline the learned error map is compared with.
  """
  outputs = _labels_and_uncertainty(model, variables, jnp.asarray(image))
  return {name: (np.asarray(labels), np.asarray(uncertainty))
          for name, (labels, uncertainty) in outputs.items()}


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
