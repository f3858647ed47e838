"""QC metrics against hand-computed values, their edge-case policies, and NumPy/SciPy
references on seeded random inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage, stats

from wh_errmap.metrics import quality

SEEDS = [0, 1, 2]


def true_dice(mask: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
  """Per-class Dice of classes 1..C-1, NaN where absent from both (metrics.py policy)."""
  out = []
  for c in range(1, num_classes):
    in_mask, in_label = mask == c, label == c
    size = in_mask.sum() + in_label.sum()
    out.append(2.0 * (in_mask & in_label).sum() / size if size else math.nan)
  return np.array(out)


# ---------------------------------------------------------------- predicted Dice

def test_predicted_dice_hand_computed_fractional():
  # A 1D line as an (8, 1, 1) volume, classes 1 and 2, class 3 absent.
  mask = np.array([0, 1, 1, 0, 2, 2, 1, 0]).reshape(8, 1, 1)
  p = np.array([0.5, 0.1, 0.2, 0.6, 0.4, 0.0, 0.8, 0.3]).reshape(8, 1, 1)
  # near 1 (radius 1) = {0, 1, 2, 3, 5, 6, 7}, near 2 = {3, 4, 5, 6}. Candidates, own class
  # excluded: v0 {1}, v3 {1, 2} (half each), v5 {1}, v6 {2}, v7 {1}; v1, v2, v4 none.
  # Class 1: TP .9 + .8 + .2 = 1.9, FP .1 + .2 + .8 = 1.1, FN .5 + .3 + 0 + .3 = 1.1.
  # Class 2: TP .6 + 1 = 1.6, FP .4, FN .3 + .8 = 1.1.
  tp, fp, fn = quality.predicted_dice_terms(mask, p, 4, 1)
  np.testing.assert_allclose(tp, [1.9, 1.6, 0], atol=1e-12)
  np.testing.assert_allclose(fp, [1.1, 0.4, 0], atol=1e-12)
  np.testing.assert_allclose(fn, [1.1, 1.1, 0], atol=1e-12)
  dice = quality.predicted_dice(mask, p, 4)
  assert dice.dtype == np.float64 and dice.shape == (3,)
  np.testing.assert_allclose(dice[:2], [3.8 / 6.0, 3.2 / 4.7], rtol=1e-12)
  assert np.isnan(dice[2])


def test_predicted_dice_radius_two_reaches_farther():
  mask = np.array([1, 1, 0, 0, 0]).reshape(5, 1, 1)
  p = np.array([0.0, 0.0, 0.0, 1.0, 1.0]).reshape(5, 1, 1)
  # Radius 1 reaches voxel 2 only (no error there); radius 2 reaches the error at 3.
  np.testing.assert_allclose(quality.predicted_dice(mask, p, 2, radius=1), [1.0])
  np.testing.assert_allclose(quality.predicted_dice(mask, p, 2, radius=2), [4 / 5])


def exact_case() -> tuple[np.ndarray, np.ndarray]:
  """(label, mask) whose true error map makes the estimator exact (see predicted_dice)."""
  label = np.zeros((30, 12, 12), np.int16)
  # 1 and 3 touch; the mask moves their shared boundary one plane into 3.
  label[2:8, 2:10, 2:10] = 1
  label[8:12, 2:10, 2:10] = 3
  # 2 is shrunk by one layer in the mask: its misses are background next to 2 only.
  label[16:22, 2:10, 2:10] = 2
  # 4 is grown by one layer in the mask: wrong class-4 voxels, truly background, with no
  # other structure nearby.
  label[24:27, 3:8, 3:8] = 4
  mask = label.copy()
  mask[8, 2:10, 2:10] = 1
  mask[16:22, 2:10, 2:10] = 0
  mask[17:21, 3:9, 3:9] = 2
  mask[23:28, 2:9, 2:9] = 4
  return label, mask


def test_predicted_dice_exact_with_true_error_map():
  label, mask = exact_case()
  error = mask != label
  expected = true_dice(mask, label, 6)
  # Every class is imperfect except 5, absent from both (NaN in both).
  assert np.all(expected[:4] < 1) and np.isnan(expected[4])
  for error_map in (error, error.astype(np.float32)):
    np.testing.assert_allclose(quality.predicted_dice(mask, error_map, 6), expected, rtol=1e-12)


def test_predicted_dice_exact_with_radius_two():
  label = np.zeros((16, 10, 10), np.int16)
  label[3:13, 2:8, 2:8] = 1
  mask = np.zeros_like(label)
  mask[5:11, 4:6, 4:6] = 1  # shrunk by two layers: misses lie within 2 voxels
  expected = true_dice(mask, label, 2)
  np.testing.assert_allclose(quality.predicted_dice(mask, mask != label, 2, radius=2), expected,
                             rtol=1e-12)
  # With radius 1 the outer layer of misses goes uncounted: an overestimate.
  assert quality.predicted_dice(mask, mask != label, 2, radius=1)[0] > expected[0] + 0.05


def test_predicted_dice_perfect_and_empty_structures():
  label, _ = exact_case()
  zeros = np.zeros(label.shape)
  # No predicted error: Dice 1 for every structure in the mask, NaN for the absent 5.
  dice = quality.predicted_dice(label, zeros, 6)
  np.testing.assert_array_equal(dice[:4], 1.0)
  assert np.isnan(dice[4])
  # A mask with no foreground at all: every structure NaN, whatever the error map says.
  assert np.all(np.isnan(quality.predicted_dice(np.zeros((4, 4, 4), int), np.ones((4, 4, 4)), 3)))


def test_predicted_dice_counts_each_error_at_most_once():
  rng = np.random.default_rng(0)
  mask = rng.integers(0, 5, size=(9, 8, 7))
  p = rng.random(mask.shape)
  _, fp, fn = quality.predicted_dice_terms(mask, p, 5, 1)
  # Reference candidates with scipy's iterated binary dilation.
  near = np.stack([ndimage.binary_dilation(mask == c, np.ones((3, 3, 3)), iterations=1)
                   & (mask != c) for c in range(1, 5)])
  counted = near.any(axis=0)
  np.testing.assert_allclose(fn.sum(), p[counted].sum(), rtol=1e-12)
  np.testing.assert_allclose(fp.sum(), p[mask > 0].sum(), rtol=1e-12)
  ref_fn = [(p * near[i] / np.maximum(near.sum(0), 1)).sum() for i in range(4)]
  np.testing.assert_allclose(fn, ref_fn, rtol=1e-12)
  dice = quality.predicted_dice(mask, p, 5)
  assert np.all((dice >= 0) & (dice <= 1))


@pytest.mark.parametrize("radius", [1, 2, 3])
def test_neighbourhood_matches_iterated_dilation(radius):
  rng = np.random.default_rng(radius)
  mask = (rng.random((11, 10, 9)) < 0.03).astype(np.int8)
  p = np.ones(mask.shape)
  _, _, fn = quality.predicted_dice_terms(mask, p, 2, radius)
  region = ndimage.binary_dilation(mask == 1, np.ones((3, 3, 3)), iterations=radius)
  assert fn[0] == np.count_nonzero(region & (mask != 1))


def test_predicted_dice_rejects_bad_input():
  mask = np.zeros((3, 3, 3), int)
  with pytest.raises(ValueError):
    quality.predicted_dice(mask, np.zeros((3, 3, 2)), 2)
  with pytest.raises(ValueError):
    quality.predicted_dice(mask + 2, np.zeros((3, 3, 3)), 2)
  with pytest.raises(ValueError):
    quality.predicted_dice(mask, np.full((3, 3, 3), 1.5), 2)
  with pytest.raises(ValueError):
    quality.predicted_dice(mask, np.full((3, 3, 3), np.nan), 2)
  with pytest.raises(ValueError):
    quality.predicted_dice(mask, np.zeros((3, 3, 3)), 2, radius=0)


# ---------------------------------------------------------------- risk-coverage, AURC

def test_risk_coverage_hand_computed():
  coverage, risk = quality.risk_coverage([0.9, 0.1, 0.5, 0.7], [0.2, 0.8, 0.0, 0.4])
  # Order by score: risks 0.2, 0.4, 0.0, 0.8.
  np.testing.assert_allclose(coverage, [0.25, 0.5, 0.75, 1.0])
  np.testing.assert_allclose(risk, [0.2, 0.3, 0.2, 0.35])
  assert quality.aurc([0.9, 0.1, 0.5, 0.7], [0.2, 0.8, 0.0, 0.4]) == pytest.approx(1.05 / 4)
  # Optimal: 0.0, 0.2, 0.4, 0.8 -> 0, 0.1, 0.2, 0.35; AURC 0.65 / 4.
  assert quality.e_aurc([0.9, 0.1, 0.5, 0.7], [0.2, 0.8, 0.0, 0.4]) == pytest.approx(0.4 / 4)


def test_risk_coverage_ties_use_group_mean():
  # Scores 1, 1, 0: the tied pair has risks 0 and 1, so coverage 1/3 gets their mean.
  _, risk = quality.risk_coverage([1.0, 1.0, 0.0], [0.0, 1.0, 0.4])
  np.testing.assert_allclose(risk, [0.5, 0.5, 1.4 / 3])
  # Three cases, all tied: every coverage has the overall mean.
  _, risk = quality.risk_coverage([2.0, 2.0, 2.0], [0.3, 0.0, 0.6])
  np.testing.assert_allclose(risk, [0.3, 0.3, 0.3])


def test_risk_coverage_independent_of_input_order():
  rng = np.random.default_rng(1)
  scores = rng.integers(0, 5, 40).astype(float)  # many ties
  risks = rng.random(40)
  coverage, risk = quality.risk_coverage(scores, risks)
  for _ in range(5):
    perm = rng.permutation(40)
    cov_p, risk_p = quality.risk_coverage(scores[perm], risks[perm])
    np.testing.assert_array_equal(cov_p, coverage)
    np.testing.assert_array_equal(risk_p, risk)
  # At each group's end the selective risk is exact (sort order within groups irrelevant).
  for s in np.unique(scores):
    k = np.count_nonzero(scores >= s)
    assert risk[k - 1] == pytest.approx(risks[scores >= s].mean(), rel=1e-12)


def test_aurc_matches_reference_without_ties():
  rng = np.random.default_rng(2)
  scores, risks = rng.random(50), rng.random(50)
  ordered = risks[np.argsort(-scores)]
  expected = np.mean(np.cumsum(ordered) / np.arange(1, 51))
  assert quality.aurc(scores, risks) == pytest.approx(expected, rel=1e-12)


def test_e_aurc_perfect_reversed_random():
  rng = np.random.default_rng(3)
  risks = rng.random(200)
  assert abs(quality.e_aurc(-risks, risks)) <= 1e-12
  # Any strictly decreasing function of the risk is a perfect ordering too.
  assert abs(quality.e_aurc(np.exp(-3 * risks), risks)) <= 1e-12
  reversed_aurc = quality.aurc(risks, risks)
  random_aurc = np.mean([quality.aurc(rng.random(200), risks) for _ in range(20)])
  assert reversed_aurc > random_aurc > quality.aurc(-risks, risks)
  for seed in range(20):
    r = np.random.default_rng(seed)
    n = int(r.integers(1, 30))
    s = r.integers(0, 4, n).astype(float) if seed % 2 else r.random(n)
    assert quality.e_aurc(s, r.random(n)) >= 0.0


def test_selective_metrics_drop_nan_and_empty():
  coverage, risk = quality.risk_coverage([0.9, np.nan, 0.5], [0.1, 0.2, np.nan])
  np.testing.assert_allclose(coverage, [1.0])
  np.testing.assert_allclose(risk, [0.1])
  coverage, risk = quality.risk_coverage([], [])
  assert coverage.shape == risk.shape == (0,)
  assert math.isnan(quality.aurc([np.nan], [0.5]))
  assert math.isnan(quality.e_aurc([], []))
  with pytest.raises(ValueError):
    quality.risk_coverage([1.0, 2.0], [0.5])


# ---------------------------------------------------------------- failure AUROC

def test_failure_auroc_hand_computed():
  dice = [0.9, 0.5, 0.8, 0.6]  # failures at 1 and 3 (below 0.75)
  assert quality.failure_auroc([0.9, 0.1, 0.8, 0.2], dice) == 1.0
  assert quality.failure_auroc([0.1, 0.9, 0.2, 0.8], dice) == 0.0
  # Failure scores 0.5, 0.3; success scores 0.5, 0.7. Pairs (fail, success):
  # (0.5, 0.5) tie 1/2, (0.5, 0.7) 1, (0.3, 0.5) 1, (0.3, 0.7) 1 -> 3.5 / 4.
  assert quality.failure_auroc([0.5, 0.5, 0.7, 0.3], dice) == pytest.approx(3.5 / 4)
  # The threshold is strict: dice == threshold is a success.
  assert quality.failure_auroc([0.1, 0.2], [0.75, 0.7]) == 0.0


def test_failure_auroc_single_class_is_nan():
  assert math.isnan(quality.failure_auroc([0.1, 0.2, 0.3], [0.8, 0.9, 1.0]))
  assert math.isnan(quality.failure_auroc([0.1, 0.2, 0.3], [0.1, 0.2, 0.3]))
  assert math.isnan(quality.failure_auroc([0.1, 0.2], [0.9, np.nan]))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_failure_auroc_matches_mannwhitneyu(seed):
  rng = np.random.default_rng(seed)
  n = 60
  scores = np.round(rng.random(n), 1)  # ties within and across the groups
  dice = np.clip(scores + rng.normal(0, 0.3, n), 0, 1)
  fail = dice < 0.75
  u = stats.mannwhitneyu(scores[~fail], scores[fail]).statistic
  expected = u / (fail.sum() * (~fail).sum())
  assert quality.failure_auroc(scores, dice) == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------- calibration

def test_calibration_bins_hand_computed():
  prob = np.array([0.0, 0.05, 0.1, 0.55, 0.95, 1.0])
  error = np.array([0, 1, 0, 1, 1, 1], bool)
  bins = quality.calibration_bins(prob, error, num_bins=4)
  # Bins [0, .25): 0, .05, .1; [.5, .75): .55; [.75, 1]: .95, 1 (p == 1 in the last bin).
  assert bins["count"].dtype == np.int64
  np.testing.assert_array_equal(bins["count"], [3, 0, 1, 2])
  np.testing.assert_allclose(bins["sum_prob"], [0.15, 0, 0.55, 1.95])
  np.testing.assert_allclose(bins["sum_error"], [1, 0, 1, 2])
  # ECE = sum of (count/N)|mean_p - rate| = sum of |sum_p - sum_err| / N over the bins.
  expected = (abs(0.15 - 1) + abs(0.55 - 1) + abs(1.95 - 2)) / 6
  ece = quality.expected_calibration_error(bins["count"], bins["sum_prob"], bins["sum_error"])
  assert ece == pytest.approx(expected, rel=1e-12)
  mean_prob, rate, count = quality.reliability_curve(bins["count"], bins["sum_prob"],
                                                bins["sum_error"])
  np.testing.assert_allclose(mean_prob, [0.05, 0.55, 0.975])
  np.testing.assert_allclose(rate, [1 / 3, 1, 1])
  np.testing.assert_array_equal(count, [3, 1, 2])


def test_calibration_perfect_data_has_small_ece():
  rng = np.random.default_rng(4)
  prob = rng.random(200_000)
  error = rng.random(prob.size) < prob
  bins = quality.calibration_bins(prob, error)
  assert quality.expected_calibration_error(**bins) < 0.01
  # An overconfident predictor (probabilities squashed towards 0) is badly calibrated.
  bins = quality.calibration_bins(prob ** 3, error)
  assert quality.expected_calibration_error(**bins) > 0.1


def test_calibration_bins_are_summable():
  rng = np.random.default_rng(5)
  prob = rng.random((6, 5, 4))
  prob[0, 0, 0], prob[1, 0, 0] = 1.0, 0.0
  error = rng.random(prob.shape) < 0.3
  whole = quality.calibration_bins(prob, error, num_bins=7)
  a = quality.calibration_bins(prob[:2], error[:2], num_bins=7)
  b = quality.calibration_bins(prob[2:], error[2:], num_bins=7)
  np.testing.assert_array_equal(a["count"] + b["count"], whole["count"])
  np.testing.assert_allclose(a["sum_prob"] + b["sum_prob"], whole["sum_prob"], rtol=1e-12)
  np.testing.assert_array_equal(a["sum_error"] + b["sum_error"], whole["sum_error"])
  assert whole["count"].sum() == prob.size
  np.testing.assert_array_equal(whole["count"],
                                np.histogram(prob, bins=7, range=(0, 1))[0])


def test_calibration_empty_and_bad_input():
  empty = quality.calibration_bins(np.zeros(0), np.zeros(0, bool), num_bins=3)
  np.testing.assert_array_equal(empty["count"], [0, 0, 0])
  assert math.isnan(quality.expected_calibration_error(**empty))
  assert all(a.shape == (0,) for a in quality.reliability_curve(**empty))
  with pytest.raises(ValueError):
    quality.calibration_bins(np.array([1.2]), np.array([1]))
  with pytest.raises(ValueError):
    quality.calibration_bins(np.array([0.2, 0.3]), np.array([1]))


# ---------------------------------------------------------------- correlations

def test_correlations_against_numpy_and_scipy():
  rng = np.random.default_rng(7)
  truth = rng.random(30)
  estimate = truth + rng.normal(0, 0.2, 30)
  out = quality.correlations(estimate, truth)
  assert out["n"] == 30
  assert out["pcc"] == pytest.approx(np.corrcoef(estimate, truth)[0, 1], rel=1e-12)
  # Continuous data has no ties, so double argsort gives the ranks.
  rank_e, rank_t = np.argsort(np.argsort(estimate)), np.argsort(np.argsort(truth))
  assert out["spearman"] == pytest.approx(np.corrcoef(rank_e, rank_t)[0, 1], rel=1e-12)
  assert out["mae"] == pytest.approx(np.abs(estimate - truth).mean(), rel=1e-12)
  assert 0 <= out["pcc_p"] < 1e-3 and 0 <= out["spearman_p"] < 1e-3


def test_correlations_hand_values_and_nan_pairs():
  x = np.array([1.0, 2.0, 3.0, 4.0, np.nan])
  y = np.array([2.0, 1.0, 4.0, 3.0, 0.5])
  out = quality.correlations(x, y)
  # Pairs without the NaN: r = 0.6 (cov 3/4 ... over variances 5/4), same for the ranks.
  assert out["n"] == 4
  assert out["pcc"] == pytest.approx(0.6) and out["spearman"] == pytest.approx(0.6)
  assert out["mae"] == pytest.approx(1.0)


def test_correlations_undefined_is_nan():
  for x, y in (([1.0, 2.0], [2.0, 3.0]),  # two pairs
               ([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]),  # constant estimate
               ([1.0, 2.0, 3.0], [0.5, 0.5, 0.5]),  # constant truth
               ([np.nan, 1.0, 2.0, 3.0], [1.0, np.nan, 2.0, 3.0])):  # 2 valid pairs
    out = quality.correlations(x, y)
    for key in ("pcc", "pcc_p", "spearman", "spearman_p"):
      assert math.isnan(out[key]), (x, y, key)
    assert not math.isnan(out["mae"])
  out = quality.correlations([np.nan], [1.0])
  assert out["n"] == 0 and math.isnan(out["mae"])


def test_pearson_and_mae_hand_computed():
  x = np.array([1.0, 2.0, 3.0, 4.0])
  y = np.array([2.0, 4.0, 5.0, 9.0])
  out = quality.correlations(x, y)
  assert out["n"] == 4 and all(isinstance(out[k], float) for k in ("pcc", "pcc_p", "mae"))
  # dx = (-1.5, -.5, .5, 1.5), dy = (-3, -1, 0, 4): r = 11 / sqrt(5 * 26) = 0.96476...;
  # t = r sqrt(2 / (1 - r^2)) = 11 sqrt(2) / 3 with 2 degrees of freedom; |x - y| = (1, 2, 2, 5).
  expected_p = 2 * stats.t.sf(11 * np.sqrt(2) / 3, 2)
  np.testing.assert_allclose([out["pcc"], out["pcc_p"], out["mae"]],
                             [11 / np.sqrt(130), expected_p, 2.5], rtol=1e-12)


def test_pearson_of_constant_input_is_nan():
  # 0.1 is not a float32 grid point: its float32 mean need not equal the values, which
  # leaves tiny deviations that a naive formula would correlate.
  x = np.full(7, 0.1, np.float32)
  y = np.linspace(0.0, 1.0, 7, dtype=np.float32)
  for out in (quality.correlations(x, y), quality.correlations(y, x)):
    assert np.isnan(out["pcc"]) and np.isnan(out["pcc_p"]) and out["n"] == 7
    assert np.isfinite(out["mae"])
  exact = quality.correlations(np.arange(10.0), 2 * np.arange(10.0))
  assert exact["pcc"] == pytest.approx(1.0, rel=1e-12) and 0.0 <= exact["pcc_p"] < 1e-12
  two = quality.correlations(np.array([0.5, 0.7]), np.array([0.1, 0.9]))
  assert np.isnan(two["pcc"]) and np.isnan(two["pcc_p"]) and two["mae"] == pytest.approx(0.3)


@pytest.mark.parametrize("m", [5, 30, 220])
def test_correlation_matches_scipy(m):
  for seed in SEEDS:
    rng = np.random.default_rng(seed)
    acc = rng.uniform(0.9, 1.0, m)
    qi = acc + rng.normal(0, 0.01, m)
    expected = stats.pearsonr(qi, acc)
    out = quality.correlations(qi, acc)
    assert out["n"] == m
    # float64 throughout: p depends steeply on r for large m (d log p / dr ~ m r / (1 - r^2)),
    # which a float32 r would cost a few 1e-4 of relative precision.
    np.testing.assert_allclose(out["pcc"], expected.statistic, rtol=1e-12)
    np.testing.assert_allclose(out["pcc_p"], expected.pvalue, rtol=1e-9)
    np.testing.assert_allclose(out["mae"], np.mean(np.abs(qi - acc)), rtol=1e-12)
