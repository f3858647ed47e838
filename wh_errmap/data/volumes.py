"""Training volumes: what the input pipelines read from a case, and the values they pad with.

A NumPy-only leaf shared by the host pipeline (`pipeline`, grain + scipy) and the device
crops (`device_crops`, jax only), so that both compute the same crops and neither imports
the other.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

# Intensity of the background after preprocessing; padding uses it so padded voxels look
# like air rather than tissue.
IMAGE_PAD_VALUE = -1.0
LABEL_PAD_VALUE = 0


class TrainingCase(Protocol):
  """What the input pipelines read from a case (a `preprocess.PreprocessedCase`, or any
  object with these fields): (X, Y, Z) float32 image in [-1, 1] and an (X, Y, Z) integer
  label with classes 0..7 (None for unlabelled cases)."""
  case_id: str
  image: np.ndarray
  label: np.ndarray | None


def training_volumes(cases: Sequence[TrainingCase]) -> list[tuple[np.ndarray, np.ndarray]]:
  """[(image (X, Y, Z) float32, label (X, Y, Z) with the case's integer dtype)] of labelled cases.

  Raises ValueError naming the case if one has no label or its image and label are not equal
  3D shapes. The image is the case's own array when it already is float32.
  """
  for case in cases:
    check_case(case)
  return [(np.asarray(case.image, np.float32), np.asarray(case.label)) for case in cases]


def check_case(case: TrainingCase) -> None:
  """ValueError naming the case unless it has a label of its image's (X, Y, Z) shape."""
  if case.label is None:
    raise ValueError(f"case {case.case_id} has no label; training needs labels")
  if case.image.ndim != 3 or case.label.shape != case.image.shape:
    raise ValueError(f"case {case.case_id}: image {case.image.shape} and label "
                     f"{case.label.shape} must be equal (X, Y, Z) shapes")
