"""Quality control of one segmentation, in memory: `assess(image, mask, model)`.

    from wh_errmap import qc
    result = qc.assess("scan.nii.gz", "scan_mask.nii.gz", "heart.whqc", labels="1:RV,2:Myo,3:LV")
    result.scores["verdict"], result.scores["mean_predicted_dice"], result.error_prob

Nothing is written unless asked (`Assessment.write`). The steps:
1. The mask is read in its label convention (`data.labels`): structures outside the
   seven are dropped (one warning), missing structures and an empty mask are findings.
2. Image and mask are preprocessed as the predictor's training data was, cropped around
   the mask (or the scan's centre for an empty mask), and the predictor gives each voxel's
   probability of being wrong.
3. Every score is computed over the scan's real extent only: where the crop box reaches
   past the scan, the padding is not assessed.
4. The verdict (`qc.verdict`): ok, review, fail or out_of_distribution, by the first rule
   that applies. A scan that looks like another modality than the predictor's training
   scans (by its raw intensities, or its masks' label convention) is out_of_distribution
   unless `Settings.allow_modality`; scores["modality"] records that check either way.
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from wh_errmap.data.labels import (EncodedMask, LabelConvention, detect, dropped_warning,
                                   is_structure_folder, parse_labels, read_structure_folder)
from wh_errmap.data.modality import looks_like
from wh_errmap.data.nifti_io import (case_id_from_path, make_case, read_image_object,
                                     read_volume_file, save_nifti)
from wh_errmap.data.preprocess import (PreprocessConfig, preprocess_case, restore_to_original,
                                       valid_region)
from wh_errmap.data.structures import NUM_CLASSES, STRUCTURES
from wh_errmap.metrics.quality import predicted_dice_terms
from wh_errmap.qc.calibration import MEAN, Calibration
from wh_errmap.qc.predictor import Predictor, load_predictor_file
from wh_errmap.qc.verdict import Settings, modality_reasons, ood_reasons, verdict
from wh_errmap.utils.atomic import removed_on_failure
from wh_errmap.utils.progress import console

Volume = Any   # a NIfTI path, or a nibabel image (a TotalSegmentator folder for masks)


@dataclasses.dataclass(frozen=True)
class Assessment:
  """Scores (JSON-ready) and maps of one assessed mask.

  error_prob: (X, Y, Z) float32 on the image file's own grid (0 outside the assessed box).
  crop: the preprocessed image, mask, error probability and valid region (model grid), for
  figures. convention: the mask's label convention; encoded: how the mask was read.
  """
  scores: dict[str, Any]
  error_prob: np.ndarray
  affine: np.ndarray
  crop: dict[str, Any]
  properties: dict[str, Any]
  convention: LabelConvention
  encoded: EncodedMask

  @property
  def error(self) -> np.ndarray:
    """(X, Y, Z) uint8: 1 where the voxel is predicted wrong."""
    return (self.error_prob > self.scores["threshold"]).astype(np.uint8)

  def errors_by_structure(self) -> np.ndarray:
    """(X, Y, Z) map in the mask's own label values, nonzero only where `error` is 1: a
    predicted-wrong voxel of a structure carries that structure (read from the mask file
    itself), a predicted-wrong background voxel the nearest structure within 2 voxels of the
    model grid (a likely miss of it), or 0 when none is that near."""
    mask = self.crop["mask"]
    near = np.zeros_like(mask)
    if mask.any():
      distance, index = ndimage.distance_transform_edt(mask == 0, return_indices=True)
      near = np.where(distance <= 2, mask[tuple(index)], 0).astype(mask.dtype)
    near = restore_to_original(near, self.properties, order="nearest")
    own = self.encoded.classes
    classes = np.where(self.error > 0, np.where(own > 0, own, near), 0).astype(np.uint8)
    return self.convention.decode(classes)

  def write(self, output_dir: str | os.PathLike, name: str) -> dict[str, Path]:
    """Writes `<name>_error_prob.nii.gz`, `<name>_error.nii.gz` and
    `<name>_errors_by_structure.nii.gz` (all atomically). Returns {kind: path}."""
    folder = Path(output_dir)
    paths = {kind: folder / f"{name}_{kind}.nii.gz"
             for kind in ("error_prob", "error", "errors_by_structure")}
    with removed_on_failure(paths):
      save_nifti(paths["error_prob"], self.error_prob, self.affine)
      save_nifti(paths["error"], self.error, self.affine)
      save_nifti(paths["errors_by_structure"], self.errors_by_structure(), self.affine)
    return paths


def convention_from(labels: str | LabelConvention | None) -> LabelConvention | None:
  """--labels as given: None or "" (decided per mask by `labels.detect`), a spec, or one."""
  if labels is None or isinstance(labels, LabelConvention):
    return labels
  return parse_labels(labels) if str(labels).strip() else None


def read_volume(volume: Volume, what: str) -> tuple[np.ndarray, np.ndarray, str]:
  """(data, affine, name) of a path or a nibabel image; errors name the file."""
  if isinstance(volume, (str, os.PathLike)):
    return (*read_volume_file(volume), str(volume))
  name = getattr(volume, "get_filename", lambda: None)() or f"<{what} in memory>"
  return (*read_image_object(volume, name), name)


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A pair read and preprocessed as the predictor's training data was: what the predictor
  needs (`image`, `mask`: the crop, model grid) and what scoring needs afterwards.
  seconds: time spent reading the files ("read") and resampling ("resample")."""
  image: np.ndarray
  mask: np.ndarray
  valid: np.ndarray
  properties: dict[str, Any]
  convention: LabelConvention
  encoded: EncodedMask
  reference: np.ndarray | None
  seconds: dict[str, float]


def prepare(image: Volume, mask: Volume, predictor: Predictor,
            labels: str | LabelConvention | None = None,
            progress: Callable[[str], None] = console,
            reference: Volume | None = None) -> Prepared:
  """Reads `mask` of `image` in its label convention and preprocesses both (steps 1-2 of
  the module docstring, without the predictor). Raises InvalidCaseError for unusable input."""
  start = time.perf_counter()
  convention = convention_from(labels)
  image_volume = read_volume(image, "image")
  if isinstance(mask, (str, os.PathLike)) and is_structure_folder(mask):
    raw, affine, folder_convention = read_structure_folder(mask)
    mask_volume, convention = (raw, affine, str(mask)), convention or folder_convention
  else:
    mask_volume = read_volume(mask, "mask")
  read: dict[str, Any] = {}

  def encode(path, raw: np.ndarray) -> np.ndarray:
    read["convention"] = convention or detect(path, raw)
    read["encoded"] = read["convention"].encode(path, raw)
    return read["encoded"].classes

  case = make_case(image_volume, mask_volume, case_id_from_path(image_volume[2]), encode)
  encoded, convention = read["encoded"], read["convention"]
  warning = dropped_warning(mask_volume[2], encoded, convention)
  if warning:
    progress(warning)
  resample = time.perf_counter()
  preprocess = PreprocessConfig.from_config(predictor.config)
  pre = preprocess_case(case, preprocess)
  truth = None
  if reference is not None:
    truth_case = make_case(image_volume, read_volume(reference, "reference"), case.case_id,
                           lambda path, raw: convention.encode(path, raw).classes)
    truth = preprocess_case(truth_case, preprocess, crop_label=case.label).label
  seconds = {"read": resample - start, "resample": time.perf_counter() - resample}
  return Prepared(pre.image, pre.label, valid_region(pre.properties), pre.properties,
                  convention, encoded, truth, seconds)


def finish(prepared: Prepared, prob: np.ndarray, predictor: Predictor,
           settings: Settings | None = None) -> Assessment:
  """Scores a prepared pair from the predictor's error map of it (`Predictor.error_map` of
  its image and mask) and maps the map back onto the image file's grid (steps 3-4)."""
  settings = settings or Settings()
  calibration = (Calibration.from_dict(predictor.calibration) if predictor.calibration
                 else None)
  if calibration is not None:   # the threshold fitted on the user's own cases
    settings = dataclasses.replace(settings, threshold=calibration.threshold)
  valid, properties = prepared.valid, prepared.properties
  prob = np.where(valid, prob, 0.0).astype(np.float32)
  scores = assessment_scores(prepared.image, prepared.mask, prob, valid, properties, predictor,
                             prepared.convention, prepared.encoded, settings, calibration)
  crop = {"image": prepared.image, "mask": prepared.mask, "error_prob": prob, "valid": valid,
          "spacing": tuple(properties["spacing"])}
  if prepared.reference is not None:
    crop["reference"] = prepared.reference
    scores["true"] = true_scores(prepared.mask, prepared.reference, valid, prepared.convention)
  restored = restore_to_original(prob, properties, order=1).astype(np.float32)
  return Assessment(scores, restored, np.asarray(properties["original_affine"]), crop,
                    properties, prepared.convention, prepared.encoded)


def assess(image: Volume, mask: Volume, model: Predictor | str | os.PathLike,
           labels: str | LabelConvention | None = None, settings: Settings | None = None,
           progress: Callable[[str], None] = console,
           reference: Volume | None = None) -> Assessment:
  """Assesses `mask` (a path, a nibabel image, or a TotalSegmentator per-structure folder)
  of `image` (a path or a nibabel image) with `model` (a Predictor or a model file path).

  labels: the mask's label convention (see `data.labels.parse_labels`); None accepts
  MMWHS codes only. Raises InvalidCaseError (one line, naming the file) for unusable input.
  reference: the image's ground truth, in the mask's convention, for scoring only
  (calibration): it is cropped with the mask's box, never places it. Adds scores["true"]
  (true Dice per structure and their mean, accuracy) and crop["reference"].
  """
  predictor = model if isinstance(model, Predictor) else load_predictor_file(model)
  prepared = prepare(image, mask, predictor, labels, progress, reference)
  return finish(prepared, predictor.error_map(prepared.image, prepared.mask), predictor,
                settings)


def true_scores(mask: np.ndarray, reference: np.ndarray, valid: np.ndarray,
                convention: LabelConvention) -> dict[str, Any]:
  """The mask's true quality against its ground truth, over the valid voxels: Dice per
  structure of the convention (None when absent from both), their mean (a structure absent
  from the mask but present in the truth counts 0) and voxel accuracy."""
  m, r = mask[valid], reference[valid]
  dice = {}
  for c, name in enumerate(STRUCTURES, start=1):
    if convention.structure_value(c) is None:
      continue
    both = int(np.sum(m == c)) + int(np.sum(r == c))
    dice[name] = 2.0 * float(np.sum((m == c) & (r == c))) / both if both else None
  values = [d for d in dice.values() if d is not None]
  return {"dice": dice, "mean_dice": float(np.mean(values)) if values else None,
          "accuracy": float(np.mean(m == r)) if m.size else None}


def assessment_scores(image: np.ndarray, mask: np.ndarray, prob: np.ndarray, valid: np.ndarray,
                      properties: dict, predictor: Predictor, convention: LabelConvention,
                      encoded: EncodedMask, settings: Settings,
                      calibration: Calibration | None = None) -> dict[str, Any]:
  """Every score of one assessment of a preprocessed (X, Y, Z) image, mask (classes 0..7) and
  error probability, over the valid voxels only (the scan's own, where the assessed box
  reaches past it): the predicted errors and mask voxels of the padding count nowhere."""
  prob = np.where(valid, prob, 0.0)
  mask = np.where(valid, mask, 0)
  ml = float(np.prod(properties["spacing"])) / 1000.0
  tp, fp, fn = predicted_dice_terms(mask, prob, NUM_CLASSES, 1)
  counts = np.bincount(mask.ravel(), minlength=NUM_CLASSES)
  structures = {}
  for c, name in enumerate(STRUCTURES, start=1):
    value = convention.structure_value(c)
    den = 2 * tp[c - 1] + fp[c - 1] + fn[c - 1]
    structures[name] = {
        "label_value": value, "label_name": None if value is None else convention.names[value],
        "present": bool(counts[c]), "mask_volume_ml": float(counts[c]) * ml,
        "predicted_dice": float(2 * tp[c - 1] / den) if counts[c] and den > 0 else None,
        "predicted_error_ml": float(fp[c - 1] + fn[c - 1]) * ml}
  expected = [s for s, v in structures.items() if v["label_value"] is not None]
  dice = [structures[s]["predicted_dice"] or 0.0 for s in expected]
  wrong = (prob > settings.threshold) & valid
  scores = {
      "threshold": settings.threshold,
      "qi": float(1.0 - wrong.sum() / max(1, valid.sum())),
      "soft_qi": float(1.0 - prob[valid].sum() / max(1, valid.sum())),
      "mean_predicted_dice": float(np.mean(dice)) if dice else None,
      "min_predicted_dice": float(np.min(dice)) if dice else None,
      "predicted_error_ml": float(wrong.sum()) * ml,
      "assessed_voxels": int(valid.sum()), "box_voxels": int(valid.size),
      "voxel_ml": ml, "label_convention": convention.name,
      "structures": structures,
      "missing": [s for s in expected if not structures[s]["present"]],
      "not_in_convention": [s for s in STRUCTURES if s not in expected],
      "empty": bool(encoded.empty),
      "dropped_labels": {str(v): n for v, n in encoded.dropped.items()},
  }
  if calibration is not None:
    for name in expected:
      d = structures[name]["predicted_dice"]
      structures[name]["calibrated_dice"] = calibration.calibrated(name, d)
      structures[name]["dice_lower_bound"] = calibration.lower_bound(name, d)
    mean = scores["mean_predicted_dice"]
    scores["calibrated_mean_dice"] = calibration.calibrated(MEAN, mean)
    scores["mean_dice_lower_bound"] = calibration.lower_bound(MEAN, mean)
    scores["calibration"] = {"cases": calibration.cases, "method": calibration.method,
                             "alpha": calibration.bounds.alpha, "source": calibration.source}
  profile = properties["intensity_profile"]
  findings = modality_reasons(profile, convention, predictor.reference)
  scores["modality"] = {"model": (predictor.reference or {}).get("modality"),
                        "image": looks_like(profile), "header": convention.modality,
                        "profile": profile, "findings": findings,
                        "allowed": settings.allow_modality}
  ood = ([] if settings.allow_modality else findings) + ood_reasons(
      image, mask, valid, properties, predictor.reference, settings)
  scores["verdict"], scores["reasons"] = verdict(scores, ood, settings)
  scores["training_reference"] = predictor.reference is not None
  return scores
