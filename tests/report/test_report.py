"""The cross-validation report on a fake run: 2 of 5 folds evaluated, a third still training."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from experiments import cv_report
from tests.conftest import blob_label
from wh_errmap.cv.evaluate import write_records
from wh_errmap.data.nifti_io import save_nifti
from wh_errmap.data.structures import MMWHS_CODES, STRUCTURES
from wh_errmap.errors import UserError
from wh_errmap.metrics import conformal, coverage, quality
from wh_errmap.report import beyond_paper, panels, tables
from wh_errmap.report.build import build_report
from wh_errmap.report.folds import read_fold, read_folds
from wh_errmap.report.tables import TABLE1_COLUMNS, TABLE1_ROWS, qi_scope, qi_statistics, table1
from wh_errmap.train.masks import AUTO_MASK_TYPES, MASK_TYPES

CASES = {0: ["mr_train_1001", "mr_train_1002", "mr_train_1003"],
         1: ["mr_train_1004", "mr_train_1005"]}
PANEL_CASE = "mr_train_1002"
PANEL_TYPES = ("3d-final", "2d-final", "gt")
FIGURES = ("dsc_histogram.png", "error_panels.png", "qi_vs_acc.png", "qi_vs_dsc.png",
           "training_curves.png", "risk_coverage.png", "reliability.png")
# An oblique header, so the panels must reorient predictions and scan alike.
AFFINE = np.array([[-1.2, 0, 0, 30], [0, 0, 1.5, -10], [0, -1.1, 0, 5], [0, 0, 0, 1.0]])


def fake_records(fold: int, rng: np.random.Generator) -> list[dict]:
  records = []
  for case_id in CASES[fold]:
    for mask_type in MASK_TYPES:
      gt = mask_type == "gt"
      acc = 1.0 if gt else float(rng.uniform(0.92, 0.99))
      records.append({
          "case_id": case_id, "fold": fold, "mask_type": mask_type,
          **{field: float(rng.uniform(0.2, 0.9)) for field in ("err_dsc", "err_prec",
                                                               "err_recl")},
          "err_acc": float(rng.uniform(0.95, 1.0)),
          "seg_dsc": 1.0 if gt else float(rng.uniform(0.2, 0.85)), "seg_acc": acc,
          "qi": acc + float(rng.normal(0, 0.004)), "soft_qi": acc + float(rng.normal(0, 0.006)),
          "true_acc": acc})
      dsc = records[-1]["seg_dsc"]
      records[-1].update({
          "pd_mean": dsc + float(rng.normal(0, 0.03)),
          **{f"pd_{s}": dsc + float(rng.normal(0, 0.05)) for s in STRUCTURES},
          **{f"dsc_{s}": dsc for s in STRUCTURES},
          **{f"base_{k}": (float("nan") if gt else float(rng.uniform(0.1, 0.9)))
             for k in ("err_dsc", "err_prec", "err_recl", "qi", "soft_qi", "pd_mean")}})
  return records


def write_calibration(fold_dir: Path) -> None:
  """Bins where the predictor is calibrated and the baseline is not."""
  count = [100] * 10
  mids = [(b + 0.5) / 10 for b in range(10)]
  (fold_dir / "calibration.json").write_text(json.dumps({
      "predictor": {"count": count, "sum_prob": [100 * m for m in mids],
                    "sum_error": [100 * m for m in mids]},
      "baseline": {"count": count, "sum_prob": [100 * m for m in mids],
                   "sum_error": [0.0] * 10}}))


def write_curve(path: Path, steps: int) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  lines = [json.dumps({"step": s, "loss": 5.0 / s + 0.5, "final/ce": 0.1})
           for s in range(1, steps + 1, 10)]
  path.write_text("\n".join(lines) + "\n")


def write_panel_case(fold_dir: Path, data_dir: Path) -> np.ndarray:
  """Scan, label and predictions of PANEL_CASE; returns the label (MMWHS codes)."""
  label = blob_label((24, 20, 16))
  rng = np.random.default_rng(1)
  image = (100 + 50 * (label > 0) + rng.normal(0, 5, label.shape)).astype(np.float32)
  paths = {"image_path": str(data_dir / f"{PANEL_CASE}_image.nii.gz"),
           "label_path": str(data_dir / f"{PANEL_CASE}_label.nii.gz")}
  save_nifti(paths["image_path"], image, AFFINE)
  save_nifti(paths["label_path"], label, AFFINE)
  (fold_dir / "test_cases.json").write_text(json.dumps({PANEL_CASE: paths}))
  # Every mask calls the myocardium LV: its true error map is exactly the myocardium.
  wrong = np.where(label == MMWHS_CODES[0], MMWHS_CODES[2], label).astype(np.int16)
  for mask_type in PANEL_TYPES:
    mask = label if mask_type == "gt" else wrong
    prob = rng.uniform(0, 1, label.shape).astype(np.float32)
    directory = fold_dir / "predictions" / PANEL_CASE
    save_nifti(directory / f"{mask_type}_mask.nii.gz", mask, AFFINE)
    save_nifti(directory / f"{mask_type}_error_prob.nii.gz", prob, AFFINE)
    save_nifti(directory / f"{mask_type}_error.nii.gz", (prob > 0.5).astype(np.uint8), AFFINE)
  return label


def make_run(workdir: Path) -> dict[int, list[dict]]:
  """Folds 0 and 1 evaluated, fold 2 training, folds 3 and 4 not started."""
  rng = np.random.default_rng(0)
  records = {}
  for fold in CASES:
    fold_dir = workdir / f"fold{fold}"
    records[fold] = fake_records(fold, rng)
    write_records(fold_dir, records[fold])
    for model in ("seg3d", "seg2d", "predictor"):
      write_curve(fold_dir / model / "metrics.jsonl", 200)
  write_panel_case(workdir / "fold0", workdir / "data")
  write_calibration(workdir / "fold0")
  write_curve(workdir / "fold2" / "seg3d" / "metrics.jsonl", 50)
  return records


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  records = make_run(workdir)
  return workdir, records, build_report(workdir, num_folds=5)


def test_table1_counts_and_means(run):
  workdir, records, _ = run
  flat = records[0] + records[1]
  rows = {row["row"]: row for row in table1(flat)}
  assert list(rows) == list(TABLE1_ROWS)
  num_cases = len(CASES[0]) + len(CASES[1])
  assert rows["3D Final"]["n_masks"] == rows["2D-5"]["n_masks"] == num_cases
  assert rows["3D-Average"]["n_masks"] == 5 * num_cases
  assert rows["Overall-auto"]["n_masks"] == 10 * num_cases
  assert rows["Overall-GT"]["n_masks"] == 11 * num_cases
  for label, types in (("3D-4", ("3d-side4",)), ("Overall-auto", AUTO_MASK_TYPES),
                       ("Overall-GT", MASK_TYPES)):
    for field in TABLE1_COLUMNS:
      expected = np.mean([r[field] for r in flat if r["mask_type"] in types])
      assert rows[label][field] == pytest.approx(expected, rel=1e-12)
  csv_lines = (workdir / "report" / "table1.csv").read_text().splitlines()
  assert len(csv_lines) == 1 + len(TABLE1_ROWS)
  assert csv_lines[1].startswith(f"3D Final,{num_cases},")
  markdown = (workdir / "report" / "table1.md").read_text()
  assert "| **Overall-auto** | 50 (200) |" in markdown
  assert "(0.4313)" in markdown   # the paper's 3D Final DSC beside ours
  assert re.search(r"\| \*\*2D-3\*\* \| 5 \(–\) \|", markdown)


def test_qi_statistics_match_scipy(run):
  workdir, records, _ = run
  flat = records[0] + records[1]
  saved = json.loads((workdir / "report" / "qi_stats.json").read_text())
  assert saved == qi_statistics(records)
  qi = np.array([r["qi"] for r in flat])
  for key, field in (("acc", "true_acc"), ("dsc", "seg_dsc")):
    truth = np.array([r[field] for r in flat])
    r, p = stats.pearsonr(qi, truth)
    assert saved["all"][key]["pcc"] == pytest.approx(r, rel=1e-12)
    assert saved["all"][key]["p_value"] == pytest.approx(p, rel=1e-9)
    assert saved["all"][key]["n"] == len(flat)
  assert saved["all"]["acc"]["mae"] == pytest.approx(
      np.mean(np.abs(qi - [r["true_acc"] for r in flat])), rel=1e-12)
  fold1 = records[1]
  r1, _ = stats.pearsonr([r["qi"] for r in fold1], [r["true_acc"] for r in fold1])
  assert saved["folds"]["1"]["acc"]["pcc"] == pytest.approx(r1, rel=1e-12)
  assert saved["auto"]["n"] == 10 * (len(CASES[0]) + len(CASES[1]))


def test_report_names_missing_folds_and_embeds_every_figure(run):
  workdir, _, report = run
  assert report == workdir / "report" / "report.md"
  text = report.read_text()
  lacking = text[text.index("Missing or incomplete"):].split("\n")[0]
  for fold in (2, 3, 4):
    assert f"fold {fold} (" in lacking
  assert "fold 0 (" not in lacking and "fold 1 (" not in lacking
  assert "fold 2 (incomplete: no records.json; last logged steps: seg3d 41)" in lacking
  for name in FIGURES:
    png = (workdir / "report" / name).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000, name
    assert f"]({name})" in text, name
  assert "| Paper (all masks) | 220 | 0.972 |" in text
  assert "| Fold 1 | 22 |" in text


def test_fold_status(tmp_path):
  folds = read_folds(tmp_path, 2)
  assert [f.status for f in folds] == ["missing: not run"] * 2
  records = fake_records(1, np.random.default_rng(0))
  write_records(tmp_path / "fold1", records[:-1])
  fold = read_fold(tmp_path / "fold1", 1)
  assert fold.status.startswith("incomplete: 1 of 2 test cases lack some")
  assert len(fold.records) == len(records) - 1   # still reported
  (tmp_path / "fold1" / "records.json").write_text("[{\"case_id\": ")
  assert "unreadable" in read_fold(tmp_path / "fold1", 1).status


def test_panels_show_the_case_with_its_masks_aligned(run):
  workdir, _, _ = run
  folds = read_folds(workdir, 5)
  rows, notes = panels.choose_rows(folds)
  assert notes == []
  assert [(row.case_id, row.mask_type) for row in rows] == [
      (PANEL_CASE, t) for t in PANEL_TYPES]
  views = {row.mask_type: panels.load_row(row, 0.5)["slices"] for row in rows}
  assert not views["gt"]["true_error"].any()
  myocardium = views["3d-final"]["label"] == 1
  assert myocardium.any()
  np.testing.assert_array_equal(views["3d-final"]["true_error"], myocardium)


def test_empty_workdir_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match=r"no fold of .* has test records.*"
                                      r"--experiment=cv_fold --fold=k"):
    build_report(tmp_path / "nothing", num_folds=5)


def test_cv_report_experiment(tmp_path, capsys):
  make_run(tmp_path)
  # A scan moved away after the run: the report is still built, without the panels.
  (tmp_path / "data" / f"{PANEL_CASE}_image.nii.gz").unlink()
  config = cv_report.get_config()
  assert config.num_folds == 5
  cv_report.run(config, str(tmp_path))
  report = tmp_path / "report" / "report.md"
  assert str(report) in capsys.readouterr().out
  text = report.read_text()
  assert f"- {PANEL_CASE} 3d-final not shown: " in text and "file not found" in text
  assert "](error_panels.png)" not in text
  assert not (tmp_path / "report" / "error_panels.png").exists()
  assert (tmp_path / "report" / "table1.md").is_file()


def test_qc_statistics_in_the_report(run):
  workdir, records, _ = run
  qc = json.loads((workdir / "report" / "qc_stats.json").read_text())
  auto = [r for fold in records.values() for r in fold if r["mask_type"] != "gt"]
  dice = np.array([r["seg_dsc"] for r in auto])
  rows = {row["field"]: row for row in qc["all"]["scores"]}
  for field in ("qi", "pd_mean", "base_qi"):
    score = np.array([r[field] for r in auto])
    assert rows[field]["n"] == len(auto) == 50   # 5 cases x 10 auto masks
    assert rows[field]["pcc"] == pytest.approx(stats.pearsonr(score, dice)[0])
    assert rows[field]["aurc"] == pytest.approx(quality.aurc(score, 1 - dice))
    assert rows[field]["failure_auroc"] == pytest.approx(
        quality.failure_auroc(score, dice, 0.75))
  # The predicted Dice was made close to the true Dice, the baseline scores are noise.
  assert rows["pd_mean"]["pcc"] > 0.9 > rows["base_pd_mean"]["pcc"]
  assert rows["pd_mean"]["e_aurc"] < rows["base_qi"]["e_aurc"]
  per_structure = {row["structure"]: row for row in qc["all"]["structures"]}
  assert set(per_structure) == set(STRUCTURES) | {"mean"}
  calibration = {row["error probabilities"]: row["ece"] for row in qc["all"]["calibration"]}
  assert calibration["predictor, auto masks"] == pytest.approx(0.0, abs=1e-12)
  assert calibration["softmax baseline, auto masks"] == pytest.approx(0.5)
  assert qc["missing_calibration"] == [1]
  report = (workdir / "report" / "report.md").read_text()
  assert "## Beyond the paper" in report and "failure AUROC" in report
  assert "Folds without calibration.json: [1]" in report
  # Dice bounds: each fold's offset fitted on the other folds' auto masks.
  bounds = {row["structure"]: row for row in qc["dice_bounds"]["structures"]}
  assert set(bounds) == set(STRUCTURES) | {"mean"} and qc["dice_bounds"]["alpha"] == 0.1
  folds = sorted(records)
  pairs = [tuple(np.array([r[f] for r in records[k] if r["mask_type"] != "gt"])
                 for f in ("pd_mean", "seg_dsc")) for k in folds]
  expected = coverage.cross_fold_coverage(pairs, 0.1)
  assert bounds["mean"]["raw"]["coverage"] == pytest.approx(expected["coverage"])
  assert bounds["mean"]["raw"]["mean_bound"] == pytest.approx(expected["mean_bound"])
  if len(folds) >= 3:
    assert bounds["mean"]["recalibrated"] == {
        k: pytest.approx(v) for k, v in coverage.cross_fitted_coverage(pairs, 0.1).items()
        if k in ("n", "coverage", "mean_bound", "mean_width")}
  assert "### Per-case lower bounds on the true Dice (90%), across folds" in report
  # Recalibration on the other folds, scored against the same true Dice as the raw value.
  raw, fitted = qc["recalibration"]
  assert raw["pcc"] == pytest.approx(rows["pd_mean"]["pcc"]) and raw["n"] == fitted["n"]
  assert "recalibrated on the other folds" in fitted["estimate"]
  recal = beyond_paper.recalibrated_mean_dice(records)
  k = sorted(records)[0]
  others = [r for j in records if j != k for r in records[j] if r["mask_type"] != "gt"]
  g = conformal.fit_recalibration(np.array([r["pd_mean"] for r in others]),
                                  np.array([r["seg_dsc"] for r in others]))
  own = [r["pd_mean"] for r in records[k] if r["mask_type"] != "gt"]
  np.testing.assert_allclose(recal[k], g(np.array(own)))
  assert (workdir / "report" / "recalibration.png").stat().st_size > 0
  assert "![Predicted and recalibrated Dice](recalibration.png)" in report
  # The same pairs (QI, Dice of the auto masks) in both files: the same numbers.
  qi_stats = json.loads((workdir / "report" / "qi_stats.json").read_text())
  assert qi_stats["auto"]["dsc"]["pcc"] == pytest.approx(rows["qi"]["pcc"], rel=1e-12)


def test_heldout_error_studies_of_a_run_are_in_its_report(tmp_path):
  make_run(tmp_path)
  (tmp_path / "heldout_errors-fold0-w0p25.md").write_text("| study table 0.25 |\n")
  build_report(tmp_path, num_folds=5)
  report = (tmp_path / "report" / "report.md").read_text()
  beyond = report.index("## Beyond the paper")
  assert beyond < report.index("| study table 0.25 |") < report.index("## Figures")


def test_qi_and_qc_statistics_share_one_correlation():
  # qi_stats.json comes from tables.qi_scope, qc_stats.json from report.qc; both must use
  # quality.correlations, so equal pairs give equal PCC, p-value and MAE.
  assert beyond_paper.correlations is quality.correlations
  rng = np.random.default_rng(5)
  for _ in range(3):
    records = [r for fold in CASES for r in fake_records(fold, rng)
               if r["mask_type"] != "gt"]
    scores = {row["field"]: row for row in beyond_paper.score_table(records, 0.75)}
    mean_pd = beyond_paper.structure_table(records)[-1]
    qi = qi_scope(records)["dsc"]
    pd = qi_scope(records, qi_field="pd_mean")["dsc"]
    assert qi["n"] == scores["qi"]["n"] == len(records)
    assert qi["pcc"] == pytest.approx(scores["qi"]["pcc"], rel=1e-12, abs=1e-12)
    assert pd["pcc"] == pytest.approx(mean_pd["pcc"], rel=1e-12, abs=1e-12)
    assert pd["p_value"] == pytest.approx(mean_pd["pcc_p"], rel=1e-12, abs=1e-300)
    assert pd["mae"] == pytest.approx(mean_pd["mae"], rel=1e-12, abs=1e-12)


def test_qc_figures_leave_no_pyplot_state(tmp_path, monkeypatch):
  import matplotlib.pyplot as plt
  records = fake_records(0, np.random.default_rng(2))
  write_calibration(tmp_path)
  bins = beyond_paper.add_bins([json.loads((tmp_path / "calibration.json").read_text())])
  plt.close("all")
  beyond_paper.risk_coverage_figure(records, tmp_path / "risk_coverage.png")
  beyond_paper.reliability_figure(bins, tmp_path / "reliability.png")
  assert plt.get_fignums() == []
  # With pyplot unimportable the figures are still made: they never touch it.
  monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
  beyond_paper.risk_coverage_figure(records, tmp_path / "risk_coverage2.png")
  beyond_paper.reliability_figure(bins, tmp_path / "reliability2.png")
  for name in ("risk_coverage2.png", "reliability2.png"):
    assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")


def test_qi_scope_is_quality_correlations_under_the_names_of_qi_stats(monkeypatch):
  # qi_stats.json and qc_stats.json must not drift apart again: the one implementation of
  # PCC, p and MAE is quality.correlations, which qi_scope only renames.
  def stand_in(estimate, truth):
    assert estimate.shape == truth.shape == (3,)
    return {"pcc": 0.25, "pcc_p": 0.5, "spearman": 0.0, "spearman_p": 1.0, "mae": 0.125, "n": 3}

  monkeypatch.setattr(tables, "correlations", stand_in)
  records = [{"qi": 0.9, "true_acc": 0.95, "seg_dsc": 0.8}] * 3
  scope = qi_scope(records)
  assert scope["acc"] == scope["dsc"] == {"pcc": 0.25, "p_value": 0.5, "mae": 0.125, "n": 3}
