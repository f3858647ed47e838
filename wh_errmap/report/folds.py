"""What a run's workdir holds: the records and training logs of each fold, and what is missing.

A cross-validation run fills `fold0/ .. fold{K-1}/` one fold at a time, so a report is often
built while some folds are absent or still training; each fold gets a status line instead of
stopping the report.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from wh_errmap.cv.evaluate import RECORD_FIELDS, read_records
from wh_errmap.train.masks import MASK_TYPES

MODELS = ("seg3d", "seg2d", "predictor")


@dataclasses.dataclass
class Fold:
  """One fold directory.

  records: its valid records ([] when it has none usable). status: "complete", or why the
  fold is missing or incomplete, in words. curves: {model: [(step, loss), ...]} of the
  models that logged any step.
  """
  index: int
  directory: Path
  records: list[dict[str, Any]]
  status: str
  curves: dict[str, list[tuple[int, float]]]

  @property
  def complete(self) -> bool:
    return self.status == "complete"

  @property
  def case_ids(self) -> list[str]:
    return sorted({r["case_id"] for r in self.records})


def read_curve(path: Path) -> list[tuple[int, float]]:
  """(step, loss) of every line of a metrics.jsonl; a line cut short by a crash is skipped."""
  curve = []
  for line in path.read_text().splitlines():
    try:
      entry = json.loads(line)
      curve.append((int(entry["step"]), float(entry["loss"])))
    except (ValueError, KeyError, TypeError):
      continue
  return curve


def _training_progress(curves: dict[str, list[tuple[int, float]]]) -> str:
  if not curves:
    return "no model has logged a training step"
  return "last logged steps: " + ", ".join(
      f"{model} {curve[-1][0]}" for model, curve in curves.items())


def _check_records(records: Any) -> str | None:
  """Why `records` cannot be used, or None when they can."""
  if not isinstance(records, list) or not records:
    return "records.json holds no records"
  for record in records:
    if not isinstance(record, dict) or not set(RECORD_FIELDS) <= set(record):
      return f"records.json has a record without the fields {', '.join(RECORD_FIELDS)}"
    if record["mask_type"] not in MASK_TYPES:
      return f"records.json has an unknown mask type {record['mask_type']!r}"
  return None


def read_fold(directory: Path, index: int) -> Fold:
  """The records, training curves and status of `directory` (which need not exist)."""
  curves = {}
  for model in MODELS:
    path = directory / model / "metrics.jsonl"
    curve = read_curve(path) if path.is_file() else []
    if curve:
      curves[model] = curve
  if not directory.is_dir():
    return Fold(index, directory, [], "missing: not run", curves)
  if not (directory / "records.json").is_file():
    return Fold(index, directory, [],
                f"incomplete: no records.json; {_training_progress(curves)}", curves)
  try:
    records = read_records(directory)
  except (ValueError, UnicodeDecodeError) as e:
    return Fold(index, directory, [], f"incomplete: records.json unreadable ({e})", curves)
  problem = _check_records(records)
  if problem:
    return Fold(index, directory, [], f"incomplete: {problem}", curves)
  per_case: dict[str, set[str]] = {}
  for record in records:
    per_case.setdefault(record["case_id"], set()).add(record["mask_type"])
  short = sorted(case for case, types in per_case.items() if types != set(MASK_TYPES))
  if short:
    return Fold(index, directory, records, f"incomplete: {len(short)} of {len(per_case)} "
                f"test cases lack some of the {len(MASK_TYPES)} masks ({', '.join(short)})",
                curves)
  return Fold(index, directory, records, "complete", curves)


def read_folds(workdir: Path, num_folds: int) -> list[Fold]:
  """Folds 0..num_folds-1 of a run, present or not."""
  return [read_fold(workdir / f"fold{k}", k) for k in range(num_folds)]
