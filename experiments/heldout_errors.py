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
from wh_errmap.cv.evaluate import TestScans, read_records
from wh_errmap.cv.run import open_run
from wh_errmap.metrics.quality import correlations
from wh_errmap.models.factory import SEGMENTORS
from wh_errmap.train.stages import model_layouts, train_predictor, train_segmentor
from wh_errmap.utils.atomic import write_json, write_text
from wh_errmap.utils.progress import console

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
  layouts = model_layouts(config)
  dataset = open_run(workdir, config, base.get_config())
  train_cases, test_cases = dataset.fold(k)
  scans = TestScans.of(dataset, test_cases, config.mesh.space)
  own_dir = Path(config.study.run) / f"fold{k}" if config.study.run else workdir / f"fold{k}"
  console(f"heldout_errors, fold {k}: segmentors and the segmentor-only predictor in {own_dir}")

  own = {name: train_segmentor(config, name, train_cases, own_dir, layouts[name])
         for name in SEGMENTORS}
  heldout_config = ml_collections.ConfigDict(config.to_dict())
  heldout_config.seed = config.study.heldout_seed
  heldout_config.train.seg3d.steps, heldout_config.train.seg2d.steps = config.study.heldout_steps
  heldout_dir = workdir / "heldout" / f"fold{k}"
  heldout = {name: train_segmentor(heldout_config, name, train_cases, heldout_dir, layouts[name])
             for name in SEGMENTORS}

  perturbed_config = ml_collections.ConfigDict(config.to_dict())
  perturbed_config.predictor.mask_sources.perturbed = config.study.perturbed_weight
  predictors = {
      "segmentor masks": train_predictor(config, own, train_cases, own_dir,
                                         layouts["predictor"], dataset.preprocess),
      "segmentor masks + perturbed GT": train_predictor(
          perturbed_config, own, train_cases, workdir / "perturbed" / f"fold{k}",
          layouts["predictor"], dataset.preprocess)}

  results = {}
  for p_index, (p_name, predictor) in enumerate(predictors.items()):
    for m_name, segmentors in (("own", own), ("held-out", heldout)):
      directory = workdir / "evaluations" / f"fold{k}" / f"predictor{p_index}-{m_name}"
      if (directory / "records.json").exists():
        records = read_records(directory)
      else:
        console(f"[{p_name}] on the {m_name} segmentors' masks")
        records = scans.evaluate(config, segmentors, predictor, k, directory, "none")
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
