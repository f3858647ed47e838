"""evaluate.score_masks: the scores of a crop's real voxels, against NumPy on those voxels
alone, and one compiled metric program per bucket of crop sizes (not one per mask)."""
from __future__ import annotations

import numpy as np

from wh_errmap.cv import evaluate
from wh_errmap.data.structures import NUM_CLASSES
from wh_errmap.metrics import segmentation


def _case(shape, seed):
  """A label, two masks with errors, their error probabilities, a baseline, and a valid map
  that leaves out a slab at the far end of every axis (a crop reaching past the scan)."""
  rng = np.random.default_rng(seed)
  valid = np.zeros(shape, bool)
  valid[:shape[0] - 3, :shape[1] - 2, :shape[2] - 4] = True
  label = np.where(valid, rng.integers(0, NUM_CLASSES, shape), 0)
  masks = {t: np.where(valid & (rng.random(shape) < rate), rng.integers(0, NUM_CLASSES, shape),
                       label) for t, rate in (("3d-final", 0.2), ("2d-final", 0.5))}
  # Probabilities outside the valid voxels are high, so scoring them would show.
  probs = {t: rng.random(shape).astype(np.float32) for t in masks}
  baseline = {"3d-final": rng.random(shape).astype(np.float32)}
  return label, masks, probs, baseline, valid


def _numpy_scores(mask, label, prob, valid, threshold):
  m, l, p = mask[valid], label[valid], prob[valid]
  true, pred = m != l, p > threshold
  tp, fp, fn = np.sum(pred & true), np.sum(pred & ~true), np.sum(~pred & true)
  dice = []
  for c in range(1, NUM_CLASSES):
    size = np.sum(m == c) + np.sum(l == c)
    if size:
      dice.append(2 * np.sum((m == c) & (l == c)) / size)
  return {"seg_dsc": np.mean(dice), "seg_acc": np.mean(m == l), "true_acc": np.mean(m == l),
          "err_dsc": 2 * tp / (2 * tp + fp + fn), "err_acc": np.mean(pred == true),
          "err_prec": tp / (tp + fp), "err_recl": tp / (tp + fn),
          "qi": 1 - np.mean(pred), "soft_qi": 1 - np.mean(p, dtype=np.float64)}


def test_scores_are_those_of_the_valid_voxels_alone():
  label, masks, probs, baseline, valid = _case((21, 18, 19), seed=0)
  scores = evaluate.score_masks(masks, probs, label, 0.4, baseline=baseline, valid=valid)
  for t in masks:
    expected = _numpy_scores(masks[t], label, np.where(valid, probs[t], 0), valid, 0.4)
    for key, value in expected.items():
      np.testing.assert_allclose(scores[t][key], value, rtol=1e-5, err_msg=f"{t} {key}")
  base = _numpy_scores(masks["3d-final"], label, np.where(valid, baseline["3d-final"], 0),
                       valid, 0.4)
  for key in ("err_dsc", "err_prec", "err_recl", "qi", "soft_qi"):
    np.testing.assert_allclose(scores["3d-final"][f"base_{key}"], base[key], rtol=1e-5,
                               err_msg=key)
  assert np.isnan(scores["2d-final"]["base_qi"])


def test_crops_of_one_bucket_share_the_compiled_metrics():
  # Two crops of different sizes and valid counts inside one 32^3 bucket (SHAPE_BUCKET 16):
  # the second compiles nothing new. Scoring x[valid] instead compiles per voxel count.
  assert evaluate.SHAPE_BUCKET == 16
  functions = (segmentation.segmentation_scores, segmentation.error_map_scores,
               segmentation.quality_indicator, segmentation.soft_quality_indicator)
  label, masks, probs, baseline, valid = _case((20, 18, 17), seed=1)
  evaluate.score_masks(masks, probs, label, 0.5, baseline=baseline, valid=valid)
  compiled = [f._cache_size() for f in functions]
  label, masks, probs, baseline, valid = _case((31, 29, 25), seed=2)
  evaluate.score_masks(masks, probs, label, 0.5, baseline=baseline, valid=valid)
  assert [f._cache_size() for f in functions] == compiled
