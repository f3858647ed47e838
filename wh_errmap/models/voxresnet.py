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
voxel i of the map at 1/f resolution over input voxel f * i. The linear upsampling below
interpolates on that same grid, so side outputs are not shifted against the input.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


def _linear_interp_matrix(in_size: int, factor: int) -> np.ndarray:
  """(in_size * factor, in_size) float32 weights: output voxel x samples input at x / factor.

  Rows sum to 1. Output voxels past the last input voxel take its value (clamped), since
  the input grid ends at factor * (in_size - 1).
  """
  pos = np.arange(in_size * factor) / factor
  lo = np.minimum(np.floor(pos).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = np.clip(pos - lo, 0.0, 1.0)
  rows = np.arange(in_size * factor)
  weights = np.zeros((in_size * factor, in_size), np.float64)
  np.add.at(weights, (rows, lo), 1.0 - frac)
  np.add.at(weights, (rows, hi), frac)
  return weights.astype(np.float32)


def upsample_linear(x: jax.Array, factor: int) -> jax.Array:
  """Separable (bi/tri)linear upsampling by an integer factor on the stride-2 conv grid.

  Args:
    x: (N, *spatial, C) array; all spatial axes are upsampled.
    factor: integer scale factor.
  Returns:
    (N, *(factor * spatial), C) array of x's dtype. Voxel i of `x` lands on output voxel
    factor * i; constants are preserved everywhere, including the clamped far edge.
  """
  for axis in range(1, x.ndim - 1):
    weights = jnp.asarray(_linear_interp_matrix(x.shape[axis], factor), x.dtype)
    x = jnp.tensordot(weights, x, axes=((1,), (axis,)), precision=jax.lax.Precision.HIGHEST)
    x = jnp.moveaxis(x, 0, axis)
  return x


def transpose_kernel_to_deconv(kernel: jax.Array) -> jax.Array:
  """An nn.ConvTranspose kernel with kernel = stride = f as the matrix of `deconv_upsample`.

  Args:
    kernel: (f,)*d + (C_in, C_out), flax's layout with transpose_kernel=False (its default).
  Returns:
    (C_in, f^d * C_out) array of kernel's dtype; column ((a_1 * f + a_2) * f + a_3) * C_out
    + o (3D; 2D drops a_3) maps input channels to output channel o at offset a within each
    f^d output block.

  lax.conv_transpose with transpose_kernel=False correlates the zero-dilated input, padded
  f - 1 on each side, with the unflipped kernel: output voxel f * i + a receives input voxel
  i through tap f - 1 - a, so the taps are flipped here.
  """
  d = kernel.ndim - 2
  flipped = kernel[(slice(None, None, -1),) * d]
  return jnp.moveaxis(flipped, -2, 0).reshape(kernel.shape[-2], -1)


def deconv_to_transpose_kernel(matrix: jax.Array, factor: int, spatial_dims: int) -> jax.Array:
  """Inverse of `transpose_kernel_to_deconv`: (C_in, f^d * C_out) -> (f,)*d + (C_in, C_out)."""
  channels = matrix.shape[0]
  blocks = matrix.reshape(channels, *(factor,) * spatial_dims, -1)
  return jnp.moveaxis(blocks, 0, -2)[(slice(None, None, -1),) * spatial_dims]


def depth_to_space(x: jax.Array, factor: int) -> jax.Array:
  """Pixel shuffle in 2D and 3D: (N, *S, f^d * C) -> (N, *(f * S), C).

  Channel ((a_1 * f + a_2) * f + a_3) * C + c of voxel i goes to channel c of voxel
  f * i + a (the column order of `transpose_kernel_to_deconv`).
  """
  d = x.ndim - 2
  size = x.shape[1:-1]
  blocks = x.reshape(x.shape[0], *size, *(factor,) * d, -1)
  # (N, S_1..S_d, a_1..a_d, C) -> (N, S_1, a_1, ..., S_d, a_d, C)
  order = [0, *(axis for k in range(1, d + 1) for axis in (k, k + d)), 2 * d + 1]
  return blocks.transpose(order).reshape(x.shape[0], *(factor * n for n in size), -1)


def deconv_upsample(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """nn.ConvTranspose(C_out, (f,)*d, strides=(f,)*d, padding="VALID") as matmul + pixel shuffle.

  Args:
    x: (N, *S, C_in) with 2 or 3 spatial axes.
    kernel: (f,)*d + (C_in, C_out), the layout of nn.ConvTranspose.
    bias: (C_out,).
  Returns:
    (N, *(f * S), C_out), equal to the transposed convolution.

  Why: with kernel = stride the output blocks do not overlap, so the transposed convolution
  is a 1^d convolution to f^d * C_out channels followed by a reshape. XLA's gradient of
  lax.conv_transpose is slow (jax-ml/jax#31662); a matmul and a transpose are not.
  """
  y = x @ transpose_kernel_to_deconv(kernel)
  return depth_to_space(y, kernel.shape[0]) + bias


def _norm_layer(channels: int, name: str, *, kind: str, train: bool, momentum: float,
                num_groups: int, axis_name: str | None, dtype: Any,
                param_dtype: Any) -> nn.Module:
  """A normalization layer over the last axis, created in the calling module's scope."""
  if kind == "batch":
    return nn.BatchNorm(use_running_average=not train, momentum=momentum,
                        axis_name=axis_name, dtype=dtype, param_dtype=param_dtype, name=name)
  if kind == "group":
    # The largest group count not above num_groups that divides the channels, so narrow
    # test-size widths (4, 6, ...) work with the same setting as the paper-size ones.
    groups = max(g for g in range(1, num_groups + 1) if channels % g == 0)
    return nn.GroupNorm(num_groups=groups, dtype=dtype, param_dtype=param_dtype, name=name)
  if kind == "instance":
    return nn.InstanceNorm(dtype=dtype, param_dtype=param_dtype, name=name)
  raise ValueError(f"norm must be 'batch', 'group' or 'instance', got {kind!r}")


def conv3_matmul(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
  """3^d convolution with 1 voxel of zero padding, written over one matmul.

  Args:
    x: (N, *S, C) with 2 or 3 spatial axes.
    kernel: (3,)*d + (C, O), the layout of flax's nn.Conv.
    stride: 1 or 2 (along every spatial axis).
  Returns:
    (N, *ceil(S / stride), O), equal to lax.conv_general_dilated with padding 1.

  Why: XLA's CPU convolution runs small-channel 3D convolutions at ~10 GFLOP/s and their
  gradients (strided ones above all) several times slower still, while its matmul is
  fast. Gathering the 9 in-plane shifts (9C columns) and letting one matmul produce the
  partial sums of all 3 depth taps (3O columns), then adding them with a shift along the
  outermost spatial axis, ran a stride-1 forward+backward 3-6x faster than lax.conv on
  our 2-core CPU for 8-32 channels. Plain autodiff of these ops is equally fast.
  """
  d = x.ndim - 2
  size, channels, out = x.shape[1:-1], x.shape[-1], kernel.shape[-1]
  out_size = [-(-n // stride) for n in size]
  padded = jnp.pad(x, [(0, 0)] + [(1, 1)] * d + [(0, 0)])

  def taps(axis_offset: int, n: int) -> slice:
    return slice(axis_offset, axis_offset + stride * (n - 1) + 1, stride)

  inplane = [(j, k) for j in range(3) for k in range(3)]
  if d == 2:
    cols = jnp.concatenate([padded[:, taps(j, out_size[0]), taps(k, out_size[1])]
                            for j, k in inplane], -1)
    return cols @ kernel.reshape(9 * channels, out)
  cols = jnp.concatenate([padded[:, :, taps(j, out_size[1]), taps(k, out_size[2])]
                          for j, k in inplane], -1)                     # (N, D+2, H', W', 9C)
  # kernel (3, 3, 3, C, O) -> (9C, 3 * O): column block i holds depth tap i.
  weights = jnp.transpose(kernel.reshape(3, 9 * channels, out), (1, 0, 2))
  partial = (cols @ weights.reshape(9 * channels, 3 * out)).reshape(*cols.shape[:-1], 3, out)
  return sum(partial[:, taps(i, out_size[0]), ..., i, :] for i in range(3))


class Conv3(nn.Module):
  """3^d convolution with padding 1 and the parameters of nn.Conv.

  impl: "xla" (lax.conv), "matmul" (conv3_matmul) or "auto": matmul for 3D convolutions on
  the CPU backend, xla otherwise. Measured on a 2-core CPU (docs/benchmarks.md), matmul made
  the 3D training steps 2.5-4x faster, while XLA's 2D convolutions were as fast or faster
  (small 2D step 79 ms with xla vs 112 ms). Parameters do not depend on impl.
  """
  features: int
  spatial_dims: int
  stride: int = 1
  impl: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (3,) * self.spatial_dims + (x.shape[-1], self.features)
    kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    impl = self.impl
    if impl == "auto":
      impl = "matmul" if jax.default_backend() == "cpu" and self.spatial_dims == 3 else "xla"
    if impl == "matmul":
      y = conv3_matmul(x, kernel, self.stride)
    elif impl == "xla":
      spec = "NHWC" if self.spatial_dims == 2 else "NDHWC"
      y = jax.lax.conv_general_dilated(
          x, kernel, (self.stride,) * self.spatial_dims, [(1, 1)] * self.spatial_dims,
          dimension_numbers=(spec, spec[1:-1] + "IO", spec))
    else:
      raise ValueError(f"conv impl must be 'auto', 'xla' or 'matmul', got {self.impl!r}")
    return y + bias


class Deconv(nn.Module):
  """Upsampling by `factor` with the parameters and function of
  nn.ConvTranspose(features, (factor,)*d, strides=(factor,)*d, padding="VALID"), computed
  by `deconv_upsample`: a checkpoint of either restores into the other unchanged."""
  features: int
  factor: int
  spatial_dims: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (self.factor,) * self.spatial_dims + (x.shape[-1], self.features)
    # nn.ConvTranspose's initializers, so that both forms start from the same weights.
    kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return deconv_upsample(x, kernel, bias)


class _Params(nn.Module):
  """A convolution's kernel and bias, with nn.Conv's initializers, for layers whose
  parameters are used in a fused computation (`VoxResNet._deconv_logits`)."""
  kernel_shape: tuple[int, ...]
  features: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    return (self.param("kernel", nn.initializers.lecun_normal(), self.kernel_shape,
                       self.param_dtype),
            self.param("bias", nn.initializers.zeros_init(), (self.features,),
                       self.param_dtype))


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

    norm = functools.partial(_norm_layer, kind=self.norm, train=train, momentum=self.momentum,
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
    kernel, bias = _Params((factor,) * d + (width, width), width, self.param_dtype,
                           name=f"{name}_upsample")()
    kernel_c, bias_c = _Params((1,) * d + (width, classes), classes, self.param_dtype,
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
