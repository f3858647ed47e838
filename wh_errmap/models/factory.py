"""The three models of the method, built from an experiment config's `model` block: the 3D
and 2D segmentors (1 image channel in, 8 classes out) and the error-map predictor (image +
one-hot mask in, 1 error logit out), each in the convolution form of the mesh it runs on.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from wh_errmap.data.structures import NUM_CLASSES
from wh_errmap.models.voxresnet import VoxResNet

SEGMENTORS = {"seg3d": 3, "seg2d": 2}   # model name -> spatial dims


def segmentor_model(config: ml_collections.ConfigDict, name: str, space: int = 1) -> VoxResNet:
  """Segmentor `name` ("seg3d" or "seg2d"): image in, NUM_CLASSES logits out."""
  return make_model(config.model, SEGMENTORS[name], NUM_CLASSES, space)


def compute_dtype(name: str) -> jnp.dtype:
  """The model's compute dtype from config: "auto" is bfloat16 on GPU/TPU, float32 on CPU.

  Parameters, batch statistics, optimizer state and losses stay float32 either way (mixed
  precision); on the CPU bf16 arithmetic is emulated and slower than float32.
  """
  if name == "auto":
    return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
  if name not in ("float32", "bfloat16"):
    raise ValueError(f"model.dtype must be 'auto', 'float32' or 'bfloat16', got {name!r}")
  return jnp.dtype(name)


def conv_impl(name: str, space: int = 1) -> str:
  """The model's convolution form: model.conv_impl, with "auto" resolved for a mesh whose
  'space' axis splits each volume over `space` devices.

  XLA partitions its own convolution along a split spatial axis with one halo exchange per
  direction; the CPU's matmul form (Conv3) is a pad, shifted slices and a sum of shifted
  partial products, each partitioned separately (a 3D layer's forward + backward on a volume
  split over 4 CPU devices: 10 collective permutes against XLA's 6, same results). So
  "auto" is XLA's convolution whenever space > 1; an explicit "matmul" is kept.
  """
  if name == "auto" and space > 1:
    return "xla"
  return name


def make_model(model: ml_collections.ConfigDict, spatial_dims: int, num_classes: int,
               space: int = 1) -> VoxResNet:
  """A VoxResNet from a `model` config block (see experiments/base.py), for a mesh that
  splits each volume over `space` devices (see conv_impl)."""
  return VoxResNet(spatial_dims=spatial_dims, num_classes=num_classes, width1=model.width1,
                   width2=model.width2, num_voxres=model.num_voxres, norm=model.norm,
                   upsample=model.upsample, conv_impl=conv_impl(model.conv_impl, space),
                   dtype=compute_dtype(model.dtype))


def predictor_model(config: ml_collections.ConfigDict, space: int = 1) -> VoxResNet:
  """The error-map predictor: a 3D VoxResNet from image + one-hot mask to one error logit."""
  return make_model(config.model, 3, 1, space)
