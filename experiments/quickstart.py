"""The default main job (`python launch.py`): a small but complete run on the phantom.

Generates the phantom (first use only), preprocesses it, trains both segmentors and the
error-map predictor for fold 0 with the CPU-sized settings of cv_fold_small, evaluates the
fold's test masks, and writes the report. Every stage resumes or is skipped when run again.
"""
from __future__ import annotations

import time

import ml_collections

from . import cv_fold, cv_fold_small
from wh_errmap.report.build import build_report
from wh_errmap.utils.progress import StageClock, console


def get_config() -> ml_collections.ConfigDict:
  return cv_fold_small.get_config()


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  clock = StageClock()
  cv_fold.run(config, workdir, clock)
  if "evaluate" in cv_fold.check_stage(config.stage):
    with clock("report"):
      report = build_report(workdir, num_folds=config.splits.num_folds,
                            threshold=config.predictor.threshold,
                            failure_dice=config.report.failure_dice)
    outcome = f"the report is {report}"
  else:   # stages before "evaluate" write no test records: nothing to report yet
    outcome = (f"no report: stage={config.stage} writes no test records (run stage=evaluate "
               f"or all)")
  console(clock.summary())
  console(f"done in {(time.perf_counter() - clock.start) / 60:.1f} min; {outcome}")
