"""How well the conformal bounds of `metrics.conformal` hold on data they were not fitted
on: coverage and width per structure, each fold's offset q fitted on the other folds
(pure NumPy).

  cross_fold_coverage, cross_fold_table       coverage and width, q fitted on other folds
  cross_fitted_coverage                       the same with g fitted on half of the other
                                              folds and q on the rest
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from wh_errmap.metrics.conformal import (Recalibration, conformal_lower_bound, conformal_offset,
                                         fit_recalibration, json_float, recalibrate,
                                         valid_pairs)


def cross_fold_coverage(folds: Sequence[tuple[np.ndarray, np.ndarray]], alpha: float,
                        recalibration: Recalibration | None = None) -> dict[str, Any]:
  """Coverage and width of bounds of one structure, each fold's q fitted on the others.

  Width is g(pred) - bound: how far the bound sits below the point estimate. Only pairs
  with neither value NaN are evaluated. For an honest estimate, g must not have been
  fitted on any of these folds.

  Args:
    folds: one (pred, true) pair of (n_k,) float arrays per fold, at least 2 folds.
    alpha: miscoverage in (0, 1).
    recalibration: a fixed g, or None.
  Returns:
    Plain JSON types: {"alpha", "n", "coverage", "mean_width", "mean_bound", "folds"},
    the middle four pooled over all evaluated cases; "folds" lists {"fold", "q", "n_cal",
    "n", "coverage", "mean_width"} per fold. q = None means +inf (trivial bound); a coverage
    or width over no case is None.
  """
  if len(folds) < 2:
    raise ValueError(f"cross-fold evaluation needs >= 2 folds, got {len(folds)}")

  def fit(others):
    return recalibration, *conformal_offset(*_concatenate(others), alpha, recalibration)

  return _cross_fold(folds, alpha, fit)


def cross_fitted_coverage(folds: Sequence[tuple[np.ndarray, np.ndarray]], alpha: float,
                          method: str = "isotonic") -> dict[str, Any]:
  """`cross_fold_coverage` with a recalibration that keeps the guarantee.

  For each fold, the other folds are split by their order (every second one): g is fitted
  on one part and q on the other, so neither was fitted on the fold's own cases and q's
  scores come from cases g never saw.

  Args:
    folds: one (pred, true) pair of (n_k,) float arrays per fold, at least 3 folds.
    alpha: miscoverage in (0, 1).
    method: the recalibration, as in `fit_recalibration`.
  Returns:
    As `cross_fold_coverage`, width measured from g(pred).
  """
  if len(folds) < 3:
    raise ValueError(f"cross-fitted evaluation needs >= 3 folds, got {len(folds)}")

  def fit(others):
    g = fit_recalibration(*_concatenate(others[0::2]), method)
    return g, *conformal_offset(*_concatenate(others[1::2]), alpha, g)

  return _cross_fold(folds, alpha, fit)


def _cross_fold(folds: Sequence[tuple[np.ndarray, np.ndarray]], alpha: float,
                fit: Callable[[list], tuple[Recalibration | None, float, int]]
                ) -> dict[str, Any]:
  """Each fold's bound from `fit(other folds' valid pairs) -> (g, q, n_cal)`, scored on
  the fold; the result of `cross_fold_coverage`."""
  folds = [valid_pairs(p, t) for p, t in folds]
  rows, covered, width, bounds = [], [], [], []
  for k, (p, t) in enumerate(folds):
    g, q, n_cal = fit([f for j, f in enumerate(folds) if j != k])
    bounds.append(conformal_lower_bound(p, q, g))
    covered.append(t >= bounds[-1])
    width.append(recalibrate(p, g) - bounds[-1])
    rows.append({"fold": k, "q": json_float(q), "n_cal": n_cal, "n": int(p.size),
                 "coverage": _json_mean(covered[-1]), "mean_width": _json_mean(width[-1])})
  covered, width = np.concatenate(covered), np.concatenate(width)
  return {"alpha": float(alpha), "n": int(covered.size), "coverage": _json_mean(covered),
          "mean_width": _json_mean(width), "mean_bound": _json_mean(np.concatenate(bounds)),
          "folds": rows}


def cross_fold_table(
    folds_by_structure: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]], alpha: float,
    recalibration: Mapping[str, Recalibration] | None = None) -> dict[str, dict[str, Any]]:
  """{structure: `cross_fold_coverage` of its folds}, g looked up per structure."""
  recalibration = recalibration or {}
  return {s: cross_fold_coverage(folds, alpha, recalibration.get(s))
          for s, folds in folds_by_structure.items()}


def _concatenate(folds: Sequence[tuple[np.ndarray, np.ndarray]]
                 ) -> tuple[np.ndarray, np.ndarray]:
  return (np.concatenate([p for p, _ in folds]), np.concatenate([t for _, t in folds]))


def _json_mean(x: np.ndarray) -> float | None:
  return float(np.mean(x)) if x.size else None
