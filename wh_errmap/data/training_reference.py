"""What a predictor's training data looked like, for the out-of-distribution checks of QC.

Written beside a fold's predictor (`WORKDIR/fold{k}/predictor/training_reference.json`) and
carried in an exported model file: the range of each structure's volume, the distribution
of preprocessed intensities, the appearance of the image inside each structure of the
training cases' masks, and the training modality with each training scan's raw intensity
profile (`data.modality`). `qc.verdict.ood_reasons` and `modality_reasons` compare a new
case with it.

Appearance: a mask of the heart on a scan of the heart covers blood pools, myocardium and
their surroundings, each with its own brightness; on a brain, a knee, another patient's
scan or another contrast, the same labels cover something else. `appearance` describes a
(image, mask) pair by the median and interquartile range of the preprocessed intensities
inside each structure and in a ring around the mask, and the contrasts of each structure
with the myocardium and with the ring. The reference holds these descriptions for the
training cases with their ground truth and with masks of every quality (the segmentors'
ten outputs), and a new pair's distance is to its nearest reference description, in units
of each feature's spread over the reference; the limit is the largest such distance of a
training case from the other training cases (leave one case out).
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from wh_errmap.data.modality import MODALITIES
from wh_errmap.data.preprocess import PreprocessedCase, valid_region
from wh_errmap.data.structures import NUM_CLASSES, STRUCTURES
from wh_errmap.errors import UserError
from wh_errmap.utils.atomic import write_json

REFERENCE_FILE = "training_reference.json"   # in WORKDIR/fold{k}/predictor/
INTENSITY_BINS = 16                          # histogram of preprocessed intensities, [-1, 1]
RING_MM = 6.0          # the ring around the mask whose intensities describe its surroundings
MIN_REGION_VOXELS = 20  # a region with fewer voxels has no appearance (NaN)
_SCALE_FLOOR = 1e-3    # the least spread of a feature, so a constant one cannot dominate


def intensity_histogram(image: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """Normalised histogram of preprocessed intensities ([-1, 1]) over the valid voxels."""
  counts, _ = np.histogram(image[valid], bins=INTENSITY_BINS, range=(-1.0, 1.0))
  return counts / max(1, counts.sum())


def histogram_distance(a: Sequence[float], b: Sequence[float]) -> float:
  """Total variation distance between two normalised histograms: 0 (same) to 1 (disjoint)."""
  return float(0.5 * np.abs(np.asarray(a) - np.asarray(b)).sum())


def appearance(image: np.ndarray, mask: np.ndarray, valid: np.ndarray,
               spacing: Sequence[float]) -> np.ndarray:
  """The appearance of a preprocessed (X, Y, Z) image inside its (X, Y, Z) mask (classes
  0..7), over the valid voxels: (29,) float64 =
    [median, IQR] of the ring within RING_MM of the mask, then of each structure 1..7 (16),
    each structure's median minus the myocardium's (6, LA..PA), and minus the ring's (7);
  NaN where a region has fewer than MIN_REGION_VOXELS voxels (or a contrast lacks a side)."""
  radius = np.maximum(1, np.round(RING_MM / np.asarray(spacing, np.float64))).astype(int)
  foreground = mask > 0
  ring = ndimage.binary_dilation(foreground, ndimage.generate_binary_structure(3, 1),
                                 int(radius.max())) & ~foreground & valid
  stats = []
  for region in [ring] + [(mask == c) & valid for c in range(1, NUM_CLASSES)]:
    values = image[region]
    stats.append(np.percentile(values, (25, 50, 75)) if values.size >= MIN_REGION_VOXELS
                 else np.full(3, np.nan))
  stats = np.asarray(stats)
  median, spread = stats[:, 1], stats[:, 2] - stats[:, 0]
  return np.concatenate([np.stack([median, spread], 1).ravel(), median[2:] - median[1],
                         median[1:] - median[0]])


def appearance_distances(features: np.ndarray, reference: np.ndarray,
                         scale: np.ndarray) -> np.ndarray:
  """(n,) distance of each row of `features` (n, F) to its nearest row of `reference`
  (m, F): the root mean square of (feature - reference) / scale over the features both
  have (NaN-free); inf where a row shares no feature with any reference row."""
  z = (reference[None] - features[:, None]) / scale          # (n, m, F)
  shared = np.isfinite(z)
  count = shared.sum(-1)
  rms = np.sqrt(np.where(shared, z * z, 0.0).sum(-1) / np.maximum(count, 1))
  return np.where(count > 0, rms, np.inf).min(axis=1)


def appearance_reference(features: Sequence[np.ndarray], case_ids: Sequence[str]
                         ) -> dict[str, Any]:
  """The appearance reference of the training cases' (image, mask) descriptions: the
  descriptions, their cases, each feature's spread (its standard deviation, at least
  _SCALE_FLOOR) and the limit: the largest distance of a case's descriptions from the other
  cases' (leave one case out). JSON-ready (NaN as None)."""
  rows = np.asarray(features, np.float64)
  cases = np.asarray(case_ids)
  if len(set(case_ids)) < 2:
    raise ValueError("an appearance reference needs at least two training cases")
  finite = np.isfinite(rows)
  count = np.maximum(finite.sum(axis=0), 1)
  mean = np.where(finite, rows, 0.0).sum(axis=0) / count
  spread = np.sqrt(np.where(finite, (rows - mean) ** 2, 0.0).sum(axis=0) / count)
  scale = np.maximum(spread, _SCALE_FLOOR)
  limit = max(float(appearance_distances(rows[cases == c], rows[cases != c], scale).max())
              for c in sorted(set(case_ids)))
  return {"features": [[None if np.isnan(v) else float(v) for v in row] for row in rows],
          "cases": list(case_ids), "scale": scale.tolist(), "limit": limit}


def appearance_distance(image: np.ndarray, mask: np.ndarray, valid: np.ndarray,
                        spacing: Sequence[float], reference: dict[str, Any]) -> float:
  """The distance of one (image, mask) pair's appearance to its nearest training one."""
  rows = np.asarray([[np.nan if v is None else v for v in row]
                     for row in reference["features"]], np.float64)
  features = appearance(image, mask, valid, spacing)[None]
  return float(appearance_distances(features, rows, np.asarray(reference["scale"]))[0])


def training_reference(cases: Sequence[PreprocessedCase],
                       masks: Mapping[str, Sequence[np.ndarray]] | None = None, *,
                       modality: str) -> dict[str, Any]:
  """What out-of-distribution checks compare a new case with, from the training cases:

    modality: the training scans' modality, "mr" or "ct" (the run's config.modality);
    intensity_profiles: each case's raw intensity profile (`data.modality`), in case order;
    volume_ml: {structure: [min, max]} of the labels' structure volumes;
    intensity_histogram: the pooled histogram of preprocessed intensities in the crops;
    intensity_distance_max: the largest distance of a training case's histogram from it;
    real_fraction_min: the smallest share of real (not padded) voxels in a training crop;
    appearance (with `masks`): `appearance_reference` of every case with its label and with
      its masks (case id -> masks on the case's grid: the segmentors' outputs, so that
      masks of every quality look usual; from labels alone, a poor mask would not).
  """
  if not cases:
    raise ValueError("training_reference needs at least one case")
  if modality not in MODALITIES:
    raise ValueError(f"modality {modality!r} is not one of {MODALITIES}")
  volumes, histograms, fractions = {s: [] for s in STRUCTURES}, [], []
  looks, owners = [], []
  for case in cases:
    ml = float(np.prod(case.properties["spacing"])) / 1000.0
    counts = np.bincount(case.label.ravel(), minlength=NUM_CLASSES)
    for c, name in enumerate(STRUCTURES, start=1):
      volumes[name].append(float(counts[c]) * ml)
    valid = valid_region(case.properties)
    histograms.append(intensity_histogram(case.image, valid))
    fractions.append(float(valid.mean()))
    for mask in ([case.label, *masks.get(case.case_id, ())] if masks is not None else ()):
      looks.append(appearance(case.image, mask, valid, case.properties["spacing"]))
      owners.append(case.case_id)
  pooled = np.mean(histograms, axis=0)
  reference = {
      "cases": len(cases), "case_ids": [case.case_id for case in cases],
      "modality": modality,
      "intensity_profiles": [case.properties["intensity_profile"] for case in cases],
      "volume_ml": {s: [min(v), max(v)] for s, v in volumes.items()},
      "intensity_histogram": pooled.tolist(),
      "intensity_distance_max": max(histogram_distance(h, pooled) for h in histograms),
      "real_fraction_min": min(fractions),
  }
  if masks is not None:
    reference["appearance"] = appearance_reference(looks, owners)
  return reference


def write_reference(predictor_dir: str | Path, cases: Sequence[PreprocessedCase],
                    masks: Mapping[str, Sequence[np.ndarray]] | None = None, *,
                    modality: str) -> Path:
  """Writes the training reference of a fold's predictor beside its checkpoints (masks,
  modality: see `training_reference`)."""
  path = Path(predictor_dir) / REFERENCE_FILE
  write_json(path, training_reference(cases, masks, modality=modality))
  return path


# Parts recorded after the first references were written: a reference without one is
# written again (cv_fold) or rebuilt for a model file (export_model).
LATER_PARTS = ("appearance", "modality")


def missing_parts(reference: Mapping[str, Any] | None) -> list[str]:
  """The LATER_PARTS that `reference` lacks (all of them when there is none)."""
  return [part for part in LATER_PARTS if part not in (reference or {})]


def read_reference(predictor_dir: str | Path) -> dict | None:
  """The fold's training reference, None when the run has none (made before it existed)."""
  path = Path(predictor_dir) / REFERENCE_FILE
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise UserError(f"{path} is unreadable ({e}); remove it to assess without "
                    f"out-of-distribution checks, or rerun the fold") from None
