"""The cross-validation report: Table 1, QI statistics and figures of a run, in `workdir/report/`.

Written from whatever folds exist, so it can be built (and rebuilt) while folds are still
running; report.md says which folds it covers and which are missing or incomplete.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from wh_errmap.data.dataset import data_source
from wh_errmap.errors import UserError
from wh_errmap.report import beyond_paper, figures, panels, tables
from wh_errmap.report.folds import Fold, read_folds
from wh_errmap.train.masks import MASK_TYPES
from wh_errmap.utils.atomic import write_json, write_text

# Figure file -> one-line caption in report.md.
CAPTIONS = {
    "dsc_histogram.png": "Segmentation Dice of the auto-generated masks (10 per test case), "
                         "3D and 2D segmentors stacked; cf. paper Fig. 2b.",
    "qi_vs_acc.png": "QI against the true voxel accuracy of every mask, coloured by mask "
                     "type (0 GT, -1 final, -2..-5 side outputs; circle 3D, triangle 2D), "
                     "dashed: QI = Acc; cf. paper Fig. 4a.",
    "qi_vs_dsc.png": "QI against the true segmentation Dice of every mask; cf. paper Fig. 4b.",
    "error_panels.png": "Representative error-map predictions (test cases with the lowest, "
                        "median and highest Dice): image, mask, ground truth, true error map, "
                        "predicted error probability and thresholded prediction, on the scan's "
                        "original grid (masks are mapped back from the working grid, so even "
                        "the GT mask differs from the label along some boundaries); cf. paper "
                        "Fig. 3.",
    "risk_coverage.png": "Risk-coverage curves on the auto masks: accepting masks from the "
                         "best-scored down, the mean 1 - Dice of those accepted, for each "
                         "quality score (dashed: softmax baseline; black: perfect ordering).",
    "reliability.png": "Reliability diagram of the voxel error probabilities (10 bins): "
                       "observed error rate against predicted probability, with the ECE.",
    "recalibration.png": "Left: mean Dice of the auto masks, predicted and recalibrated "
                         "(isotonic fit on the other folds), against the true Dice. Right: "
                         "their risk-coverage curves.",
    "training_curves.png": "Training loss against step of the 3D and 2D segmentors and the "
                           "error-map predictor, one line per fold.",
}


def run_data_source(workdir: Path) -> str:
  """Where the run's cases come from (`data_source`), from its config.json; "unknown data
  (no readable config.json)" without one."""
  try:
    return data_source(json.loads((workdir / "config.json").read_text()))
  except (OSError, ValueError, KeyError, TypeError):
    return "unknown data (no readable config.json)"


def _data_summary(workdir: Path) -> str | None:
  """One line on the run's data and training length, from its config.json."""
  path = workdir / "config.json"
  try:
    config = json.loads(path.read_text())
    data = run_data_source(workdir)
    steps = ", ".join(f"{model} {config['train'][model]['steps']}"
                      for model in ("seg3d", "seg2d", "predictor"))
    spacing = " x ".join(f"{s:g}" for s in config["preprocess"]["spacing"])
    threshold = config["predictor"]["threshold"]
  except (OSError, ValueError, KeyError, TypeError):
    return None
  return (f"Data: {data}; {spacing} mm voxels; training steps: {steps}; records scored with "
          f"predicted error = probability > {threshold} (`{path.name}`).")


def _fold_section(folds: Sequence[Fold]) -> list[str]:
  """Which folds the results cover, which are missing or incomplete, and a status table."""
  used = [f for f in folds if f.records]
  cases = sum(len(f.case_ids) for f in used)
  masks = sum(len(f.records) for f in used)
  lines = ["| Fold | Status | Test cases | Masks |", "|---|---|---|---|"]
  lines += [f"| {f.index} | {f.status} | {len(f.case_ids)} | {len(f.records)} |" for f in folds]
  lacking = [f for f in folds if not f.complete]
  summary = (f"Results below cover fold(s) {', '.join(str(f.index) for f in used)}: {cases} "
             f"test cases, {masks} masks ({len(MASK_TYPES)} per case: 10 auto masks + GT). ")
  if lacking:
    summary += ("**Missing or incomplete: " + "; ".join(
        f"fold {f.index} ({f.status})" for f in lacking) + ".**")
  else:
    summary += f"All {len(folds)} folds are complete."
  return [summary, "", *lines, ""]


def _figure(name: str, title: str) -> list[str]:
  return [f"### {title}", "", f"![{title}]({name})", "", f"*{CAPTIONS[name]}*", ""]


def _markdown(workdir: Path, folds: Sequence[Fold], table1_md: str, qi_md: str,
              panels_drawn: bool, panel_notes: Sequence[str], qc_md: str) -> str:
  """report.md: what was run, Table 1, QI statistics and the figures with captions."""
  lines = ["# Error-map prediction and segmentation quality assessment: cross-validation "
           "report", "", f"**Data source: {run_data_source(workdir)}.**", "",
           f"Run: `{workdir.resolve()}`. Rebuild with `python launch.py "
           f"--experiment=cv_report --workdir={workdir}`.", ""]
  lines += ["## What was run", ""]
  data = _data_summary(workdir)
  lines += [data, ""] if data else []
  lines += _fold_section(folds)
  lines += ["## Table 1: error-map prediction per mask type", "",
            "Means over masks; each cell is *this run (paper)*. Err. = scores of the predicted "
            "error map against the true one (error voxels are the positive class); Seg. = "
            "the mask against the ground truth (DSC averaged over the 7 structures). The paper "
            "reports no per-type 2D rows (–). Also in `table1.csv`.", "", table1_md,
            "## Quality indicator (QI) against the true quality (paper Eq. 4)", "",
            "QI = 1 - fraction of voxels predicted wrong estimates the mask's voxel accuracy "
            "without ground truth. Pearson correlation (PCC, two-sided p) and mean absolute "
            "error (MAE). Also in `qi_stats.json`.", "", qi_md,
            qc_md, "Also in `qc_stats.json`.", ""]
  studies = sorted(workdir.glob("heldout_errors-*.md"))
  if studies:
    lines += ["### Mask sources: errors that no predictor saw", "",
              "From `--experiment=heldout_errors --set=study.run=...` on this run: a "
              "predictor trained on the segmentors' masks alone and one that also trains on "
              "perturbed ground truth, each scored on masks of its own segmentors and of "
              "held-out segmentors trained another way.", ""]
    for path in studies:
      lines += [f"`{path.name}`:", "", path.read_text().strip(), ""]
  lines += ["## Figures", ""]
  lines += _figure("dsc_histogram.png", "Dice of the generated masks")
  lines += _figure("qi_vs_acc.png", "QI vs true accuracy")
  lines += _figure("qi_vs_dsc.png", "QI vs true Dice")
  lines += _figure("risk_coverage.png", "Risk-coverage curves")
  lines += _figure("reliability.png", "Calibration of the error probabilities")
  if (workdir / "report" / "recalibration.png").exists():
    lines += _figure("recalibration.png", "Predicted and recalibrated Dice")
  if panels_drawn:
    lines += _figure("error_panels.png", "Error maps of representative cases")
  else:
    lines += ["### Error maps of representative cases", "", "Not drawn.", ""]
  lines += [f"- {note}" for note in panel_notes] + ([""] if panel_notes else [])
  lines += _figure("training_curves.png", "Training curves")
  return "\n".join(lines)


def build_report(workdir: str | Path, num_folds: int = 5, threshold: float = 0.5,
                 failure_dice: float = 0.75) -> Path:
  """Writes Table 1, QI statistics, figures and report.md to `workdir/report/`.

  Args:
    workdir: a run's workdir, holding `fold{k}/` directories (some may be missing).
    num_folds: folds the run should have (0..num_folds-1).
    threshold: error probability above which a voxel counts as predicted wrong in the
      error-map panels (the records hold the evaluation's scores).
    failure_dice: a mask with a true Dice below this is a failure (failure AUROC).
  Returns:
    The path of report.md.
  Raises:
    UserError: no fold has records.
  """
  workdir = Path(workdir)
  folds = read_folds(workdir, num_folds)
  used = [f for f in folds if f.records]
  if not used:
    raise UserError(
        f"no fold of {workdir} has test records (looked for "
        f"{workdir / 'fold{k}' / 'records.json'} with k = 0..{num_folds - 1}); produce them "
        f"with `python launch.py --experiment=cv_fold --fold=k --workdir={workdir}`")
  out = workdir / "report"
  records = [r for f in used for r in f.records]

  rows = tables.table1(records)
  write_text(out / "table1.csv", tables.table1_csv(rows))
  table1_md = tables.table1_markdown(rows)
  write_text(out / "table1.md", f"Table 1 on {run_data_source(workdir)}.\n\n{table1_md}")
  stats = tables.qi_statistics({f.index: f.records for f in used})
  write_json(out / "qi_stats.json", stats)
  qi_md = tables.qi_markdown(stats)
  write_text(out / "qi_stats.md", qi_md)

  bins = {f.index: json.loads((f.directory / "calibration.json").read_text()) for f in used
          if (f.directory / "calibration.json").exists()}
  qc_stats = beyond_paper.qc_statistics({f.index: f.records for f in used}, bins, failure_dice)
  write_json(out / "qc_stats.json", qc_stats)
  qc_md = beyond_paper.qc_markdown(qc_stats)
  write_text(out / "qc_stats.md", qc_md)
  beyond_paper.risk_coverage_figure(records, out / "risk_coverage.png")
  beyond_paper.reliability_figure(beyond_paper.add_bins(list(bins.values())),
                                  out / "reliability.png")
  if not beyond_paper.recalibration_figure({f.index: f.records for f in used},
                                           out / "recalibration.png"):
    (out / "recalibration.png").unlink(missing_ok=True)

  figures.dsc_histogram(records, out / "dsc_histogram.png")
  figures.qi_vs_acc(records, stats["all"], out / "qi_vs_acc.png")
  figures.qi_vs_dsc(records, stats["all"], out / "qi_vs_dsc.png")
  figures.training_curves({f.index: f.curves for f in folds}, out / "training_curves.png")
  panel_rows, panel_notes = panels.error_panels(folds, out / "error_panels.png", threshold)
  if not panel_rows:
    # An image left by an earlier build would no longer match the records.
    (out / "error_panels.png").unlink(missing_ok=True)

  path = out / "report.md"
  write_text(path, _markdown(workdir, folds, table1_md, qi_md, bool(panel_rows), panel_notes,
                            qc_md))
  return path
