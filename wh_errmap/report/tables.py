"""Table 1 of the paper (error-map prediction per mask type) and the QI statistics (Eq. 4)."""
from __future__ import annotations

import csv
import io
import math
from typing import Any, Mapping, Sequence

import numpy as np

from wh_errmap.metrics.quality import correlations
from wh_errmap.train.masks import AUTO_MASK_TYPES, MASK_TYPES
from wh_errmap.utils.text import DASH, number

# Table 1's metric columns: record field -> header.
TABLE1_COLUMNS = {"err_dsc": "Err. DSC", "err_acc": "Err. Acc", "err_prec": "Err. Prec",
                  "err_recl": "Err. Recl", "seg_dsc": "Seg. DSC", "seg_acc": "Seg. Acc"}


def mask_type_label(mask_type: str) -> str:
  """'3d-final' -> '3D Final', '2d-side3' -> '2D-3', 'gt' -> 'GT' (the paper's names)."""
  if mask_type == "gt":
    return "GT"
  dims, output = mask_type.split("-")
  return f"{dims.upper()} Final" if output == "final" else f"{dims.upper()}-{output[-1]}"


_3D = tuple(t for t in AUTO_MASK_TYPES if t.startswith("3d"))
_2D = tuple(t for t in AUTO_MASK_TYPES if t.startswith("2d"))
# Row label -> the mask types it averages over, in the order of the report.
TABLE1_ROWS: dict[str, tuple[str, ...]] = {
    **{mask_type_label(t): (t,) for t in _3D + ("gt",) + _2D},
    "3D-Average": _3D,
    "2D-Average": _2D,
    "Overall-auto": AUTO_MASK_TYPES,
    "Overall-GT": MASK_TYPES,
}
# Table 1 of the paper: row -> (#masks, DSC, Acc, Prec, Recl, Seg. DSC, Seg. Acc). It has no
# per-type 2D rows.
PAPER_TABLE1: dict[str, tuple[float, ...]] = {
    "3D Final": (20, 0.4313, 0.9757, 0.3766, 0.5479, 0.8102, 0.9816),
    "3D-2": (20, 0.8611, 0.9842, 0.8132, 0.9175, 0.2751, 0.938),
    "3D-3": (20, 0.5666, 0.9769, 0.8133, 0.6665, 0.7781, 0.9762),
    "3D-4": (20, 0.5772, 0.9676, 0.4953, 0.7074, 0.6781, 0.9674),
    "3D-5": (20, 0.7421, 0.9597, 0.6501, 0.8668, 0.2387, 0.932),
    "GT": (20, 0.25, 0.9967, 0.25, 1, 1, 1),
    "3D-Average": (100, 0.6357, 0.9728, 0.6297, 0.7412, 0.5560, 0.9590),
    "2D-Average": (100, 0.6161, 0.9691, 0.5092, 0.7927, 0.5483, 0.9647),
    "Overall-auto": (200, 0.6259, 0.9710, 0.5695, 0.7670, 0.5522, 0.9619),
    "Overall-GT": (220, 0.5917, 0.9733, 0.5404, 0.7881, 0.5929, 0.9653),
}
# Eq. 4 of the paper, over its 220 masks (both PCCs with p < 0.0001).
PAPER_QI = {"pcc_acc": 0.972, "pcc_dsc": 0.856, "mae_acc": 0.0048, "n": 220}
# qi_stats.json's name of each statistic -> its name in quality.correlations.
QI_STATS_FIELDS = {"pcc": "pcc", "p_value": "pcc_p", "mae": "mae", "n": "n"}


def table1(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Table 1 over `records`: per row {"row", "n_masks", <field>: mean over its masks}.

  A row without masks has NaN means.
  """
  rows = []
  for label, types in TABLE1_ROWS.items():
    chosen = [r for r in records if r["mask_type"] in types]
    rows.append({"row": label, "n_masks": len(chosen),
                 **{field: float(np.mean([r[field] for r in chosen])) if chosen else math.nan
                    for field in TABLE1_COLUMNS}})
  return rows


def table1_csv(rows: Sequence[Mapping[str, Any]]) -> str:
  """This run's values and the paper's (paper_* columns, empty where it has no row)."""
  fields = ["row", "n_masks", *TABLE1_COLUMNS]
  paper_fields = ["paper_n_masks", *(f"paper_{f}" for f in TABLE1_COLUMNS)]
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(fields + paper_fields)
  for row in rows:
    ours = [row["row"], row["n_masks"]] + [
        "" if math.isnan(row[f]) else f"{row[f]:.6f}" for f in TABLE1_COLUMNS]
    writer.writerow(ours + list(PAPER_TABLE1.get(row["row"], [""] * len(paper_fields))))
  return buffer.getvalue()


def table1_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
  """Table 1 as Markdown; each cell is "this run (paper)"."""
  header = ["Mask type", "#Masks", *TABLE1_COLUMNS.values()]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in rows:
    paper = PAPER_TABLE1.get(row["row"])
    cells = [f"**{row['row']}**", f"{row['n_masks']} ({paper[0] if paper else DASH})"]
    for i, field in enumerate(TABLE1_COLUMNS, start=1):
      cells.append(f"{number(row[field])} ({number(paper[i]) if paper else DASH})")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _clean(value: float | int) -> float | int | None:
  """NaN -> None, so the JSON stays standard."""
  return None if isinstance(value, float) and math.isnan(value) else value


def qi_scope(records: Sequence[Mapping[str, Any]], qi_field: str = "qi") -> dict[str, Any]:
  """How well a quality indicator tracks the true Acc and DSC of `records`.

  Returns {"n", "acc": {"pcc", "p_value", "mae", "n"} of QI against Acc, "dsc": the same
  against DSC} (`quality.correlations`: pairs with a NaN side left out), NaN turned into
  None.
  """
  qi = np.array([r[qi_field] for r in records], np.float64)
  result: dict[str, Any] = {"n": len(records)}
  for key, field in (("acc", "true_acc"), ("dsc", "seg_dsc")):
    stats = correlations(qi, np.array([r[field] for r in records], np.float64))
    result[key] = {name: _clean(stats[source]) for name, source in QI_STATS_FIELDS.items()}
  return result


def qi_statistics(records_by_fold: Mapping[int, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
  """QI statistics over all masks (the paper's Eq. 4), the auto masks, the soft QI and each fold.

  Returns {"all", "auto", "all_soft_qi", "folds": {fold: ...}, "paper": PAPER_QI}, each
  scope as `qi_scope` gives it.
  """
  records = [r for fold in sorted(records_by_fold) for r in records_by_fold[fold]]
  return {"all": qi_scope(records),
          "auto": qi_scope([r for r in records if r["mask_type"] != "gt"]),
          "all_soft_qi": qi_scope(records, "soft_qi"),
          "folds": {str(fold): qi_scope(records_by_fold[fold])
                    for fold in sorted(records_by_fold)},
          "paper": PAPER_QI}


def format_p(p: float | None) -> str:
  """The paper's style: "< 0.0001" below it, else three significant digits."""
  if p is None or math.isnan(p):
    return DASH
  return "< 0.0001" if p < 1e-4 else f"{p:.3g}"


def qi_markdown(stats: Mapping[str, Any]) -> str:
  """One row per scope: n, PCC(QI, Acc) and its p, PCC(QI, DSC) and its p, MAE(QI, Acc)."""
  header = ("Masks", "n", "PCC(QI, Acc)", "p", "PCC(QI, DSC)", "p", "MAE(QI, Acc)")
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  scopes = [("All masks (auto + GT)", stats["all"]), ("Auto masks only", stats["auto"]),
            ("All masks, soft QI (1 - mean probability)", stats["all_soft_qi"])]
  scopes += [(f"Fold {fold}", scope) for fold, scope in stats["folds"].items()]
  for name, scope in scopes:
    acc, dsc = scope["acc"], scope["dsc"]
    lines.append(
        f"| {name} | {scope['n']} | {number(acc['pcc'], 3)} | {format_p(acc['p_value'])} | "
        f"{number(dsc['pcc'], 3)} | {format_p(dsc['p_value'])} | {number(acc['mae'])} |")
  paper = stats["paper"]
  lines.append(f"| Paper (all masks) | {paper['n']} | {paper['pcc_acc']:.3f} | < 0.0001 | "
               f"{paper['pcc_dsc']:.3f} | < 0.0001 | {paper['mae_acc']:.4f} |")
  return "\n".join(lines) + "\n"
