"""The training reference's appearances: the features against hand computations, the
nearest-description distance and the leave-one-case-out limit against a brute force."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from wh_errmap.data.training_reference import (RING_MM, appearance, appearance_distances,
                                               appearance_reference)


def test_appearance_is_the_medians_spreads_and_contrasts_of_each_region():
  # 24^3 at 2 mm: Myo a 6^3 block of intensities 0..215 / 215, LV beside it a 6^3 block of
  # 0.8; outside the mask each voxel holds its city-block distance to the mask (scipy's
  # taxicab distance transform). The ring is what lies within 6 mm = 3 steps, so
  # its median and spread are those of the distances 1..3 over the voxels that have them.
  mask = np.zeros((24, 24, 24), np.uint8)
  mask[6:12, 8:14, 8:14] = 1
  mask[12:18, 8:14, 8:14] = 3
  distance = ndimage.distance_transform_cdt(mask == 0, metric="taxicab").astype(np.float64)
  image = distance.copy()
  image[mask == 1] = (np.arange(216) / 215).reshape(6, 6, 6).ravel()
  image[mask == 3] = 0.8
  valid = np.ones(mask.shape, bool)
  got = appearance(image, mask, valid, (2.0, 2.0, 2.0))
  assert got.shape == (29,) and RING_MM / 2.0 == 3
  ring = distance[(distance >= 1) & (distance <= 3)]
  q1, ring_median, q3 = np.percentile(ring, (25, 50, 75))
  myo = np.arange(216) / 215
  nan = math.nan
  expected = np.array([ring_median, q3 - q1,
                       0.5, np.percentile(myo, 75) - np.percentile(myo, 25), nan, nan,
                       0.8, 0.0] + [nan, nan] * 4                                   # regions
                      + [nan, 0.3, nan, nan, nan, nan]                              # - Myo
                      + [0.5 - ring_median, nan, 0.8 - ring_median, nan, nan, nan, nan])
  np.testing.assert_allclose(got, expected, atol=1e-12)
  # Only valid voxels count, and a region of fewer than 20 has no appearance.
  valid[12:18, 8:14, 8:14] = False
  valid[12, 8:11, 8:14] = True                 # 18 LV voxels left
  assert np.isnan(appearance(image, mask, valid, (2.0,) * 3)[6])
  valid[12, 11, 8:10] = True                   # 20
  assert appearance(image, mask, valid, (2.0,) * 3)[6] == 0.8


def brute_force_limit(rows, cases, scale):
  """The largest, over every row, of the distance to the nearest row of another case."""
  worst = 0.0
  for i in range(len(rows)):
    best = math.inf
    for j in range(len(rows)):
      if cases[j] == cases[i]:
        continue
      terms = [((rows[j][k] - rows[i][k]) / scale[k]) ** 2 for k in range(len(scale))
               if not (math.isnan(rows[i][k]) or math.isnan(rows[j][k]))]
      if terms:
        best = min(best, math.sqrt(sum(terms) / len(terms)))
    worst = max(worst, best)
  return worst


def test_the_limit_is_the_leave_one_case_out_nearest_distance():
  rng = np.random.default_rng(0)
  rows = rng.normal(size=(12, 5))
  rows[rng.random(rows.shape) < 0.15] = np.nan
  cases = [f"c{i // 3}" for i in range(12)]
  reference = appearance_reference(list(rows), cases)
  scale = np.nanstd(rows, axis=0)
  np.testing.assert_allclose(reference["scale"], scale)
  assert reference["limit"] == pytest.approx(brute_force_limit(rows, cases, scale))
  assert reference["cases"] == cases
  assert [v is None for v in reference["features"][0]] == list(np.isnan(rows[0]))
  # A new description's distance is to its nearest row; one sharing no feature is inf.
  new = rows[4] + 0.01
  expected = min(math.sqrt(np.nanmean(((rows[j] - new) / scale) ** 2)) for j in range(12))
  assert appearance_distances(new[None], rows, scale)[0] == pytest.approx(expected)
  assert appearance_distances(np.full((1, 5), np.nan), rows, scale)[0] == math.inf
  with pytest.raises(ValueError, match="two training cases"):
    appearance_reference(list(rows[:3]), cases[:3])
