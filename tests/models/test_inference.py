"""Whole-volume segmentor inference: outputs of the model applied to the volume as it is,
one compiled program for scans whose shapes round up to the same multiple of 8, and scans
of any shape split over 4 or 8 simulated devices."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import base
from tests.train.sharded_training import run_on_8_devices
from wh_errmap.models import inference
from wh_errmap.models.factory import make_model


@pytest.mark.parametrize("spatial_dims", [3, 2])
def test_scans_of_one_size_bucket_share_a_program_and_keep_their_outputs(spatial_dims):
  config = base.get_config().model
  config.width1, config.width2, config.num_voxres = 4, 8, 1
  model = make_model(config, spatial_dims, 8)
  sample = jnp.zeros((1, 16, 16, 1) if spatial_dims == 2 else (1, 16, 16, 16, 1))
  variables = jax.jit(lambda key: model.init(key, sample, train=False))(jax.random.key(0))
  compiled = None
  # Neither shape is a multiple of 8 on any axis; both round up to 16 x 16 x 16.
  for seed, shape in enumerate([(13, 11, 9), (15, 10, 14)]):
    image = np.random.default_rng(seed).normal(size=(*shape, 1)).astype(np.float32)
    outputs = inference.segment_volume_with_uncertainty(model, variables, image)
    # Independently: the model on the volume as it is (it edge-pads to 8 itself), or on
    # each axial slice alone for the 2D model.
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    if spatial_dims == 3:
      logits = {k: np.asarray(v[0]) for k, v in apply(variables, image[None]).items()}
    else:   # the axial slices as a batch of (X, Y) images
      by_slice = apply(variables, np.moveaxis(image, 2, 0))
      logits = {k: np.moveaxis(np.asarray(v), 0, 2) for k, v in by_slice.items()}
    assert set(outputs) == set(logits)
    for name, (labels, unsure) in outputs.items():
      assert labels.shape == unsure.shape == shape, name
      probs = jax.nn.softmax(logits[name], axis=-1)
      np.testing.assert_array_equal(labels, np.argmax(logits[name], axis=-1), err_msg=name)
      np.testing.assert_allclose(unsure, 1 - np.max(probs, axis=-1), atol=1e-5, err_msg=name)
    if compiled is None:
      compiled = inference._labels_and_uncertainty._cache_size()
  assert inference._labels_and_uncertainty._cache_size() == compiled


@pytest.mark.parametrize("space,shape,expected", [
    (1, (13, 11, 9), (16, 16, 16)), (1, (16, 8, 17), (16, 8, 24)),
    (4, (13, 11, 9), (32, 16, 16)), (4, (70, 19, 13), (72, 24, 16)),
    (3, (49, 8, 8), (72, 8, 8))])
def test_the_inference_shape_rounds_to_8_and_splits_over_the_mesh(space, shape, expected):
  # Hand-computed: each axis up to a multiple of 8; X then up to a multiple of lcm(8,
  # space) and at least 8 per device (32 for 4 devices; 56 -> 72 for 3).
  class Mesh:   # split_length reads only the size of the mesh's space axis
    shape = {"space": space}
  assert inference.inference_shape(shape, None if space == 1 else Mesh()) == expected


def test_whole_scans_of_any_shape_split_over_4_or_8_devices_match_one_device():
  """Whole-volume inference split over 4 or 8 devices gives the 1-device outputs, for scans
  whose shape divides by neither, and so does a fold's evaluation of a whole scan."""
  inference = run_on_8_devices("inference")
  for scan in ("4:70x19x13", "8:70x19x13"):
    for name in ("seg3d", "seg2d"):
      # Argmax ties aside, the split volume gives the same labels and uncertainties.
      assert inference[scan][name]["label_mismatch"] < 1e-3, inference
      assert inference[scan][name]["uncertainty_diff"] < 1e-4, inference
    assert inference[scan]["predictor"]["prob_diff"] < 1e-4, inference
  # A scan shorter than a device's share runs (padded along X, outputs of its own shape);
  # near its end the padding differs from one device's, so only the run is checked.
  assert set(inference["8:13x11x9"]) == {"seg3d", "seg2d", "predictor"}
  # A fold's evaluation of a whole scan that 4 devices do not divide: the same 11 records.
  assert inference["evaluate"]["records"] == 11
  assert inference["evaluate"]["score_diff"] < 1e-4, inference["evaluate"]
