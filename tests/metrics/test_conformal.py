"""Conformal Dice lower bounds (coverage on synthetic scores, exact offsets, NaN and
cross-fold policies) and monotone recalibration (fits, JSON round trips, leave-one-out)."""
from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest

from wh_errmap.metrics import conformal as cf
from wh_errmap.metrics import coverage


def json_round_trip(d: dict) -> dict:
  return json.loads(json.dumps(d, allow_nan=False))


# ---------------------------------------------------------------- conformal offset


NOISE = {
    "normal": lambda rng, size: rng.normal(0.0, 0.05, size),
    "skewed": lambda rng, size: rng.exponential(0.05, size) - 0.02,
    "heavy_tailed": lambda rng, size: 0.03 * rng.standard_t(2, size),
}


@pytest.mark.parametrize("alpha", [0.1, 0.2])
@pytest.mark.parametrize("noise", sorted(NOISE))
def test_coverage_matches_the_guarantee_on_synthetic_scores(noise, alpha):
  rng = np.random.default_rng(0)
  draws, n_cal, n_test = 2000, 50, 20
  pred = rng.uniform(0.3, 0.95, (draws, n_cal + n_test))
  # Clipping keeps true Dice in [0, 1]; scores stay continuous since pred is.
  true = np.clip(pred - NOISE[noise](rng, pred.shape), 0.0, 1.0)
  coverage = np.empty(draws)
  for d in range(draws):
    q, n = cf.conformal_offset(pred[d, :n_cal], true[d, :n_cal], alpha)
    assert n == n_cal
    bound = cf.conformal_lower_bound(pred[d, n_cal:], q)
    coverage[d] = np.mean(true[d, n_cal:] >= bound)
  mean = coverage.mean()
  assert abs(mean - (1 - alpha)) <= 0.03
  assert mean <= 1 - alpha + 1 / (n_cal + 1) + 0.03
  # With continuous scores the marginal coverage is exactly k / (n + 1); the Monte Carlo
  # error is about 0.001, so an off-by-one k (1 / 51 away) fails here.
  k = math.ceil((n_cal + 1) * (1 - alpha))
  assert abs(mean - k / (n_cal + 1)) < 0.008


def test_offset_is_the_kth_smallest_score():
  pred = np.full(9, 0.9)
  scores = np.array([0.05, 0.01, 0.09, 0.03, 0.07, 0.02, 0.08, 0.04, 0.06])
  true = pred - scores
  # n = 9, alpha = 0.2: k = ceil(10 * 0.8) = 8.
  q, n = cf.conformal_offset(pred, true, 0.2)
  assert n == 9 and q == np.sort(pred - true)[7]
  # n = 9, alpha = 0.1: k = 9, the largest score, still finite.
  assert cf.conformal_offset(pred, true, 0.1)[0] == np.max(pred - true)
  # 10 * (1 - 0.7) rounds to 3.0000000000000004; k must stay 3.
  assert cf.conformal_offset(pred, true, 0.7)[0] == np.sort(pred - true)[2]


@pytest.mark.parametrize("n", [0, 1, 5, 8])
def test_too_few_cases_give_infinite_offset_and_trivial_bound(n):
  rng = np.random.default_rng(n)
  pred = rng.uniform(0.5, 1.0, n)
  q, m = cf.conformal_offset(pred, pred - 0.1, alpha=0.1)
  assert q == math.inf and m == n
  np.testing.assert_array_equal(cf.conformal_lower_bound([0.2, 0.9, 1.0], q), [0, 0, 0])


def test_bound_is_clipped_and_nan_prediction_gives_nan():
  bound = cf.conformal_lower_bound([0.95, 0.5, np.nan, 0.05], -0.1)
  np.testing.assert_allclose(bound, [1.0, 0.6, np.nan, 0.15])
  np.testing.assert_array_equal(cf.conformal_lower_bound([0.05], 0.1), [0.0])


def test_nan_pairs_are_ignored_in_fitting():
  rng = np.random.default_rng(1)
  pred = rng.uniform(0.5, 1.0, 30)
  true = np.clip(pred - rng.normal(0, 0.05, 30), 0, 1)
  q_clean, n_clean = cf.conformal_offset(pred, true, 0.1)
  pred_nan = np.concatenate([pred, [np.nan, 0.1, np.nan]])
  true_nan = np.concatenate([true, [0.0, np.nan, np.nan]])
  assert cf.conformal_offset(pred_nan, true_nan, 0.1) == (q_clean, n_clean)


def test_offset_rejects_malformed_input():
  with pytest.raises(ValueError, match="alpha"):
    cf.conformal_offset([0.5] * 10, [0.5] * 10, 1.0)
  with pytest.raises(ValueError, match=r"\(n,\)"):
    cf.conformal_offset([0.5] * 10, [0.5] * 9, 0.1)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    cf.conformal_offset([0.5] * 9 + [1.2], [0.5] * 10, 0.1)


def test_offset_uses_the_recalibrated_prediction():
  rng = np.random.default_rng(2)
  pred = rng.uniform(0.2, 0.9, 40)
  true = np.clip(pred + 0.1 + rng.normal(0, 0.03, 40), 0, 1)
  g = cf.PlattRecalibration(a=1.5, b=0.4)
  q, _ = cf.conformal_offset(pred, true, 0.1, g)
  assert q == cf.conformal_offset(g(pred), true, 0.1)[0]
  np.testing.assert_array_equal(cf.conformal_lower_bound(pred, q, g),
                                np.clip(g(pred) - q, 0, 1))


# ---------------------------------------------------------------- cross-fold


def three_folds() -> list[tuple[np.ndarray, np.ndarray]]:
  """Fold k holds scores 0.1 k + 0.00, 0.01, ..., 0.08 (pred 0.9)."""
  folds = []
  for k in range(3):
    pred = np.full(9, 0.9)
    folds.append((pred, pred - (0.1 * k + 0.01 * np.arange(9))))
  return folds


def test_cross_fold_fits_each_offset_on_the_other_folds_only():
  folds = three_folds()
  out = coverage.cross_fold_coverage(folds, alpha=0.1)
  # n_cal = 18, k = ceil(19 * 0.9) = 18: the largest score of the two other folds. With
  # its own fold (n = 27, k = 26) fold 2 would get 0.27 instead of 0.18.
  largest = [float(np.max(p - t)) for p, t in folds]
  expected_q = [largest[2], largest[2], largest[1]]
  assert [f["q"] for f in out["folds"]] == expected_q
  assert [f["n_cal"] for f in out["folds"]] == [18, 18, 18]
  # Fold 2's scores (0.20..0.28) all exceed its q = 0.18; the others are all covered.
  assert [f["coverage"] for f in out["folds"]] == [1.0, 1.0, 0.0]
  assert out["coverage"] == pytest.approx(18 / 27) and out["n"] == 27
  np.testing.assert_allclose([f["mean_width"] for f in out["folds"]], expected_q)
  np.testing.assert_allclose(out["mean_width"], np.mean(expected_q))
  bounds = [np.clip(p - q, 0, 1) for (p, _), q in zip(folds, expected_q)]
  assert out["mean_bound"] == pytest.approx(np.mean(np.concatenate(bounds)))


def test_cross_fold_table_is_strict_json_with_trivial_bounds_and_nan():
  folds = [(np.array([0.8, 0.7, np.nan]), np.array([0.75, 0.72, 0.5])),
           (np.array([0.9, 0.6]), np.array([0.85, np.nan]))]
  table = coverage.cross_fold_table({"LV": folds, "RV": three_folds()}, alpha=0.1)
  assert json_round_trip(table) == table
  lv = table["LV"]
  # One calibration case per fold: q = +inf, written as None; the bound is 0.
  assert [f["q"] for f in lv["folds"]] == [None, None]
  assert lv["n"] == 3 and lv["coverage"] == 1.0
  assert lv["mean_width"] == pytest.approx((0.8 + 0.7 + 0.9) / 3)
  assert table["RV"] == coverage.cross_fold_coverage(three_folds(), 0.1)


def test_cross_fitting_fits_g_and_q_on_disjoint_other_folds():
  # Predictions biased low by 0.15 (as the predicted Dice of 3D masks is). Raw, the bound
  # must sit above the prediction (q < 0); recalibrated, g removes the bias and q is the
  # noise's 90% quantile (about 0.04). Coverage holds either way.
  rng = np.random.default_rng(7)
  folds = []
  for _ in range(5):
    true = rng.uniform(0.3, 0.95, 60)
    folds.append((np.clip(true - 0.15 + rng.normal(0, 0.03, 60), 0, 1), true))
  raw = coverage.cross_fold_coverage(folds, 0.1)
  fitted = coverage.cross_fitted_coverage(folds, 0.1)
  assert fitted["coverage"] >= 0.85 and raw["coverage"] >= 0.85
  assert all(row["q"] < -0.05 for row in raw["folds"])
  assert all(0 < row["q"] < 0.1 for row in fitted["folds"])
  assert [row["n_cal"] for row in fitted["folds"]] == [120] * 5
  # Fold 0's g is fitted on folds 1 and 3, its q on folds 2 and 4 ...
  g = cf.fit_recalibration(*[np.concatenate(a) for a in zip(folds[1], folds[3])])
  q, _ = cf.conformal_offset(*[np.concatenate(a) for a in zip(folds[2], folds[4])], 0.1, g)
  assert fitted["folds"][0]["q"] == q
  # ... so its own true values change nothing but its coverage.
  changed = [(folds[0][0], np.clip(folds[0][1] - 0.3, 0, 1)), *folds[1:]]
  again = coverage.cross_fitted_coverage(changed, 0.1)["folds"][0]
  assert again["q"] == q and again["coverage"] < fitted["folds"][0]["coverage"]
  with pytest.raises(ValueError, match="3 folds"):
    coverage.cross_fitted_coverage(folds[:2], 0.1)


def test_cross_fold_needs_two_folds():
  with pytest.raises(ValueError, match="2 folds"):
    coverage.cross_fold_coverage(three_folds()[:1], 0.1)


def test_conformal_bound_round_trips_through_strict_json():
  rng = np.random.default_rng(3)
  pred = rng.uniform(0.3, 0.9, 30)
  true = np.clip(pred - rng.normal(0, 0.05, 30), 0, 1)
  g = cf.fit_recalibration(pred, true)
  bound = cf.fit_conformal_bound({"LV": (pred, true), "RV": (pred, true),
                                  "PA": (pred[:4], true[:4])}, 0.1, {"RV": g})
  assert bound.offset["PA"] == math.inf and bound.n == {"LV": 30, "RV": 30, "PA": 4}
  assert bound.offset["RV"] == cf.conformal_offset(pred, true, 0.1, g)[0]
  restored = cf.ConformalBound.from_dict(json_round_trip(bound.to_dict()))
  assert restored == bound
  for s in ("LV", "RV", "PA"):
    np.testing.assert_array_equal(restored.lower_bound(s, pred), bound.lower_bound(s, pred))


# ---------------------------------------------------------------- recalibration


def test_isotonic_fits_a_monotone_sample_exactly_and_is_monotone():
  pred = np.array([0.2, 0.4, 0.5, 0.7, 0.9])
  true = np.array([0.1, 0.3, 0.35, 0.8, 0.85])
  g = cf.fit_recalibration(pred, true, "isotonic")
  np.testing.assert_allclose(g(pred), true, atol=1e-15)
  # Linear between knots, constant outside them.
  np.testing.assert_allclose(g([0.45, 0.0, 1.0]), [0.325, 0.1, 0.85], atol=1e-15)

  rng = np.random.default_rng(4)
  pred = rng.uniform(0, 1, 50)
  true = np.clip(pred + rng.normal(0, 0.2, 50), 0, 1)
  out = cf.fit_recalibration(pred, true, "isotonic")(np.linspace(0, 1, 201))
  assert np.all(np.diff(out) >= 0) and out.min() >= 0 and out.max() <= 1


def test_isotonic_pools_violators_and_ties():
  # Knot 0.5 holds 0.6 and 0.2 (mean 0.4), above knot 0.6's 0.1: the three pool to 0.3.
  g = cf.fit_recalibration([0.5, 0.5, 0.6, 0.9], [0.6, 0.2, 0.1, 1.0], "isotonic")
  assert g.x == (0.5, 0.6, 0.9)
  np.testing.assert_allclose(g.y, [0.3, 0.3, 1.0], atol=1e-15)


def test_platt_recovers_known_parameters_and_stays_monotone():
  pred = np.linspace(0.05, 0.98, 25)
  a, b = 2.0, -0.5
  true = 1 / (1 + np.exp(-(a * np.log(pred / (1 - pred)) + b)))
  g = cf.fit_recalibration(pred, true, "platt")
  assert g.a == pytest.approx(a, abs=1e-6) and g.b == pytest.approx(b, abs=1e-6)
  np.testing.assert_array_equal(g([0.0, 1.0]), [0.0, 1.0])
  # Decreasing data: a stays > 0, so the map stays non-decreasing.
  decreasing = cf.fit_recalibration(pred, 1 - pred, "platt")
  assert decreasing.a > 0
  assert np.all(np.diff(decreasing(np.linspace(0, 1, 101))) >= 0)
  with pytest.raises(ValueError, match="a > 0"):
    cf.PlattRecalibration(a=-1.0, b=0.0)


@pytest.mark.parametrize("method", ["isotonic", "platt"])
def test_recalibration_round_trips_through_strict_json(method):
  rng = np.random.default_rng(5)
  pred = rng.uniform(0, 1, 20)
  g = cf.fit_recalibration(pred, np.clip(pred ** 2 + rng.normal(0, 0.05, 20), 0, 1), method)
  restored = cf.recalibration_from_dict(json_round_trip(g.to_dict()))
  assert restored == g
  grid = np.append(np.linspace(0, 1, 101), np.nan)
  np.testing.assert_array_equal(restored(grid), g(grid))
  assert np.isnan(g(grid)[-1])


def test_recalibration_rejects_malformed_input():
  with pytest.raises(ValueError, match=">= 3 cases"):
    cf.fit_recalibration([0.5, 0.6, np.nan], [0.5, 0.6, 0.7])
  with pytest.raises(ValueError, match=r"\(n,\)"):
    cf.fit_recalibration([0.5, 0.6, 0.7], [0.5, 0.6])
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    cf.fit_recalibration([0.5, 0.6, 0.7], [0.5, 0.6, -0.1])
  with pytest.raises(ValueError, match="method"):
    cf.fit_recalibration([0.5, 0.6, 0.7], [0.5, 0.6, 0.7], "spline")
  with pytest.raises(ValueError, match="method"):
    cf.recalibration_from_dict({"method": "spline"})


@pytest.mark.parametrize("method", ["isotonic", "platt"])
def test_leave_one_out_value_does_not_depend_on_own_true_dice(method):
  rng = np.random.default_rng(6)
  pred = rng.uniform(0.2, 0.95, 12)
  true = np.clip(pred + rng.normal(0, 0.1, 12), 0, 1)
  pred[3] = np.nan
  true[5] = np.nan
  loo = cf.leave_one_out_recalibrated(pred, true, method)
  assert np.isnan(loo[3]) and not np.isnan(loo[5])
  i = 7
  perturbed = true.copy()
  perturbed[i] = 1.0 - true[i]
  loo_perturbed = cf.leave_one_out_recalibrated(pred, perturbed, method)
  assert loo_perturbed[i] == loo[i]
  # The other cases' maps do see true[i].
  assert not np.allclose(np.delete(loo_perturbed, [3, i]), np.delete(loo, [3, i]))
  # Case i's value is the map fitted without case i (nor the NaN pairs).
  keep = np.ones(12, bool)
  keep[[3, 5, i]] = False
  assert loo[i] == cf.fit_recalibration(pred[keep], true[keep], method)(pred[i:i + 1])[0]


@pytest.mark.parametrize("alpha", [0.1, 0.05, 0.2, 0.3, 0.5, 0.7])
def test_min_cases_for_bound_is_where_the_offset_becomes_finite(alpha):
  """Expected n from exact rational arithmetic: the smallest n with
  ceil((n + 1)(1 - alpha)) <= n; the offset is infinite one case below it, finite at it."""
  a = Fraction(alpha).limit_denominator(1000)
  expected = next(n for n in range(1, 1000) if math.ceil((n + 1) * (1 - a)) <= n)
  assert cf.min_cases_for_bound(alpha) == expected
  rng = np.random.default_rng(0)
  for n, finite in ((expected - 1, False), (expected, True)):
    pred = rng.uniform(0.5, 0.9, n)
    q, _ = cf.conformal_offset(pred, pred - 0.05, alpha)
    assert math.isfinite(q) == finite, (n, q)


def test_min_cases_for_bound_of_the_default_alpha_is_9():
  assert cf.min_cases_for_bound(0.1) == 9     # ceil(10 * 0.9) = 9 <= 9; ceil(9 * 0.9) = 9 > 8
