"""Scoring trained models on the test cases of a fold.

Per fold, in the fold's workdir:
    segmentors.json              Dice of every segmentor output on the test cases
    records.csv, records.json    one record per (test case, mask): 10 auto masks + GT
    test_cases.json              the original image and label file of every test case
    predictions/<case>/          NIfTI in the original image space: <mask>_mask (MMWHS
                                 codes), <mask>_error_prob (float), <mask>_error (0/1)
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from wh_errmap.atomic import write_json, write_text
from wh_errmap.data import MMWHS_CODES, NUM_CLASSES, STRUCTURES, save_nifti
from wh_errmap.data.preprocess import PreprocessedCase, restore_to_original
from wh_errmap.inference import error_probability, segment_volume
from wh_errmap.masks import MASK_TYPES
from wh_errmap.metrics import (binary_error_map, error_map_scores, quality_indicator,
                               segmentation_scores, soft_quality_indicator)
from wh_errmap.models.voxresnet import OUTPUT_NAMES, VoxResNet
from wh_errmap.progress import console

Model = tuple[VoxResNet, Any]   # (module, variables)
RECORD_FIELDS = ("case_id", "fold", "mask_type", "err_dsc", "err_acc", "err_prec", "err_recl",
                 "seg_dsc", "seg_acc", "qi", "soft_qi", "true_acc")
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
                     test_cases: Sequence[PreprocessedCase], path: Path) -> str:
  """Mean foreground Dice of every output of every segmentor on the test cases.

  Writes {model: {output: {"dsc": mean, "dsc_per_case": [...], "dsc_per_structure": {...}}}}
  to `path` and returns a printable table.
  """
  results: dict[str, dict[str, Any]] = {}
  for name, (model, variables) in segmentors.items():
    per_output: dict[str, list] = {output: [] for output in OUTPUT_NAMES}
    per_class: dict[str, list] = {output: [] for output in OUTPUT_NAMES}
    for case in test_cases:
      masks = segment_volume(model, variables, case.image[..., None])
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


def all_masks(segmentors: Mapping[str, Model], case: PreprocessedCase) -> dict[str, np.ndarray]:
  """{mask type: (X, Y, Z) uint8} for the 10 auto masks and the GT of one case."""
  masks = {}
  for dims, name in (("3d", "seg3d"), ("2d", "seg2d")):
    model, variables = segmentors[name]
    for output, mask in segment_volume(model, variables, case.image[..., None]).items():
      masks[f"{dims}-{output}"] = mask
  masks["gt"] = case.label
  return {mask_type: masks[mask_type] for mask_type in MASK_TYPES}


def score_masks(masks: Mapping[str, np.ndarray], probs: Mapping[str, np.ndarray],
                label: np.ndarray, threshold: float) -> dict[str, dict[str, float]]:
  """Error-map and segmentation scores of each mask against the label, plus QI."""
  types = list(masks)
  mask = np.stack([masks[t] for t in types]).astype(np.int32)
  prob = np.stack([probs[t] for t in types])
  labels = np.broadcast_to(label.astype(np.int32), mask.shape)
  err = error_map_scores(binary_error_map(prob, threshold), mask != labels)
  seg = segmentation_scores(mask, labels, NUM_CLASSES)
  qi = quality_indicator(prob, threshold)
  soft_qi = soft_quality_indicator(prob)
  return {t: {"err_dsc": float(err["dsc"][i]), "err_acc": float(err["acc"][i]),
              "err_prec": float(err["prec"][i]), "err_recl": float(err["recl"][i]),
              "seg_dsc": float(seg["dsc"][i]), "seg_acc": float(seg["acc"][i]),
              "qi": float(qi[i]), "soft_qi": float(soft_qi[i]), "true_acc": float(seg["acc"][i])}
          for i, t in enumerate(types)}


def write_predictions(directory: Path, case: PreprocessedCase, mask_type: str, mask: np.ndarray,
                      prob: np.ndarray, threshold: float) -> None:
  """A mask and its predicted error map as NIfTI on the original image's grid."""
  affine = np.asarray(case.properties["original_affine"])
  codes = np.asarray((0,) + MMWHS_CODES, np.int16)
  original_prob = restore_to_original(prob.astype(np.float32), case.properties, order=1)
  save_nifti(directory / f"{mask_type}_mask.nii.gz",
             codes[restore_to_original(mask, case.properties, order=0)], affine)
  save_nifti(directory / f"{mask_type}_error_prob.nii.gz", original_prob, affine)
  save_nifti(directory / f"{mask_type}_error.nii.gz",
             (original_prob > threshold).astype(np.uint8), affine)


def evaluate_fold(segmentors: Mapping[str, Model], predictor: Model,
                  test_cases: Sequence[PreprocessedCase], fold: int, directory: Path,
                  threshold: float = 0.5, nifti: str = "all",
                  progress=console) -> list[dict[str, Any]]:
  """Runs the predictor on the 11 masks of every test case and writes the records.

  nifti: which masks get NIfTI outputs: "all", "final" (3d-final, 2d-final, gt) or "none".
  """
  if nifti not in ("all", "final", "none"):
    raise ValueError(f"nifti must be 'all', 'final' or 'none', got {nifti!r}")
  model, variables = predictor
  records = []
  for i, case in enumerate(test_cases):
    masks = all_masks(segmentors, case)
    image = case.image[..., None]
    probs = {t: np.asarray(error_probability(model, variables, image, m, NUM_CLASSES))
             for t, m in masks.items()}
    scores = score_masks(masks, probs, case.label, threshold)
    records += [{"case_id": case.case_id, "fold": fold, "mask_type": t, **scores[t]}
                for t in masks]
    written = {"all": MASK_TYPES, "final": FINAL_MASK_TYPES, "none": ()}[nifti]
    for t in written:
      write_predictions(directory / "predictions" / case.case_id, case, t, masks[t], probs[t],
                        threshold)
    progress(f"[evaluate] {case.case_id} ({i + 1}/{len(test_cases)}): 3d-final Dice "
             f"{scores['3d-final']['seg_dsc']:.3f}, QI {scores['3d-final']['qi']:.4f} vs "
             f"accuracy {scores['3d-final']['true_acc']:.4f}")
  write_records(directory, records)
  write_json(directory / "test_cases.json", {
      case.case_id: {"image_path": case.properties["image_path"],
                     "label_path": case.properties["label_path"]} for case in test_cases})
  return records
