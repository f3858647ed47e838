"""What a predictor's training data looked like, for the out-of-distribution checks of QC.

Written beside a fold's predictor (`WORKDIR/fold{k}/predictor/training_reference.json`) and
carried in an exported model file: the range of each structure's volume and the
distribution of preprocessed intensities over the training cases. `qc.verdict.ood_reasons`
compares a new case with it.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wh_errmap.data.preprocess import PreprocessedCase, valid_region
from wh_errmap.data.structures import NUM_CLASSES, STRUCTURES
from wh_errmap.errors import UserError
from wh_errmap.utils.atomic import write_json

REFERENCE_FILE = "training_reference.json"   # in WORKDIR/fold{k}/predictor/
INTENSITY_BINS = 16                          # histogram of preprocessed intensities, [-1, 1]


def intensity_histogram(image: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """Normalised histogram of preprocessed intensities ([-1, 1]) over the valid voxels."""
  counts, _ = np.histogram(image[valid], bins=INTENSITY_BINS, range=(-1.0, 1.0))
  return counts / max(1, counts.sum())


def histogram_distance(a: Sequence[float], b: Sequence[float]) -> float:
  """Total variation distance between two normalised histograms: 0 (same) to 1 (disjoint)."""
  return float(0.5 * np.abs(np.asarray(a) - np.asarray(b)).sum())


def training_reference(cases: Sequence[PreprocessedCase]) -> dict[str, Any]:
  """What out-of-distribution checks compare a new case with, from the training cases:

    volume_ml: {structure: [min, max]} of the labels' structure volumes;
    intensity_histogram: the pooled histogram of preprocessed intensities in the crops;
    intensity_distance_max: the largest distance of a training case's histogram from it;
    real_fraction_min: the smallest share of real (not padded) voxels in a training crop.
  """
  if not cases:
    raise ValueError("training_reference needs at least one case")
  volumes, histograms, fractions = {s: [] for s in STRUCTURES}, [], []
  for case in cases:
    ml = float(np.prod(case.properties["spacing"])) / 1000.0
    counts = np.bincount(case.label.ravel(), minlength=NUM_CLASSES)
    for c, name in enumerate(STRUCTURES, start=1):
      volumes[name].append(float(counts[c]) * ml)
    valid = valid_region(case.properties)
    histograms.append(intensity_histogram(case.image, valid))
    fractions.append(float(valid.mean()))
  pooled = np.mean(histograms, axis=0)
  return {
      "cases": len(cases), "case_ids": [case.case_id for case in cases],
      "volume_ml": {s: [min(v), max(v)] for s, v in volumes.items()},
      "intensity_histogram": pooled.tolist(),
      "intensity_distance_max": max(histogram_distance(h, pooled) for h in histograms),
      "real_fraction_min": min(fractions),
  }


def write_reference(predictor_dir: str | Path, cases: Sequence[PreprocessedCase]) -> Path:
  """Writes the training reference of a fold's predictor beside its checkpoints."""
  path = Path(predictor_dir) / REFERENCE_FILE
  write_json(path, training_reference(cases))
  return path


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
