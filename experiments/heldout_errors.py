"""Does training the predictor on synthetic errors help on errors it has never seen?

For one fold (`--fold`, default 0) at the settings of cv_fold_small:
  1. the fold's segmentors and segmentor-only predictor: restored from a finished run
     (`--set=study.run=RUN`, e.g. a cv_small workdir) or trained into WORKDIR/fold{k}/;
  2. held-out segmentors, "trained differently": another seed and fewer steps
     (`study.heldout_seed`, `study.heldout_steps`), in WORKDIR/heldout/fold{k}/. The
     predictors never see their masks;
  3. a second predictor trained on the same segmentors' masks plus perturbed ground truth
     (`predictor.mask_sources`, weights `study.perturbed_weight` : 1), in
     WORKDIR/perturbed/fold{k}/;
  4. both predictors evaluated on the held-out segmentors' 10 masks of every test case and
     on their own segmentors' masks.
Writes WORKDIR/heldout_errors.json and .md: error-map DSC, PCC(predicted Dice, Dice) and
PCC(QI, Acc) of each predictor on each kind of mask; with `study.run`, also
RUN/heldout_errors-fold{k}-w{weight}.md, which the run's report includes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from . import base, cv_fold_small
from wh_errmap.atomic import write_json, write_text
from wh_errmap.data.dataset import dataset_from_config, preprocess_config
from wh_errmap.evaluation import evaluate_fold, read_records
from wh_errmap.inference import inference_mesh
from wh_errmap.progress import console
from wh_errmap.qc_metrics import correlations
from wh_errmap.train.stages import (SEGMENTORS, predictor_model, segmentor_model, train_predictor,
                                    train_segmentor)
from wh_errmap.workdir import check_config, check_writable, record_config


def get_config() -> ml_collections.ConfigDict:
  c = cv_fold_small.get_config()
  c.nifti = "none"
  c.study = ml_collections.ConfigDict()
  c.study.run = ""               # a finished run whose fold{k}/ segmentors and predictor to use
  c.study.heldout_seed = 1       # the held-out segmentors' seed ...
  c.study.heldout_steps = (150, 600)   # ... and training steps (seg3d, seg2d)
  c.study.perturbed_weight = 1.0  # mask_sources of the second predictor: segmentors 1
  return c


def _summary(records: list[dict[str, Any]]) -> dict[str, float]:
  auto = [r for r in records if r["mask_type"] != "gt"]

  def column(field):
    return np.array([r[field] for r in auto], np.float64)

  dice = correlations(column("pd_mean"), column("seg_dsc"))
  return {"n": len(auto), "seg_dsc": float(np.mean(column("seg_dsc"))),
          "err_dsc": float(np.nanmean(column("err_dsc"))),
          "pcc_pd_dice": dice["pcc"], "mae_pd_dice": dice["mae"],
          "pcc_qi_acc": correlations(column("qi"), column("true_acc"))["pcc"]}


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  workdir = Path(workdir)
  k = config.fold
  check_config(workdir, config, defaults=base.get_config())
  check_writable(workdir)
  dataset = dataset_from_config(config)
  record_config(workdir, config, defaults=base.get_config())
  train_cases, test_cases = dataset.fold(k)
  test_cases = dataset.whole_scans(test_cases, preprocess_config(config))
  own_dir = Path(config.study.run) / f"fold{k}" if config.study.run else workdir / f"fold{k}"
  console(f"heldout_errors, fold {k}: segmentors and the segmentor-only predictor in {own_dir}")

  own = {name: train_segmentor(config, name, train_cases, own_dir) for name in SEGMENTORS}
  heldout_config = ml_collections.ConfigDict(config.to_dict())
  heldout_config.seed = config.study.heldout_seed
  heldout_config.train.seg3d.steps, heldout_config.train.seg2d.steps = config.study.heldout_steps
  heldout_dir = workdir / "heldout" / f"fold{k}"
  heldout = {name: train_segmentor(heldout_config, name, train_cases, heldout_dir)
             for name in SEGMENTORS}

  perturbed_config = ml_collections.ConfigDict(config.to_dict())
  perturbed_config.predictor.mask_sources.perturbed = config.study.perturbed_weight
  predictors = {
      "segmentor masks": train_predictor(config, own, train_cases, own_dir),
      "segmentor masks + perturbed GT": train_predictor(
          perturbed_config, own, train_cases, workdir / "perturbed" / f"fold{k}")}

  mesh = inference_mesh(config.mesh.space, min(c.image.shape[0] for c in test_cases))
  space = 1 if mesh is None else mesh.shape["space"]
  scoring = {"own": {n: (segmentor_model(config, n, space), v) for n, (_, v) in own.items()},
             "held-out": {n: (segmentor_model(config, n, space), v)
                          for n, (_, v) in heldout.items()}}
  results = {}
  for p_index, (p_name, (_, variables)) in enumerate(predictors.items()):
    for m_name, segmentors in scoring.items():
      directory = workdir / "evaluations" / f"fold{k}" / f"predictor{p_index}-{m_name}"
      if (directory / "records.json").exists():
        records = read_records(directory)
      else:
        console(f"[{p_name}] on the {m_name} segmentors' masks")
        records = evaluate_fold(segmentors, (predictor_model(config, space), variables),
                                test_cases, k, directory, config.predictor.threshold,
                                "none", mesh=mesh, preprocess=preprocess_config(config))
      results[f"{p_name} | {m_name}"] = {"predictor": p_name, "masks": m_name,
                                         **_summary(records)}
  write_json(workdir / "heldout_errors.json", {"fold": k, "results": list(results.values())})
  lines = [f"Fold {k}: predictors trained on different mask sources, scored on the auto masks "
           f"of their own segmentors and of held-out segmentors (seed "
           f"{config.study.heldout_seed}, {config.study.heldout_steps[0]} / "
           f"{config.study.heldout_steps[1]} steps) that no predictor saw.", "",
           "| predictor trained on | masks | n | mask Dice | error-map DSC | "
           "PCC(pred. Dice, Dice) | MAE(pred. Dice, Dice) | PCC(QI, Acc) |",
           "|---|---|---|---|---|---|---|---|"]
  for r in results.values():
    lines.append(f"| {r['predictor']} | {r['masks']} | {r['n']} | {r['seg_dsc']:.3f} | "
                 f"{r['err_dsc']:.3f} | {r['pcc_pd_dice']:.3f} | {r['mae_pd_dice']:.3f} | "
                 f"{r['pcc_qi_acc']:.3f} |")
  text = "\n".join(lines) + "\n"
  write_text(workdir / "heldout_errors.md", text)
  if config.study.run:   # the run's report (cv_report) shows it in "Beyond the paper"
    weight = f"{config.study.perturbed_weight:g}".replace(".", "p")
    write_text(Path(config.study.run) / f"heldout_errors-fold{k}-w{weight}.md",
               f"Perturbed weight {config.study.perturbed_weight:g} (segmentors 1).\n\n{text}")
  console(json.dumps(list(results.values()), indent=1))
