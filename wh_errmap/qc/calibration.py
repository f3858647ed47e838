"""A predictor's calibration on a user's labelled cases: what `calibrate` fits and stores in
the model file, and what `qc.assess` applies.

From N labelled (image, mask, ground truth) triples of the user's own segmentor:
  threshold      the error probability above which a voxel counts as wrong, chosen among
                 `THRESHOLDS` to maximise the error-map Dice pooled over the cases' voxels
                 (ties: the one nearest 0.5);
  recalibration  per structure and for the mean, a monotone map of predicted Dice to true
                 Dice (`conformal.fit_recalibration`: isotonic or Platt; "none" keeps the
                 predicted Dice);
  bounds         per structure and for the mean, the split-conformal offset q such that the
                 true Dice is at least g(predicted Dice) - q with probability 1 - alpha.
                 With a recalibration, the scores come from leave-one-out recalibrated
                 predictions (each case's g fitted without it), a jackknife form of split
                 conformal: g is never fitted on the case it scores. Without one ("none"),
                 the guarantee of split conformal holds exactly for cases exchangeable with
                 the calibration cases.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from wh_errmap.metrics.conformal import (MIN_RECALIBRATION_CASES, ConformalBound, Recalibration,
                                         conformal_offset, fit_recalibration,
                                         leave_one_out_recalibrated, recalibration_from_dict)

THRESHOLDS = tuple(np.round(np.arange(0.1, 0.91, 0.05), 2).tolist())
METHODS = ("isotonic", "platt", "none")
MEAN = "mean"   # the key of the mean Dice beside the structures


@dataclasses.dataclass(frozen=True)
class Calibration:
  """A fitted calibration (see the module docstring); JSON via to_dict / from_dict."""
  threshold: float
  method: str
  recalibration: dict[str, Recalibration]
  bounds: ConformalBound
  cases: int
  source: str = ""       # where the calibration cases came from (for the record)

  def calibrated(self, name: str, predicted: float | None) -> float | None:
    """g(predicted Dice) of a structure (or MEAN); the prediction itself without a map."""
    if predicted is None:
      return None
    g = self.recalibration.get(name)
    return float(g(np.array([predicted]))[0]) if g is not None else float(predicted)

  def lower_bound(self, name: str, predicted: float | None) -> float | None:
    """The 1 - alpha lower bound on the true Dice; None without a prediction or offset."""
    if predicted is None or name not in self.bounds.offset:
      return None
    return float(self.bounds.lower_bound(name, np.array([predicted]))[0])

  def to_dict(self) -> dict[str, Any]:
    return {"threshold": self.threshold, "method": self.method,
            "recalibration": {k: g.to_dict() for k, g in self.recalibration.items()},
            "bounds": self.bounds.to_dict(), "cases": self.cases, "source": self.source}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> Calibration:
    return cls(float(d["threshold"]), str(d["method"]),
               {k: recalibration_from_dict(g) for k, g in d["recalibration"].items()},
               ConformalBound.from_dict(d["bounds"]), int(d["cases"]), str(d.get("source", "")))


def choose_threshold(error_prob: Sequence[np.ndarray], error: Sequence[np.ndarray],
                     thresholds: Sequence[float] = THRESHOLDS) -> tuple[float, list[dict]]:
  """The threshold with the best error-map Dice pooled over all cases' voxels.

  Args:
    error_prob: per case, the predicted error probabilities of its assessed voxels.
    error: per case, the true errors (bool) of the same voxels.
  Returns:
    (threshold, [{"threshold", "dice"} per candidate]).
  """
  prob = np.concatenate([np.ravel(p) for p in error_prob])
  truth = np.concatenate([np.ravel(e) for e in error]).astype(bool)
  rows = []
  for t in thresholds:
    wrong = prob > t
    den = wrong.sum() + truth.sum()
    rows.append({"threshold": float(t),
                 "dice": float(2 * np.sum(wrong & truth) / den) if den else 1.0})
  best = max(rows, key=lambda r: (r["dice"], -abs(r["threshold"] - 0.5)))
  return best["threshold"], rows


def fit_calibration(predicted: Mapping[str, np.ndarray], true: Mapping[str, np.ndarray],
                    threshold: float, method: str = "isotonic", alpha: float = 0.1,
                    source: str = "") -> Calibration:
  """Recalibration and conformal offsets per structure (and MEAN) from N cases.

  Args:
    predicted, true: {name: (N,) predicted / true Dice, NaN where not defined}.
    threshold: the chosen error threshold (`choose_threshold`).
    method: "isotonic", "platt" or "none".
    alpha: miscoverage of the lower bounds.
  Returns:
    The Calibration. A structure with fewer than MIN_RECALIBRATION_CASES + 1 valid cases
    keeps its raw prediction (no map); its offset is +inf (a trivial bound) when the cases
    are too few for alpha.
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
  maps, offsets, counts = {}, {}, {}
  for name, pred in predicted.items():
    pred, truth = np.asarray(pred, np.float64), np.asarray(true[name], np.float64)
    valid = ~(np.isnan(pred) | np.isnan(truth))
    scored = pred
    if method != "none" and valid.sum() > MIN_RECALIBRATION_CASES:
      maps[name] = fit_recalibration(pred, truth, method)
      scored = np.where(valid, leave_one_out_recalibrated(
          np.where(valid, pred, np.nan), truth, method), np.nan)
    offsets[name], counts[name] = conformal_offset(scored, truth, alpha)
  n = max((int(np.sum(~np.isnan(np.asarray(v, np.float64)))) for v in true.values()),
          default=0)
  return Calibration(float(threshold), method, maps,
                     ConformalBound(float(alpha), offsets, counts, maps), n, source)
