"""Metrics against hand-computed values, the empty-set policies, NumPy/SciPy references on
random batches, and jit."""
import functools

import jax
import numpy as np
import pytest

from wh_errmap.metrics import segmentation as metrics

SHAPES = [(3, 5, 6), (2, 4, 5, 6), (1, 17)]
SEEDS = [0, 1, 2]


def assert_scores(scores, expected, **tol):
  for key, value in expected.items():
    assert scores[key].dtype == np.float32, key
    np.testing.assert_allclose(scores[key], value, err_msg=key, **tol)


# ---------------------------------------------------------------- hand-computed values

def test_error_map_scores_hand_computed():
  pred = np.array([[1, 1, 0, 0, 1, 0, 0, 0]])
  true = np.array([[1, 0, 1, 0, 1, 0, 0, 1]])
  # TP at 0, 4; FP at 1; FN at 2, 7; TN at 3, 5, 6.
  counts = metrics.confusion_counts(pred, true)
  assert_scores(counts, {"tp": [2], "fp": [1], "fn": [2], "tn": [3]})
  # DSC 2*2 / (4 + 1 + 2) = 4/7, Acc 5/8, Prec 2/3, Recl 2/4.
  assert_scores(metrics.error_map_scores(pred, true),
                {"dsc": [4 / 7], "acc": [5 / 8], "prec": [2 / 3], "recl": [1 / 2]}, rtol=1e-6)


def test_error_map_scores_hand_computed_2d_batch():
  pred = np.array([[[1, 0, 0], [1, 1, 0]],
                   [[0, 1, 1], [0, 0, 0]]], bool)
  true = np.array([[[1, 1, 0], [0, 1, 0]],
                   [[0, 1, 0], [0, 0, 0]]], bool)
  # Sample 0: TP 2 (corners (0,0), (1,1)), FP 1 ((1,0)), FN 1 ((0,1)), TN 2.
  #   DSC 4/6, Acc 4/6, Prec 2/3, Recl 2/3.
  # Sample 1: TP 1, FP 1, FN 0, TN 4. DSC 2/3, Acc 5/6, Prec 1/2, Recl 1.
  assert_scores(metrics.confusion_counts(pred, true),
                {"tp": [2, 1], "fp": [1, 1], "fn": [1, 0], "tn": [2, 4]})
  assert_scores(metrics.error_map_scores(pred, true),
                {"dsc": [2 / 3, 2 / 3], "acc": [2 / 3, 5 / 6], "prec": [2 / 3, 1 / 2],
                 "recl": [2 / 3, 1]}, rtol=1e-6)


def test_segmentation_scores_hand_computed():
  label = np.array([[0, 1, 1, 2, 2, 2, 0, 0],
                    [0, 0, 0, 0, 0, 0, 0, 0],
                    [0, 0, 0, 0, 0, 0, 0, 0]])
  mask = np.array([[0, 1, 2, 2, 2, 0, 0, 1],
                   [0, 0, 0, 0, 0, 0, 0, 0],
                   [3, 0, 0, 0, 0, 0, 0, 0]])
  # Sample 0: class 1 mask {1, 7}, label {1, 2}: Dice 2*1/4 = 1/2; class 2 mask {2, 3, 4},
  #   label {3, 4, 5}: Dice 2*2/6 = 2/3; class 3 absent -> NaN, left out of the mean:
  #   DSC (1/2 + 2/3) / 2 = 7/12. Equal at 0, 1, 3, 4, 6: Acc 5/8.
  # Sample 1: all background in both -> no class present, DSC 1, Acc 1.
  # Sample 2: class 3 predicted but absent from the label: Dice 0, the only class present.
  scores = metrics.segmentation_scores(mask, label, num_classes=4)
  nan = np.nan
  assert_scores(scores, {
      "dsc": [7 / 12, 1, 0], "acc": [5 / 8, 1, 7 / 8],
      "dsc_per_class": [[1 / 2, 2 / 3, nan], [nan, nan, nan], [nan, nan, 0]]}, rtol=1e-6)


def test_quality_indicator_hand_computed():
  prob = np.array([[0.1, 0.5, 0.7, 0.9],
                   [0.0, 0.2, 0.3, 0.4]], np.float32)
  # Strict threshold: 0.5 is not an error. Sample 0: 2 of 4 errors -> QI 1/2; sample 1: none.
  np.testing.assert_allclose(metrics.quality_indicator(prob), [0.5, 1.0])
  np.testing.assert_allclose(metrics.quality_indicator(prob, threshold=0.3), [0.25, 0.75])
  # Soft QI: 1 - 2.2/4 = 0.45 and 1 - 0.9/4 = 0.775.
  np.testing.assert_allclose(metrics.soft_quality_indicator(prob), [0.45, 0.775], rtol=1e-6)


def test_quality_indicator_of_true_error_map_is_segmentation_accuracy():
  rng = np.random.default_rng(3)
  label = rng.integers(0, 4, size=(3, 6, 5))
  mask = np.where(rng.random(label.shape) < 0.2, rng.integers(0, 4, label.shape), label)
  true_error = (mask != label).astype(np.float32)
  np.testing.assert_allclose(metrics.quality_indicator(true_error),
                             metrics.segmentation_scores(mask, label, 4)["acc"], rtol=1e-6)


# ---------------------------------------------------------------- empty-set policies

def test_perfect_mask_scoring_policy():
  true = np.zeros((4, 6), bool)
  true[3, :2] = True
  pred = np.zeros((4, 6), bool)
  pred[1, 4] = True              # perfect mask, one false alarm
  pred[2] = True                 # perfect mask, everything flagged
  # Sample 3 has true errors and an empty prediction.
  assert_scores(metrics.error_map_scores(pred, true), {
      "dsc": [1, 0, 0, 0], "prec": [1, 0, 0, 0], "recl": [1, 1, 1, 0],
      "acc": [1, 5 / 6, 0, 4 / 6]}, rtol=1e-6)


def test_table1_gt_row():
  # 20 perfect masks; the predictor flags nothing on 5 and some voxels on the other 15:
  # the paper's GT row, DSC 0.25, Prec 0.25, Recl 1.
  true = np.zeros((20, 4, 4, 3), bool)
  pred = np.zeros_like(true)
  pred[5:, 0, 0, 0] = True
  pred[10:, 1, 2, :] = True
  scores = metrics.error_map_scores(pred, true)
  assert scores["dsc"].mean() == 0.25
  assert scores["prec"].mean() == 0.25
  assert scores["recl"].mean() == 1.0


def test_mismatched_shapes_raise():
  with pytest.raises(ValueError):
    metrics.confusion_counts(np.zeros((2, 3)), np.zeros((2, 4)))
  with pytest.raises(ValueError):
    metrics.segmentation_scores(np.zeros((2, 3), int), np.zeros((2, 3), int), num_classes=1)


# ---------------------------------------------------------------- NumPy / SciPy references

def numpy_error_scores(pred, true):
  out = {k: [] for k in ("dsc", "acc", "prec", "recl")}
  for p, t in zip(pred.astype(bool), true.astype(bool)):
    tp, fp, fn = np.sum(p & t), np.sum(p & ~t), np.sum(~p & t)
    out["acc"].append(np.mean(p == t))
    if not t.any():
      out["dsc"].append(float(not p.any()))
      out["prec"].append(float(not p.any()))
      out["recl"].append(1.0)
    else:
      out["dsc"].append(2 * tp / (2 * tp + fp + fn))
      out["prec"].append(tp / (tp + fp) if p.any() else 0.0)
      out["recl"].append(tp / (tp + fn))
  return out


def numpy_segmentation_scores(mask, label, num_classes):
  dsc, acc, per_class = [], [], []
  for m, l in zip(mask, label):
    row = []
    for c in range(1, num_classes):
      size = np.sum(m == c) + np.sum(l == c)
      row.append(2 * np.sum((m == c) & (l == c)) / size if size else np.nan)
    present = [d for d in row if not np.isnan(d)]
    dsc.append(np.mean(present) if present else 1.0)
    acc.append(np.mean(m == l))
    per_class.append(row)
  return {"dsc": dsc, "acc": acc, "dsc_per_class": per_class}


def random_error_maps(shape, seed):
  """Binary maps with per-sample densities from empty to dense, so empty cases occur."""
  rng = np.random.default_rng(seed)
  density = rng.choice([0.0, 0.05, 0.3, 0.7], size=(2, shape[0], *[1] * (len(shape) - 1)))
  return rng.random((2, *shape)) < density


@pytest.mark.parametrize("shape", SHAPES)
def test_error_map_scores_match_numpy(shape):
  for seed in SEEDS:
    pred, true = random_error_maps(shape, seed)
    assert_scores(metrics.error_map_scores(pred, true), numpy_error_scores(pred, true), rtol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_segmentation_scores_match_numpy(shape):
  num_classes = 5
  for seed in SEEDS:
    rng = np.random.default_rng(seed)
    # Each sample draws from its own subset of classes, so some classes are absent.
    allowed = rng.random((shape[0], num_classes)) < 0.6
    allowed[:, 0] = True
    label = np.stack([rng.choice(np.flatnonzero(a), size=shape[1:]) for a in allowed])
    mask = np.where(rng.random(shape) < 0.3, rng.integers(0, num_classes, shape), label)
    assert_scores(metrics.segmentation_scores(mask, label, num_classes),
                  numpy_segmentation_scores(mask, label, num_classes), rtol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_valid_voxels_score_like_the_selected_voxels_alone(shape):
  # Each metric with `valid` against the NumPy references (and 1 - mean) on each sample's
  # valid voxels taken out with numpy: per-sample valid sets of different sizes, one with
  # every voxel valid. Dropping `valid` anywhere inside a metric changes these numbers (the
  # invalid voxels hold errors and other classes).
  num_classes = 5
  for seed in SEEDS:
    rng = np.random.default_rng(seed + 10)
    pred, true = random_error_maps(shape, seed)
    label = rng.integers(0, num_classes, shape)
    mask = np.where(rng.random(shape) < 0.4, rng.integers(0, num_classes, shape), label)
    prob = rng.random(shape).astype(np.float32)
    valid = rng.random(shape) < rng.uniform(0.3, 0.9, (shape[0], *[1] * (len(shape) - 1)))
    valid[0] = True
    valid.reshape(shape[0], -1)[:, 0] = True   # no sample without a valid voxel

    def per_sample(fn, *arrays):
      rows = [fn(*(a[i][valid[i]][None] for a in arrays)) for i in range(shape[0])]
      if isinstance(rows[0], dict):
        return {k: [r[k][0] for r in rows] for k in rows[0]}
      return [r[0] for r in rows]

    assert_scores(metrics.error_map_scores(pred, true, valid),
                  per_sample(numpy_error_scores, pred, true), rtol=1e-6)
    assert_scores(metrics.segmentation_scores(mask, label, num_classes, valid),
                  per_sample(lambda m, l: numpy_segmentation_scores(m, l, num_classes),
                             mask, label), rtol=1e-6)
    counts = metrics.confusion_counts(pred, true, valid)
    np.testing.assert_array_equal(
        counts["tp"] + counts["fp"] + counts["fn"] + counts["tn"],
        valid.reshape(shape[0], -1).sum(1))
    np.testing.assert_allclose(metrics.quality_indicator(prob, 0.5, valid),
                               per_sample(lambda p: [1 - np.mean(p > 0.5)], prob), rtol=1e-6)
    np.testing.assert_allclose(metrics.soft_quality_indicator(prob, valid),
                               per_sample(lambda p: [1 - np.mean(p, dtype=np.float64)], prob),
                               rtol=1e-6)


# ---------------------------------------------------------------- jit

def test_jit_matches_eager():
  # The metrics are jitted; run them op by op too and inside an outer jit.
  shape = (2, 4, 5, 6)
  pred, true = random_error_maps(shape, seed=4)
  prob = np.random.default_rng(4).random(shape).astype(np.float32)
  label = true.astype(np.int32) * 2
  mask = pred.astype(np.int32) + label

  def all_metrics(pred, true, mask, label, prob):
    return {
        "counts": metrics.confusion_counts(pred, true),
        "error": metrics.error_map_scores(pred, true),
        "seg": metrics.segmentation_scores(mask, label, 4),
        "qi": metrics.quality_indicator(prob),
        "soft_qi": metrics.soft_quality_indicator(prob),
    }

  args = (pred, true, mask, label, prob)
  jitted = jax.jit(all_metrics)(*args)
  with jax.disable_jit():
    eager = all_metrics(*args)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6), jitted, eager)
