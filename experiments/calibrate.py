"""Calibrates a trained predictor on a few labelled cases of the user's own segmentor.

  python launch.py --experiment=calibrate --model=heart.whqc --image=IMAGES/ --mask=MASKS/ \\
      --set=reference=LABELS/ --labels=MASKS/dataset.json --set=output=heart-mine.whqc

Images and masks pair as in `predict`; each image's ground truth is found in `reference`
by the same names (`X_label`, `X_mask` or `X`), in the masks' label convention. The
predictor is the model file (--model) or the run in --workdir (--fold). For the N cases:
  - the error threshold with the best pooled error-map Dice (`calibration.THRESHOLDS`);
  - a monotone map of predicted to true Dice per structure and for the mean
    (`calibrate.method`: isotonic, platt or none);
  - split-conformal lower bounds on the true Dice at level 1 - `calibrate.alpha`;
  - a report (`calibration.md`, reliability and risk-coverage figures, `calibration.json`)
    scoring the predicted and the leave-one-out calibrated Dice on the same cases: PCC, MAE,
    failure AUROC and AURC.
The calibration goes into a new model file (`output`, default `<model>-calibrated.whqc` or
WORKDIR/model-fold{k}-calibrated.whqc), which `predict --model=` then applies: its
threshold, calibrated Dice (the verdict reads them) and per-structure lower bounds.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import ml_collections
import numpy as np

from . import base
from wh_errmap.data.structures import STRUCTURES
from wh_errmap.errors import UserError
from wh_errmap.metrics.conformal import leave_one_out_recalibrated, min_cases_for_bound
from wh_errmap.metrics.quality import aurc, correlations, failure_auroc
from wh_errmap.qc.assessment import assess, convention_from
from wh_errmap.qc.calibration import MEAN, METHODS, choose_threshold, fit_calibration
from wh_errmap.qc.model_file import load_model
from wh_errmap.qc.pairing import pair_folder
from wh_errmap.qc.predictor import export_predictor, load_predictor, load_predictor_file
from wh_errmap.report.beyond_paper import estimate_figure
from wh_errmap.utils.atomic import write_json, write_text
from wh_errmap.utils.progress import console

# Never read by run(): the predictor brings its own model, preprocessing and training
# settings, the error threshold is chosen from the cases, and no verdict is given.
UNREAD = {**dict.fromkeys(base.TRAINING_GROUPS), "predictor": None, "preprocess": None,
          "splits": None, "data_dir": None, "report.review_band": None}


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.image = ""          # a folder of images
  c.mask = ""           # a folder of the user's masks of them
  c.reference = ""      # a folder of their ground truths (the masks' label convention)
  c.labels = ""         # label convention of masks and ground truths ("" = MMWHS codes)
  c.model_file = ""     # --model: the predictor's model file; "" = the run in --workdir
  c.fold = 0            # with --workdir: whose predictor
  c.output = ""         # the calibrated model file (see the module docstring)
  c.report_dir = ""     # "" = <output without .whqc>-calibration/
  c.calibrate = ml_collections.ConfigDict()
  c.calibrate.method = "isotonic"   # predicted -> true Dice map: isotonic, platt or none
  c.calibrate.alpha = 0.1           # lower bounds hold with probability 1 - alpha
  return c


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  if config.calibrate.method not in METHODS:
    raise UserError(f"calibrate.method must be one of {', '.join(METHODS)}, got "
                    f"{config.calibrate.method!r}")
  if not 0 < config.calibrate.alpha < 1:
    raise UserError(f"calibrate.alpha must lie in (0, 1), got {config.calibrate.alpha}")
  folders = {}
  for what in ("image", "mask", "reference"):
    path = Path(config[what]) if config[what] else None
    if path is None or not path.is_dir():
      raise UserError(f"calibrate needs --{what if what != 'reference' else 'set=reference'}="
                      f"FOLDER, got {config[what]!r}" + (" (not a folder)" if path else ""))
    folders[what] = path
  labels = convention_from(config.labels)
  if config.model_file:
    predictor = load_predictor_file(config.model_file)
    training = load_model(config.model_file).training
    default = Path(config.model_file).with_name(Path(config.model_file).stem
                                                + "-calibrated.whqc")
  else:
    predictor = load_predictor(workdir, config.fold)
    training = predictor.training_record()
    default = Path(workdir) / f"model-fold{config.fold}-calibrated.whqc"
  output = Path(config.output or default)
  if output.exists() and not config.overwrite:
    raise UserError(f"{output} exists: use --overwrite to replace it, or another "
                    f"--set=output=FILE")
  report_dir = Path(config.report_dir or output.with_name(output.stem + "-calibration"))
  # An earlier calibration is not applied while fitting a new one.
  predictor = dataclasses.replace(predictor, calibration=None)

  triples, problems = _triples(folders, config.calibrate.alpha)
  if problems:
    raise UserError(f"{len(problems)} problem(s) pairing the calibration cases: "
                    + "; ".join(problems))
  console(f"[calibrate] {len(triples)} labelled cases in {folders['image']}")
  cases = []
  for i, (image, mask, reference) in enumerate(triples, start=1):
    result = assess(image, mask, predictor, labels, progress=console, reference=reference)
    crop = result.crop
    valid = crop["valid"]
    cases.append({"name": Path(mask).name, "scores": result.scores,
                  "prob": crop["error_prob"][valid],
                  "error": crop["mask"][valid] != crop["reference"][valid]})
    true = result.scores["true"]["mean_dice"]
    console(f"[calibrate] {i}/{len(triples)} {Path(mask).name}: predicted Dice "
            f"{result.scores['mean_predicted_dice']:.3f}, true "
            f"{'-' if true is None else f'{true:.3f}'}")
  threshold, sweep = choose_threshold([c["prob"] for c in cases], [c["error"] for c in cases])
  predicted, true = _dice_columns(cases)
  calibration = fit_calibration(predicted, true, threshold, config.calibrate.method,
                                config.calibrate.alpha, source=str(folders["mask"].absolute()))
  summary = _report(report_dir, cases, predicted, true, calibration, sweep,
                    config.report.failure_dice)
  path = export_predictor(dataclasses.replace(predictor, calibration=calibration.to_dict()),
                          output, {**training, "calibration_cases": len(cases)})
  console(f"[calibrate] threshold {threshold:g}; mean Dice: PCC {summary['raw']['pcc']:.3f} -> "
          f"{summary['calibrated']['pcc']:.3f}, MAE {summary['raw']['mae']:.3f} -> "
          f"{summary['calibrated']['mae']:.3f} (leave-one-out); calibrated model {path}; "
          f"report {report_dir / 'calibration.md'}")


def _triples(folders: dict[str, Path], alpha: float
             ) -> tuple[list[tuple[Path, Path, Path]], list[str]]:
  pairs, problems = pair_folder(folders["image"], folders["mask"])
  truths, truth_problems = pair_folder(folders["image"], folders["reference"])
  truth_of = dict(truths)
  problems += [p for p in truth_problems if p not in problems]
  triples = [(image, mask, truth_of[image]) for image, mask in pairs if image in truth_of]
  if len(triples) < 3:
    problems.append(f"{len(triples)} labelled case(s) found; calibration needs at least 3 "
                    f"(and {min_cases_for_bound(alpha)} for a finite {1 - alpha:.0%} lower "
                    f"bound)")
  return triples, problems


def _dice_columns(cases: list[dict]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """{structure or MEAN: (N,)} predicted and true Dice, NaN where not defined."""
  def value(v):
    return np.nan if v is None else float(v)
  names = [s for s in STRUCTURES if s in cases[0]["scores"]["true"]["dice"]]
  predicted = {s: np.array([value(c["scores"]["structures"][s]["predicted_dice"])
                            for c in cases]) for s in names}
  true = {s: np.array([value(c["scores"]["true"]["dice"].get(s)) for c in cases])
          for s in names}
  predicted[MEAN] = np.array([value(c["scores"]["mean_predicted_dice"]) for c in cases])
  true[MEAN] = np.array([value(c["scores"]["true"]["mean_dice"]) for c in cases])
  return predicted, true


def _report(folder: Path, cases, predicted, true, calibration, sweep, failure_dice) -> dict:
  """calibration.md / .json and two figures; returns the mean Dice's raw and LOO scores."""
  method = calibration.method
  pred, truth = predicted[MEAN], true[MEAN]
  # The calibration's own rule: a map only with more than MIN_RECALIBRATION_CASES cases.
  loo = (leave_one_out_recalibrated(pred, truth, method) if MEAN in calibration.recalibration
         else pred)

  def scores(estimate):
    c = correlations(estimate, truth)
    return {"pcc": c["pcc"], "mae": c["mae"], "aurc": aurc(estimate, 1 - truth),
            "failure_auroc": failure_auroc(estimate, truth, failure_dice)}

  summary = {"cases": len(cases), "threshold": calibration.threshold, "method": method,
             "alpha": calibration.bounds.alpha, "threshold_sweep": sweep,
             "raw": scores(pred), "calibrated": scores(loo),
             "offsets": {k: (None if not np.isfinite(q) else q)
                         for k, q in calibration.bounds.offset.items()},
             "per_case": [{"mask": c["name"], "predicted_dice": p, "calibrated_dice": q,
                           "true_dice": t} for c, p, q, t in zip(cases, pred.tolist(),
                                                                  loo.tolist(),
                                                                  truth.tolist())]}
  folder.mkdir(parents=True, exist_ok=True)
  write_json(folder / "calibration.json", summary)
  estimate_figure(pred, loo, truth, "calibrated (leave-one-out)",
                  folder / "reliability_risk_coverage.png")
  level = 1 - calibration.bounds.alpha
  lines = [f"# Calibration on {len(cases)} labelled cases", "",
           f"Error threshold: {calibration.threshold:g} (best pooled error-map Dice). "
           f"Recalibration: {method}. Lower bounds at {level:.0%}.", "",
           "Mean Dice over the structures, on the calibration cases themselves (calibrated "
           "values leave-one-out):", "",
           "| estimate | PCC | MAE | AURC | failure AUROC |", "|---|---|---|---|---|"]
  for label, key in (("predicted Dice", "raw"), ("calibrated Dice", "calibrated")):
    r = summary[key]
    lines.append(f"| {label} | {r['pcc']:.3f} | {r['mae']:.3f} | {r['aurc']:.4f} | "
                 f"{r['failure_auroc']:.3f} |")
  lines += ["", "Conformal offsets (bound = calibrated Dice - offset; none: too few cases for "
            "this level, the bound is 0):", ""]
  lines += [f"- {k}: {'none' if q is None else f'{q:.3f}'} ({calibration.bounds.n[k]} cases)"
            for k, q in summary["offsets"].items()]
  lines += ["", "![](reliability_risk_coverage.png)", ""]
  write_text(folder / "calibration.md", "\n".join(lines))
  return summary
