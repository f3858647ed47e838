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
import datetime
import hashlib
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from wh_errmap.data.labels import LabelConvention
from wh_errmap.data.nifti_io import InvalidCaseError
from wh_errmap.data.structures import STRUCTURES
from wh_errmap.errors import UserError
from wh_errmap.qc.assessment import assess as assess_mask, convention_from
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
_IDENTITY = {"image_sha256": "image file contents", "mask_sha256": "mask file contents",
             "threshold": "threshold", "settings": "verdict settings",
             "labels": "label convention",
             "predictor": "predictor (run, model file, fold or checkpoint)"}
TSV_FILE = "qc.tsv"


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
  image_path, mask_path, output_dir = Path(image_path), Path(mask_path), Path(output_dir)
  name = pair_name(image_path, mask_path)
  report = output_dir / f"{name}_qc.json"
  convention = convention_from(labels)
  identity = {"image_sha256": _sha256(image_path), "mask_sha256": _sha256(mask_path),
              "threshold": settings.threshold,
              "settings": {k: v for k, v in vars(settings).items() if k != "threshold"},
              "labels": None if convention is None else convention.to_json(),
              "predictor": predictor.provenance}
  if report.exists() and not overwrite:
    previous = _same_assessment(report, identity, name)
    if all((output_dir / f).exists() for f in previous.get("files", [])):
      return previous, True
  assessment = assess_mask(image_path, mask_path, predictor, convention, settings, progress)
  report.unlink(missing_ok=True)   # an old result must not describe the new maps
  paths: dict[str, Path] = {}
  with removed_on_failure(paths):
    paths.update(assessment.write(output_dir, name))
    if figures:
      paths["png"] = output_dir / f"{name}_qc.png"
      paths["thumbnail"] = output_dir / f"{name}_qc_thumb.png"
      crop = assessment.crop
      case_figure(paths["png"], crop["image"], crop["mask"], crop["error_prob"],
                  crop["spacing"], f"{name}: {assessment.scores['verdict']}",
                  settings.threshold, crop["valid"], thumbnail_path=paths["thumbnail"])
    result = {"pair": name, "case_id": image_case(image_path),
              "image": str(image_path.absolute()), "mask": str(mask_path.absolute()),
              **identity, **assessment.scores,
              "convention": assessment.convention.to_json(),
              "files": sorted(p.name for p in paths.values())}
    write_json(report, result)
  return result, False


def assess_many(pairs: list[tuple[Path, Path]], predictor: Predictor, output_dir: Path,
                settings: Settings = Settings(),
                labels: str | LabelConvention | None = None, overwrite: bool = False,
                figures: bool = True, progress: Progress = console,
                ) -> tuple[list[dict], list[str], list[str]]:
  """Assesses every pair, with a progress bar and ETA. Any failure of a pair (a bad file,
  an existing other result, out of memory, ...) is reported and the pair skipped; the
  others complete. KeyboardInterrupt and SystemExit stop the batch.

  Returns (results, names of the pairs whose result was reused, problems).
  """
  results, reused, problems = [], [], []
  start = time.monotonic()
  for i, (image, mask) in enumerate(pairs):
    try:
      result, was_done = assess(image, mask, predictor, output_dir, settings, labels,
                                overwrite, figures, progress)
    except Exception as e:  # noqa: BLE001  (one bad pair must not stop the batch)
      problems.append(_describe(e, image, mask))
      progress(f"{_bar(i + 1, len(pairs), start)} skipped: {problems[-1]}")
      continue
    results.append(result)
    if was_done:
      reused.append(result["pair"])
    dice = result.get("mean_predicted_dice")
    state = "already assessed, kept" if was_done else "assessed"
    progress(f"{_bar(i + 1, len(pairs), start)} {result['pair']}: "
             f"{result['verdict']}, predicted Dice "
             f"{'-' if dice is None else f'{dice:.3f}'}, QI {result['qi']:.4f} ({state})")
  return results, reused, problems


def _bar(done: int, total: int, start: float) -> str:
  """`[#####.....] 5/10 ETA 0:01:10`: the time left from the pace so far."""
  width = 20
  filled = round(width * done / max(1, total))
  elapsed = time.monotonic() - start
  left = elapsed / done * (total - done) if done else 0.0
  return (f"[predict] [{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
          f"ETA {datetime.timedelta(seconds=round(left))}")


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


def write_folder_report(output_dir: Path, figures: bool = True) -> dict[str, Path]:
  """Rewrites the folder's `qc.tsv` (one row per result in it), and with figures its
  `index.html` gallery and the label files for ITK-SNAP and 3D Slicer."""
  results = folder_results(output_dir)
  text = io.StringIO()
  writer = csv.DictWriter(text, TSV_COLUMNS, delimiter="\t", lineterminator="\n")
  writer.writeheader()
  writer.writerows(tsv_row(r) for r in results)
  paths = {"tsv": output_dir / TSV_FILE}
  with atomic_path(paths["tsv"], ".tsv") as tmp:
    Path(tmp).write_text(text.getvalue())
  if not figures:
    return paths
  rows = [{"pair": r["pair"], "verdict": r["verdict"],
           "mean_predicted_dice": r.get("mean_predicted_dice"),
           "min_predicted_dice": r.get("min_predicted_dice"), "qi": r.get("qi"),
           "soft_qi": r.get("soft_qi"), "reasons": r.get("reasons", []),
           "png": f"{r['pair']}_qc.png" if f"{r['pair']}_qc.png" in r.get("files", []) else None,
           "thumbnail": _thumbnail(output_dir, r),
           "files": [f"{r['pair']}_qc.json"] + [f for f in r.get("files", [])
                                                if not f.endswith(".png")],
           "predicted_dice": {s: v.get("predicted_dice")
                              for s, v in r.get("structures", {}).items()}} for r in results]
  paths["html"] = write_gallery(output_dir, rows)
  values = {}
  for r in results:
    for name, s in r.get("structures", {}).items():
      if s.get("label_value") is not None:
        values.setdefault(int(s["label_value"]), name)
  tables = write_colour_tables(output_dir, sorted(values.items()))
  paths.update({p.name: p for p in tables})
  return paths


def _thumbnail(output_dir: Path, result: dict[str, Any]) -> str | None:
  for name in (f"{result['pair']}_qc_thumb.png", f"{result['pair']}_qc.png"):
    if (output_dir / name).exists():
      return name
  return None


def _same_assessment(report: Path, identity: dict[str, Any], name: str) -> dict[str, Any]:
  """The result in `report` if it is the assessment `identity` describes; else UserError."""
  try:
    previous = json.loads(report.read_text())
  except (OSError, ValueError) as e:
    raise UserError(f"{report} is unreadable ({e}); it is kept: use --overwrite to replace "
                    f"it") from None
  differs = [words for key, words in _IDENTITY.items() if previous.get(key) != identity[key]]
  if differs:
    raise UserError(f"{report} already holds a result for {name} with another "
                    f"{', '.join(differs)}; it is kept: use --overwrite to replace it, or "
                    f"another --set=output_dir")
  return previous


def _describe(error: Exception, image: Path, mask: Path) -> str:
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
