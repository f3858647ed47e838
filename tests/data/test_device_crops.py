"""Tests of the parameter stream and of the training crops computed on the device.

The host path (pipeline.train_dataset(..., output="crops"), scipy) is the reference: the
device crops of the parameter stream must equal it.
"""
import types

import jax
import numpy as np
import pytest

from tests.conftest import take_batches
from wh_errmap.data import device_crops, pipeline
from wh_errmap.data.volumes import IMAGE_PAD_VALUE, LABEL_PAD_VALUE

# Different shapes, one smaller than the 3D crop along every axis, so that stacking pads and
# crops pad.
SHAPES = [(20, 18, 14), (17, 18, 12), (20, 15, 14), (12, 10, 9)]
CROP_3D, CROP_2D = (16, 16, 12), (16, 16)
VALUES = (0, 2, 3, 5)

crop_batch = jax.jit(device_crops.crop_batch, static_argnames="crop_size")


def _case(case_id, image, label):
  return types.SimpleNamespace(case_id=case_id, image=image, label=label)


def _cases(shapes=SHAPES):
  """Random images independent of the labels, to check interpolation, not just the labels."""
  cases = []
  for k, shape in enumerate(shapes):
    rng = np.random.default_rng(k)
    cases.append(_case(f"case_{k}", rng.uniform(-1, 1, shape).astype(np.float32),
                       rng.choice(np.array(VALUES, np.uint8), size=shape)))
  return cases


def _streams(cases, crop_size, n, **kwargs):
  """n batches of crops and n of params of the same stream."""
  kwargs = dict(crop_size=crop_size, batch_size=3, seed=4, shard_index=0, shard_count=1) | kwargs
  return (take_batches(pipeline.train_dataset(cases, **kwargs), n),
          take_batches(pipeline.train_dataset(cases, output="params", **kwargs), n))


def _host_crop(cases, params, b, crop_size):
  """Sample b of a params batch, computed on the host by the pipeline's own apply steps."""
  case = cases[params["case"][b]]
  image, label = case.image, case.label
  if len(crop_size) == 2:
    image, label = pipeline.RandAxialSlice().apply(image, label, params["slice"][b])
  image, label = pipeline.RandAffineCrop(crop_size).apply(
      image, label, float(params["scale"][b]), params["origin"][b])
  return pipeline.RandFlip(range(len(crop_size))).apply(image, label, params["flip"][b])


@pytest.mark.parametrize("crop_size", [CROP_3D, CROP_2D])
def test_params_batches_shapes_and_dtypes(crop_size):
  d = len(crop_size)
  for params in take_batches(pipeline.train_dataset(_cases(), crop_size=crop_size, batch_size=3, seed=0,
                                             output="params", shard_index=0, shard_count=1), 4):
    assert set(params) == {"case", "scale", "origin", "flip"} | ({"slice"} if d == 2 else set())
    assert params["case"].shape == (3,) and params["case"].dtype == np.int32
    assert params["scale"].shape == (3,) and params["scale"].dtype == np.float32
    assert params["origin"].shape == (3, d) and params["origin"].dtype == np.int32
    assert params["flip"].shape == (3, d) and params["flip"].dtype == bool
    if d == 2:
      assert params["slice"].dtype == np.int32
      depth = np.array([SHAPES[k][2] for k in params["case"]])
      assert np.all((0 <= params["slice"]) & (params["slice"] < depth))


@pytest.mark.parametrize("crop_size", [CROP_3D, CROP_2D])
def test_params_pick_the_samples_of_the_host_stream(crop_size):
  # Without scaling the params recompute the host crops exactly, so the cases, slices,
  # origins and flips are those the host stream drew.
  cases = _cases()
  crops, params = _streams(cases, crop_size, 6, scale_range=(1.0, 1.0))
  seen = set()
  for crop, param in zip(crops, params):
    np.testing.assert_array_equal(param["scale"], 1.0)
    for b in range(3):
      image, label = _host_crop(cases, param, b, crop_size)
      np.testing.assert_array_equal(image, crop["image"][b, ..., 0])
      np.testing.assert_array_equal(label, crop["label"][b])
    seen |= {tuple(flip) for flip in param["flip"]}
  assert len(seen) > 2  # flips vary


def test_params_with_scaling_recompute_the_host_crops():
  # The float32 scale of the params recomputes the float64 host crops up to rounding.
  cases = _cases()
  crops, params = _streams(cases, CROP_3D, 4, scale_range=(0.7, 1.4))
  for crop, param in zip(crops, params):
    for b in range(3):
      image, label = _host_crop(cases, param, b, CROP_3D)
      np.testing.assert_allclose(image, crop["image"][b, ..., 0], atol=1e-4)
      assert np.mean(label != crop["label"][b]) < 1e-3


def test_flip_axes_subset_marks_only_those_axes():
  _, params = _streams(_cases(), CROP_3D, 8, flip_axes=(1,))
  flips = np.concatenate([p["flip"] for p in params])
  assert not flips[:, [0, 2]].any()
  assert 0 < flips[:, 1].sum() < len(flips)


def test_case_indexes_all_cases_not_the_shard():
  cases = _cases()
  for index in range(2):
    crops, params = _streams(cases, CROP_3D, 4, scale_range=(1.0, 1.0), shard_index=index,
                             shard_count=2)
    picked = np.concatenate([p["case"] for p in params])
    assert set(picked) == {index, index + 2}  # shard i of 2 holds cases[i::2]
    for crop, param in zip(crops, params):
      for b in range(3):
        np.testing.assert_array_equal(_host_crop(cases, param, b, CROP_3D)[1], crop["label"][b])


@pytest.mark.parametrize("crop_size", [CROP_3D, CROP_2D])
def test_device_crops_equal_host_crops_without_scaling(crop_size):
  cases = _cases()
  volumes = jax.device_put(device_crops.stack_volumes(cases))
  crops, params = _streams(cases, crop_size, 6, scale_range=(1.0, 1.0))
  for crop, param in zip(crops, params):
    out = crop_batch(volumes, param, crop_size)
    assert out["image"].shape == crop["image"].shape and out["image"].dtype == np.float32
    assert out["label"].shape == crop["label"].shape and out["label"].dtype == np.int32
    np.testing.assert_array_equal(out["image"], crop["image"])
    np.testing.assert_array_equal(out["label"], crop["label"])


@pytest.mark.parametrize("crop_size", [CROP_3D, CROP_2D])
def test_device_crops_match_host_crops_with_scaling(crop_size):
  cases = _cases()
  volumes = jax.device_put(device_crops.stack_volumes(cases))
  crops, params = _streams(cases, crop_size, 10, scale_range=(0.7, 1.4))
  mismatched = voxels = 0
  for crop, param in zip(crops, params):
    out = crop_batch(volumes, param, crop_size)
    np.testing.assert_allclose(out["image"], crop["image"], atol=1e-4)
    mismatched += int(np.sum(np.asarray(out["label"]) != crop["label"]))
    voxels += crop["label"].size
  # float32 positions here, float64 in scipy: a label voxel can differ only where its position
  # lies within ~1e-5 of a nearest-neighbour tie (measured: none in these crops).
  assert mismatched / voxels < 1e-3


def test_edges_interpolate_towards_the_pad_value():
  # A constant case of 8 voxels along X, sampled at half-voxel steps (scale 2) from -1:
  # positions -1, -0.5, 0, ..., 7, 7.5, 8 along X.
  image = np.full((8, 4, 4), 1.0, np.float32)
  label = np.full((8, 4, 4), 3, np.uint8)
  volumes = device_crops.stack_volumes([_case("const", image, label)])
  params = {"case": np.array([0]), "scale": np.array([2.0], np.float32),
            "origin": np.array([[-1, 0, 0]]), "flip": np.zeros((1, 3), bool)}
  out = crop_batch(volumes, params, (19, 2, 2))
  # Linear: halfway between the pad (-1) and the case (1) at -0.5 and 7.5.
  expected_image = np.array([-1, 0] + [1] * 15 + [0, -1], np.float32)
  # Nearest neighbour rounds ties up: -0.5 reads voxel 0, 7.5 reads voxel 8 (outside).
  expected_label = np.array([0] + [3] * 16 + [0, 0])
  np.testing.assert_array_equal(out["image"][0, :, 0, 0, 0], expected_image)
  np.testing.assert_array_equal(out["label"][0, :, 0, 0], expected_label)
  host = pipeline.RandAffineCrop((19, 2, 2)).apply(image, label, 2.0, (-1, 0, 0))
  np.testing.assert_array_equal(host[0][:, 0, 0], expected_image)
  np.testing.assert_array_equal(host[1][:, 0, 0], expected_label)


# 0.85: no position is a nearest-neighbour tie (1 / 0.85 = 20 / 17), so labels agree exactly.
@pytest.mark.parametrize("scale", [1.0, 0.85])
def test_padding_outside_a_smaller_case_reads_pad_values(scale):
  cases = _cases([(20, 18, 14), (9, 8, 7)])
  volumes = device_crops.stack_volumes(cases)
  np.testing.assert_array_equal(volumes["image"][1, 9:], IMAGE_PAD_VALUE)
  np.testing.assert_array_equal(volumes["label"][1, :, 8:], LABEL_PAD_VALUE)
  # Real data where the stacked array pads the small case: only its own shape may be read.
  volumes["image"][1, 9:], volumes["label"][1, 9:] = 0.5, 7
  volumes["image"][1, :, 8:], volumes["label"][1, :, 8:] = 0.5, 7
  volumes["image"][1, :, :, 7:], volumes["label"][1, :, :, 7:] = 0.5, 7
  origins = np.array([[-3, -2, -4], [0, 0, 0], [-6, -7, -8]])
  params = {"case": np.array([1, 1, 1]), "scale": np.full(3, scale, np.float32),
            "origin": origins, "flip": np.array([[0, 0, 0], [1, 0, 1], [0, 1, 0]], bool)}
  out = crop_batch(volumes, params, CROP_3D)
  assert np.sum(np.asarray(out["label"]) == 7) == 0
  for b in range(3):
    image, label = _host_crop(cases, params, b, CROP_3D)
    np.testing.assert_allclose(out["image"][b, ..., 0], image, atol=1e-5)
    np.testing.assert_array_equal(out["label"][b], label)
    assert np.sum(label == LABEL_PAD_VALUE) > label.size / 2  # mostly padding


def test_jit_and_eager_give_the_same_crops():
  cases = _cases()
  volumes = device_crops.stack_volumes(cases)
  _, params = _streams(cases, CROP_2D, 1, scale_range=(0.7, 1.4))
  eager = device_crops.crop_batch(volumes, params[0], CROP_2D)
  jitted = crop_batch(jax.device_put(volumes), params[0], CROP_2D)
  # Fusion may contract a multiply-add: the last bit of an image voxel may differ.
  np.testing.assert_allclose(eager["image"], jitted["image"], atol=1e-6)
  np.testing.assert_array_equal(eager["label"], jitted["label"])


def test_stack_volumes_pads_to_the_largest_shape():
  cases = _cases()
  volumes = device_crops.stack_volumes(cases)
  assert volumes["image"].shape == volumes["label"].shape == (4, 20, 18, 14)
  assert volumes["image"].dtype == np.float32 and volumes["label"].dtype == np.uint8
  np.testing.assert_array_equal(volumes["shape"], SHAPES)
  assert volumes["shape"].dtype == np.int32
  for k, case in enumerate(cases):
    region = (k, *(slice(0, n) for n in SHAPES[k]))
    np.testing.assert_array_equal(volumes["image"][region], case.image)
    np.testing.assert_array_equal(volumes["label"][region], case.label)
  np.testing.assert_array_equal(volumes["image"][3, 12:], IMAGE_PAD_VALUE)
  np.testing.assert_array_equal(volumes["label"][3, :, :, 9:], LABEL_PAD_VALUE)
  assert device_crops.volumes_nbytes(cases) == sum(v.nbytes for v in volumes.values())


def test_invalid_cases_raise_naming_the_case():
  good = _cases()[:1]
  no_label = _case("unlabelled", np.zeros((4, 4, 4), np.float32), None)
  mismatched = _case("mismatched", np.zeros((4, 4, 4), np.float32), np.zeros((4, 4, 3), np.uint8))
  for bad, name in [(no_label, "unlabelled"), (mismatched, "mismatched")]:
    with pytest.raises(ValueError, match=name):
      device_crops.stack_volumes(good + [bad])
    with pytest.raises(ValueError, match=name):
      device_crops.volumes_nbytes(good + [bad])
  with pytest.raises(ValueError, match="no cases"):
    device_crops.stack_volumes([])
  wide = _case("wide", np.zeros((4, 4, 4), np.float32), np.full((4, 4, 4), 300, np.int16))
  with pytest.raises(ValueError, match="wide"):
    device_crops.stack_volumes([wide])


def test_invalid_params_raise():
  cases = _cases()
  volumes = device_crops.stack_volumes(cases)
  params_3d = _streams(cases, CROP_3D, 1)[1][0]
  params_2d = _streams(cases, CROP_2D, 1)[1][0]
  with pytest.raises(ValueError, match="crop_size"):
    device_crops.crop_batch(volumes, params_3d, (16,))
  with pytest.raises(ValueError, match="slice"):
    device_crops.crop_batch(volumes, params_3d, CROP_2D)  # 3D params lack the axial slice
  with pytest.raises(ValueError, match="do not fit"):
    device_crops.crop_batch(volumes, params_2d, CROP_3D)  # 2 origin entries for 3 axes
  with pytest.raises(ValueError, match="stack_volumes"):
    device_crops.crop_batch({"image": volumes["image"]}, params_3d, CROP_3D)
  with pytest.raises(ValueError, match="output"):
    pipeline.train_dataset(cases, crop_size=CROP_3D, batch_size=1, seed=0, output="voxels")
  # A flip per crop axis cannot say "flip axis 0 twice" (which crashed the host path at random).
  with pytest.raises(ValueError, match="flip_axes"):
    pipeline.train_dataset(cases, crop_size=CROP_3D, batch_size=1, seed=0, flip_axes=(0, 0))
