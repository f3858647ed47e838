"""cv_fold at a size that trains on a 2-core CPU in minutes (the quick start's settings)."""
from __future__ import annotations

import ml_collections

from experiments import cv_fold

run = cv_fold.run


def get_config() -> ml_collections.ConfigDict:
  c = cv_fold.get_config()
  c.model.width1 = 8
  c.model.width2 = 16
  c.model.num_voxres = 1
  c.input.crop_3d = (48, 48, 40)
  c.input.crop_2d = (96, 96)
  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 20
  c.train.seg3d.steps = 300
  c.train.seg3d.batch_size = 2
  c.train.seg2d.steps = 300
  c.train.seg2d.batch_size = 8
  c.train.log_every = 25
  c.train.checkpoint_every = 100
  return c
