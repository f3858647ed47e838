"""Beyond the paper: predicted Dice, failure detection, calibration and the softmax baseline.

Everything here is computed from the saved records (records.json) and calibration bins
(calibration.json) of each fold. Quality scores are compared on the auto masks (the 10
segmentor outputs of every test case), since the softmax baseline has no GT-mask version:

  QI, soft QI, predicted Dice          from the learned error map
  softmax QI, softmax soft QI,         from the segmentor's own 1 - max softmax probability
  softmax predicted Dice               (the ground-truth-free alternative)

Risk is 1 - true Dice; a failure is a mask whose true Dice is below `failure_dice`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from wh_errmap.data.structures import STRUCTURES
from wh_errmap.metrics.conformal import fit_recalibration
from wh_errmap.metrics.coverage import cross_fitted_coverage, cross_fold_coverage
from wh_errmap.metrics.quality import (aurc, correlations, e_aurc, expected_calibration_error,
                                       failure_auroc, reliability_curve, risk_coverage)
from wh_errmap.report.figures import save_figure

# (label, record field) of each quality score; higher = the mask looks better.
SCORES = (("QI", "qi"), ("soft QI", "soft_qi"), ("predicted Dice", "pd_mean"),
          ("softmax QI (baseline)", "base_qi"), ("softmax soft QI (baseline)", "base_soft_qi"),
          ("softmax predicted Dice (baseline)", "base_pd_mean"))
ESTIMATORS = (("predicted Dice", "pd"), ("softmax predicted Dice (baseline)", None))
# Miscoverage of the per-case lower bounds on the true Dice: each holds with probability 0.9.
CONFORMAL_ALPHA = 0.1
CALIBRATION_SOURCES = (("predictor, auto masks", "predictor"), ("predictor, GT masks",
                       "predictor_gt"), ("softmax baseline, auto masks", "baseline"))


def _auto(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
  return [r for r in records if r["mask_type"] != "gt"]


def _column(records: Sequence[Mapping[str, Any]], field: str) -> np.ndarray:
  return np.array([np.nan if r.get(field) is None else r[field] for r in records], np.float64)


def score_table(records: Sequence[Mapping[str, Any]], failure_dice: float) -> list[dict]:
  """One row per quality score on the auto masks: correlation with the true Dice, AURC,
  e-AURC and failure AUROC (and MAE against the true Dice for the Dice estimates)."""
  auto = _auto(records)
  dice = _column(auto, "seg_dsc")
  rows = []
  for label, field in SCORES:
    score = _column(auto, field)
    corr = correlations(score, dice)
    rows.append({"score": label, "field": field, "n": corr["n"], "pcc": corr["pcc"],
                 "spearman": corr["spearman"],
                 "mae": corr["mae"] if field in ("pd_mean", "base_pd_mean") else float("nan"),
                 "aurc": aurc(score, 1.0 - dice), "e_aurc": e_aurc(score, 1.0 - dice),
                 "failure_auroc": failure_auroc(score, dice, failure_dice),
                 "failures": int(np.sum(dice < failure_dice))})
  return rows


def structure_table(records: Sequence[Mapping[str, Any]]) -> list[dict]:
  """Per structure, predicted Dice against the true Dice on the auto masks."""
  auto = _auto(records)
  rows = []
  for s in STRUCTURES:
    corr = correlations(_column(auto, f"pd_{s}"), _column(auto, f"dsc_{s}"))
    rows.append({"structure": s, **corr})
  corr = correlations(_column(auto, "pd_mean"), _column(auto, "seg_dsc"))
  rows.append({"structure": "mean", **corr})
  return rows


def error_map_table(records: Sequence[Mapping[str, Any]]) -> list[dict]:
  """Mean error-map DSC / precision / recall on the auto masks: predictor vs baseline."""
  auto = _auto(records)
  return [{"error map": label,
           **{k: float(np.nanmean(_column(auto, f"{prefix}err_{k}"))) for k in
              ("dsc", "prec", "recl")}}
          for label, prefix in (("learned predictor", ""), ("softmax baseline", "base_"))]


def conformal_table(records_by_fold: Mapping[int, Sequence[Mapping[str, Any]]],
                    alpha: float = CONFORMAL_ALPHA) -> list[dict]:
  """Per structure and for the mean Dice: the 1 - alpha lower bound on the true Dice of
  each auto mask, fitted on the other folds (split conformal, `metrics.conformal`), and
  its empirical coverage on the fold, pooled over folds.

  "raw" bounds the predicted Dice itself; "recalibrated" first maps it by an isotonic fit
  on half of the other folds and fits the offset on the other half (3 folds or more). Empty
  with fewer than 2 folds.
  """
  folds = sorted(records_by_fold)
  if len(folds) < 2:
    return []
  rows = []
  for name, estimate, truth in ([(s, f"pd_{s}", f"dsc_{s}") for s in STRUCTURES]
                                + [("mean", "pd_mean", "seg_dsc")]):
    pairs = [(_column(_auto(records_by_fold[k]), estimate),
              _column(_auto(records_by_fold[k]), truth)) for k in folds]
    row = {"structure": name}
    for label, fit in (("raw", cross_fold_coverage), ("recalibrated", cross_fitted_coverage)):
      try:
        out = fit(pairs, alpha)
      except ValueError:   # too few folds or cases for this form
        out = {"n": 0, "coverage": None, "mean_bound": None, "mean_width": None}
      row[label] = {k: out[k] for k in ("n", "coverage", "mean_bound", "mean_width")}
    row["mean_true_dice"] = float(np.nanmean(np.concatenate([t for _, t in pairs])))
    rows.append(row)
  return rows


def recalibrated_mean_dice(records_by_fold: Mapping[int, Sequence[Mapping[str, Any]]]
                           ) -> dict[int, np.ndarray]:
  """Per fold, the auto masks' predicted mean Dice mapped by an isotonic fit on the other
  folds (what `calibrate` does with a user's cases, scored on cases it did not see).
  Empty with fewer than 2 folds."""
  folds = sorted(records_by_fold)
  if len(folds) < 2:
    return {}
  out = {}
  for k in folds:
    others = [r for j in folds if j != k for r in _auto(records_by_fold[j])]
    try:
      g = fit_recalibration(_column(others, "pd_mean"), _column(others, "seg_dsc"))
    except ValueError:   # too few cases
      return {}
    out[k] = g(_column(_auto(records_by_fold[k]), "pd_mean"))
  return out


def _recalibrated_columns(records_by_fold: Mapping[int, Sequence[Mapping[str, Any]]]
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
  """(true, predicted, recalibrated) mean Dice of the auto masks, pooled over folds in
  order; None when `recalibrated_mean_dice` has nothing."""
  recalibrated = recalibrated_mean_dice(records_by_fold)
  if not recalibrated:
    return None
  folds = sorted(recalibrated)
  auto = [_auto(records_by_fold[k]) for k in folds]
  return (np.concatenate([_column(a, "seg_dsc") for a in auto]),
          np.concatenate([_column(a, "pd_mean") for a in auto]),
          np.concatenate([recalibrated[k] for k in folds]))


def recalibration_table(records_by_fold: Mapping[int, Sequence[Mapping[str, Any]]],
                        failure_dice: float) -> list[dict]:
  """The predicted mean Dice against the same recalibrated on the other folds: PCC, MAE,
  AURC and failure AUROC against the true Dice, pooled over folds."""
  columns = _recalibrated_columns(records_by_fold)
  if columns is None:
    return []
  dice, raw, fitted = columns
  rows = []
  for label, estimate in (
      ("predicted Dice", raw),
      ("predicted Dice, recalibrated on the other folds (isotonic)", fitted)):
    corr = correlations(estimate, dice)
    rows.append({"estimate": label, "n": corr["n"], "pcc": corr["pcc"], "mae": corr["mae"],
                 "aurc": aurc(estimate, 1 - dice),
                 "failure_auroc": failure_auroc(estimate, dice, failure_dice)})
  return rows


def add_bins(bins: Sequence[Mapping[str, Mapping[str, Sequence[float]]]]) -> dict[str, dict]:
  """Sums the calibration bins of several folds, per source."""
  total: dict[str, dict[str, np.ndarray]] = {}
  for fold_bins in bins:
    for source, b in fold_bins.items():
      arrays = {k: np.asarray(v, np.float64) for k, v in b.items()}
      total[source] = arrays if source not in total else {
          k: total[source][k] + arrays[k] for k in arrays}
  return total


def calibration_table(bins: Mapping[str, Mapping[str, np.ndarray]]) -> list[dict]:
  rows = []
  for label, source in CALIBRATION_SOURCES:
    if source in bins:
      b = bins[source]
      rows.append({"error probabilities": label, "voxels": int(np.sum(b["count"])),
                   "ece": expected_calibration_error(b["count"], b["sum_prob"], b["sum_error"])})
  return rows


def qc_statistics(records_by_fold: Mapping[int, Sequence[Mapping[str, Any]]],
                  bins_by_fold: Mapping[int, Mapping[str, Any]],
                  failure_dice: float) -> dict[str, Any]:
  """All tables, per fold and overall ("all"); JSON-ready."""
  def tables(records, bins):
    return {"scores": score_table(records, failure_dice), "structures": structure_table(records),
            "error_maps": error_map_table(records), "calibration": calibration_table(bins)}

  result = {"failure_dice": failure_dice, "folds": {
      str(k): tables(records_by_fold[k], add_bins([bins_by_fold.get(k, {})]))
      for k in sorted(records_by_fold)}}
  everything = [r for k in sorted(records_by_fold) for r in records_by_fold[k]]
  result["all"] = tables(everything, add_bins(list(bins_by_fold.values())))
  result["missing_calibration"] = sorted(k for k in records_by_fold if k not in bins_by_fold)
  result["dice_bounds"] = {"alpha": CONFORMAL_ALPHA,
                           "structures": conformal_table(records_by_fold, CONFORMAL_ALPHA)}
  result["recalibration"] = recalibration_table(records_by_fold, failure_dice)
  return result


def _n(value: float | None, digits: int = 3) -> str:
  return "-" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
          + ["| " + " | ".join(row) + " |" for row in rows])


def qc_markdown(stats: Mapping[str, Any], paper_pcc_qi_dsc: float = 0.856) -> str:
  """The report section: overall tables, then the score table of each fold."""
  overall = stats["all"]
  lines = ["## Beyond the paper: predicted Dice, failure detection, calibration", "",
           f"On the auto masks (10 per test case). Risk = 1 - true Dice; a failure is a mask "
           f"with true Dice < {stats['failure_dice']}. e-AURC: AURC minus that of a perfect "
           f"ordering (0 is best). Failure AUROC: chance that a failure scores lower than a "
           f"success. Baseline rows use the segmentor's own 1 - max softmax probability as "
           f"the error map. The paper reports PCC(QI, DSC) = {paper_pcc_qi_dsc}.", ""]
  lines += ["### Quality scores, all folds", ""]
  lines += _md_table(
      ("score", "n", "PCC with Dice", "Spearman", "MAE vs Dice", "AURC", "e-AURC",
       "failure AUROC"),
      [(r["score"], str(r["n"]), _n(r["pcc"]), _n(r["spearman"]), _n(r["mae"]),
        _n(r["aurc"], 4), _n(r["e_aurc"], 4), _n(r["failure_auroc"])) for r in overall["scores"]])
  failures = overall["scores"][0]["failures"] if overall["scores"] else 0
  lines += ["", f"{failures} failures among the auto masks.", "",
            "### Predicted Dice per structure, all folds (learned error map)", ""]
  lines += _md_table(("structure", "n", "PCC", "Spearman", "MAE"),
                     [(r["structure"], str(r["n"]), _n(r["pcc"]), _n(r["spearman"]),
                       _n(r["mae"])) for r in overall["structures"]])
  lines += ["", "### Error maps on the auto masks, all folds", ""]
  lines += _md_table(("error map", "DSC", "precision", "recall"),
                     [(r["error map"], _n(r["dsc"]), _n(r["prec"]), _n(r["recl"]))
                      for r in overall["error_maps"]])
  lines += ["", "### Calibration of the voxel error probabilities, all folds", ""]
  if overall["calibration"]:
    lines += _md_table(("error probabilities", "voxels", "ECE"),
                       [(r["error probabilities"], str(r["voxels"]), _n(r["ece"], 4))
                        for r in overall["calibration"]])
  else:
    lines += ["No calibration.json in any fold (evaluated before calibration was recorded)."]
  if stats["missing_calibration"]:
    lines += ["", f"Folds without calibration.json: {stats['missing_calibration']}."]
  lines += _bounds_markdown(stats.get("dice_bounds"))
  if stats.get("recalibration"):
    lines += ["", "### Recalibrated predicted Dice, across folds", "",
              "The mean predicted Dice of each fold's auto masks mapped by an isotonic fit "
              "(predicted to true Dice) on the other folds, as `calibrate` does with a user's "
              "labelled cases; figure `recalibration.png`.", ""]
    lines += _md_table(("estimate", "n", "PCC with Dice", "MAE", "AURC", "failure AUROC"),
                       [(r["estimate"], str(r["n"]), _n(r["pcc"]), _n(r["mae"]),
                         _n(r["aurc"], 4), _n(r["failure_auroc"])) for r in
                        stats["recalibration"]])
  for fold, tables in stats["folds"].items():
    lines += ["", f"### Fold {fold}: quality scores", ""]
    lines += _md_table(("score", "PCC with Dice", "AURC", "e-AURC", "failure AUROC"),
                       [(r["score"], _n(r["pcc"]), _n(r["aurc"], 4), _n(r["e_aurc"], 4),
                         _n(r["failure_auroc"])) for r in tables["scores"]])
  lines += [""]
  return "\n".join(lines)


def _bounds_markdown(bounds: Mapping[str, Any] | None) -> list[str]:
  if not bounds or not bounds["structures"]:
    return []
  level = 1 - bounds["alpha"]
  lines = ["", f"### Per-case lower bounds on the true Dice ({level:.0%}), across folds", "",
           f"For each auto mask, a bound that the true Dice exceeds with probability "
           f"{level:.0%} (split conformal: the offset is fitted on the other folds' masks, so "
           f"each fold is scored on bounds it did not shape). Coverage = share of masks whose "
           f"true Dice is at or above its bound; below = mean distance of the bound under "
           f"the estimate. Recalibrated: the predicted Dice is first mapped by an isotonic "
           f"fit on half of the other folds, the offset fitted on the other half.", ""]
  def cells(out):
    return (_n(out["coverage"]), _n(out["mean_bound"]), _n(out["mean_width"]))
  lines += _md_table(
      ("structure", "masks", "mean true Dice", "coverage", "mean bound", "below",
       "recal. coverage", "recal. mean bound", "recal. below"),
      [(r["structure"], str(r["raw"]["n"]), _n(r["mean_true_dice"]), *cells(r["raw"]),
        *cells(r["recalibrated"])) for r in bounds["structures"]])
  return lines


def risk_coverage_figure(records: Sequence[Mapping[str, Any]], path: Path) -> None:
  """Risk-coverage curves of every quality score on the auto masks, and the optimal one."""
  auto = _auto(records)
  risk = 1.0 - _column(auto, "seg_dsc")
  # The object API, as in figures.py: no pyplot, so no figure is left open in its registry.
  fig = Figure(figsize=(6, 4.5))
  ax = fig.add_subplot()
  for label, field in SCORES:
    coverage, selective = risk_coverage(_column(auto, field), risk)
    if coverage.size:
      ax.plot(coverage, selective, label=f"{label} (AURC {aurc(_column(auto, field), risk):.4f})",
              linestyle="--" if field.startswith("base_") else "-")
  coverage, selective = risk_coverage(-risk, risk)
  ax.plot(coverage, selective, color="k", linewidth=0.8, label="optimal")
  ax.set_xlabel("coverage (share of masks accepted, best-scored first)")
  ax.set_ylabel("selective risk (mean 1 - Dice of accepted)")
  ax.legend(fontsize=7)
  save_figure(fig, path)


def recalibration_figure(records_by_fold: Mapping[int, Sequence[Mapping[str, Any]]],
                         path: Path) -> bool:
  """Predicted and recalibrated mean Dice against the true Dice, and their risk-coverage
  curves; False (nothing drawn) with fewer than 2 folds."""
  columns = _recalibrated_columns(records_by_fold)
  if columns is None:
    return False
  dice, raw, fitted = columns
  estimate_figure(raw, fitted, dice, "recalibrated (other folds)", path)
  return True


def estimate_figure(predicted: np.ndarray, calibrated: np.ndarray, truth: np.ndarray,
                    calibrated_label: str, path: Path) -> None:
  """Left: predicted and calibrated mean Dice against the true Dice; right: their
  risk-coverage curves with AURC (also `calibrate`'s report figure)."""
  fig = Figure(figsize=(9, 4))
  ax, bx = fig.subplots(1, 2)
  ax.plot([0, 1], [0, 1], color="k", linewidth=0.8)
  ax.scatter(predicted, truth, s=10, label="predicted Dice")
  ax.scatter(calibrated, truth, s=10, marker="x", label=calibrated_label)
  ax.set_xlabel("estimated mean Dice")
  ax.set_ylabel("true mean Dice")
  ax.legend(fontsize=7)
  for label, estimate in (("predicted", predicted), (calibrated_label, calibrated)):
    coverage, risk = risk_coverage(estimate, 1 - truth)
    bx.plot(coverage, risk, label=f"{label} (AURC {aurc(estimate, 1 - truth):.4f})")
  bx.set_xlabel("coverage")
  bx.set_ylabel("selective risk (1 - Dice)")
  bx.legend(fontsize=7)
  save_figure(fig, path)


def reliability_figure(bins: Mapping[str, Mapping[str, np.ndarray]], path: Path) -> None:
  """Reliability curves (observed error rate against predicted probability) per source."""
  fig = Figure(figsize=(4.8, 4.5))
  ax = fig.add_subplot()
  ax.plot([0, 1], [0, 1], color="k", linewidth=0.8, label="perfect calibration")
  for label, source in CALIBRATION_SOURCES:
    if source in bins:
      b = bins[source]
      mean_prob, error_rate, _ = reliability_curve(b["count"], b["sum_prob"], b["sum_error"])
      ece = expected_calibration_error(b["count"], b["sum_prob"], b["sum_error"])
      ax.plot(mean_prob, error_rate, marker="o", label=f"{label} (ECE {ece:.4f})")
  ax.set_xlabel("predicted error probability (bin mean)")
  ax.set_ylabel("observed error rate")
  ax.legend(fontsize=7)
  save_figure(fig, path)
