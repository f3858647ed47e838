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
from typing import Any

import jax
import ml_collections
import numpy as np

from . import base
from wh_errmap.data.dataset import dataset_from_config, preprocess_config
from wh_errmap.errors import UserError
from wh_errmap.evaluation import evaluate_fold, read_records, score_segmentors
from wh_errmap.metrics import correlation_stats
from wh_errmap.workdir import check_config, check_writable, record_config, run_lock
from wh_errmap.predictor import REFERENCE_FILE, write_reference
from wh_errmap.progress import console
from wh_errmap.inference import inference_mesh
from wh_errmap.train.sharding import model_layout
from wh_errmap.train.stages import (SEGMENTORS, predictor_model, segmentor_model, train_predictor,
                                    train_segmentor)

STAGES = ("segmentors", "predictor", "evaluate")


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.stage = "all"     # one of STAGES, or "all"
  c.nifti = "all"     # NIfTI outputs of the evaluation: "all" masks, "final" (3d/2d/gt), "none"
  return c


def qi_summary(records: list[dict]) -> str:
  """PCC and MAE of QI against the true accuracy (and PCC against Dice) over `records`."""
  qi = np.array([r["qi"] for r in records])
  acc = correlation_stats(qi, np.array([r["true_acc"] for r in records]))
  dsc = correlation_stats(qi, np.array([r["seg_dsc"] for r in records]))
  auto = [r for r in records if r["mask_type"] != "gt"]
  return (f"{len(records)} masks: PCC(QI, Acc) = {acc['pcc']:.3f} (p = {acc['p_value']:.1e}), "
          f"PCC(QI, DSC) = {dsc['pcc']:.3f}, MAE(QI, Acc) = {acc['mae']:.4f}; error-map DSC "
          f"over auto masks {np.mean([r['err_dsc'] for r in auto]):.3f}")


def data_line(config: ml_collections.ConfigDict) -> str:
  """The first line of a run: which data it uses."""
  if config.data_dir:
    return f"data: MMWHS {config.modality.upper()} cases in {config.data_dir}"
  return (f"data: the synthetic whole-heart phantom ({config.num_cases} cases, seed "
          f"{config.seed}), not MMWHS: pass --data_dir=MMWHS_FOLDER for the real data")


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  if config.stage != "all" and config.stage not in STAGES:
    raise UserError(f"unknown stage {config.stage!r}; choose 'all' or one of {', '.join(STAGES)}")
  stages = STAGES if config.stage == "all" else (config.stage,)
  console(data_line(config))
  # Every model's batch must fit the devices, and the settings the workdir's: say so
  # before any data or training work. The settings are recorded only once the data is
  # found and valid, so a mistyped --data_dir does not lock them in.
  layouts = {name: model_layout(config, name) for name in (*SEGMENTORS, "predictor")}
  check_config(workdir, config, defaults=base.get_config())
  check_writable(workdir)
  dataset = dataset_from_config(config)
  record_config(workdir, config, defaults=base.get_config())
  # One run per fold at a time (a double launch, a requeued job while the old one lives);
  # with several processes (jax.distributed), process 0 holds it for all.
  lock = (run_lock(Path(workdir) / f"fold{config.fold}.lock") if jax.process_index() == 0
          else contextlib.nullcontext())
  with lock:
    _run_fold(config, workdir, dataset, stages, layouts)


def _run_fold(config: ml_collections.ConfigDict, workdir: str, dataset: Any,
              stages: tuple[str, ...], layouts: dict[str, Any]) -> None:
  train_cases, test_cases = dataset.fold(config.fold)
  # Test cases are scored as whole scans: no crop around their ground truth.
  test_cases = dataset.whole_scans(test_cases, preprocess_config(config))
  fold_dir = Path(workdir) / f"fold{config.fold}"
  console(f"fold {config.fold}: {len(train_cases)} training and {len(test_cases)} test cases; "
          f"outputs in {fold_dir}; " + ", ".join(f"{name} {layout.describe()}"
                                                  for name, layout in layouts.items()))
  # Whole-volume inference splits each test volume over the local devices when mesh.space
  # asks for it; the models then take the convolution form of that split.
  mesh = inference_mesh(config.mesh.space, min(c.image.shape[0] for c in test_cases))
  space = 1 if mesh is None else mesh.shape["space"]
  # Training a finished model only restores it, so later stages can always ask for it.
  segmentors = {name: train_segmentor(config, name, train_cases, fold_dir)
                for name in SEGMENTORS}
  scoring = {name: (segmentor_model(config, name, space), variables)
             for name, (_, variables) in segmentors.items()}
  # Scoring runs on one process's own devices; with several processes (jax.distributed)
  # process 0 alone scores and writes the fold's outputs.
  scorer = jax.process_index() == 0
  if "segmentors" in stages and scorer:
    console(score_segmentors(scoring, test_cases, fold_dir / "segmentors.json", mesh))
  if "predictor" not in stages and "evaluate" not in stages:
    return
  predictor = train_predictor(config, segmentors, train_cases, fold_dir)
  if scorer and not (fold_dir / "predictor" / REFERENCE_FILE).exists():
    write_reference(fold_dir / "predictor", train_cases)   # for predict's checks
  if "evaluate" in stages and scorer:
    if (fold_dir / "records.json").exists() and config.stage == "all":
      console(f"[evaluate] records exist in {fold_dir}: not redone")
      records = read_records(fold_dir)
    else:
      records = evaluate_fold(scoring, (predictor_model(config, space), predictor[1]),
                              test_cases, config.fold, fold_dir, config.predictor.threshold,
                              config.nifti, mesh=mesh, preprocess=preprocess_config(config))
    console(f"fold {config.fold}: " + qi_summary(records))
