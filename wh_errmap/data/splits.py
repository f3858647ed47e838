"""Seeded K-fold cross-validation split, written once to `splits.json`.

Every fold reads the same file, so train and test sets never change between runs or
between the stages of one fold.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from wh_errmap.errors import UserError
from wh_errmap.utils.atomic import write_json


def make_splits(case_ids: Sequence[str], num_folds: int = 5, seed: int = 0) -> list[dict]:
  """[{"train": [...], "test": [...]}, ...]: each case is in exactly one test set."""
  ids = sorted(case_ids)
  if len(ids) < num_folds:
    raise UserError(f"{len(ids)} cases cannot be split into {num_folds} folds")
  order = np.random.default_rng(seed).permutation(len(ids))
  folds = [sorted(ids[i] for i in order[k::num_folds]) for k in range(num_folds)]
  return [{"train": sorted(set(ids) - set(test)), "test": test} for test in folds]


def load_or_create_splits(path: str | os.PathLike, case_ids: Sequence[str],
                          num_folds: int = 5, seed: int = 0) -> list[dict]:
  """Reads `path` if it exists (and matches the cases), else writes a new split there."""
  path = Path(path)
  if path.exists():
    stored = json.loads(path.read_text())
    folds = stored["folds"]
    stored_ids = sorted(c for fold in folds for c in fold["test"])
    if stored_ids != sorted(case_ids) or len(folds) != num_folds:
      raise UserError(
          f"{path} holds a {len(folds)}-fold split of {len(stored_ids)} cases, but the data has "
          f"{len(case_ids)} cases and {num_folds} folds were asked for; delete it to re-split")
    return folds
  folds = make_splits(case_ids, num_folds, seed)
  write_json(path, {"num_folds": num_folds, "seed": seed, "folds": folds})
  return folds


def fold_cases(folds: list[dict], fold: int) -> tuple[list[str], list[str]]:
  """(train ids, test ids) of one fold."""
  if not 0 <= fold < len(folds):
    raise UserError(f"fold {fold} does not exist: the split has folds 0..{len(folds) - 1}")
  return folds[fold]["train"], folds[fold]["test"]
