"""Scoring trained models on the test cases of a fold.

Test cases are whole resampled scans (`TestScans`): the segmentors see the whole scan, and
each mask being assessed is cropped around itself by the same rule as `predict`
(preprocess.crop_box around the mask's foreground, then only the scan's real voxels are
scored). Ground truth is used only to score, never to place a crop.

Per fold, in the fold's workdir:
    segmentors.json              Dice of every segmentor output on the test cases
    records.csv, records.json    one record per (test case, mask): 10 auto masks + GT
    test_cases.json              the original image and label file of every test case
    predictions/<case>/          NIfTI in the original image space: <mask>_mask (MMWHS
                                 codes), <mask>_error_prob (float), <mask>_error (0/1)
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from wh_errmap.data.dataset import Dataset
from wh_errmap.data.nifti_io import save_nifti
from wh_errmap.data.preprocess import (PreprocessConfig, PreprocessedCase, crop_box,
                                       restore_to_original, take)
from wh_errmap.data.structures import MMWHS_CODES, NUM_CLASSES, STRUCTURES
from wh_errmap.metrics.quality import calibration_bins, predicted_dice
from wh_errmap.metrics.segmentation import (binary_error_map, error_map_scores, quality_indicator,
                                            segmentation_scores, soft_quality_indicator)
from wh_errmap.models.factory import predictor_model, segmentor_model
from wh_errmap.models.inference import (bucket_shape, inference_mesh, place, predict_error_map,
                                        segment_volume, segment_volume_with_uncertainty)
from wh_errmap.models.voxresnet import OUTPUT_NAMES, VoxResNet
from wh_errmap.train.masks import MASK_TYPES
from wh_errmap.utils.atomic import write_json, write_text
from wh_errmap.utils.progress import console

Model = tuple[VoxResNet, Any]   # (module, variables)
RECORD_FIELDS = (
    "case_id", "fold", "mask_type", "err_dsc", "err_acc", "err_prec", "err_recl", "seg_dsc",
    "seg_acc", "qi", "soft_qi", "true_acc", "pd_mean",
    *(f"pd_{s}" for s in STRUCTURES), *(f"dsc_{s}" for s in STRUCTURES),
    # The softmax-uncertainty baseline (auto masks only; NaN for the GT mask).
    "base_err_dsc", "base_err_prec", "base_err_recl", "base_qi", "base_soft_qi", "base_pd_mean")
CALIBRATION_FILE = "calibration.json"
NUM_CALIBRATION_BINS = 10
# Each mask's crop is padded to a multiple of this for the predictor (one compiled program
# per bucket of crop sizes; see inference.predict_error_map).
SHAPE_BUCKET = 16
# With nifti="final", only these masks' volumes are written.
FINAL_MASK_TYPES = ("3d-final", "2d-final", "gt")


def write_records(directory: Path, records: Sequence[dict[str, Any]]) -> None:
  """records.csv and records.json, written atomically."""
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=RECORD_FIELDS)
  writer.writeheader()
  writer.writerows(records)
  write_text(directory / "records.csv", buffer.getvalue())
  write_json(directory / "records.json", list(records))


def read_records(directory: Path) -> list[dict[str, Any]]:
  return json.loads((directory / "records.json").read_text())


def score_segmentors(segmentors: Mapping[str, tuple[VoxResNet, Any]],
                     test_cases: Sequence[PreprocessedCase], path: Path,
                     mesh: jax.sharding.Mesh | None = None) -> str:
  """Mean foreground Dice of every output of every segmentor on the test cases.

  mesh: whole-volume inference splits each volume over it (inference.inference_mesh).

  Writes {model: {output: {"dsc": mean, "dsc_per_case": [...], "dsc_per_structure": {...}}}}
  to `path` and returns a printable table.
  """
  results: dict[str, dict[str, Any]] = {}
  for name, (model, variables) in segmentors.items():
    variables, = place(mesh, variables)
    per_output: dict[str, list] = {output: [] for output in OUTPUT_NAMES}
    per_class: dict[str, list] = {output: [] for output in OUTPUT_NAMES}
    for case in test_cases:
      masks = segment_volume(model, variables, case.image[..., None], mesh)
      for output in OUTPUT_NAMES:
        scores = segmentation_scores(masks[output][None], case.label[None], NUM_CLASSES)
        per_output[output].append(float(scores["dsc"][0]))
        per_class[output].append(np.asarray(scores["dsc_per_class"][0]))
    results[name] = {
        output: {"dsc": float(np.mean(per_output[output])),
                 "dsc_per_case": dict(zip([c.case_id for c in test_cases], per_output[output])),
                 "dsc_per_structure": dict(zip(STRUCTURES, np.nanmean(
                     np.stack(per_class[output]), axis=0).tolist()))}
        for output in OUTPUT_NAMES}
  write_json(path, results)
  header = f"{'test Dice':<10}" + "".join(f"{o:>8}" for o in OUTPUT_NAMES)
  rows = [header] + [f"{name:<10}" + "".join(f"{results[name][o]['dsc']:8.3f}"
                                              for o in OUTPUT_NAMES) for name in results]
  return "\n".join(rows + [f"(mean foreground Dice over {len(test_cases)} test cases; {path})"])


def all_masks(segmentors: Mapping[str, Model], case: PreprocessedCase,
              mesh: jax.sharding.Mesh | None = None,
              ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """The 10 auto masks and the GT of one case, and the auto masks' softmax uncertainty.

  Returns ({mask type: (X, Y, Z) uint8}, {auto mask type: (X, Y, Z) float32 1 - max
  softmax probability of the output that made it}).
  """
  masks, uncertainty = {}, {}
  for dims, name in (("3d", "seg3d"), ("2d", "seg2d")):
    model, variables = segmentors[name]
    outputs = segment_volume_with_uncertainty(model, variables, case.image[..., None], mesh)
    for output, (mask, unsure) in outputs.items():
      masks[f"{dims}-{output}"], uncertainty[f"{dims}-{output}"] = mask, unsure
  masks["gt"] = case.label
  return {mask_type: masks[mask_type] for mask_type in MASK_TYPES}, uncertainty


def score_masks(masks: Mapping[str, np.ndarray], probs: Mapping[str, np.ndarray],
                label: np.ndarray, threshold: float,
                baseline: Mapping[str, np.ndarray] | None = None,
                valid: np.ndarray | None = None) -> dict[str, dict[str, float]]:
  """Error-map and segmentation scores of each mask against the label, QI, soft QI, the
  predicted Dice per structure (metrics.quality.predicted_dice) beside the true one, and the
  same QC scores of the softmax-uncertainty baseline for the masks in `baseline`.

  valid: (X, Y, Z) bool, the voxels scored (the scan's real voxels of a crop that reaches
  past it); None scores every voxel. Masks and label must be 0 outside it."""
  types = list(masks)
  mask = np.stack([masks[t] for t in types]).astype(np.int32)
  labels = np.broadcast_to(label.astype(np.int32), mask.shape)
  valid = np.ones(label.shape, bool) if valid is None else np.asarray(valid, bool)
  padded_mask, padded_labels, inside = _bucketed(mask, labels, valid)
  seg = segmentation_scores(padded_mask, padded_labels, NUM_CLASSES, inside)
  own = _error_map_qc(mask, labels, np.stack([probs[t] for t in types]), threshold, valid)
  baseline = baseline or {}
  with_base = [i for i, t in enumerate(types) if t in baseline]
  base = (_error_map_qc(mask[with_base], labels[with_base],
                        np.stack([baseline[types[i]] for i in with_base]), threshold, valid)
          if with_base else {})
  scores = {}
  for i, t in enumerate(types):
    j = with_base.index(i) if i in with_base else None
    scores[t] = {
        **{k: float(own[k][i]) for k in ("err_dsc", "err_acc", "err_prec", "err_recl")},
        "seg_dsc": float(seg["dsc"][i]), "seg_acc": float(seg["acc"][i]),
        "qi": float(own["qi"][i]), "soft_qi": float(own["soft_qi"][i]),
        "true_acc": float(seg["acc"][i]), "pd_mean": float(own["pd_mean"][i]),
        **{f"pd_{s}": float(v) for s, v in zip(STRUCTURES, own["pd"][i])},
        **{f"dsc_{s}": float(v) for s, v in zip(STRUCTURES, np.asarray(seg["dsc_per_class"][i]))},
        **{f"base_{k}": float("nan") if j is None else float(base[k][j])
           for k in ("err_dsc", "err_prec", "err_recl", "qi", "soft_qi", "pd_mean")}}
  return scores


def _bucketed(*arrays: np.ndarray) -> list[np.ndarray]:
  """(M, X, Y, Z) arrays and last an (X, Y, Z) valid map -> the arrays zero-padded to a
  multiple of SHAPE_BUCKET along X, Y, Z and the valid map broadcast to (M, ...) and padded
  with False: the metrics score the same voxels, compiled once per bucket of crop sizes."""
  *volumes, valid = arrays
  valid = np.broadcast_to(valid, volumes[0].shape)
  target = bucket_shape(valid.shape[1:], SHAPE_BUCKET)
  widths = [(0, 0)] + [(0, t - n) for n, t in zip(valid.shape[1:], target)]
  return [np.pad(a, widths) for a in (*volumes, valid)]


def _error_map_qc(mask: np.ndarray, labels: np.ndarray, prob: np.ndarray,
                  threshold: float, valid: np.ndarray) -> dict[str, np.ndarray]:
  """Scores of error maps (M, X, Y, Z) of masks (M, X, Y, Z) against their labels, over the
  voxels `valid` (X, Y, Z) marks: err_* (M,), qi, soft_qi (M,), pd (M, 7) predicted Dice
  per structure and pd_mean (M,), the mean over the structures with an estimate (NaN if
  none has one)."""
  prob = np.where(valid, prob, 0.0)   # no predicted error outside the scored voxels
  pred_error, true_error, padded_prob, inside = _bucketed(
      binary_error_map(prob, threshold), mask != labels, prob, valid)
  err = error_map_scores(pred_error, true_error, inside)
  pd = np.stack([predicted_dice(m, p, NUM_CLASSES) for m, p in zip(mask, prob)])
  has_estimate = np.isfinite(pd).any(axis=1)
  pd_mean = np.full(len(pd), np.nan)
  pd_mean[has_estimate] = np.nanmean(pd[has_estimate], axis=1)
  return {**{f"err_{k}": np.asarray(err[k]) for k in ("dsc", "acc", "prec", "recl")},
          "qi": np.asarray(quality_indicator(padded_prob, threshold, inside)),
          "soft_qi": np.asarray(soft_quality_indicator(padded_prob, inside)), "pd": pd,
          "pd_mean": pd_mean}


class CalibrationCounts:
  """Reliability-diagram bins of voxel error probabilities, summed over masks.

  Kept per source ("predictor" on the auto masks, "predictor_gt" on the GT masks,
  "baseline" = softmax uncertainty on the auto masks) and written to calibration.json.
  """

  def __init__(self):
    self.bins: dict[str, dict[str, np.ndarray]] = {}

  def add(self, source: str, prob: np.ndarray, error: np.ndarray) -> None:
    new = calibration_bins(prob, error, NUM_CALIBRATION_BINS)
    old = self.bins.get(source)
    self.bins[source] = new if old is None else {k: old[k] + new[k] for k in new}

  def to_json(self) -> dict[str, dict[str, list]]:
    return {source: {k: v.tolist() for k, v in bins.items()} for source, bins in self.bins.items()}


def write_predictions(directory: Path, properties: dict[str, Any], mask_type: str,
                      mask: np.ndarray, prob: np.ndarray, threshold: float) -> None:
  """A mask and its predicted error map (on the crop `properties` describes) as NIfTI on
  the original image's grid."""
  affine = np.asarray(properties["original_affine"])
  codes = np.asarray((0,) + MMWHS_CODES, np.int16)
  original_prob = restore_to_original(prob.astype(np.float32), properties, order=1)
  save_nifti(directory / f"{mask_type}_mask.nii.gz",
             codes[restore_to_original(mask, properties, order=0)], affine)
  save_nifti(directory / f"{mask_type}_error_prob.nii.gz", original_prob, affine)
  save_nifti(directory / f"{mask_type}_error.nii.gz",
             (original_prob > threshold).astype(np.uint8), affine)


def assessed_crop(case: PreprocessedCase, mask: np.ndarray, config: PreprocessConfig,
                  ) -> tuple[dict[str, Any], np.ndarray]:
  """Where a mask of a whole-scan case is assessed: the crop box around the mask itself
  (preprocess.crop_box, as `predict` crops), never around the ground truth.

  Returns (the case's properties with that crop box, (X, Y, Z) bool real-voxel map of the
  crop: the box may reach past the scan)."""
  start, stop = crop_box(mask, case.image.shape, case.properties["spacing"], config)
  offset = np.asarray(case.properties["crop_start"])
  properties = dict(case.properties, crop_start=(offset + start).tolist(),
                    crop_stop=(offset + stop).tolist())
  return properties, take(np.ones(case.image.shape, bool), start, stop, False)


def evaluate_fold(segmentors: Mapping[str, Model], predictor: Model,
                  test_cases: Sequence[PreprocessedCase], fold: int, directory: Path,
                  threshold: float = 0.5, nifti: str = "all", progress=console,
                  mesh: jax.sharding.Mesh | None = None,
                  preprocess: PreprocessConfig = PreprocessConfig()) -> list[dict[str, Any]]:
  """Runs the predictor on the 11 masks of every test case and writes the records.

  test_cases: whole scans (Dataset.whole_scans); each mask is assessed on its own crop
  (`assessed_crop`, with the box rule of `preprocess`), scored over the scan's voxels.
  nifti: which masks get NIfTI outputs: "all", "final" (3d-final, 2d-final, gt) or "none".
  mesh: whole-volume inference splits each volume over it (inference.inference_mesh).
  """
  if nifti not in ("all", "final", "none"):
    raise ValueError(f"nifti must be 'all', 'final' or 'none', got {nifti!r}")
  model, variables = predictor
  # Placed once: the models' variables stay on the mesh for every case.
  variables, = place(mesh, variables)
  segmentors = {name: (m, place(mesh, v)[0]) for name, (m, v) in segmentors.items()}
  records = []
  calibration = CalibrationCounts()
  written = {"all": MASK_TYPES, "final": FINAL_MASK_TYPES, "none": ()}[nifti]
  for i, case in enumerate(test_cases):
    masks, uncertainty = all_masks(segmentors, case, mesh)
    scores = {}
    for t, whole_mask in masks.items():
      properties, valid = assessed_crop(case, whole_mask, preprocess)
      start = np.asarray(properties["crop_start"]) - np.asarray(case.properties["crop_start"])
      stop = start + valid.shape
      mask, label = take(whole_mask, start, stop, 0), take(case.label, start, stop, 0)
      image = take(case.image, start, stop, -1.0)[..., None]
      prob = np.where(valid, predict_error_map(model, variables, image, mask, NUM_CLASSES,
                                               mesh, SHAPE_BUCKET), 0.0).astype(np.float32)
      unsure = ({t: take(uncertainty[t], start, stop, 0.0)} if t in uncertainty else None)
      scores[t] = score_masks({t: mask}, {t: prob}, label, threshold, baseline=unsure,
                              valid=valid)[t]
      error = (mask != label)[valid]
      calibration.add("predictor_gt" if t == "gt" else "predictor", prob[valid], error)
      if unsure:
        calibration.add("baseline", unsure[t][valid], error)
      if t in written:
        write_predictions(directory / "predictions" / case.case_id, properties, t, mask, prob,
                          threshold)
    records += [{"case_id": case.case_id, "fold": fold, "mask_type": t, **scores[t]}
                for t in masks]
    progress(f"[evaluate] {case.case_id} ({i + 1}/{len(test_cases)}): 3d-final Dice "
             f"{scores['3d-final']['seg_dsc']:.3f}, QI {scores['3d-final']['qi']:.4f} vs "
             f"accuracy {scores['3d-final']['true_acc']:.4f}")
  write_records(directory, records)
  write_json(directory / CALIBRATION_FILE, calibration.to_json())
  write_json(directory / "test_cases.json", {
      case.case_id: {"image_path": case.properties["image_path"],
                     "label_path": case.properties["label_path"]} for case in test_cases})
  return records


@dataclasses.dataclass(frozen=True)
class TestScans:
  """A fold's test cases as whole scans, and the mesh whole-volume inference splits them
  over (`inference_mesh`, from config mesh.space; None: one device). Scores trained
  variables with the models built for that mesh."""
  cases: list[PreprocessedCase]
  mesh: jax.sharding.Mesh | None
  preprocess: PreprocessConfig

  @classmethod
  def of(cls, dataset: Dataset, test_cases: Sequence[PreprocessedCase],
         space: int | str) -> "TestScans":
    return cls(dataset.whole_scans(test_cases), inference_mesh(space), dataset.preprocess)

  def _models(self, config: ml_collections.ConfigDict, segmentors: Mapping[str, Any],
              predictor: Any = None) -> tuple[dict[str, Model], Model | None]:
    space = 1 if self.mesh is None else self.mesh.shape["space"]
    return ({name: (segmentor_model(config, name, space), variables)
             for name, variables in segmentors.items()},
            None if predictor is None else (predictor_model(config, space), predictor))

  def score_segmentors(self, config: ml_collections.ConfigDict,
                       segmentors: Mapping[str, Any], path: Path) -> str:
    """`score_segmentors` of the segmentors' variables (by name) on these scans."""
    models, _ = self._models(config, segmentors)
    return score_segmentors(models, self.cases, path, self.mesh)

  def evaluate(self, config: ml_collections.ConfigDict, segmentors: Mapping[str, Any],
               predictor: Any, fold: int, directory: Path, nifti: str,
               progress=console) -> list[dict[str, Any]]:
    """`evaluate_fold` of trained variables (segmentors by name, the predictor's) on these
    scans, at config.predictor.threshold."""
    models, predictor_pair = self._models(config, segmentors, predictor)
    return evaluate_fold(models, predictor_pair, self.cases, fold, directory,
                         config.predictor.threshold, nifti, progress, self.mesh,
                         self.preprocess)
