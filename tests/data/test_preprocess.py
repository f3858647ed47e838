"""Preprocessing geometry, intensity scaling, restore round trip and the cache."""
from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from wh_errmap.data.nifti_io import load_case
from wh_errmap.data.preprocess import (PreprocessConfig, _resample, preprocess_cached,
                                       preprocess_case, restore_to_original)


def ellipsoid_case(tmp_path, write):
  """7 separate ellipsoids (radii 12..20 mm) on a 1.1 x 1.1 x 1.6 mm LPS-oriented grid."""
  spacing = np.array([1.1, 1.1, 1.6])
  shape = (110, 110, 70)
  affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
  grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)],
                              indexing="ij"), -1)
  label = np.zeros(shape, np.uint8)
  rng = np.random.default_rng(0)
  centres = [(30, 30, 30), (30, 60, 40), (30, 90, 70), (60, 30, 80), (60, 65, 40),
             (90, 30, 50), (90, 80, 60)]
  for cls, centre in enumerate(centres, start=1):
    radii = rng.uniform(12, 20, size=3)
    label[(((grid - np.array(centre)) / radii) ** 2).sum(-1) <= 1] = cls
  image = (200 + 40 * label + rng.normal(0, 10, shape)).astype(np.float32)
  return write(tmp_path / "mr_train_1002_image.nii.gz", image, affine), write(
      tmp_path / "mr_train_1002_label.nii.gz", label, affine)


def dice(a, b, cls):
  a, b = a == cls, b == cls
  return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture
def ellipsoids(tmp_path):
  from tests.conftest import write_nifti
  return ellipsoid_case(tmp_path, write_nifti)


def test_geometry_and_intensities(ellipsoids):
  case = load_case(*ellipsoids)
  pre = preprocess_case(case, PreprocessConfig(margin_mm=8.0, crop_size=(8, 8, 8)))
  assert pre.image.dtype == np.float32 and pre.label.dtype == np.uint8
  assert pre.image.shape == pre.label.shape
  assert pre.image.min() >= -1.0 and pre.image.max() <= 1.0
  assert set(np.unique(pre.label)) <= set(np.unique(case.label))
  # 2 mm voxels: the affine's columns have length 2; a small least crop size leaves the
  # label's box + 4 voxel margin.
  affine = np.asarray(pre.properties["affine"])
  np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), 2.0)
  nonzero = np.argwhere(pre.label > 0)
  assert (nonzero.min(0) == 4).all() and (np.array(pre.label.shape) - nonzero.max(0) - 1 == 4).all()


def test_preprocessed_affine_maps_to_the_same_world_points(ellipsoids):
  case = load_case(*ellipsoids)
  pre = preprocess_case(case)
  affine = np.asarray(pre.properties["affine"])
  for cls in (1, 4, 7):
    centre_pre = affine @ np.append(np.argwhere(pre.label == cls).mean(0), 1)
    centre_raw = case.affine @ np.append(np.argwhere(case.label == cls).mean(0), 1)
    np.testing.assert_allclose(centre_pre[:3], centre_raw[:3], atol=1.0)


def test_restore_round_trip(ellipsoids):
  case = load_case(*ellipsoids)
  pre = preprocess_case(case)
  restored = restore_to_original(pre.label, pre.properties, order=0)
  original = np.asarray(nib.load(str(ellipsoids[1])).dataobj)
  assert restored.shape == original.shape
  scores = [dice(restored, original, c) for c in range(1, 8)]
  assert min(scores) >= 0.95, scores


def test_crop_is_at_least_crop_size_and_centred_on_the_label(ellipsoids):
  case = load_case(*ellipsoids)
  pre = preprocess_case(case, PreprocessConfig(crop_size=(90, 30, 80)))
  nonzero = np.argwhere(pre.label > 0)
  assert pre.image.shape[0] == 90 and pre.image.shape[2] == 80
  assert pre.image.shape[1] > 30  # the label is wider than 30 voxels: the box grows
  centre = (nonzero.min(0) + nonzero.max(0) + 1) / 2
  np.testing.assert_allclose(centre, np.array(pre.image.shape) / 2, atol=1)
  # The box reaches past the volume along x: padded with the background intensity.
  assert pre.image[0].max() == -1.0 or pre.image[-1].max() == -1.0


def test_unlabelled_image_gets_centred_crop(ellipsoids):
  case = load_case(ellipsoids[0])
  pre = preprocess_case(case, PreprocessConfig(crop_size=(20, 24, 16)))
  assert pre.label is None and pre.image.shape == (20, 24, 16)


def test_crop_from_mask(ellipsoids):
  labelled = load_case(*ellipsoids)
  unlabelled = load_case(ellipsoids[0])
  a = preprocess_case(labelled)
  b = preprocess_case(unlabelled, crop_label=labelled.label)
  np.testing.assert_array_equal(a.image, b.image)
  assert a.properties["crop_start"] == b.properties["crop_start"]


def test_cache_is_reused_and_keyed_by_config_and_file(ellipsoids, tmp_path):
  cache = tmp_path / "cache"
  first, hit = preprocess_cached(*ellipsoids, cache)
  assert not hit
  second, hit = preprocess_cached(*ellipsoids, cache)
  assert hit
  np.testing.assert_array_equal(first.image, second.image)
  np.testing.assert_array_equal(first.label, second.label)
  assert first.properties == second.properties
  _, hit = preprocess_cached(*ellipsoids, cache, PreprocessConfig(margin_mm=4.0))
  assert not hit
  os.utime(ellipsoids[0], ns=(1, 1))  # the file changed: the entry is stale
  _, hit = preprocess_cached(*ellipsoids, cache)
  assert not hit


def test_phantom_round_trip_and_size(tmp_path):
  """A full-size phantom case: ~120 x 120 x 90 at 2 mm, all 7 structures, and label ->
  preprocess -> restore keeps every structure's Dice >= 0.95 on the original grid."""
  from tests.conftest import write_nifti
  from wh_errmap.data.phantom import make_phantom_case
  image, label, affine = make_phantom_case(seed=0, index=0)
  paths = (write_nifti(tmp_path / "mr_train_1001_image.nii.gz", image, affine),
           write_nifti(tmp_path / "mr_train_1001_label.nii.gz", label, affine))
  pre = preprocess_case(load_case(*paths))
  assert pre.image.shape == (120, 120, 90)
  assert sorted(np.unique(pre.label)) == list(range(8))
  restored = restore_to_original(pre.label, pre.properties, order=0)
  assert restored.shape == label.shape
  original = np.searchsorted([0, 205, 420, 500, 550, 600, 820, 850], label)
  scores = [dice(restored, original, c) for c in range(1, 8)]
  assert min(scores) >= 0.95, scores


def _labels_through_whole_volume_indicators(volume, scale, offset, out_shape, outside):
  """The reference: every class's indicator interpolated over the whole output, then the
  most likely class (background = 1 - their sum), the first of equals."""
  kwargs = dict(offset=offset, output_shape=out_shape, order=1, mode=outside, cval=0.0,
                prefilter=False)
  classes = [c for c in np.unique(volume) if c != 0]
  probs = [ndimage.affine_transform((volume == c).astype(np.float32), scale, **kwargs)
           for c in classes]
  background = 1.0 - np.sum(probs, axis=0) if probs else np.ones(out_shape)
  return np.asarray([0, *classes], volume.dtype)[np.argmax(np.stack([background, *probs]), 0)]


@pytest.mark.parametrize("outside", ["nearest", "constant"])
@pytest.mark.parametrize("seed", range(4))
def test_labels_resampled_class_by_class_in_their_boxes_equal_the_whole_volume_way(seed,
                                                                                 outside):
  # Random boxes of 4 classes, some touching the volume's edges (where "nearest" extends
  # them past it), resampled up, down and shifted.
  rng = np.random.default_rng(seed)
  shape = tuple(int(n) for n in rng.integers(12, 20, 3))
  volume = np.zeros(shape, np.int16)
  for code in (205, 500, 600, 820):
    lo = [int(rng.integers(0, n - 3)) if rng.random() < 0.7 else 0 for n in shape]
    hi = [int(rng.integers(a + 2, n + 1)) for a, n in zip(lo, shape)]
    volume[tuple(slice(a, b) for a, b in zip(lo, hi))] = code
  for scale in (np.array([0.3, 0.45, 0.6]), np.array([1.7, 2.0, 1.3]), np.ones(3)):
    offset = rng.uniform(-3, 3, 3)
    out_shape = tuple(int(n) for n in np.ceil(np.asarray(shape) / scale) + 4)
    got = _resample(volume, scale, offset, out_shape, label=True, outside=outside)
    want = _labels_through_whole_volume_indicators(volume, scale, offset, out_shape, outside)
    np.testing.assert_array_equal(got, want)
