"""One fold of the paper's 5-fold cross-validation, stage by stage.

Stages (`--set=stage=NAME`; the default "all" runs them in order, and a stage whose final
checkpoint or records exist is not redone):
  segmentors  train the 3D and the 2D VoxResNet segmentors on the fold's training cases,
              then score every output on the test cases (fold{k}/segmentors.json)
  predictor   train the error-map predictor on masks generated on the fly by the frozen
              segmentors (needs the segmentors)
  evaluate    the 10 auto masks + GT of every test case through the predictor: records
              (fold{k}/records.csv|json) and NIfTI error maps (fold{k}/predictions/)
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import jax
import ml_collections
import numpy as np

from . import base
from wh_errmap.cv.evaluate import TestScans, read_records
from wh_errmap.cv.run import open_run
from wh_errmap.data.dataset import Dataset, data_source
from wh_errmap.data.training_reference import (missing_parts, read_reference,
                                                write_reference)
from wh_errmap.errors import UserError
from wh_errmap.metrics.quality import correlations
from wh_errmap.models.factory import SEGMENTORS
from wh_errmap.train.sharding import Layout
from wh_errmap.train.stages import (model_layouts, reference_masks, train_predictor,
                                     train_segmentor)
from wh_errmap.utils.progress import StageClock, console
from wh_errmap.utils.workdir import run_lock

STAGES = ("segmentors", "predictor", "evaluate")


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.stage = "all"     # one of STAGES, or "all"
  c.nifti = "all"     # NIfTI outputs of the evaluation: "all" masks, "final" (3d/2d/gt), "none"
  return c


def qi_summary(records: list[dict]) -> str:
  """PCC and MAE of QI against the true accuracy (and PCC against Dice) over `records`."""
  qi = np.array([r["qi"] for r in records])
  acc = correlations(qi, np.array([r["true_acc"] for r in records]))
  dsc = correlations(qi, np.array([r["seg_dsc"] for r in records]))
  auto = [r for r in records if r["mask_type"] != "gt"]
  return (f"{len(records)} masks: PCC(QI, Acc) = {acc['pcc']:.3f} (p = {acc['pcc_p']:.1e}), "
          f"PCC(QI, DSC) = {dsc['pcc']:.3f}, MAE(QI, Acc) = {acc['mae']:.4f}; error-map DSC "
          f"over auto masks {np.mean([r['err_dsc'] for r in auto]):.3f}")


def data_line(config: ml_collections.ConfigDict) -> str:
  """The first line of a run: which data it uses."""
  hint = "" if config.data_dir else ": pass --data_dir=MMWHS_FOLDER for the real data"
  return f"data: {data_source(config)}{hint}"


def check_stage(stage: str) -> tuple[str, ...]:
  """The stages config.stage asks for (UserError for an unknown one)."""
  if stage != "all" and stage not in STAGES:
    raise UserError(f"unknown stage {stage!r}; choose 'all' or one of {', '.join(STAGES)}")
  return STAGES if stage == "all" else (stage,)


def run(config: ml_collections.ConfigDict, workdir: str, clock: StageClock | None = None
        ) -> None:
  """Runs the fold's stages; prints each stage's wall time and, unless a caller's `clock`
  goes on timing more stages, the breakdown line at the end."""
  own_clock = clock is None
  clock = clock or StageClock()
  stages = check_stage(config.stage)
  console(data_line(config))
  # Every model's batch must fit the devices, and the settings the workdir's: say so
  # before any data or training work.
  layouts = model_layouts(config)
  with clock("data"):
    dataset = open_run(workdir, config, base.get_config())
  # One run per fold at a time (a double launch, a requeued job while the old one lives);
  # with several processes (jax.distributed), process 0 holds it for all.
  lock = (run_lock(Path(workdir) / f"fold{config.fold}.lock") if jax.process_index() == 0
          else contextlib.nullcontext())
  with lock:
    _run_fold(config, workdir, dataset, stages, layouts, clock)
  if own_clock:
    console(clock.summary())


def _run_fold(config: ml_collections.ConfigDict, workdir: str, dataset: Dataset,
              stages: tuple[str, ...], layouts: dict[str, Layout], clock: StageClock) -> None:
  with clock("test scans"):
    train_cases, test_cases = dataset.fold(config.fold)
    # Test cases are scored as whole scans, split over the local devices when mesh.space
    # asks for it: no crop around their ground truth.
    scans = TestScans.of(dataset, test_cases, config.mesh.space)
  fold_dir = Path(workdir) / f"fold{config.fold}"
  console(f"fold {config.fold}: {len(train_cases)} training and {len(test_cases)} test cases; "
          f"outputs in {fold_dir}; " + ", ".join(f"{name} {layout.describe()}"
                                                  for name, layout in layouts.items()))
  # Training a finished model only restores it, so later stages can always ask for it.
  segmentors = {}
  for name in SEGMENTORS:
    with clock(name):
      segmentors[name] = train_segmentor(config, name, train_cases, fold_dir, layouts[name])
  # Scoring runs on one process's own devices; with several processes (jax.distributed)
  # process 0 alone scores and writes the fold's outputs.
  scorer = jax.process_index() == 0
  if "segmentors" in stages and scorer:
    with clock("segmentor scores"):
      console(scans.score_segmentors(config, segmentors, fold_dir / "segmentors.json"))
  if "predictor" not in stages and "evaluate" not in stages:
    return
  with clock("predictor"):
    predictor = train_predictor(config, segmentors, train_cases, fold_dir,
                                layouts["predictor"], dataset.preprocess)
  # predict's out-of-distribution checks, written again for a fold made before the
  # appearances or the modality were recorded; the appearances need the segmentors' masks
  if scorer and missing_parts(read_reference(fold_dir / "predictor")):
    with clock("training reference"):
      write_reference(fold_dir / "predictor", train_cases,
                      reference_masks(config, segmentors, train_cases),
                      modality=config.modality)
  if "evaluate" in stages and scorer:
    if (fold_dir / "records.json").exists() and config.stage == "all":
      console(f"[evaluate] records exist in {fold_dir}: not redone")
      records = read_records(fold_dir)
    else:
      with clock("evaluate"):
        records = scans.evaluate(config, segmentors, predictor, config.fold, fold_dir,
                                 config.nifti)
    console(f"fold {config.fold}: " + qi_summary(records))
