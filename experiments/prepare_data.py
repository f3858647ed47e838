"""Finds (or generates) the data, preprocesses it into the cache, writes the split, and
prints a summary of the dataset and of the fold."""
from __future__ import annotations

import ml_collections
import numpy as np

from . import base
from wh_errmap.data.dataset import Dataset, dataset_from_config
from wh_errmap.data.structures import STRUCTURES

# Never read by run(): it prepares the data and the split; nothing is trained or assessed.
UNREAD = {**dict.fromkeys(base.TRAINING_GROUPS), "predictor": None, "report": None,
          "overwrite": None}


def get_config() -> ml_collections.ConfigDict:
  return base.get_config()


def summary(dataset: Dataset, fold: int) -> str:
  """A text table: one row per case with its shape, fold role and structure volumes (ml)."""
  train, test = dataset.fold(fold)
  role = {c.case_id: "train" for c in train} | {c.case_id: "test" for c in test}
  header = f"{'case':<16} {'shape':<12} {'fold ' + str(fold):<7} " + " ".join(
      f"{s:>5}" for s in STRUCTURES)
  lines = [header, "-" * len(header)]
  for case in dataset.cases.values():
    voxel_ml = np.prod(case.properties["spacing"]) / 1000.0
    counts = np.bincount(case.label.ravel(), minlength=len(STRUCTURES) + 1)[1:]
    lines.append(f"{case.case_id:<16} {'x'.join(map(str, case.image.shape)):<12} "
                 f"{role[case.case_id]:<7} " + " ".join(f"{n * voxel_ml:5.0f}" for n in counts))
  lines.append(f"structure volumes in ml; {len(train)} train / {len(test)} test cases in fold "
               f"{fold}; split: {dataset.cache_dir / 'splits.json'}")
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  del workdir  # everything goes to the cache
  dataset = dataset_from_config(config)
  print(summary(dataset, config.fold), flush=True)
