"""One fold of the paper's 5-fold cross-validation, stage by stage.

Stages (`--set=stage=NAME`, default "all" runs them in order and skips finished ones):
  segmentors  train the 3D and the 2D VoxResNet segmentors on the fold's training cases,
              then score every output on the test cases (fold{k}/segmentors.json)
"""
from __future__ import annotations

from pathlib import Path

import ml_collections

from experiments import base
from wh_errmap.data.dataset import dataset_from_config
from wh_errmap.errors import UserError
from wh_errmap.evaluation import score_segmentors
from wh_errmap.train.stages import SEGMENTORS, train_segmentor

STAGES = ("segmentors",)


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.stage = "all"   # one of STAGES, or "all"
  return c


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  if config.stage != "all" and config.stage not in STAGES:
    raise UserError(f"unknown stage {config.stage!r}; choose 'all' or one of {', '.join(STAGES)}")
  stages = STAGES if config.stage == "all" else (config.stage,)
  dataset = dataset_from_config(config)
  train_cases, test_cases = dataset.fold(config.fold)
  fold_dir = Path(workdir) / f"fold{config.fold}"
  print(f"fold {config.fold}: {len(train_cases)} training and {len(test_cases)} test cases; "
        f"outputs in {fold_dir}", flush=True)
  if "segmentors" in stages:
    segmentors = {name: train_segmentor(config, name, train_cases, fold_dir)
                  for name in SEGMENTORS}
    print(score_segmentors(segmentors, test_cases, fold_dir / "segmentors.json"), flush=True)
