"""The report's plots of records and training logs (paper Fig. 2b and Fig. 4, loss curves).

Figures are built with matplotlib's object API (no pyplot), so no GUI backend or global
figure state is involved and the report can run on a headless machine.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter

from wh_errmap.report.tables import format_p
from wh_errmap.train.masks import MASK_TYPES
from wh_errmap.utils.atomic import atomic_path
from wh_errmap.utils.text import number

# Fig. 4's colour code: 0 GT, -1 final output, -2..-5 side outputs.
LEVEL_COLORS = {0: "black", -1: "tab:red", -2: "tab:orange", -3: "tab:green", -4: "tab:blue",
                -5: "tab:purple"}
DIMS_MARKERS = {"3d": "o", "2d": "^", "gt": "*"}
MODEL_TITLES = {"seg3d": "3D segmentor (seg3d)", "seg2d": "2D segmentor (seg2d)",
                "predictor": "error-map predictor (predictor)"}
QI_LABEL = "QI = 1 - fraction of voxels predicted wrong"
DSC_LABEL = "true segmentation Dice (mean over the 7 structures)"


def save_figure(fig: Figure, path: Path, dpi: int = 120) -> None:
  """Writes `fig` as PNG atomically: a crash never leaves a truncated image under `path`."""
  with atomic_path(path, ".png") as tmp:
    fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")


def mask_level(mask_type: str) -> int:
  """Fig. 4's code of a mask type: 0 for GT, -1 for a final output, -k for side output k."""
  if mask_type == "gt":
    return 0
  output = mask_type.split("-")[1]
  return -1 if output == "final" else -int(output[-1])


def mask_style(mask_type: str) -> dict[str, Any]:
  """Colour by Fig. 4's level, marker by segmentor (3D circle, 2D triangle, GT star)."""
  level = mask_level(mask_type)
  if mask_type == "gt":
    name = "GT (0)"
  else:
    dims, output = mask_type.split("-")
    name = f"{dims.upper()} {'final' if level == -1 else 'side ' + output[-1]} ({level})"
  return {"color": LEVEL_COLORS[level], "marker": DIMS_MARKERS[mask_type.split("-")[0]],
          "s": 70 if mask_type == "gt" else 28, "label": name}


def dsc_histogram(records: Sequence[Mapping[str, Any]], path: Path) -> None:
  """Histogram of the segmentation Dice of the auto masks, 3D and 2D stacked (Fig. 2b)."""
  auto = [r for r in records if r["mask_type"] != "gt"]
  groups = {"3D VoxResNet (final + 4 side outputs)": "3d",
            "2D VoxResNet (final + 4 side outputs)": "2d"}
  values = [[r["seg_dsc"] for r in auto if r["mask_type"].startswith(dims)]
            for dims in groups.values()]
  fig = Figure(figsize=(7, 4.5))
  ax = fig.add_subplot()
  ax.hist(values, bins=np.linspace(0.0, 1.0, 21), stacked=True, label=list(groups),
          color=["tab:blue", "tab:orange"], edgecolor="white")
  ax.set_xlim(0.0, 1.0)
  ax.set_xlabel(DSC_LABEL)
  ax.set_ylabel("number of masks")
  ax.set_title(f"Dice of the {len(auto)} auto-generated masks (cf. paper Fig. 2b)")
  ax.legend(loc="upper left")
  save_figure(fig, path)


def _scatter_by_type(ax, records: Sequence[Mapping[str, Any]], x_field: str) -> None:
  for mask_type in MASK_TYPES:
    chosen = [r for r in records if r["mask_type"] == mask_type]
    if chosen:
      ax.scatter([r[x_field] for r in chosen], [r["qi"] for r in chosen], alpha=0.8,
                 edgecolors="none", **mask_style(mask_type))
  ax.legend(title="mask type (level)", loc="center left", bbox_to_anchor=(1.02, 0.5),
            fontsize="small")
  ax.grid(alpha=0.3)


def qi_vs_acc(records: Sequence[Mapping[str, Any]], stats: Mapping[str, Any],
              path: Path) -> None:
  """QI against the true accuracy of every mask, with the identity line (Fig. 4a)."""
  fig = Figure(figsize=(8, 6))
  ax = fig.add_subplot()
  values = np.array([[r["true_acc"], r["qi"]] for r in records])
  low = float(values.min()) - 0.005
  high = 1.0 + 0.02 * (1.0 - low)   # room for the GT masks' markers at Acc = 1
  ax.plot([low, 1.0], [low, 1.0], color="gray", linestyle="--", linewidth=1,
          label="identity (QI = Acc)")
  _scatter_by_type(ax, records, "true_acc")
  ax.set_xlim(low, high)
  ax.set_ylim(low, high)
  ax.set_aspect("equal")
  ax.set_xlabel("true segmentation accuracy (fraction of voxels correct)")
  ax.set_ylabel(QI_LABEL)
  ax.set_title(f"QI vs true accuracy of {stats['n']} masks: PCC = {_pcc(stats['acc'])} "
               f"(p {_p(stats['acc'])}), MAE = {_mae(stats['acc'])}", fontsize="medium")
  save_figure(fig, path)


def qi_vs_dsc(records: Sequence[Mapping[str, Any]], stats: Mapping[str, Any],
              path: Path) -> None:
  """QI against the true segmentation Dice of every mask (Fig. 4b)."""
  fig = Figure(figsize=(8, 6))
  ax = fig.add_subplot()
  _scatter_by_type(ax, records, "seg_dsc")
  ax.set_xlim(0.0, 1.02)
  ax.set_xlabel(DSC_LABEL)
  ax.set_ylabel(QI_LABEL)
  ax.set_title(f"QI vs true Dice of {stats['n']} masks: PCC = {_pcc(stats['dsc'])} "
               f"(p {_p(stats['dsc'])})", fontsize="medium")
  save_figure(fig, path)


def _pcc(stats: Mapping[str, Any]) -> str:
  return number(stats["pcc"], 3)


def _mae(stats: Mapping[str, Any]) -> str:
  return number(stats["mae"], 4)


def _p(stats: Mapping[str, Any]) -> str:
  text = format_p(stats["p_value"])
  return text if text.startswith("<") else f"= {text}"


def training_curves(curves_by_fold: Mapping[int, Mapping[str, Sequence[tuple[int, float]]]],
                    path: Path) -> None:
  """Training loss against step of the three models, one line per fold.

  curves_by_fold: {fold: {model: [(step, loss), ...]}}.
  """
  fig = Figure(figsize=(15, 4.5), layout="constrained")
  axes = fig.subplots(1, len(MODEL_TITLES))
  for ax, (model, title) in zip(axes, MODEL_TITLES.items()):
    losses = []
    for fold, curves in sorted(curves_by_fold.items()):
      if model in curves:
        steps, loss = zip(*curves[model])
        ax.plot(steps, loss, label=f"fold {fold}", linewidth=1.2)
        losses += loss
    if not losses:
      ax.text(0.5, 0.5, "no metrics.jsonl logged", ha="center", va="center",
              transform=ax.transAxes)
    else:
      # The loss falls by orders of magnitude early on; a log axis keeps the tail visible.
      if min(losses) > 0:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
      ax.legend()
    ax.set_title(title)
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3, which="both")
  fig.suptitle("Training loss (CE + soft Dice summed over all outputs) per model and fold")
  save_figure(fig, path)
