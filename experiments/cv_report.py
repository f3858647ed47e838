"""The report of a cross-validation run: Table 1, QI statistics and figures.

`python launch.py --experiment=cv_report --workdir=RUN` reads the folds that exist in RUN
(fold{k}/records.json, training logs, NIfTI outputs) and writes RUN/report/report.md with
its tables and figures; missing or unfinished folds are named in the report.
"""
from __future__ import annotations

from pathlib import Path

import ml_collections

from . import base
from wh_errmap.report.build import build_report
from wh_errmap.utils.progress import console

# Never read by run(): the report reads the folds' records, and of this config only
# num_folds (= splits.num_folds), predictor.threshold and report.failure_dice.
UNREAD = {**dict.fromkeys(base.TRAINING_GROUPS), "preprocess": None, "data_dir": None,
          "fold": None}


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  # Folds the run should have (0..num_folds-1); one value with splits.num_folds, so setting
  # either changes both.
  c.num_folds = c.splits.get_ref("num_folds")
  return c


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  # The error-map panels threshold the predicted probabilities at config.predictor.threshold.
  report = build_report(Path(workdir), num_folds=config.num_folds,
                        threshold=config.predictor.threshold,
                        failure_dice=config.report.failure_dice)
  console(f"report: {report} (tables and figures beside it)")
