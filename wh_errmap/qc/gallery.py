"""The HTML gallery of a folder of QC results: one self-contained, sortable index.html.

Cases are listed worst first (verdict severity, then mean predicted Dice), each with its
thumbnail (`qc.figure`), verdict, scores, reasons and files.
"""
from __future__ import annotations

import html
import math
import os
import re
import urllib.parse
from pathlib import Path
from typing import Any, Mapping, Sequence

from wh_errmap.data.structures import STRUCTURES
from wh_errmap.qc.figure import THUMBNAIL_WIDTH
from wh_errmap.qc.verdict import VERDICTS
from wh_errmap.utils.atomic import write_text
from wh_errmap.utils.text import DASH

SEVERITY = tuple(reversed(VERDICTS))   # most severe first


def _number(value: Any) -> float | None:
  """A finite float, or None for None, NaN and infinities."""
  value = None if value is None else float(value)
  return value if value is not None and math.isfinite(value) else None


def _href(relative: str | os.PathLike) -> str:
  return html.escape(urllib.parse.quote(Path(relative).as_posix()), quote=True)


def _number_cell(value: Any, tint: bool = False) -> str:
  value = _number(value)
  if value is None:
    return f'<td class="num" data-sort="">{DASH}</td>'
  style = ""
  if tint:  # red below Dice 0.5, through yellow, to green at 1
    style = f' style="background:hsl({120 * min(max(2 * value - 1, 0), 1):.0f},70%,88%)"'
  return f'<td class="num" data-sort="{value!r}"{style}>{value:.3f}</td>'


def _verdict_rank(verdict: str) -> int:
  return SEVERITY.index(verdict) if verdict in SEVERITY else len(SEVERITY)


def _badge(verdict: str, text: str) -> str:
  kind = verdict if verdict in SEVERITY else "other"
  return f'<span class="badge v-{kind}">{html.escape(text)}</span>'


def _default_order(row: Mapping[str, Any]) -> tuple:
  dice = _number(row.get("mean_predicted_dice"))
  return (_verdict_rank(str(row.get("verdict"))), dice is None, dice or 0.0, str(row["pair"]))


def _row_html(index: int, row: Mapping[str, Any], structures: Sequence[str]) -> str:
  pair = html.escape(str(row["pair"]), quote=True)
  png, thumb = row.get("png"), row.get("thumbnail")
  if png or thumb:
    img = (f'<img src="{_href(thumb or png)}" alt="{pair}" width="{THUMBNAIL_WIDTH}" '
           'loading="lazy">')
    picture = f'<a href="{_href(png)}">{img}</a>' if png else img
  else:
    picture = DASH
  verdict = str(row.get("verdict"))
  reasons = "<br>".join(html.escape(str(r)) for r in row.get("reasons") or []) or DASH
  files = "<br>".join(f'<a href="{_href(f)}">{html.escape(Path(f).name)}</a>'
                      for f in row.get("files") or []) or DASH
  dice = row.get("predicted_dice") or {}
  cells = [f"<td>{picture}</td>",
           f'<td class="pair" data-sort="{pair}">{pair}</td>',
           f'<td data-sort="{_verdict_rank(verdict)}">{_badge(verdict, verdict)}</td>',
           _number_cell(row.get("mean_predicted_dice"), tint=True),
           _number_cell(row.get("min_predicted_dice"), tint=True),
           _number_cell(row.get("qi")), _number_cell(row.get("soft_qi")),
           f'<td class="reasons">{reasons}</td>',
           *(_number_cell(dice.get(s), tint=True) for s in structures),
           f'<td class="files">{files}</td>']
  return f'<tr data-pair="{pair}" data-index="{index}">{"".join(cells)}</tr>'


def _header(key: str, label: str, kind: str | None) -> str:
  if kind is None:
    return f"<th>{html.escape(label)}</th>"
  key = re.sub(r"[^A-Za-z0-9_-]", "_", key)
  return (f'<th id="sort-{key}" class="sortable" data-type="{kind}" '
          f'title="sort (click again to reverse)">{html.escape(label)}</th>')


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222}
h1{font-size:1.3em;margin:0 0 .3em} p.note{color:#555;font-size:.85em;max-width:70em}
table{border-collapse:collapse;font-size:.85em}
th,td{border-bottom:1px solid #ddd;padding:.3em .5em;vertical-align:middle;text-align:left}
th{background:#f3f3f3;position:sticky;top:0;z-index:1}
th.sortable{cursor:pointer;user-select:none} th.sortable:hover{background:#e4e4e4}
th[aria-sort=ascending]::after{content:" \\25B2"}
th[aria-sort=descending]::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.reasons{max-width:22em;font-size:.9em} td.files{font-size:.85em}
td img{display:block;background:#000} tr:hover td{background-color:#fafae8}
.badge{display:inline-block;padding:.15em .55em;border-radius:.8em;font-weight:600;font-size:.9em;
 white-space:nowrap;color:#fff;margin-right:.3em}
.v-ok{background:#1a7f37}.v-review{background:#b58100}.v-fail{background:#c62828}
.v-out_of_distribution{background:#6a1b9a}.v-other{background:#777}
"""

# Sorting by the clicked column's data-sort values: numbers or text, empty values last in
# both directions, ties in the default (worst first) order.
_JS = """
{
  const tbody = document.querySelector("#cases tbody");
  let current = null, direction = 1;
  for (const th of document.querySelectorAll("#cases th.sortable")) {
    th.addEventListener("click", () => {
      direction = current === th ? -direction : 1;
      current = th;
      const key = (row) => row.cells[th.cellIndex].dataset.sort;
      tbody.append(...Array.from(tbody.rows).sort((a, b) => {
        const x = key(a), y = key(b), tie = a.dataset.index - b.dataset.index;
        if (x === "" || y === "") return x === y ? tie : (x === "" ? 1 : -1);
        return (th.dataset.type === "num" ? x - y : x.localeCompare(y)) * direction || tie;
      }));
      document.querySelectorAll("#cases th").forEach((h) => h.removeAttribute("aria-sort"));
      th.setAttribute("aria-sort", direction > 0 ? "ascending" : "descending");
    });
  }
}
"""


def write_gallery(output_dir: str | os.PathLike, rows: list[dict],
                  title: str = "wh_errmap QC") -> Path:
  """Writes `output_dir/index.html` atomically and returns its path: one self-contained page
  (inline CSS and JS, no network) with a table of the cases, worst first (verdict severity,
  then mean predicted Dice). Clicking a header sorts by it; clicking again reverses.

  rows: per case {"pair": str, "verdict": str, "mean_predicted_dice", "min_predicted_dice",
  "qi", "soft_qi": float or None/NaN (shown as a dash, sorted last), "reasons": [str],
  "png", "thumbnail": str or None, "files": [str], "predicted_dice": {structure: float or
  None}}; paths are relative to `output_dir`. All text is HTML-escaped.
  """
  structures = [s for s in STRUCTURES if any(s in (r.get("predicted_dice") or {}) for r in rows)]
  structures += sorted({s for r in rows for s in r.get("predicted_dice") or {}} - set(structures))
  ordered = sorted(rows, key=_default_order)
  counts = {v: sum(str(r.get("verdict")) == v for r in rows) for v in VERDICTS}
  others = len(rows) - sum(counts.values())
  summary = " ".join(_badge(v, f"{n} {v}") for v, n in counts.items())
  if others:
    summary += " " + _badge("other", f"{others} other")
  headers = [_header("thumbnail", "slices", None), _header("pair", "case", "text"),
             _header("verdict", "verdict", "num"),
             _header("mean_predicted_dice", "mean pred. Dice", "num"),
             _header("min_predicted_dice", "min pred. Dice", "num"),
             _header("qi", "QI", "num"), _header("soft_qi", "soft QI", "num"),
             _header("reasons", "reasons", None),
             *(_header(f"dice-{s}", s, "num") for s in structures),
             _header("files", "files", None)]
  page = "\n".join([
      "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
      f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
      f"<h1>{html.escape(title)}</h1>",
      f'<p class="summary">{len(rows)} cases: {summary}</p>',
      '<p class="note">Pred. Dice: the Dice each structure is predicted to have against a '
      "correct mask. QI: 1 - fraction of voxels predicted wrong. Slices cross at the worst "
      "predicted region (red: predicted errors). Click a header to sort; click again to "
      "reverse.</p>",
      f'<table id="cases"><thead><tr>{"".join(headers)}</tr></thead><tbody>',
      *(_row_html(i, row, structures) for i, row in enumerate(ordered)),
      f"</tbody></table><script>{_JS}</script></body></html>", ""])
  path = Path(output_dir) / "index.html"
  write_text(path, page)
  return path
