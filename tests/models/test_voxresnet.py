"""VoxResNet: output names and shapes, parameter counts, padding, dtypes, norms."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wh_errmap.models.layers import (Deconv, deconv_to_transpose_kernel, transpose_kernel_to_deconv,
                                     upsample_linear)
from wh_errmap.models.voxresnet import OUTPUT_NAMES, SIDE_OUTPUTS, VoxResNet, count_params

# XLA's convolution: 2-3x faster to compile on the CPU than the matmul form that "auto"
# gives 3D models there. The two forms are compared whole-model below and layer by layer
# with gradients (test_matmul_convolution_equals_xla_with_gradients).
TINY = {"width1": 4, "width2": 8, "conv_impl": "xla"}


def expected_param_count(spatial_dims, in_channels, num_classes, width1=32, width2=64,
                         num_voxres=2, upsample="linear"):
  """Parameter count from the layer list: convs k^d*cin*cout + cout, norms 2*C."""
  def conv(cin, cout, kernel=3):
    return kernel**spatial_dims * cin * cout + cout

  count = conv(in_channels, width1) + 2 * width1 + conv(width1, width1)  # conv1a, norm1a, conv1b
  for stage in range(3):
    cin = width1 if stage == 0 else width2
    count += 2 * cin + conv(cin, width2)  # stage norm, stride-2 conv
    count += num_voxres * 2 * (2 * width2 + conv(width2, width2))  # VoxRes: 2 x (norm, conv)
  count += conv(width1, num_classes, 1) + 3 * conv(width2, num_classes, 1)  # classifiers
  if upsample in ("transpose", "deconv"):
    count += sum(conv(width2, width2, 2**level) for level in (1, 2, 3))
  return count


def init(model, shape, in_channels=1):
  """(input, variables), jitted with rbg keys: eager init and threefry keys each make init
  several times slower to compile on CPU."""
  x = jax.random.normal(jax.random.key(0, impl="rbg"), (*shape, in_channels))
  return x, jax.jit(model.init, static_argnames="train")(
      jax.random.key(1, impl="rbg"), x, train=False)


def squared_sum_grads(layer, params, x):
  """Gradients of sum(layer(x)^2) with respect to (params, x); jitted: one compilation
  instead of one per operation."""
  return jax.jit(jax.grad(lambda p, x: (layer.apply(p, x) ** 2).sum(), argnums=(0, 1)))(
      params, x)


def jit_apply(model):
  """model.apply, jitted once so that repeated calls on one shape compile once."""
  return jax.jit(model.apply, static_argnames=("train", "mutable"))


@pytest.mark.parametrize("shape", [(2, 12, 10, 9), (2, 13, 11)])
def test_outputs_are_named_logits_at_input_resolution(shape):
  model = VoxResNet(spatial_dims=len(shape) - 1, num_classes=5, **TINY)
  x, variables = init(model, shape)
  outputs = jit_apply(model)(variables, x, train=False)
  assert tuple(outputs) == OUTPUT_NAMES
  for name in OUTPUT_NAMES:
    assert outputs[name].shape == (*shape, 5), name
    assert outputs[name].dtype == jnp.float32
  np.testing.assert_allclose(outputs["final"], sum(outputs[name] for name in SIDE_OUTPUTS),
                             rtol=1e-6, atol=1e-6)
  # The CPU's default form ("auto": matmul in 3D) computes the same outputs.
  default = VoxResNet(spatial_dims=len(shape) - 1, num_classes=5,
                      **{**TINY, "conv_impl": "auto"})
  for name, output in jit_apply(default)(variables, x, train=False).items():
    np.testing.assert_allclose(output, outputs[name], rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("upsample", ["linear", "transpose", "deconv"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("in_channels,num_classes", [(1, 8), (9, 1)])
def test_param_count_matches_layer_list(spatial_dims, upsample, in_channels, num_classes):
  model = VoxResNet(spatial_dims=spatial_dims, num_classes=num_classes, upsample=upsample)
  x = jnp.zeros((1, *(16,) * spatial_dims, in_channels))
  # eval_shape: paper-size widths without allocating or computing anything.
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  assert count_params(variables["params"]) == expected_param_count(
      spatial_dims, in_channels, num_classes, upsample=upsample)
  num_norm_channels = 32 + 32 + 2 * 64 + 3 * 2 * 2 * 64  # norm1a, stage norms, VoxRes norms
  assert count_params(variables["batch_stats"]) == 2 * num_norm_channels


def test_paper_size_param_counts():
  segmentor, predictor = VoxResNet(num_classes=8), VoxResNet(num_classes=1)
  x1, x9 = jnp.zeros((1, 16, 16, 16, 1)), jnp.zeros((1, 16, 16, 16, 9))
  count = lambda model, x: count_params(jax.eval_shape(
      functools.partial(model.init, train=False), jax.random.key(0), x)["params"])
  assert count(segmentor, x1) == 1_636_864
  assert count(predictor, x9) == 1_642_180


def test_non_multiple_of_8_input_is_edge_padded():
  model = VoxResNet(spatial_dims=3, num_classes=3, **TINY)
  x, variables = init(model, (1, 12, 10, 9))
  padded = jnp.pad(x, [(0, 0), (0, 4), (0, 6), (0, 7), (0, 0)], mode="edge")
  apply = jit_apply(model)
  outputs = apply(variables, x, train=False)
  padded_outputs = apply(variables, padded, train=False)
  for name in OUTPUT_NAMES:
    np.testing.assert_allclose(outputs[name], padded_outputs[name][:, :12, :10, :9],
                               rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  shape = (2, 16, 8, 8)
  model32 = VoxResNet(spatial_dims=3, num_classes=4, **TINY)
  model16 = VoxResNet(spatial_dims=3, num_classes=4, dtype=jnp.bfloat16, **TINY)
  x, variables = init(model16, shape)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  outputs16 = jit_apply(model16)(variables, x, train=False)
  outputs32 = jit_apply(model32)(variables, x, train=False)
  for name in OUTPUT_NAMES:
    assert outputs16[name].dtype == jnp.float32
    # bf16 really ran (results differ) and stayed close to float32.
    assert not np.array_equal(outputs16[name], outputs32[name])
    np.testing.assert_allclose(outputs16[name], outputs32[name], atol=0.1)


def test_batch_stats_update_in_train_mode_and_are_read_only_in_eval():
  model = VoxResNet(spatial_dims=2, num_classes=3, **TINY)
  x, variables = init(model, (4, 8, 8))
  apply = jit_apply(model)
  _, updates = apply(variables, x, train=True, mutable=("batch_stats",))
  for old, new in zip(jax.tree.leaves(variables["batch_stats"]),
                      jax.tree.leaves(updates["batch_stats"])):
    assert not np.allclose(old, new)
  # Eval uses the running averages: without a mutable collection it runs, and a sample's
  # output does not depend on the rest of the batch (it does in train mode).
  alone = apply(variables, x[:1], train=False)["final"]
  batched = apply(variables, x, train=False)["final"][:1]
  np.testing.assert_allclose(alone, batched, rtol=1e-5, atol=1e-5)
  alone, _ = apply(variables, x[:1], train=True, mutable=("batch_stats",))
  batched, _ = apply(variables, x, train=True, mutable=("batch_stats",))
  assert not np.allclose(alone["final"], batched["final"][:1], atol=1e-3)


def test_axis_name_averages_batch_stats_across_devices():
  model = VoxResNet(spatial_dims=2, num_classes=3, **TINY)
  sharded_model = VoxResNet(spatial_dims=2, num_classes=3, axis_name="data", **TINY)
  x, variables = init(model, (4, 8, 8))
  _, whole = jit_apply(model)(variables, x, train=True, mutable=("batch_stats",))

  def per_device(xs):
    return sharded_model.apply(variables, xs, train=True, mutable=["batch_stats"])[1]

  per_device_stats = jax.jit(jax.vmap(per_device, axis_name="data"))(x.reshape(2, 2, 8, 8, 1))
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(per_device_stats)):
    np.testing.assert_allclose(b[0], a, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b[1], a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm", ["group", "instance"])
def test_group_and_instance_norm_run_without_batch_stats(norm):
  model = VoxResNet(spatial_dims=3, num_classes=2, norm=norm, width1=6, width2=8)
  x, variables = init(model, (1, 8, 8, 8))
  assert set(variables) == {"params"}
  assert count_params(variables["params"]) == expected_param_count(3, 1, 2, 6, 8)
  outputs = jit_apply(model)(variables, x, train=True)
  assert all(np.isfinite(outputs[name]).all() for name in OUTPUT_NAMES)


def test_unknown_options_raise():
  x = jnp.zeros((1, 8, 8, 1))
  with pytest.raises(ValueError, match="norm"):
    VoxResNet(spatial_dims=2, norm="layer", **TINY).init(jax.random.key(0), x, train=False)
  with pytest.raises(ValueError, match="upsample"):
    VoxResNet(spatial_dims=2, upsample="nearest", **TINY).init(jax.random.key(0), x, train=False)
  with pytest.raises(ValueError, match="input"):
    VoxResNet(spatial_dims=3, **TINY).init(jax.random.key(0), x, train=False)


@pytest.mark.parametrize("upsample", ["linear", "transpose", "deconv"])
def test_every_parameter_gets_a_finite_gradient(upsample):
  model = VoxResNet(spatial_dims=3, num_classes=3, upsample=upsample, **TINY)
  x, variables = init(model, (2, 8, 8, 8))

  def loss(params):
    outputs, _ = model.apply({**variables, "params": params}, x, train=True,
                             mutable=["batch_stats"])
    return sum(jnp.mean(outputs[name] ** 2) for name in OUTPUT_NAMES)

  grads = jax.jit(jax.grad(loss))(variables["params"])
  for path, grad in jax.tree_util.tree_leaves_with_path(grads):
    assert np.isfinite(grad).all() and np.abs(grad).max() > 0, jax.tree_util.keystr(path)


def test_upsample_linear_puts_low_res_voxel_i_at_factor_times_i():
  ramp = jnp.arange(3.0)[None, :, None, None] + jnp.zeros((1, 3, 2, 1))
  up = upsample_linear(ramp, 4)
  assert up.shape == (1, 12, 8, 1)
  # Interior: exact linear interpolation between the samples at 0, 4, 8; past 8: clamped.
  np.testing.assert_allclose(up[0, :, 0, 0], [0, .25, .5, .75, 1, 1.25, 1.5, 1.75, 2, 2, 2, 2])
  np.testing.assert_allclose(up[0, :, :, 0], np.repeat(up[0, :, :1, 0], 8, axis=1))
  np.testing.assert_allclose(upsample_linear(jnp.full((1, 2, 3, 2, 1), 7.0), 8), 7.0)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape", [(2, 6, 5, 4, 3), (3, 7, 6, 2), (1, 8, 8, 6, 2)])
def test_matmul_convolution_equals_xla_with_gradients(shape, stride):
  from wh_errmap.models.layers import Conv3
  x = jax.random.normal(jax.random.key(0), shape)
  layers = {impl: Conv3(5, spatial_dims=len(shape) - 2, stride=stride, impl=impl)
            for impl in ("xla", "matmul")}
  params = layers["xla"].init(jax.random.key(1), x)
  outputs = {impl: jax.jit(layer.apply)(params, x) for impl, layer in layers.items()}
  np.testing.assert_allclose(outputs["matmul"], outputs["xla"], rtol=1e-5, atol=1e-5)
  grads = {impl: squared_sum_grads(layer, params, x) for impl, layer in layers.items()}
  for a, b in zip(jax.tree.leaves(grads["matmul"]), jax.tree.leaves(grads["xla"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


# The side outputs upsample by 2, 4 and 8.
@pytest.mark.parametrize("factor", [2, 4, 8])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_deconv_equals_conv_transpose_with_gradients(spatial_dims, factor):
  # Unequal sizes and channel counts, so that a swapped axis cannot pass.
  x = jax.random.normal(jax.random.key(0), (2, 3, 4, 2)[:spatial_dims + 1] + (5,))
  transpose = nn.ConvTranspose(6, (factor,) * spatial_dims, strides=(factor,) * spatial_dims,
                               padding="VALID")
  deconv = Deconv(6, factor, spatial_dims)
  shapes = jax.eval_shape(transpose.init, jax.random.key(1), x)
  assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(
      lambda a: a.shape, jax.eval_shape(deconv.init, jax.random.key(1), x))
  assert count_params(shapes) == factor**spatial_dims * 5 * 6 + 6
  # Random bias too (the initializer's is zero); a different key per leaf.
  leaves, treedef = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = treedef.unflatten([jax.random.normal(k, a.shape) for k, a in zip(keys, leaves)])
  expected = jax.jit(transpose.apply)(params, x)
  assert expected.shape == (2, *(factor * n for n in x.shape[1:-1]), 6)
  np.testing.assert_allclose(jax.jit(deconv.apply)(params, x), expected, rtol=1e-5, atol=1e-5)
  grads = [squared_sum_grads(layer, params, x) for layer in (deconv, transpose)]
  for a, b in zip(*map(jax.tree.leaves, grads), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_deconv_kernel_conversion_round_trips(spatial_dims):
  kernel = jax.random.normal(jax.random.key(0), (4,) * spatial_dims + (3, 5))
  matrix = transpose_kernel_to_deconv(kernel)
  assert matrix.shape == (3, 4**spatial_dims * 5)
  np.testing.assert_array_equal(deconv_to_transpose_kernel(matrix, 4, spatial_dims), kernel)
  np.testing.assert_array_equal(
      transpose_kernel_to_deconv(deconv_to_transpose_kernel(matrix, 4, spatial_dims)), matrix)
  # Tap (0, ..., 0) of the transpose kernel feeds the last voxel of each output block.
  np.testing.assert_array_equal(matrix[:, -5:], kernel[(0,) * spatial_dims])


@pytest.mark.parametrize("shape", [(2, 12, 10, 9), (2, 13, 11)])
def test_deconv_model_is_the_transpose_model(shape):
  """Same parameter tree and initial values, same logits, also on edge-padded inputs."""
  models = {upsample: VoxResNet(spatial_dims=len(shape) - 1, num_classes=3, upsample=upsample,
                                **TINY) for upsample in ("transpose", "deconv")}
  x, variables = init(models["transpose"], shape)
  _, deconv_variables = init(models["deconv"], shape)
  for a, b in zip(jax.tree_util.tree_leaves_with_path(variables),
                  jax.tree_util.tree_leaves_with_path(deconv_variables), strict=True):
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])
  outputs = {upsample: jit_apply(model)(variables, x, train=False)
             for upsample, model in models.items()}
  for name in OUTPUT_NAMES:
    assert outputs["deconv"][name].shape == (*shape, 3)
    np.testing.assert_allclose(outputs["deconv"][name], outputs["transpose"][name],
                               rtol=1e-5, atol=1e-5)


def test_deconv_computes_in_the_given_dtype():
  x = jax.random.normal(jax.random.key(0), (1, 3, 2, 4))
  layers = {dtype: Deconv(4, 2, 2, dtype=dtype) for dtype in (jnp.float32, jnp.bfloat16)}
  params = layers[jnp.float32].init(jax.random.key(1), x)
  outputs = {dtype: layer.apply(params, x) for dtype, layer in layers.items()}
  assert outputs[jnp.bfloat16].dtype == jnp.bfloat16
  assert not np.array_equal(outputs[jnp.bfloat16], outputs[jnp.float32])
  np.testing.assert_allclose(outputs[jnp.bfloat16].astype(jnp.float32), outputs[jnp.float32],
                             atol=0.05)
