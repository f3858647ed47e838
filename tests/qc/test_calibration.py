"""Calibration on the user's labelled cases: threshold choice, recalibration and bounds
(calibration.py), scoring against a reference in qc.assess, the calibrate experiment and
predict's use of a calibrated model file."""
from __future__ import annotations

import csv
import json
import math
import shutil

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from experiments import calibrate, predict
from wh_errmap import qc
from wh_errmap.qc.verdict import verdict
from wh_errmap.data.phantom import make_phantom_case
from wh_errmap.data.training_reference import REFERENCE_FILE
from wh_errmap.errors import UserError
from wh_errmap.metrics.conformal import ConformalBound
from wh_errmap.qc.calibration import (MEAN, THRESHOLDS, Calibration, choose_threshold,
                                      fit_calibration)
from wh_errmap.qc.predictor import load_predictor, load_predictor_file

MYO, LV = 205, 500
CASES = 10   # enough for a finite 90% bound: k = ceil(11 * 0.9) = 10 <= 10


def test_threshold_maximises_the_pooled_error_dice():
  rng = np.random.default_rng(0)
  error = rng.random(5000) < 0.1
  # Errors score 0.6 +- 0.05, correct voxels 0.35 +- 0.05: the cut lies between.
  prob = np.where(error, 0.6, 0.35) + rng.normal(0, 0.05, error.size)
  threshold, sweep = choose_threshold([prob[:2500], prob[2500:]], [error[:2500], error[2500:]])
  assert 0.4 <= threshold <= 0.55 and len(sweep) == len(THRESHOLDS)
  best = max(r["dice"] for r in sweep)
  assert [r["dice"] for r in sweep if r["threshold"] == threshold] == [best]
  assert best > 0.9


def test_fit_calibration_removes_a_bias_and_round_trips():
  rng = np.random.default_rng(1)
  true = rng.uniform(0.4, 0.95, 40)
  pred = np.clip(true - 0.15 + rng.normal(0, 0.02, 40), 0, 1)
  absent = np.full(40, np.nan)
  cal = fit_calibration({"LV": pred, MEAN: pred, "PA": absent}, {"LV": true, MEAN: true,
                        "PA": absent}, 0.4, "isotonic", 0.1, source="here")
  assert cal.cases == 40 and "PA" not in cal.recalibration
  assert cal.bounds.offset["PA"] == np.inf and cal.lower_bound("PA", 0.5) == 0.0
  # The map removes the 0.15 bias; the bound sits a little below the calibrated value.
  assert abs(cal.calibrated("LV", 0.6) - 0.75) < 0.05
  assert 0 < cal.calibrated("LV", 0.6) - cal.lower_bound("LV", 0.6) < 0.1
  assert np.mean(true >= [cal.lower_bound("LV", p) for p in pred]) >= 0.85
  again = Calibration.from_dict(json.loads(json.dumps(cal.to_dict(), allow_nan=False)))
  assert again.calibrated("LV", 0.6) == cal.calibrated("LV", 0.6)
  assert again.lower_bound(MEAN, 0.7) == cal.lower_bound(MEAN, 0.7)
  assert (again.threshold, again.source) == (0.4, "here")
  none = fit_calibration({MEAN: pred}, {MEAN: true}, 0.5, "none", 0.1)
  assert none.calibrated(MEAN, 0.6) == 0.6 and none.recalibration == {}
  with pytest.raises(ValueError, match="method"):
    fit_calibration({MEAN: pred}, {MEAN: true}, 0.5, "linear")


def scores_with(mean, bound, structures=None):
  structures = structures or {"LV": {"predicted_dice": 0.9, "calibrated_dice": mean}}
  return {"empty": False, "missing": [], "mean_predicted_dice": 0.5,
          "calibrated_mean_dice": mean, "mean_dice_lower_bound": bound,
          "structures": structures, "calibration": {"alpha": 0.1}}


def test_a_calibrated_verdict_reads_the_calibrated_dice_and_its_bound():
  settings = qc.Settings()
  # The raw predicted Dice (0.5) would fail; the calibrated one is read instead.
  assert verdict(scores_with(0.95, 0.9), [], settings) == ("ok", [])
  word, reasons = verdict(scores_with(0.95, 0.7), [], settings)
  assert word == "review" and "90% lower bound on the mean Dice, 0.700" in reasons[0]
  assert verdict(scores_with(0.7, 0.6), [], settings)[0] == "fail"


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, tiny_run):
  """A tiny run, and 10 phantom cases whose masks are the label with the LV eroded by
  0..4 voxels (index % 5; true Dice falling with the erosion), in three folders."""
  # The session's tiny run without its training reference: calibration cases are not
  # judged in or out of distribution.
  run = tmp_path_factory.mktemp("run") / "run"
  shutil.copytree(tiny_run, run)
  (run / "fold0" / "predictor" / REFERENCE_FILE).unlink()
  root = tmp_path_factory.mktemp("cases")
  for name in ("images", "masks", "labels"):
    (root / name).mkdir()
  for index in range(CASES):
    image, label, affine = make_phantom_case(seed=9, index=index, spacing_scale=2.0)
    mask = label.copy()
    if index % 5:
      lv = ndimage.binary_erosion(label == LV, iterations=index % 5)
      mask[(label == LV) & ~lv] = 0
    for folder, data in (("images", image), ("masks", mask), ("labels", label)):
      nib.save(nib.Nifti1Image(data, affine), str(root / folder / f"c{index}.nii.gz"))
  return run, root


def test_assess_scores_a_mask_against_its_reference_without_moving_the_crop(labelled):
  run, root = labelled
  predictor = load_predictor(run, 0)
  args = (root / "images" / "c2.nii.gz", root / "masks" / "c2.nii.gz", predictor)
  plain = qc.assess(*args, progress=lambda _: None)
  scored = qc.assess(*args, progress=lambda _: None, reference=root / "labels" / "c2.nii.gz")
  assert plain.properties["crop_start"] == scored.properties["crop_start"]
  np.testing.assert_array_equal(plain.error_prob, scored.error_prob)
  true = scored.scores["true"]
  # Labels resample by class indicators: the eroded LV moves a few Myo voxels too.
  assert true["dice"]["Myo"] > 0.99 and 0.2 < true["dice"]["LV"] < 0.95
  valid = scored.crop["valid"]
  mask, reference = scored.crop["mask"][valid], scored.crop["reference"][valid]
  lv = 2 * np.sum((mask == 3) & (reference == 3)) / (np.sum(mask == 3) + np.sum(reference == 3))
  assert true["dice"]["LV"] == pytest.approx(lv)
  assert true["accuracy"] == pytest.approx(np.mean(mask == reference))
  assert "true" not in plain.scores


def test_calibrate_writes_a_model_file_that_predict_applies(labelled, tmp_path):
  run, root = labelled
  config = calibrate.get_config()
  config.image, config.mask = str(root / "images"), str(root / "masks")
  config.reference = str(root / "labels")
  config.output = str(tmp_path / "mine.whqc")
  config.calibrate.method = "platt"
  calibrate.run(config, str(run))
  report = json.loads((tmp_path / "mine-calibration" / "calibration.json").read_text())
  per_case = report["per_case"]
  assert [c["mask"] for c in per_case] == [f"c{i}.nii.gz" for i in range(CASES)]
  true = {c["mask"]: c["true_dice"] for c in per_case}
  assert true["c0.nii.gz"] == 1.0 and true["c5.nii.gz"] == 1.0
  assert true["c1.nii.gz"] > true["c2.nii.gz"] > true["c3.nii.gz"] > true["c4.nii.gz"]
  assert report["threshold"] in THRESHOLDS and report["cases"] == CASES
  assert (tmp_path / "mine-calibration" / "reliability_risk_coverage.png").stat().st_size
  loaded = load_predictor_file(tmp_path / "mine.whqc")
  calibration = Calibration.from_dict(loaded.calibration)
  assert calibration.threshold == report["threshold"] and calibration.cases == CASES
  # Split conformal, computed here from the report's leave-one-out calibrated and true mean
  # Dice: q is the ceil((n + 1)(1 - alpha))-th smallest score calibrated - true.
  scores = sorted(c["calibrated_dice"] - c["true_dice"] for c in per_case)
  q = scores[math.ceil((CASES + 1) * 0.9 - 1e-9) - 1]
  assert math.isfinite(calibration.bounds.offset[MEAN])
  assert calibration.bounds.offset[MEAN] == pytest.approx(q)
  with pytest.raises(UserError, match="exists"):
    calibrate.run(config, str(run))

  out = tmp_path / "qc"
  p = predict.get_config()
  p.image, p.mask = str(root / "images" / "c3.nii.gz"), str(root / "masks" / "c3.nii.gz")
  p.model_file, p.output_dir = str(tmp_path / "mine.whqc"), str(out)
  predict.run(p, str(tmp_path / "no_such_run"))
  result = json.loads((out / "c3__c3_qc.json").read_text())
  assert result["threshold"] == calibration.threshold
  assert result["calibration"]["cases"] == CASES
  # The bound is the calibrated mean Dice (g of the predicted one, applied once) less q.
  calibrated = result["calibrated_mean_dice"]
  assert calibrated == pytest.approx(calibration.calibrated(MEAN, result["mean_predicted_dice"]))
  bound = min(1.0, max(0.0, calibrated - q))
  assert 0 < bound < calibrated and result["mean_dice_lower_bound"] == pytest.approx(bound)
  with open(out / "qc.tsv", newline="") as f:
    row, = csv.DictReader(f, delimiter="\t")
  assert float(row["mean_dice_lower_bound"]) == pytest.approx(bound, abs=1e-4)
  assert float(row["calibrated_mean_dice"]) == pytest.approx(calibrated, abs=1e-4)
  # The verdict by the stated rules, from the calibrated values and the bound.
  structures = [s["calibrated_dice"] for s in result["structures"].values()
                if s.get("calibrated_dice") is not None]
  expected = ("fail" if calibrated < 0.75 else
              "review" if calibrated < 0.85 or min(structures) < 0.75 or bound < 0.75 else
              "ok")
  assert row["verdict"] == result["verdict"] == expected


def test_calibrate_needs_labelled_triples(labelled, tmp_path):
  run, root = labelled
  config = calibrate.get_config()
  config.image, config.mask = str(root / "images"), str(root / "masks")
  with pytest.raises(UserError, match="reference"):
    calibrate.run(config, str(run))
  lonely = tmp_path / "labels"
  lonely.mkdir()
  (lonely / "c0.nii.gz").write_bytes((root / "labels" / "c0.nii.gz").read_bytes())
  config.reference = str(lonely)
  with pytest.raises(UserError, match="1 labelled case.*at least 3"):
    calibrate.run(config, str(run))


def test_conformal_bound_offsets_of_infinity_survive_the_model_file():
  bound = ConformalBound(0.1, {MEAN: np.inf}, {MEAN: 2})
  cal = Calibration(0.5, "none", {}, bound, 2)
  assert Calibration.from_dict(json.loads(json.dumps(cal.to_dict(), allow_nan=False))
                               ).bounds.offset[MEAN] == np.inf
