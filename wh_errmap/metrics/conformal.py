"""Lower bounds on the true Dice with guaranteed coverage, and recalibration of the
predicted Dice (pure NumPy/SciPy).

  fit_recalibration, recalibration_from_dict  monotone maps g: predicted -> true Dice
  (IsotonicRecalibration, PlattRecalibration) fitted on labelled cases; their JSON forms
  leave_one_out_recalibrated                  each case mapped by a g fitted without it
  conformal_offset, conformal_lower_bound     offset q of one structure; clip(g(pred) - q)
  fit_conformal_bound (ConformalBound)        alpha, q, n (and g) of every structure
  (metrics.coverage: the cross-fold coverage and width of these bounds)

Split conformal (Vovk et al. 2005; Angelopoulos & Bates 2021): with scores
s_i = g(pred_i) - true_i on n calibration cases and q their k-th smallest,
k = ceil((n + 1)(1 - alpha)), a new case exchangeable with them has
P(true >= clip(g(pred) - q, 0, 1)) >= 1 - alpha, and < 1 - alpha + 1 / (n + 1) when the
scores have no ties. The guarantee is marginal (over the calibration cases and the new case
together), per structure, and holds only if g (identity when None) was fitted on cases
other than the calibration and the new ones: scores of cases that g was fitted on are
too small, and the bound then covers less than promised.

Policies: a pair with a NaN prediction or true Dice (a structure absent from mask or
label) is not a case and is dropped before fitting; a NaN prediction gets a NaN
recalibrated value and a NaN bound. Predictions or true values outside [0, 1], shapes that
differ, or too few cases raise ValueError.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import optimize, special

MIN_RECALIBRATION_CASES = 3

# ---------------------------------------------------------------- recalibration

@dataclass(frozen=True)
class IsotonicRecalibration:
  """Non-decreasing piecewise-linear map of predicted Dice to true Dice.

  Linear between knots, constant outside them (y[0] below x[0], y[-1] above x[-1]), so
  outputs stay in [y[0], y[-1]], a subset of [0, 1].

  Attributes:
    x: (K,) increasing knots: the distinct predicted Dice of the fitting cases.
    y: (K,) non-decreasing values in [0, 1] at the knots.
  """
  x: tuple[float, ...]
  y: tuple[float, ...]

  def __call__(self, pred: np.ndarray) -> np.ndarray:
    """Any-shape predicted Dice in [0, 1] or NaN -> float64 array of that shape."""
    return np.interp(_check_dice(pred, "pred"), self.x, self.y)

  def to_dict(self) -> dict[str, Any]:
    return {"method": "isotonic", "x": list(self.x), "y": list(self.y)}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> IsotonicRecalibration:
    _check_method(d, "isotonic")
    return cls(tuple(float(v) for v in d["x"]), tuple(float(v) for v in d["y"]))


@dataclass(frozen=True)
class PlattRecalibration:
  """Logistic map true ~ sigmoid(a * logit(pred) + b) with a > 0, hence increasing.

  It maps 0 to 0 and 1 to 1 whatever a and b (logit(0) = -inf).

  Attributes:
    a: slope in logit space, > 0.
    b: intercept in logit space.
  """
  a: float
  b: float

  def __post_init__(self):
    if not (self.a > 0 and math.isfinite(self.a) and math.isfinite(self.b)):
      raise ValueError(f"Platt map needs a finite a > 0 and finite b, got a={self.a}, "
                       f"b={self.b}")

  def __call__(self, pred: np.ndarray) -> np.ndarray:
    """Any-shape predicted Dice in [0, 1] or NaN -> float64 array of that shape."""
    return special.expit(self.a * special.logit(_check_dice(pred, "pred")) + self.b)

  def to_dict(self) -> dict[str, Any]:
    return {"method": "platt", "a": self.a, "b": self.b}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> PlattRecalibration:
    _check_method(d, "platt")
    return cls(float(d["a"]), float(d["b"]))


Recalibration = IsotonicRecalibration | PlattRecalibration
_RECALIBRATIONS = {"isotonic": IsotonicRecalibration, "platt": PlattRecalibration}


def recalibration_from_dict(d: Mapping[str, Any]) -> Recalibration:
  """Rebuild either map from its `to_dict` form, by its "method" entry."""
  if d.get("method") not in _RECALIBRATIONS:
    raise ValueError(f"unknown recalibration method {d.get('method')!r}")
  return _RECALIBRATIONS[d["method"]].from_dict(d)


def fit_recalibration(pred: np.ndarray, true: np.ndarray,
                      method: str = "isotonic") -> Recalibration:
  """Fit a monotone map of predicted Dice to true Dice on labelled cases.

  "isotonic": least-squares non-decreasing fit (pool adjacent violators); cases with equal
  predictions share one value. "platt": `PlattRecalibration` fitted by least squares on the
  Dice scale, with a = exp(u) so that a > 0 holds throughout the search.

  Args:
    pred: (n,) float predicted Dice in [0, 1] or NaN.
    true: (n,) float true Dice in [0, 1] or NaN.
    method: "isotonic" or "platt".
  Returns:
    The fitted map. Raises ValueError when fewer than MIN_RECALIBRATION_CASES (3) pairs
    have neither value NaN.
  """
  if method not in _RECALIBRATIONS:
    raise ValueError(f"method must be 'isotonic' or 'platt', got {method!r}")
  p, t = valid_pairs(pred, true)
  if p.size < MIN_RECALIBRATION_CASES:
    raise ValueError(f"recalibration needs >= {MIN_RECALIBRATION_CASES} cases with "
                     f"predicted and true Dice, got {p.size}")
  if method == "isotonic":
    x, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
    # One value per distinct prediction: isotonic regression of the group means weighted
    # by group size is the least-squares fit that gives tied predictions one value.
    y = optimize.isotonic_regression(np.bincount(inverse, weights=t) / counts,
                                     weights=counts).x
    return IsotonicRecalibration(tuple(x.tolist()), tuple(np.clip(y, 0.0, 1.0).tolist()))
  z = special.logit(p)
  # Predictions of exactly 0 or 1 give z = -inf or inf; their residual is then constant
  # (the map sends them to 0 or 1), which the finite-difference Jacobian handles.
  fit = optimize.least_squares(lambda u: special.expit(np.exp(u[0]) * z + u[1]) - t,
                               x0=[0.0, 0.0], xtol=1e-12, ftol=1e-12, gtol=1e-12)
  return PlattRecalibration(float(np.exp(fit.x[0])), float(fit.x[1]))


def leave_one_out_recalibrated(pred: np.ndarray, true: np.ndarray,
                               method: str = "isotonic") -> np.ndarray:
  """Each case's prediction recalibrated by a map fitted on all the other valid cases.

  Honest recalibrated values for the fitting cases themselves (case i's value never
  depends on true[i]); a case with a true Dice of NaN still gets a value.

  Args:
    pred, true, method: as in `fit_recalibration`; every case with a prediction needs
      MIN_RECALIBRATION_CASES other valid pairs.
  Returns:
    (n,) float64, NaN where pred is NaN.
  """
  p, t = _pairs(pred, true)
  valid = ~(np.isnan(p) | np.isnan(t))
  out = np.full(p.shape, np.nan)
  for i in np.flatnonzero(~np.isnan(p)):
    others = valid.copy()
    others[i] = False
    out[i] = fit_recalibration(p[others], t[others], method)(p[i:i + 1])[0]
  return out


# ---------------------------------------------------------------- conformal bounds

def _rank(n: int, alpha: float) -> int:
  """k = ceil((n + 1)(1 - alpha)): the rank of the offset among n scores."""
  # (n + 1)(1 - alpha) can round to just above an integer (n = 9, alpha = 0.7 gives
  # 3.0000000000000004); the 1e-9 keeps k from moving up by one.
  return math.ceil((n + 1) * (1 - alpha) - 1e-9)


def min_cases_for_bound(alpha: float) -> int:
  """The fewest valid cases whose conformal offset is finite at miscoverage `alpha` (the
  smallest n with k <= n: 9 for alpha = 0.1, 19 for 0.05)."""
  if not 0 < alpha < 1:
    raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
  n = 1
  while _rank(n, alpha) > n:
    n += 1
  return n


def conformal_offset(pred: np.ndarray, true: np.ndarray, alpha: float,
                     recalibration: Recalibration | None = None) -> tuple[float, int]:
  """Split-conformal offset q of one structure from its calibration cases.

  q is the k-th smallest score g(pred_i) - true_i, k = ceil((n + 1)(1 - alpha)). When
  k > n (n < 1 / alpha - 1, e.g. n < 9 for alpha = 0.1) no finite q carries the guarantee:
  q = +inf and every bound is the trivial 0.

  Args:
    pred: (n,) float predicted Dice in [0, 1] or NaN.
    true: (n,) float true Dice in [0, 1] or NaN.
    alpha: miscoverage in (0, 1).
    recalibration: g applied to pred before scoring, or None for the identity.
  Returns:
    (q, n): q as a Python float in [-1, 1] or +inf, n the number of valid pairs.
  """
  if not 0 < alpha < 1:
    raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
  p, t = valid_pairs(pred, true)
  scores = recalibrate(p, recalibration) - t
  n = scores.size
  k = _rank(n, alpha)
  if k > n:
    return math.inf, n
  return float(np.partition(scores, k - 1)[k - 1]), n


def conformal_lower_bound(pred: np.ndarray, offset: float,
                          recalibration: Recalibration | None = None) -> np.ndarray:
  """Lower bound clip(g(pred) - offset, 0, 1) on the true Dice.

  Args:
    pred: any-shape float predicted Dice in [0, 1] or NaN.
    offset: q from `conformal_offset` (+inf gives 0).
    recalibration: the g that q was computed with, or None.
  Returns:
    float64 array of pred's shape, in [0, 1] or NaN where pred is NaN.
  """
  if math.isnan(offset):
    raise ValueError("offset must not be NaN")
  return np.clip(recalibrate(_check_dice(pred, "pred"), recalibration) - offset, 0.0, 1.0)


@dataclass(frozen=True)
class ConformalBound:
  """Fitted lower bounds of several structures (keys are structure names, str).

  Attributes:
    alpha: miscoverage the offsets were fitted for.
    offset: q per structure; +inf means the trivial bound 0.
    n: number of calibration cases per structure.
    recalibration: g per structure; a structure without one uses the raw prediction.
  """
  alpha: float
  offset: dict[str, float]
  n: dict[str, int]
  recalibration: dict[str, Recalibration] = field(default_factory=dict)

  def lower_bound(self, structure: str, pred: np.ndarray) -> np.ndarray:
    """Bounds of one structure's predictions, as in `conformal_lower_bound`."""
    return conformal_lower_bound(pred, self.offset[structure],
                                 self.recalibration.get(structure))

  def to_dict(self) -> dict[str, Any]:
    """Strict-JSON form: an offset of +inf is written as None (JSON null)."""
    return {"alpha": self.alpha,
            "offset": {s: json_float(q) for s, q in self.offset.items()},
            "n": dict(self.n),
            "recalibration": {s: g.to_dict() for s, g in self.recalibration.items()}}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> ConformalBound:
    return cls(float(d["alpha"]),
               {s: math.inf if q is None else float(q) for s, q in d["offset"].items()},
               {s: int(v) for s, v in d["n"].items()},
               {s: recalibration_from_dict(g) for s, g in d.get("recalibration", {}).items()})


def fit_conformal_bound(cases: Mapping[str, tuple[np.ndarray, np.ndarray]], alpha: float,
                        recalibration: Mapping[str, Recalibration] | None = None
                        ) -> ConformalBound:
  """`conformal_offset` of every structure.

  Args:
    cases: {structure: (pred, true)}, each a (n,) float array as in `conformal_offset`.
    alpha: miscoverage in (0, 1).
    recalibration: {structure: g}, each fitted on cases other than these; a structure
      without one uses the raw prediction.
  Returns:
    The fitted ConformalBound.
  """
  recalibration = dict(recalibration or {})
  fitted = {s: conformal_offset(p, t, alpha, recalibration.get(s))
            for s, (p, t) in cases.items()}
  return ConformalBound(alpha, {s: q for s, (q, _) in fitted.items()},
                        {s: n for s, (_, n) in fitted.items()}, recalibration)


# ---------------------------------------------------------------- helpers

def _check_dice(x: np.ndarray, name: str) -> np.ndarray:
  x = np.asarray(x, dtype=np.float64)
  finite = x[~np.isnan(x)]
  if finite.size and not (finite.min() >= 0 and finite.max() <= 1):
    raise ValueError(f"{name} must lie in [0, 1] or be NaN, got [{finite.min()}, "
                     f"{finite.max()}]")
  return x


def _pairs(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  p, t = _check_dice(pred, "pred"), _check_dice(true, "true")
  if p.ndim != 1 or p.shape != t.shape:
    raise ValueError(f"pred and true must be two (n,) arrays, got {p.shape} and "
                     f"{t.shape}")
  return p, t


def valid_pairs(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(pred, true) as float64 (n,) arrays checked to lie in [0, 1], NaN pairs dropped."""
  p, t = _pairs(pred, true)
  keep = ~(np.isnan(p) | np.isnan(t))
  return p[keep], t[keep]


def recalibrate(p: np.ndarray, recalibration: Recalibration | None) -> np.ndarray:
  """g(p), or p itself when there is no recalibration."""
  return p if recalibration is None else recalibration(p)


def _check_method(d: Mapping[str, Any], method: str) -> None:
  if d.get("method") != method:
    raise ValueError(f"expected a {method!r} recalibration, got {d.get('method')!r}")


def json_float(x: float) -> float | None:
  """x, or None for an infinite or NaN value (strict JSON)."""
  return float(x) if math.isfinite(x) else None
