"""Quality-control metrics for ground-truth-free assessment of segmentations (pure NumPy/SciPy).

Host-side companions of `segmentation` for reports: they run on NumPy arrays of single volumes
or of case-level vectors and return NumPy arrays or Python numbers.

  predicted_dice           per-structure Dice estimated from a mask and its error map
  risk_coverage, aurc,     selective-prediction curve of a case-level confidence score and
  e_aurc                   its area (Geifman et al. 2019, discrete), raw and excess
  failure_auroc            how well a low score flags cases with Dice below a threshold
  calibration_bins,        voxel-level calibration of error probabilities: summable bin
  expected_calibration_error, reliability_curve   statistics, ECE and the reliability curve
  correlations             Pearson / Spearman / MAE between estimates and true values: the
                           one implementation of every PCC, p-value and MAE of the reports
                           (qi_stats.json, qc_stats.json) and the console

Policies shared by the case-level functions (risk_coverage, aurc, e_aurc, failure_auroc,
correlations): a case whose score or true value is NaN (e.g. the per-class Dice of a class
absent from both mask and label) is not a case and is dropped before anything is computed;
a metric that is undefined on what remains (no case, a single class, constant input) is
NaN, never an exception. Malformed input (shapes that differ, probabilities outside [0, 1])
raises ValueError.

Per-structure Dice follows `segmentation.segmentation_scores`: NaN for a structure absent from
both mask and label. `predicted_dice` uses the same NaN, since a structure absent from the
mask has no estimated TP, FP or FN (see its docstring).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

# ---------------------------------------------------------------- predicted Dice

def predicted_dice(mask: np.ndarray, error_prob: np.ndarray, num_classes: int,
                   radius: int = 1) -> np.ndarray:
  """Ground-truth-free Dice of each foreground structure, from the predicted error map.

  Estimator, for each structure c in 1..num_classes-1 and error probability p(v):
    TP_c = sum over mask == c of (1 - p)   (voxels of c predicted correct),
    FP_c = sum over mask == c of p         (voxels of c predicted wrong),
    FN_c = sum over mask != c of p * w_c   (predicted errors outside c that may be misses
           of c),
    Dice_c = 2 TP_c / (2 TP_c + FP_c + FN_c).
  A voxel v is a candidate miss of c when it lies within `radius` voxels of the mask's c
  region (Chebyshev distance: dilation by the full 3x3x3 cube, `radius` times) and c is not
  v's own mask class. Its error is split equally among its candidate structures,
  w_c(v) = 1 / (number of candidates of v), so each predicted error counts as at most one
  miss in total; an error with no candidate structure is nobody's miss.

  A wrong foreground voxel of class k near c could truly be c or background; it is
  attributed to the neighbouring structures, never to background, because errors
  concentrate on the boundaries and a boundary between two structures is most often
  misplaced in favour of one of them. What this misses:
    - a wrong foreground voxel that is truly background but borders another structure is
      also counted as a miss of that structure (FN too high there);
    - misses farther than `radius` from the mask's c region (a missed blob, or a
      structure absent from the mask) are never counted (FN too low);
    - near several structures the equal split is a guess.
  The estimate is exact (equal to the true Dice) when `error_prob` is the true binary
  error map, every voxel of true class c that the mask misses lies within `radius` of the
  mask's c region and near no other structure than c (its own mask class aside), and every
  wrong voxel with no candidate is a wrong foreground voxel that is truly background.

  Policy: a structure absent from the mask has no region to dilate, hence TP = FP = FN = 0
  and no estimate: NaN, like `segmentation.segmentation_scores` for a class absent from mask and
  label (its true Dice is NaN or 0, and the error map cannot tell which). A structure
  present in the mask always has TP + FP > 0, hence a defined estimate.

  Args:
    mask: (X, Y, Z) integer classes in [0, num_classes); 0 is background. Any number of
      spatial axes works; the neighbourhood is then the full 3^ndim cube.
    error_prob: (X, Y, Z) float probability that each voxel of the mask is wrong, in
      [0, 1]; a bool or {0, 1} error map works too.
    num_classes: C including background, at least 2.
    radius: neighbourhood radius in voxels, at least 1.
  Returns:
    (C - 1,) float64 estimated Dice of structures 1..C-1, in [0, 1] or NaN.
  """
  tp, fp, fn = predicted_dice_terms(mask, error_prob, num_classes, radius)
  den = 2.0 * tp + fp + fn
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(den > 0, 2.0 * tp / np.where(den > 0, den, 1.0), np.nan)


def predicted_dice_terms(mask: np.ndarray, error_prob: np.ndarray, num_classes: int,
                          radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The (C - 1,) float64 TP, FP and FN sums of `predicted_dice`."""
  mask = np.asarray(mask)
  p = np.asarray(error_prob, dtype=np.float64)
  if mask.shape != p.shape or mask.ndim < 1:
    raise ValueError(f"mask and error_prob must have one shape, got {mask.shape} and "
                     f"{p.shape}")
  if not np.issubdtype(mask.dtype, np.integer):
    raise ValueError(f"mask must be integer, got {mask.dtype}")
  if num_classes < 2:
    raise ValueError(f"num_classes must count background and >= 1 structure, got "
                     f"{num_classes}")
  if radius < 1:
    raise ValueError(f"radius must be >= 1, got {radius}")
  if mask.size and (mask.min() < 0 or mask.max() >= num_classes):
    raise ValueError(f"mask classes must lie in [0, {num_classes}), got "
                     f"[{mask.min()}, {mask.max()}]")
  _check_probabilities(p, "error_prob")

  classes = range(1, num_classes)
  # A maximum filter over a (2r+1)^ndim cube with zero padding is the r-fold dilation by
  # the 3^ndim cube, computed separably (one pass per axis instead of r 3D passes).
  near = np.stack([
      ndimage.maximum_filter((mask == c).view(np.uint8), size=2 * radius + 1,
                             mode="constant", cval=0).astype(bool) & (mask != c)
      for c in classes])
  num_candidates = near.sum(axis=0)
  # Voxels with no candidate get weight 0; the 1 in the denominator only avoids 0/0.
  share = p / np.maximum(num_candidates, 1)
  tp = np.empty(num_classes - 1)
  fp = np.empty(num_classes - 1)
  fn = np.empty(num_classes - 1)
  for i, c in enumerate(classes):
    in_c = mask == c
    size, fp[i] = np.count_nonzero(in_c), p[in_c].sum()
    # 1 - p summed as size - sum(p) is one pass fewer and equal up to rounding.
    tp[i] = size - fp[i]
    fn[i] = share[near[i]].sum()
  return tp, fp, fn


# ---------------------------------------------------------------- selective prediction

def risk_coverage(scores: np.ndarray, risks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Risk-coverage curve of a confidence score.

  Cases are accepted in order of decreasing score; at coverage k/n the selective risk is
  the mean risk of the k most confident cases.

  Ties: a group of cases with equal scores is accepted in no defined order, so at a
  coverage inside the group each accepted case of the group counts with the group's mean
  risk (the expected selective risk over the group's orderings): ties neither help nor
  hurt, and the curve does not depend on the input order (bit for bit: cases are sorted
  by risk within a group before summing). At the group's end the risk is exact.

  Args:
    scores: (n,) float, higher = more confident that the case is good.
    risks: (n,) float loss of each case, e.g. 1 - true Dice.
  Returns:
    (coverage, selective_risk), both (m,) float64, coverage = k/m for k = 1..m, where m is
    the number of cases with neither score nor risk NaN (empty arrays when m = 0).
  """
  scores, risks = _valid_pairs(scores, risks)
  m = scores.size
  if m == 0:
    return np.empty(0), np.empty(0)
  # np.lexsort sorts by its last key first: score descending, then risk ascending.
  order = np.lexsort((risks, -scores))
  s, r = scores[order], risks[order]
  starts = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1])))
  sizes = np.diff(np.append(starts, m))
  group_mean = np.add.reduceat(r, starts) / sizes
  k = np.arange(1, m + 1)
  return k / m, np.cumsum(np.repeat(group_mean, sizes)) / k


def aurc(scores: np.ndarray, risks: np.ndarray) -> float:
  """Area under the risk-coverage curve: the mean selective risk over k = 1..m.

  Args:
    scores, risks: (n,) float, as in `risk_coverage` (same tie and NaN policies).
  Returns:
    AURC as a Python float; NaN when no valid case remains.
  """
  _, risk = risk_coverage(scores, risks)
  return float(risk.mean()) if risk.size else math.nan


def e_aurc(scores: np.ndarray, risks: np.ndarray) -> float:
  """Excess AURC: `aurc` minus the AURC of the optimal ordering (scores = -risks).

  The optimal ordering minimises every selective risk at once, so the excess is >= 0 in
  exact arithmetic; rounding residues below zero are clipped to 0.

  Args:
    scores, risks: (n,) float, as in `risk_coverage`.
  Returns:
    E-AURC >= 0 as a Python float; NaN when no valid case remains.
  """
  scores, risks = _valid_pairs(scores, risks)
  if scores.size == 0:
    return math.nan
  return max(0.0, aurc(scores, risks) - aurc(-risks, risks))


def failure_auroc(scores: np.ndarray, dice: np.ndarray, threshold: float = 0.75) -> float:
  """AUROC of flagging failed segmentations by a low score.

  Failures are cases with dice < threshold, successes the others. The result is the
  probability that a random failure scores lower than a random success, ties counting
  1/2 (the Mann-Whitney U of successes over failures divided by n_fail * n_success).

  Args:
    scores: (n,) float, higher = more confident that the case is good.
    dice: (n,) float true Dice (or any quality where low means failed).
    threshold: a case fails when its dice is strictly below this.
  Returns:
    AUROC in [0, 1] as a Python float; NaN when, after dropping NaN pairs, there is no
    failure or no success.
  """
  scores, dice = _valid_pairs(scores, dice)
  fail = dice < threshold
  n_fail = int(np.count_nonzero(fail))
  n_success = fail.size - n_fail
  if n_fail == 0 or n_success == 0:
    return math.nan
  ranks = _midranks(scores)
  # U of the successes: pairs (success, failure) with the success scored higher, ties 1/2.
  u = ranks[~fail].sum() - n_success * (n_success + 1) / 2.0
  return float(u / (n_fail * n_success))


# ---------------------------------------------------------------- calibration

def calibration_bins(prob: np.ndarray, error: np.ndarray,
                     num_bins: int = 10) -> dict[str, np.ndarray]:
  """Bin voxel error probabilities for calibration statistics.

  Bins are equal-width over [0, 1]: voxel v goes to bin floor(p * num_bins), and p == 1 to
  the last bin. The outputs are sums, so the bins of several volumes (or of parts of one)
  add up to the bins of their union.

  Args:
    prob: (*S) float predicted probability that each voxel is wrong, in [0, 1].
    error: (*S) true error map, bool or {0, 1} (a float in [0, 1] is averaged as is).
    num_bins: number of bins, at least 1.
  Returns:
    {"count": (num_bins,) int64 voxels per bin, "sum_prob": (num_bins,) float64 sum of
    their probabilities, "sum_error": (num_bins,) float64 sum of their errors}.
  """
  prob = np.asarray(prob, dtype=np.float64)
  error = np.asarray(error)
  if prob.shape != error.shape:
    raise ValueError(f"prob and error must have one shape, got {prob.shape} and "
                     f"{error.shape}")
  if num_bins < 1:
    raise ValueError(f"num_bins must be >= 1, got {num_bins}")
  _check_probabilities(prob, "prob")
  prob, error = prob.ravel(), error.ravel().astype(np.float64)
  index = np.minimum((prob * num_bins).astype(np.int64), num_bins - 1)
  return {
      "count": np.bincount(index, minlength=num_bins).astype(np.int64),
      "sum_prob": np.bincount(index, weights=prob, minlength=num_bins),
      "sum_error": np.bincount(index, weights=error, minlength=num_bins),
  }


def expected_calibration_error(count: np.ndarray, sum_prob: np.ndarray,
                               sum_error: np.ndarray) -> float:
  """ECE = sum over non-empty bins of (count_b / N) |mean_prob_b - error_rate_b|.

  Args:
    count, sum_prob, sum_error: (B,) bin statistics from `calibration_bins` (or their sum
      over volumes).
  Returns:
    ECE in [0, 1] as a Python float; NaN when N = sum(count) = 0.
  """
  count, sum_prob, sum_error = _check_bins(count, sum_prob, sum_error)
  total = count.sum()
  if total == 0:
    return math.nan
  # (count_b / N) |sum_prob_b / count_b - sum_error_b / count_b| = |sum_prob_b -
  # sum_error_b| / N, and empty bins hold zero sums, so no per-bin division is needed.
  return float(np.abs(sum_prob - sum_error).sum() / total)


def reliability_curve(count: np.ndarray, sum_prob: np.ndarray,
                      sum_error: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Reliability curve: mean predicted probability against the observed error rate.

  Args:
    count, sum_prob, sum_error: (B,) bin statistics from `calibration_bins`.
  Returns:
    (mean_prob, error_rate, count) of the non-empty bins only, each (m,), m <= B:
    float64, float64, int64.
  """
  count, sum_prob, sum_error = _check_bins(count, sum_prob, sum_error)
  full = count > 0
  n = count[full]
  return sum_prob[full] / n, sum_error[full] / n, n


# ---------------------------------------------------------------- correlations

def correlations(estimate: np.ndarray, truth: np.ndarray) -> dict[str, float | int]:
  """Agreement of case-level estimates (predicted Dice, QI) with the true values.

  Args:
    estimate: (n,) float estimated values.
    truth: (n,) float true values of the same cases.
  Returns:
    {"pcc", "pcc_p": Pearson r and its two-sided p-value, "spearman", "spearman_p":
    Spearman rho and its p-value, "mae": mean |estimate - truth|} as Python floats and
    "n": the number of pairs used, those where neither side is NaN. The correlations and
    p-values are NaN with fewer than 3 pairs or when either side is constant; mae is NaN
    only with no pair.
  """
  estimate, truth = _valid_pairs(estimate, truth)
  n = int(estimate.size)
  out: dict[str, float | int] = {"pcc": math.nan, "pcc_p": math.nan, "spearman": math.nan,
                                 "spearman_p": math.nan, "n": n,
                                 "mae": float(np.abs(estimate - truth).mean()) if n else math.nan}
  # SciPy warns and returns NaN for constant input; n = 2 leaves no degree of freedom.
  if n < 3 or np.all(estimate == estimate[0]) or np.all(truth == truth[0]):
    return out
  # Imported here: scipy.stats takes most of a second to import, in every command that
  # imports this module (predict, a fold's evaluation), and only the statistics need it.
  from scipy import stats
  pearson = stats.pearsonr(estimate, truth)
  spearman = stats.spearmanr(estimate, truth)
  out.update(pcc=float(pearson.statistic), pcc_p=float(pearson.pvalue),
             spearman=float(spearman.statistic), spearman_p=float(spearman.pvalue))
  return out


# ---------------------------------------------------------------- helpers

def _valid_pairs(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Two (n,) arrays -> float64 copies without the pairs where either is NaN."""
  x = np.asarray(x, dtype=np.float64)
  y = np.asarray(y, dtype=np.float64)
  if x.ndim != 1 or x.shape != y.shape:
    raise ValueError(f"expected two (n,) arrays, got {x.shape} and {y.shape}")
  keep = ~(np.isnan(x) | np.isnan(y))
  return x[keep], y[keep]


def _midranks(x: np.ndarray) -> np.ndarray:
  """(n,) values -> (n,) float64 ranks 1..n, tied values sharing their mean rank."""
  _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  # Distinct value j holds ranks last_j - counts_j + 1 .. last_j; their mean follows.
  last = np.cumsum(counts)
  return (last - (counts - 1) / 2.0)[inverse]


def _check_probabilities(p: np.ndarray, name: str) -> None:
  # Written so that NaN fails too.
  if p.size and not (np.all(p >= 0) and np.all(p <= 1)):
    raise ValueError(f"{name} must lie in [0, 1] (no NaN)")


def _check_bins(count: np.ndarray, sum_prob: np.ndarray,
                sum_error: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  count = np.asarray(count, dtype=np.int64)
  sum_prob = np.asarray(sum_prob, dtype=np.float64)
  sum_error = np.asarray(sum_error, dtype=np.float64)
  if count.ndim != 1 or count.shape != sum_prob.shape or count.shape != sum_error.shape:
    raise ValueError(f"expected three (B,) bin arrays, got {count.shape}, "
                     f"{sum_prob.shape} and {sum_error.shape}")
  return count, sum_prob, sum_error
