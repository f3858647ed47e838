"""The verdict rules, table-driven: every rule and each side of each threshold, with and
without a calibration. Expected verdicts come from the rules as docs/qc.md states them, not
from the code: with failure_dice 0.75 and review_band 0.10,
  empty mask -> fail; out of distribution -> out_of_distribution; missing structure -> fail;
  mean < 0.75 -> fail; mean < 0.85, or a structure < 0.75, or (calibrated) the bound on the
  mean < 0.75 -> review; else ok.
"""
from __future__ import annotations

import numpy as np
import pytest

from wh_errmap.data.structures import STRUCTURES
from wh_errmap.data.training_reference import (appearance, appearance_distance,
                                               appearance_reference)
from wh_errmap.qc.verdict import VERDICTS, Settings, ood_reasons, verdict

EPS = 1e-6
SETTINGS = Settings(failure_dice=0.75, review_band=0.10)
OOD = ["intensity distribution unlike training (distance 0.60 > 0.40)"]


def scores(mean: float = 0.9, weak: float | None = None, *, empty: bool = False,
           missing: tuple[str, ...] = (), calibrated: float | None = None,
           calibrated_weak: float | None = None, bound: float | None = None) -> dict:
  """Scores of a mask whose structures all have Dice `mean`, except, with `weak`, Myo at
  `weak` and LV at 2 * mean - weak (the mean stays `mean`); with a calibration, the same for
  the calibrated Dice."""
  def dice(mean_value, weak_value):
    values = {name: mean_value for name in STRUCTURES}
    if weak_value is not None:
      values["Myo"], values["LV"] = weak_value, 2 * mean_value - weak_value
    return values

  result = {"empty": empty, "missing": list(missing), "mean_predicted_dice": mean,
            "structures": {name: {"predicted_dice": d} for name, d in dice(mean, weak).items()}}
  if calibrated is not None:
    for name, d in dice(calibrated, calibrated_weak).items():
      result["structures"][name]["calibrated_dice"] = d
    result["calibrated_mean_dice"] = calibrated
    result["mean_dice_lower_bound"] = bound
    result["calibration"] = {"alpha": 0.1}
  return result


# (case, scores, ood reasons, expected verdict, a phrase every expected reason list holds)
RAW = [
    ("empty", scores(empty=True), [], "fail", "the mask is empty"),
    ("empty beats out of distribution", scores(empty=True), OOD, "fail", "the mask is empty"),
    ("out of distribution", scores(), OOD, "out_of_distribution", "intensity distribution"),
    ("out of distribution beats missing", scores(missing=("LA",)), OOD,
     "out_of_distribution", "missing structure(s): LA"),
    ("out of distribution beats a low Dice", scores(mean=0.2), OOD,
     "out_of_distribution", "intensity distribution"),
    ("missing", scores(missing=("LV", "AO")), [], "fail", "missing structure(s): LV, AO"),
    ("missing beats a high Dice", scores(mean=0.99, missing=("PA",)), [],
     "fail", "missing structure(s): PA"),
    ("mean just below failure_dice", scores(mean=0.75 - EPS), [], "fail",
     "mean predicted Dice 0.750 < 0.75"),
    ("mean at failure_dice", scores(mean=0.75), [], "review",
     "mean predicted Dice 0.750 < 0.85"),
    ("mean just above failure_dice", scores(mean=0.75 + EPS), [], "review",
     "< 0.85"),
    ("mean just below the review band's top", scores(mean=0.85 - EPS), [],
     "review", "mean predicted Dice 0.850 < 0.85"),
    ("mean just above the review band's top", scores(mean=0.85 + EPS), [],
     "ok", None),
    ("a structure just below failure_dice", scores(mean=0.87, weak=0.75 - EPS), [],
     "review", "predicted Dice below 0.75: Myo 0.75"),
    ("a structure at failure_dice", scores(mean=0.87, weak=0.75), [], "ok", None),
    ("a structure just above failure_dice", scores(mean=0.87, weak=0.75 + EPS), [], "ok",
     None),
    ("no structure weak, mean high", scores(mean=0.95), [], "ok", None),
]

CALIBRATED = [
    # The rules read the calibrated Dice, not the predicted one.
    ("calibrated mean low, predicted high", scores(mean=0.95, calibrated=0.7, bound=0.8), [],
     "fail",
     "mean calibrated Dice 0.700 < 0.75"),
    ("calibrated mean high, predicted low", scores(mean=0.5, calibrated=0.95, bound=0.8), [],
     "ok", None),
    ("calibrated mean in the review band", scores(calibrated=0.8, bound=0.8), [], "review",
     "mean calibrated Dice 0.800 < 0.85"),
    ("a calibrated structure weak", scores(calibrated=0.87, calibrated_weak=0.75 - EPS,
                                           bound=0.8), [], "review",
     "calibrated Dice below 0.75: Myo 0.75"),
    ("a predicted structure weak, calibrated fine", scores(mean=0.75, weak=0.5, calibrated=0.9,
                                                           bound=0.8), [], "ok", None),
    # ok also needs the lower bound on the true mean Dice to reach failure_dice.
    ("bound just below failure_dice", scores(calibrated=0.9, bound=0.75 - EPS), [], "review",
     "the 90% lower bound on the mean Dice, 0.750, is below 0.75"),
    ("bound at failure_dice", scores(calibrated=0.9, bound=0.75), [], "ok", None),
    ("bound just above failure_dice", scores(calibrated=0.9, bound=0.75 + EPS), [], "ok", None),
    ("no bound (too few calibration cases for one)", scores(calibrated=0.9, bound=None), [],
     "ok", None),
    ("bound 0 (trivial)", scores(calibrated=0.95, bound=0.0), [], "review",
     "lower bound on the mean Dice, 0.000"),
    ("a low bound does not make a fail a review", scores(calibrated=0.6, bound=0.1), [],
     "fail", "mean calibrated Dice 0.600 < 0.75"),
    ("out of distribution beats the calibration", scores(calibrated=0.95, bound=0.9), OOD,
     "out_of_distribution", "intensity distribution"),
]


@pytest.mark.parametrize("case, given, ood, expected, phrase", RAW + CALIBRATED,
                         ids=[row[0] for row in RAW + CALIBRATED])
def test_verdict_rules(case, given, ood, expected, phrase):
  word, reasons = verdict(given, list(ood), SETTINGS)
  assert word == expected
  if phrase is None:
    assert reasons == []
  else:
    assert any(phrase in reason for reason in reasons), reasons
  if expected == "out_of_distribution":
    assert reasons[:len(ood)] == ood   # the scan's problem first


def test_the_review_band_and_failure_dice_are_the_settings_not_constants():
  # The same scores against other thresholds: 0.80 is review at (0.75, 0.10), fail at
  # failure_dice 0.85, ok with a band that ends below 0.80.
  given = scores(mean=0.80)
  assert verdict(given, [], SETTINGS)[0] == "review"
  assert verdict(given, [], Settings(failure_dice=0.85, review_band=0.10))[0] == "fail"
  assert verdict(given, [], Settings(failure_dice=0.75, review_band=0.0))[0] == "ok"
  assert verdict(given, [], Settings(failure_dice=0.75, review_band=0.04))[0] == "ok"
  assert verdict(given, [], Settings(failure_dice=0.75, review_band=0.0501))[0] == "review"


def test_every_verdict_is_reachable_and_ordered_best_first():
  reached = {verdict(given, list(ood), SETTINGS)[0] for _, given, ood, _, _ in RAW}
  assert reached == set(VERDICTS)
  assert VERDICTS == ("ok", "review", "fail", "out_of_distribution")


def test_the_appearance_rule_flags_a_distance_above_limit_times_factor_only():
  # A reference of two cases whose appearances differ; a new case between them. Its
  # distance d (data.training_reference, tested there) against limit * factor, each side.
  rng = np.random.default_rng(0)
  mask = np.zeros((16, 16, 16), np.uint8)
  mask[4:12, 4:12, 4:8], mask[4:12, 4:12, 8:12] = 1, 3
  valid = np.ones(mask.shape, bool)
  images = [rng.normal(level, 0.05, mask.shape) for level in (0.0, 0.4, 0.2)]
  rows = [appearance(image, mask, valid, (2.0,) * 3) for image in images[:2]]
  reference = {"volume_ml": {s: [0.0, 1e9] for s in STRUCTURES},
               "intensity_histogram": [1.0 / 16] * 16, "intensity_distance_max": 1.0,
               "appearance": appearance_reference(rows * 2, ["a", "b", "a", "b"])}
  d = appearance_distance(images[2], mask, valid, (2.0,) * 3, reference["appearance"])
  limit = reference["appearance"]["limit"]
  properties = {"spacing": [2.0] * 3}
  for factor, flagged in ((d / limit * (1 - 1e-6), True), (d / limit * (1 + 1e-6), False)):
    reasons = ood_reasons(images[2], mask, valid, properties, reference,
                          Settings(appearance_factor=factor))
    assert any("appearance distance" in r for r in reasons) == flagged, (factor, reasons)
  no_appearances = {k: v for k, v in reference.items() if k != "appearance"}
  assert ood_reasons(images[2], mask, valid, properties, no_appearances,
                     Settings(appearance_factor=1e-9)) == []
