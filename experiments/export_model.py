"""Writes a trained run's error-map predictor as one versioned model file.

  python launch.py --experiment=export_model --workdir=RUN --fold=0 --set=output=heart.whqc

The file holds the predictor's parameters and batch statistics, the run's model and
preprocessing config, the label convention it was trained with (MMWHS structures), a
description of its training data (source, training cases of the fold, the reference
statistics of the out-of-distribution checks, the training modality and the raw intensity
profile of each training scan), the fold and a checksum. `predict
--model=FILE` uses it without the run. An existing file is replaced only with
--overwrite.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import ml_collections

from . import base
from wh_errmap.data.dataset import dataset_from_config
from wh_errmap.data.training_reference import missing_parts, training_reference
from wh_errmap.errors import UserError
from wh_errmap.qc.predictor import Predictor, export_predictor, load_predictor
from wh_errmap.train.stages import reference_masks, restore_segmentors
from wh_errmap.utils.progress import console

# Never read by run(): the model file takes the run's own recorded config (model,
# preprocessing, data, training), whatever this one says.
UNREAD = {**dict.fromkeys(base.TRAINING_GROUPS), "predictor": None, "preprocess": None,
          "splits": None, "data_dir": None, "report": None}


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.output = ""       # the model file; "" = WORKDIR/model-fold{k}.whqc
  c.allow_partial = False  # export a predictor whose training has not finished
  return c


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  output = Path(config.output or Path(workdir) / f"model-fold{config.fold}.whqc")
  if output.exists() and not config.overwrite:
    raise UserError(f"{output} exists: use --overwrite to replace it, or another "
                    f"--set=output=FILE")
  predictor = load_predictor(workdir, config.fold, config.allow_partial)
  # a run made before the appearances or the modality were recorded
  if missing_parts(predictor.reference):
    predictor = _with_reference(predictor, Path(workdir) / f"fold{config.fold}")
  path = export_predictor(predictor, output, predictor.training_record())
  console(f"predictor of fold {config.fold} (step {predictor.step} of "
          f"{predictor.total_steps}) written to {path}"
          + ("" if predictor.reference else " without a training reference"))


def _with_reference(predictor: Predictor, fold_dir: Path) -> Predictor:
  """The predictor with the training reference computed from its run's data and segmentors,
  as far as they can be read (the reference it has otherwise, said in a warning)."""
  try:
    train_cases, _ = dataset_from_config(predictor.config).fold(predictor.fold)
  except UserError as e:
    lacks = ("none" if predictor.reference is None else " and ".join(
        f"no {part}" for part in missing_parts(predictor.reference)))
    console(f"warning: the run's training data cannot be read ({e}): the model file keeps the "
            f"run's training reference as it is ({lacks}), so predict skips the checks it "
            f"lacks")
    return predictor
  try:
    masks = reference_masks(predictor.config, restore_segmentors(predictor.config, fold_dir),
                            train_cases)
  except UserError as e:
    console(f"warning: {e}: the model file's training reference has no appearances, so "
            f"predict skips that check")
    masks = None
  return dataclasses.replace(predictor, reference=training_reference(
      train_cases, masks, modality=predictor.config.modality))
