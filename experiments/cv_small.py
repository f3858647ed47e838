"""cv at the CPU-sized settings of cv_fold_small: every fold, then the report.

As cv_fold_small is to cv_fold: the same settings for each fold (3 mm voxels, widths 8/16,
small crops, a few hundred steps; see cv_fold_small), each fold run as
`launch.py --experiment=cv_fold_small --fold=k`, plus the `cv` block of experiments/cv.py.
"""
from __future__ import annotations

import ml_collections

from . import cv, cv_fold_small


def get_config() -> ml_collections.ConfigDict:
  return cv.add_cv_block(cv_fold_small.get_config())


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  cv.run_cv(config, workdir, fold_experiment="cv_fold_small")
