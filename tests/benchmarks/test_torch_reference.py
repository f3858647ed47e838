"""The PyTorch benchmark reference computes what the flax model and the JAX losses compute."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import torch_reference as ref  # noqa: E402  (after the torch skip)
from tests.conftest import ROOT  # noqa: E402
from wh_errmap.models import layers, voxresnet  # noqa: E402
from wh_errmap.train import losses  # noqa: E402

TINY = {"width1": 4, "width2": 8, "num_voxres": 1, "num_classes": 8}


def _flax_model(spatial_dims: int, num_classes: int = 8) -> voxresnet.VoxResNet:
  return voxresnet.VoxResNet(spatial_dims=spatial_dims, num_classes=num_classes, width1=4,
                             width2=8, num_voxres=1, conv_impl="xla")


def _random_variables(model: voxresnet.VoxResNet, x: np.ndarray, seed: int) -> dict:
  """Variables of the model's structure, all random (biases, BN affine and statistics too).

  The structure comes from eval_shape: a real (even jitted) init of the model takes
  seconds on CPU, for values that would be replaced anyway.
  """
  shapes = jax.eval_shape(lambda k, v: model.init(k, v, train=False), jax.random.PRNGKey(0),
                          jnp.asarray(x))
  rng = np.random.default_rng(seed)

  def sample(path, leaf):
    name = path[-1].key
    if name == "kernel":  # lecun-normal-like scale, so activations stay O(1)
      value = rng.normal(0.0, 1.0 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape)
    elif name == "scale":
      value = rng.uniform(0.5, 1.5, leaf.shape)
    elif name == "mean":
      value = rng.uniform(-0.3, 0.3, leaf.shape)
    elif name == "var":
      value = rng.uniform(0.5, 2.0, leaf.shape)
    else:  # conv and BN biases
      value = rng.normal(0.0, 0.2, leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(sample, shapes)


def copy_flax_to_torch(variables: dict, model: torch.nn.Module) -> None:
  """Copies flax VoxResNet params and batch_stats into the torch twin, checking every leaf.

  Conv kernels (*k, C, O) become torch weights (O, C, *k); the spatial axes X, Y, Z map to
  D, H, W in order, so no spatial transposition is needed.
  """
  used = 0
  for name, module in model.named_modules():
    path = name.split(".")

    def lookup(collection: str, leaf: str) -> np.ndarray:
      node = variables[collection]
      for key in path:
        node = node[key]
      return np.array(node[leaf])

    with torch.no_grad():
      if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
        kernel = lookup("params", "kernel")
        d = kernel.ndim - 2
        module.weight.copy_(torch.from_numpy(
            np.ascontiguousarray(np.transpose(kernel, (d + 1, d, *range(d))))))
        module.bias.copy_(torch.from_numpy(lookup("params", "bias")))
        used += 2
      elif isinstance(module, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
        module.weight.copy_(torch.from_numpy(lookup("params", "scale")))
        module.bias.copy_(torch.from_numpy(lookup("params", "bias")))
        module.running_mean.copy_(torch.from_numpy(lookup("batch_stats", "mean")))
        module.running_var.copy_(torch.from_numpy(lookup("batch_stats", "var")))
        used += 4
  assert used == len(jax.tree.leaves(variables)), "some flax variables were not copied"


def _to_torch_layout(x: np.ndarray) -> torch.Tensor:
  """(N, *S, C) -> (N, C, *S)."""
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


@pytest.mark.parametrize("spatial_dims,shape", [(3, (13, 12, 10)), (2, (13, 10))])
def test_same_network_as_flax(spatial_dims, shape):
  rng = np.random.default_rng(spatial_dims)
  x = rng.normal(size=(2, *shape, 1)).astype(np.float32)
  flax_model = _flax_model(spatial_dims)
  variables = _random_variables(flax_model, x, seed=spatial_dims)
  model = ref.VoxResNet(spatial_dims, 1, 8, **{k: TINY[k] for k in ("width1", "width2",
                                                                    "num_voxres")})
  assert ref.count_params(model) == voxresnet.count_params(variables["params"])
  copy_flax_to_torch(variables, model)

  for train in (False, True):
    expected = flax_model.apply(variables, jnp.asarray(x), train=train,
                                mutable=["batch_stats"] if train else False)
    if train:
      expected = expected[0]
    model.train(train)
    with torch.no_grad():
      got = model(_to_torch_layout(x))
    assert sorted(got) == sorted(voxresnet.OUTPUT_NAMES)
    for name in voxresnet.OUTPUT_NAMES:
      assert got[name].dtype == torch.float32
      np.testing.assert_allclose(got[name].numpy(), np.moveaxis(np.asarray(expected[name]), -1, 1),
                                 atol=1e-4, rtol=1e-4, err_msg=f"{name}, train={train}")


def test_same_interpolation_matrix():
  for size, factor in [(1, 2), (5, 2), (6, 4), (3, 8)]:
    np.testing.assert_array_equal(ref.linear_interp_matrix(size, factor).numpy(),
                                  layers._linear_interp_matrix(size, factor))


def test_same_losses_as_jax():
  rng = np.random.default_rng(0)
  shape = (2, 6, 5, 4)
  names = voxresnet.OUTPUT_NAMES
  logits = {n: rng.normal(0.0, 2.0, (*shape, 8)).astype(np.float32) for n in names}
  labels = rng.integers(0, 8, shape)
  labels[1, :, :, 2:] = 0  # some classes absent from a sample
  expected = losses.segmentation_loss({n: jnp.asarray(v) for n, v in logits.items()},
                                      jnp.asarray(labels), 8, (1, 1, 1, 1), 1.0)[0]
  got = ref.segmentation_loss({n: _to_torch_layout(v) for n, v in logits.items()},
                              torch.from_numpy(labels), 8)
  np.testing.assert_allclose(got.item(), float(expected), rtol=1e-5, atol=1e-5)

  error_logits = {n: rng.normal(0.0, 2.0, (*shape, 1)).astype(np.float32) for n in names}
  targets = rng.random(shape) < 0.3
  targets[0] = False  # an all-correct mask
  expected = losses.error_map_loss({n: jnp.asarray(v) for n, v in error_logits.items()},
                                   jnp.asarray(targets), (1, 1, 1, 1), 1.0)[0]
  got = ref.error_map_loss({n: _to_torch_layout(v) for n, v in error_logits.items()},
                           torch.from_numpy(targets))
  np.testing.assert_allclose(got.item(), float(expected), rtol=1e-5, atol=1e-5)


def test_pick_masks_and_predictor_input():
  masks = (torch.arange(10) % 7).reshape(10, 1, 1, 1, 1).expand(10, 4, 2, 3, 2).clone()
  label = torch.full((4, 2, 3, 2), 7)
  generator = torch.Generator().manual_seed(0)
  chosen = ref.pick_masks(masks, label, 0.5, generator)
  assert chosen.shape == label.shape
  for sample in chosen:  # each sample is one whole mask (a constant here) or the label
    assert sample.unique().numel() == 1
  inputs = ref.predictor_input(torch.zeros(4, 1, 2, 3, 2), chosen, 8)
  assert inputs.shape == (4, 9, 2, 3, 2)
  np.testing.assert_array_equal(inputs[:, 1:].sum(1).numpy(), 1.0)
  np.testing.assert_array_equal(inputs[:, 1:].argmax(1).numpy(), chosen.numpy())


def _tiny_spec(steps=None) -> dict:
  config = {"name": "tiny", **TINY, "crop_3d": [16, 16, 16], "crop_2d": [16, 16],
            "crop_predictor": [16, 16, 16], "batch_3d": 2, "batch_2d": 2,
            "batch_predictor": 2, "volume": [24, 24, 16]}
  spec = {"configs": [config], "warmup": 1, "iters": 1, "device": "cpu", "amp": "auto",
          "compile": "auto", "channels_last": "auto"}
  if steps is not None:
    spec["steps"] = steps
  return spec


def _check_result(out: dict, steps) -> None:
  assert out["framework"] == "pytorch"
  assert out["device"] == "cpu"
  assert isinstance(out["device_name"], str) and out["num_threads"] >= 1
  assert out["settings"] == {"amp": "none", "compile": False, "channels_last": False}
  assert [r["step"] for r in out["results"]] == list(steps)
  for r in out["results"]:
    assert r["config"] == "tiny"
    assert math.isfinite(r["seconds_per_iter"]) and r["seconds_per_iter"] > 0
    assert len(r["seconds_all"]) == 1
    assert r["samples_per_s"] == pytest.approx(r["batch"] / r["seconds_per_iter"])
    assert r["peak_memory_bytes"] is None
    assert r["num_params"] > 0
  by_step = {r["step"]: r for r in out["results"]}
  if "seg3d_train" in by_step:
    assert by_step["seg3d_train"]["voxels_per_sample"] == 16**3
  if "inference" in by_step:
    inference = by_step["inference"]
    assert inference["batch"] == 1 and inference["voxels_per_sample"] == 24 * 24 * 16
    assert 0.0 <= inference["qi"] <= 1.0
    widths = (TINY["width1"], TINY["width2"], TINY["num_voxres"])
    models = (ref.VoxResNet(3, 1, 8, *widths), ref.VoxResNet(2, 1, 8, *widths),
              ref.VoxResNet(3, 9, 1, *widths))
    assert inference["num_params"] == sum(ref.count_params(m) for m in models)


def test_run_end_to_end():
  out = ref.run(_tiny_spec())
  _check_result(out, ref.STEPS)


def test_cli_writes_json(tmp_path):
  steps = ["inference"]
  spec_path = tmp_path / "spec.json"
  spec_path.write_text(json.dumps(_tiny_spec(steps)))
  out_path = tmp_path / "out" / "result.json"
  subprocess.run([sys.executable, "benchmarks/torch_reference.py", "--spec", str(spec_path),
                  "--out", str(out_path)], cwd=ROOT, check=True, timeout=120)
  _check_result(json.loads(out_path.read_text()), steps)
  assert [p.name for p in out_path.parent.iterdir()] == ["result.json"]
