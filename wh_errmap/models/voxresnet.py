"""VoxResNet (Chen et al., NeuroImage 2018) for 2D and 3D, deeply supervised.

Layout is channels-last, (N, *spatial, C). The network is

  conv1a -> norm/ReLU -> conv1b                                   -> side2 (full resolution)
  3 x [norm/ReLU -> stride-2 conv -> num_voxres x VoxRes module]  -> side3, side4, side5
                                                                     (1/2, 1/4, 1/8)

and every side output is a 1^d classifier brought back to the input size; the final logits
are the sum of the four side logits. The side outputs carry the paper's numbering (Zhang &
Chung 2019, Fig. 1(b): Loss-1 is the fused output, Loss-2..Loss-5 the auxiliary classifiers
from shallow to deep), so mask "3D-2" of Table 1 is `outputs["side2"]`.

Geometry: every 3^d convolution pads 1 voxel on each side, so the stride-2 convolutions put
voxel i of the map at 1/f resolution over input voxel f * i. The linear upsampling
(`layers.upsample_linear`) interpolates on that same grid, so side outputs are not shifted
against the input.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from wh_errmap.models.layers import (Conv3, KernelAndBias, deconv_upsample, norm_layer,
                                     upsample_linear)

# Output names in order from shallow to deep side output; losses pair side weights with
# this order.
SIDE_OUTPUTS = ("side2", "side3", "side4", "side5")
OUTPUT_NAMES = ("final",) + SIDE_OUTPUTS
NUM_DOWNSAMPLINGS = 3
# Inputs are padded to a multiple of this so that every stride-2 stage halves exactly.
SIZE_MULTIPLE = 2**NUM_DOWNSAMPLINGS

NormFactory = Callable[[int, str], nn.Module]


def count_params(params: Any) -> int:
  """Number of scalars in a pytree of arrays (e.g. `variables["params"]`)."""
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


class VoxRes(nn.Module):
  """Pre-activation residual module: x + conv(relu(norm(conv(relu(norm(x)))))), width kept."""
  norm: NormFactory
  conv: Callable[..., nn.Module]   # conv(features, name=...) -> a stride-1 Conv3

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    y = nn.relu(self.norm(channels, "norm1")(x))
    y = self.conv(channels, name="conv1")(y)
    y = nn.relu(self.norm(channels, "norm2")(y))
    y = self.conv(channels, name="conv2")(y)
    return x + y


class VoxResNet(nn.Module):
  """Deeply supervised VoxResNet; one definition for 2D and 3D segmentors and the predictor.

  Attributes:
    spatial_dims: 2 or 3.
    num_classes: output channels: 8 for the segmentors, 1 (error logit) for the predictor.
      The input channel count is taken from the input (1 image channel for the segmentors,
      1 + 8 for the predictor).
    width1: channels of conv1a/conv1b.
    width2: channels of the three downsampling stages.
    num_voxres: VoxRes modules per stage.
    norm: "batch", "group" or "instance".
    num_groups: group count for norm="group" (lowered to a divisor of the channels).
    momentum: batch-norm running-average momentum.
    axis_name: mapped axis over which batch norm averages its batch statistics (inside
      shard_map/pmap/vmap); None for statistics of the local batch only. Unused by group
      and instance norm.
    upsample: "linear": classify at low resolution, then linearly upsample the logits;
      "transpose": learnable transposed conv (kernel = stride = factor) on the features,
      then classify at full resolution, as in the original VoxResNet; "deconv": the same
      function and parameters as "transpose", computed as a matmul and a pixel shuffle
      (Deconv), which trains faster.
    conv_impl: 3^d convolutions: "auto", "xla" or "matmul" (see Conv3).
    dtype: compute dtype (e.g. jnp.bfloat16); outputs are float32 regardless.
    param_dtype: dtype of the parameters and batch statistics.
  """
  spatial_dims: int = 3
  num_classes: int = 8
  width1: int = 32
  width2: int = 64
  num_voxres: int = 2
  norm: str = "batch"
  num_groups: int = 8
  momentum: float = 0.9
  axis_name: str | None = None
  upsample: str = "linear"
  conv_impl: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    """Logits of the fused and side outputs.

    Args:
      x: (N, *spatial, C_in) float image (and one-hot mask for the predictor); any spatial
        size: it is edge-padded at the far end of each axis to a multiple of 8 and the
        outputs are cropped back, so border voxels see replicated content rather than an
        artificial step to zero (a zero one-hot row would not be a valid mask).
      train: batch norm uses (and, with mutable=["batch_stats"], updates) batch statistics
        when True, the running averages when False.
    Returns:
      {"final", "side2", "side3", "side4", "side5"} -> (N, *spatial, num_classes) float32
      logits at input resolution; "final" is the sum of the four side outputs.
    """
    if self.spatial_dims not in (2, 3):
      raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
    if x.ndim != self.spatial_dims + 2:
      raise ValueError(f"expected (N, *{self.spatial_dims} spatial, C) input, got {x.shape}")
    if self.upsample not in ("linear", "transpose", "deconv"):
      raise ValueError(
          f"upsample must be 'linear', 'transpose' or 'deconv', got {self.upsample!r}")

    spatial = x.shape[1:-1]
    pad = [(0, -size % SIZE_MULTIPLE) for size in spatial]
    x = jnp.pad(x, [(0, 0), *pad, (0, 0)], mode="edge")

    norm = functools.partial(norm_layer, kind=self.norm, train=train, momentum=self.momentum,
                             num_groups=self.num_groups, axis_name=self.axis_name,
                             dtype=self.dtype, param_dtype=self.param_dtype)
    conv = functools.partial(Conv3, spatial_dims=self.spatial_dims, impl=self.conv_impl,
                             dtype=self.dtype, param_dtype=self.param_dtype)
    down = functools.partial(conv, stride=2)

    h = conv(self.width1, name="conv1a")(x)
    h = conv(self.width1, name="conv1b")(nn.relu(norm(self.width1, "norm1a")(h)))
    features = [h]
    for stage in range(1, NUM_DOWNSAMPLINGS + 1):
      h = nn.relu(norm(h.shape[-1], f"stage{stage}_norm")(h))
      h = down(self.width2, name=f"stage{stage}_down")(h)
      for k in range(1, self.num_voxres + 1):
        h = VoxRes(norm, conv, name=f"stage{stage}_voxres{k}")(h)
      features.append(h)

    crop = (slice(None), *(slice(0, size) for size in spatial))
    sides = {name: self._side_logits(feature, 2**level, name)[crop]
             for level, (name, feature) in enumerate(zip(SIDE_OUTPUTS, features))}
    return {"final": sum(sides.values()), **sides}

  def _deconv_logits(self, feature: jax.Array, factor: int, name: str) -> jax.Array:
    """The "transpose" side output (deconvolution, then the 1^d classifier) with the same
    parameters, computed fast: both maps are linear, so the classifier is folded into the
    deconvolution's matrix and only num_classes channels per output voxel are shuffled
    (`deconv_upsample`'s matmul + pixel shuffle, at the cost of the linear form)."""
    d, width, classes = self.spatial_dims, feature.shape[-1], self.num_classes
    kernel, bias = KernelAndBias((factor,) * d + (width, width), width, self.param_dtype,
                           name=f"{name}_upsample")()
    kernel_c, bias_c = KernelAndBias((1,) * d + (width, classes), classes, self.param_dtype,
                               name=f"{name}_classifier")()
    # Deconvolution then classifier = one deconvolution with kernel @ classifier weights.
    weights = kernel_c.reshape(width, classes).astype(jnp.float32)
    folded = kernel.astype(jnp.float32) @ weights
    offset = bias.astype(jnp.float32) @ weights + bias_c.astype(jnp.float32)
    x, folded = nn.dtypes.promote_dtype(feature, folded, dtype=self.dtype)
    return deconv_upsample(x, folded, jnp.zeros((), x.dtype)).astype(jnp.float32) + offset

  def _side_logits(self, feature: jax.Array, factor: int, name: str) -> jax.Array:
    """(N, *padded_spatial, num_classes) float32 logits of one side output."""
    if self.upsample == "deconv" and factor > 1:
      return self._deconv_logits(feature, factor, name)
    classifier = nn.Conv(self.num_classes, (1,) * self.spatial_dims, dtype=self.dtype,
                         param_dtype=self.param_dtype, name=f"{name}_classifier")
    if factor == 1:
      return classifier(feature).astype(jnp.float32)
    if self.upsample == "linear":
      # Linear upsampling and the 1^d classifier are both linear maps and the upsampling
      # weights sum to 1 (so the bias passes through unchanged): classifying first and
      # upsampling num_classes logits equals upsampling width2 features and classifying,
      # at a fraction of the memory and FLOPs. Upsampling in float32 keeps bf16 rounding
      # out of the interpolation.
      return upsample_linear(classifier(feature).astype(jnp.float32), factor)
    upsample = nn.ConvTranspose(feature.shape[-1], (factor,) * self.spatial_dims,
                                strides=(factor,) * self.spatial_dims, padding="VALID",
                                dtype=self.dtype, param_dtype=self.param_dtype,
                                name=f"{name}_upsample")
    upsampled = upsample(feature)
    return classifier(upsampled).astype(jnp.float32)
