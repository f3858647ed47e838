"""The layers VoxResNet is built of, in forms that run fast under XLA on every backend.

- `Conv3`: a 3^d convolution with padding 1, through XLA's convolution or one matmul
  (`conv3_matmul`, much faster on the CPU).
- `Deconv` / `deconv_upsample`: the transposed convolution with kernel = stride as a matmul
  and a pixel shuffle (XLA's gradient of lax.conv_transpose is slow).
- `upsample_linear`: separable linear upsampling on the stride-2 convolution grid.
- `norm_layer`: batch, group or instance normalisation from one setting.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


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


def norm_layer(channels: int, name: str, *, kind: str, train: bool, momentum: float,
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


class KernelAndBias(nn.Module):
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
