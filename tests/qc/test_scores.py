"""The scores of one assessment on a box that reaches past the scan: only the scan's own
voxels count, in the QI's denominator as in the predicted Dice, whatever the predictor
says about the padding. Expected values are counted by hand below."""
from __future__ import annotations

import types

import numpy as np
import pytest

from wh_errmap.data.labels import parse_labels
from wh_errmap.qc.assessment import assessment_scores
from wh_errmap.qc.verdict import Settings

VOXEL_ML = 2.0**3 / 1000   # 2 mm voxels


@pytest.fixture
def padded_case():
  """A 10^3 box whose scan covers x < 8 (800 voxels): an LV cube of 4^3 = 64 voxels at
  x 4..7, y 3..6, z 3..6, touching the scan's edge; one stray LV voxel in the padding; error
  probability 0.9 on the cube's x = 4 face (16 voxels) and on every padding voxel."""
  valid = np.zeros((10, 10, 10), bool)
  valid[:8] = True
  mask = np.zeros((10, 10, 10), np.uint8)
  mask[4:8, 3:7, 3:7] = 3
  mask[9, 0, 0] = 3
  prob = np.zeros((10, 10, 10), np.float32)
  prob[4, 3:7, 3:7] = 0.9
  prob[~valid] = 0.9
  image = np.zeros((10, 10, 10), np.float32)
  return image, mask, prob, valid


def test_padding_counts_nowhere(padded_case):
  image, mask, prob, valid = padded_case
  convention = parse_labels("1:LV")
  encoded = convention.encode("m", np.where(mask == 3, 1, 0))
  # as preprocess records them; the raw intensity profile is that of an MR-like scan
  properties = {"spacing": [2.0, 2.0, 2.0], "canonical_shape": [8, 10, 10],
                "canonical_spacing": [2.0, 2.0, 2.0],
                "intensity_profile": {"p0.5": 0.0, "p99.5": 1.0, "air_share": 0.0}}
  predictor = types.SimpleNamespace(reference=None)
  scores = assessment_scores(image, mask, prob, valid, properties, predictor, convention,
                             encoded, Settings())
  # 16 of the 800 scanned voxels are predicted wrong.
  assert scores["assessed_voxels"] == 800 and scores["box_voxels"] == 1000
  assert scores["qi"] == pytest.approx(1 - 16 / 800)
  assert scores["soft_qi"] == pytest.approx(1 - 16 * 0.9 / 800)
  assert scores["predicted_error_ml"] == pytest.approx(16 * VOXEL_ML)
  # LV: TP = 48 + 16 * 0.1, FP = 16 * 0.9, FN = 0 (no predicted error beside the cube in the
  # scan; the 36 padding voxels beside its x = 7 face would add 36 * 0.9 if they counted).
  lv = scores["structures"]["LV"]
  tp, fp = 48 + 16 * 0.1, 16 * 0.9
  assert lv["predicted_dice"] == pytest.approx(2 * tp / (2 * tp + fp))
  assert lv["predicted_error_ml"] == pytest.approx(fp * VOXEL_ML)
  assert lv["mask_volume_ml"] == pytest.approx(64 * VOXEL_ML)   # not the stray padding voxel
  assert scores["mean_predicted_dice"] == pytest.approx(2 * tp / (2 * tp + fp))
  assert scores["verdict"] == "ok" and scores["reasons"] == []
