"""Quality control of (image, mask) pairs and folders, written to an output folder.

A pair's outputs are named after the image and the mask, `<image case>__<mask name>_...`,
so two masks of one scan never share a file:
  _error_prob.nii.gz           probability that each voxel of the mask is wrong
  _error.nii.gz                1 where it is predicted wrong (probability > threshold)
  _errors_by_structure.nii.gz  the wrong voxels, in the mask's own label values
  _qc.png                      three slices through the worst region (with --figures)
  _qc.json                     scores, verdict, inputs and predictor: the pair's result
The `_qc.json`, written last, is the result; maps without it are leftovers of an
interrupted assessment. An existing result is only replaced with `overwrite`; without it
the same assessment (same files, predictor and settings) is reused, and any other is an
error for that pair. After every run the folder's `qc.tsv` (one row per result in it),
`index.html` (a gallery) and the ITK-SNAP / 3D Slicer label files are rewritten.

The predictor only reads its run (checkpoints restored read-only) or its model file.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import glob
import hashlib
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from wh_errmap.data.labels import LabelConvention
from wh_errmap.data.nifti_io import InvalidCaseError
from wh_errmap.data.structures import STRUCTURES
from wh_errmap.errors import UserError
from wh_errmap.qc.assessment import Prepared, convention_from, finish, prepare
from wh_errmap.qc.colours import write_colour_tables
from wh_errmap.qc.figure import case_figure
from wh_errmap.qc.gallery import write_gallery
from wh_errmap.qc.pairing import image_case, nifti_files, pair_name
from wh_errmap.qc.predictor import Predictor
from wh_errmap.qc.verdict import Settings
from wh_errmap.utils.atomic import atomic_path, removed_on_failure, write_json
from wh_errmap.utils.progress import console

Progress = Callable[[str], None]
# What makes two assessments of a pair the same, with the words that name a difference.
IDENTITY = {"image_sha256": "image file contents", "mask_sha256": "mask file contents",
             "threshold": "threshold", "settings": "verdict settings",
             "labels": "label convention",
             "predictor": "predictor (run, model file, fold or checkpoint)"}
TSV_FILE = "qc.tsv"
# What a pair writes, after `<pair>`.
OUTPUT_SUFFIXES = ("_error_prob.nii.gz", "_error.nii.gz", "_errors_by_structure.nii.gz",
                   "_qc.png", "_qc_thumb.png", "_qc.json")


@dataclasses.dataclass(frozen=True)
class Pending:
  """A pair read and preprocessed whose result is still to be computed and written."""
  name: str
  image: Path
  mask: Path
  identity: dict[str, Any]
  prepared: Prepared


def settings_identity(predictor: Predictor, settings: Settings,
                      convention: LabelConvention | None) -> dict[str, Any]:
  """The part of `IDENTITY` that a whole run shares: threshold, verdict settings, label
  convention and predictor."""
  return {"threshold": settings.threshold,
          "settings": {k: v for k, v in vars(settings).items() if k != "threshold"},
          "labels": None if convention is None else convention.to_json(),
          "predictor": predictor.provenance}


def identity_of(image_path: Path, mask_path: Path, predictor: Predictor, settings: Settings,
                convention: LabelConvention | None) -> dict[str, Any]:
  """What makes two assessments of a pair the same (`IDENTITY`): the inputs' contents and
  `settings_identity`."""
  return {"image_sha256": _sha256(image_path), "mask_sha256": _sha256(mask_path),
          **settings_identity(predictor, settings, convention)}


def begin(image_path: str | Path, mask_path: str | Path, predictor: Predictor,
          output_dir: str | Path, settings: Settings = Settings(),
          labels: str | LabelConvention | None = None, overwrite: bool = False,
          progress: Progress = console) -> tuple[dict[str, Any] | None, Pending | None]:
  """The first half of `assess`: (the pair's existing result, None) when `<pair>_qc.json`
  already holds this very assessment and its files are there; else (None, the pair read and
  preprocessed). Raises UserError when the folder holds another assessment of the pair and
  not overwrite, InvalidCaseError for unusable input."""
  image_path, mask_path, output_dir = Path(image_path), Path(mask_path), Path(output_dir)
  name = pair_name(image_path, mask_path)
  report = output_dir / f"{name}_qc.json"
  convention = convention_from(labels)
  identity = identity_of(image_path, mask_path, predictor, settings, convention)
  if report.exists() and not overwrite:
    previous = _same_assessment(report, identity, name)
    if all((output_dir / f).exists() for f in previous.get("files", [])):
      return previous, None
  prepared = prepare(image_path, mask_path, predictor, convention, progress)
  return None, Pending(name, image_path, mask_path, identity, prepared)


def complete(pending: Pending, prob: np.ndarray, predictor: Predictor, output_dir: str | Path,
             settings: Settings = Settings(), figures: bool = True) -> dict[str, Any]:
  """The second half of `assess`: scores the pair from its error map `prob` and writes its
  outputs, `_qc.json` last; on a failure the files written are removed."""
  output_dir, name = Path(output_dir), pending.name
  report = output_dir / f"{name}_qc.json"
  assessment = finish(pending.prepared, prob, predictor, settings)
  report.unlink(missing_ok=True)   # an old result must not describe the new maps
  _remove_leftovers(output_dir, name)
  paths: dict[str, Path] = {}
  with removed_on_failure(paths):
    paths.update(assessment.write(output_dir, name))
    if figures:
      paths["png"] = output_dir / f"{name}_qc.png"
      paths["thumbnail"] = output_dir / f"{name}_qc_thumb.png"
      crop = assessment.crop
      case_figure(paths["png"], crop["image"], crop["mask"], crop["error_prob"],
                  crop["spacing"], f"{name}: {assessment.scores['verdict']}",
                  assessment.scores["threshold"], crop["valid"],
                  thumbnail_path=paths["thumbnail"])
    result = {"pair": name, "case_id": image_case(pending.image),
              "image": str(pending.image.absolute()), "mask": str(pending.mask.absolute()),
              **pending.identity, **assessment.scores,
              "convention": assessment.convention.to_json(),
              "files": sorted(p.name for p in paths.values())}
    write_json(report, result)
  return result


def assess(image_path: str | Path, mask_path: str | Path, predictor: Predictor,
           output_dir: str | Path, settings: Settings = Settings(),
           labels: str | LabelConvention | None = None, overwrite: bool = False,
           figures: bool = True, progress: Progress = console,
           ) -> tuple[dict[str, Any], bool]:
  """Assesses one mask (a file, or a TotalSegmentator per-structure folder) of an image and
  writes the pair's outputs (see the module docstring). On a failure the files written are
  removed.

  Returns (result, reused): reused when `<pair>_qc.json` already held this very assessment
  (nothing is recomputed). Raises UserError when it holds another one and not overwrite.
  """
  previous, pending = begin(image_path, mask_path, predictor, output_dir, settings, labels,
                            overwrite, progress)
  if pending is None:
    return previous, True
  prob = predictor.error_map(pending.prepared.image, pending.prepared.mask)
  return complete(pending, prob, predictor, output_dir, settings, figures), False


def _remove_leftovers(output_dir: Path, name: str) -> None:
  """Removes the temporary files that a killed assessment of the pair left (atomic_path's
  `.<file>.*`); other pairs' are not touched."""
  for suffix in OUTPUT_SUFFIXES:
    for path in output_dir.glob(f".{glob.escape(name)}{suffix}.*"):
      path.unlink(missing_ok=True)


def write_summary(output_dir: Path, payload: dict[str, Any]) -> Path:
  """Writes a folder run's summary to a new `summary-<date>-<time>[-n].json`: summaries
  of earlier runs are never replaced."""
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  path, n = output_dir / f"summary-{stamp}.json", 1
  while True:
    try:
      path.touch(exist_ok=False)   # claims the name: a run beside this one takes the next
    except FileExistsError:
      n += 1
      path = output_dir / f"summary-{stamp}-{n}.json"
      continue
    write_json(path, payload)
    return path


def folder_results(output_dir: Path) -> list[dict[str, Any]]:
  """Every pair result (`*_qc.json`) in an output folder, by pair name; unreadable ones
  are left out."""
  results = []
  for path in sorted(Path(output_dir).glob("*_qc.json")):
    try:
      result = json.loads(path.read_text())
    except (OSError, ValueError):
      continue
    if isinstance(result, dict) and "pair" in result and "verdict" in result:
      results.append(result)
  return results


TSV_COLUMNS = (["pair", "verdict", "reasons", "mean_predicted_dice", "min_predicted_dice",
                "calibrated_mean_dice", "mean_dice_lower_bound",
                "qi", "soft_qi", "predicted_error_ml"]
               + [f"dice_{s}" for s in STRUCTURES]
               + [f"dice_lower_bound_{s}" for s in STRUCTURES]
               + [f"error_ml_{s}" for s in STRUCTURES]
               + [f"volume_ml_{s}" for s in STRUCTURES]
               + ["missing", "dropped_labels", "label_convention", "image", "mask"])


def tsv_row(result: dict[str, Any]) -> dict[str, Any]:
  """One qc.tsv row: blank for no value, numbers with 4 decimals (Dice, QI) or 2 (ml)."""
  def number(value, digits):
    return "" if value is None else f"{value:.{digits}f}"
  structures = result.get("structures", {})
  row = {"pair": result["pair"], "verdict": result["verdict"],
         "reasons": "; ".join(result.get("reasons", [])),
         "mean_predicted_dice": number(result.get("mean_predicted_dice"), 4),
         "min_predicted_dice": number(result.get("min_predicted_dice"), 4),
         # with a calibrated model file (calibrate): blank otherwise
         "calibrated_mean_dice": number(result.get("calibrated_mean_dice"), 4),
         "mean_dice_lower_bound": number(result.get("mean_dice_lower_bound"), 4),
         "qi": number(result.get("qi"), 4), "soft_qi": number(result.get("soft_qi"), 4),
         "predicted_error_ml": number(result.get("predicted_error_ml"), 2),
         "missing": ",".join(result.get("missing", [])),
         "dropped_labels": ",".join(result.get("dropped_labels", {})),
         "label_convention": result.get("label_convention", ""),
         "image": result.get("image", ""), "mask": result.get("mask", "")}
  for s in STRUCTURES:
    found = structures.get(s, {})
    row[f"dice_{s}"] = number(found.get("predicted_dice"), 4)
    row[f"dice_lower_bound_{s}"] = number(found.get("dice_lower_bound"), 4)
    row[f"error_ml_{s}"] = number(found.get("predicted_error_ml"), 2)
    row[f"volume_ml_{s}"] = number(found.get("mask_volume_ml"), 2)
  return row


def write_folder_report(output_dir: Path, figures: bool = True,
                        results: list[tuple[Path, dict[str, Any]]] | None = None,
                        ) -> dict[str, Path]:
  """Rewrites the folder's `qc.tsv` (one row per result), and with figures its `index.html`
  gallery and the label files for ITK-SNAP and 3D Slicer.

  results: (folder, result) pairs, sorted by pair; default: every result in `output_dir`.
  The gallery links each result's files in its own folder."""
  output_dir = Path(output_dir)
  if results is None:
    results = [(output_dir, r) for r in folder_results(output_dir)]
  text = io.StringIO()
  writer = csv.DictWriter(text, TSV_COLUMNS, delimiter="\t", lineterminator="\n")
  writer.writeheader()
  writer.writerows(tsv_row(r) for _, r in results)
  paths = {"tsv": output_dir / TSV_FILE}
  with atomic_path(paths["tsv"], ".tsv") as tmp:
    Path(tmp).write_text(text.getvalue())
  if not figures:
    return paths
  rows = []
  for folder, r in results:
    where = Path(os.path.relpath(folder, output_dir))
    files = r.get("files", [])
    png = f"{r['pair']}_qc.png"
    thumbnail = _thumbnail(folder, r)
    rows.append({
        "pair": r["pair"], "verdict": r["verdict"],
        "mean_predicted_dice": r.get("mean_predicted_dice"),
        "min_predicted_dice": r.get("min_predicted_dice"), "qi": r.get("qi"),
        "soft_qi": r.get("soft_qi"), "reasons": r.get("reasons", []),
        "png": str(where / png) if png in files else None,
        "thumbnail": None if thumbnail is None else str(where / thumbnail),
        "files": [str(where / f) for f in [f"{r['pair']}_qc.json"] + files
                  if not f.endswith(".png")],
        "predicted_dice": {s: v.get("predicted_dice")
                           for s, v in r.get("structures", {}).items()}})
  paths["html"] = write_gallery(output_dir, rows)
  values = {}
  for _, r in results:
    for name, s in r.get("structures", {}).items():
      if s.get("label_value") is not None:
        values.setdefault(int(s["label_value"]), name)
  tables = write_colour_tables(output_dir, sorted(values.items()))
  paths.update({p.name: p for p in tables})
  return paths


def _thumbnail(folder: Path, result: dict[str, Any]) -> str | None:
  for name in (f"{result['pair']}_qc_thumb.png", f"{result['pair']}_qc.png"):
    if (folder / name).exists():
      return name
  return None


def _same_assessment(report: Path, identity: dict[str, Any], name: str) -> dict[str, Any]:
  """The result in `report` if it is the assessment `identity` describes; else UserError."""
  try:
    previous = json.loads(report.read_text())
  except (OSError, ValueError) as e:
    raise UserError(f"{report} is unreadable ({e}); it is kept: use --overwrite to replace "
                    f"it") from None
  differs = [words for key, words in IDENTITY.items() if previous.get(key) != identity[key]]
  if differs:
    raise UserError(f"{report} already holds a result for {name} with another "
                    f"{', '.join(differs)}; it is kept: use --overwrite to replace it, or "
                    f"another --set=output_dir")
  return previous


def describe(error: Exception, image: Path, mask: Path) -> str:
  """One line naming the pair and what went wrong."""
  text = " ".join(str(error).split())
  if isinstance(error, UserError):
    return text if str(image) in text or str(mask) in text else f"{image} with {mask}: {text}"
  what = f"{type(error).__name__}: {text}" if text else type(error).__name__
  if isinstance(error, MemoryError):
    what = f"out of memory ({what})"
  return f"{image} with {mask}: {what}"


def _sha256(path: Path) -> str:
  """SHA-256 of a file, or of a per-structure folder's NIfTI files (names and contents)."""
  digest = hashlib.sha256()
  files = [path] if not path.is_dir() else nifti_files(path)
  try:
    for file in files:
      if path.is_dir():
        digest.update(file.name.encode() + b"\0")
      with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
          digest.update(chunk)
  except OSError as e:
    raise InvalidCaseError(path, f"cannot be read ({e.strerror or e})") from None
  return digest.hexdigest()
