"""The visual QC report of a batch of (image, mask) pairs: case figures, an HTML gallery and
colour tables for viewers.

`case_figure` draws three orthogonal slices through the region the predictor marks worst,
`write_gallery` writes a self-contained sortable index.html over the cases, and
`write_colour_tables` writes ITK-SNAP and 3D Slicer colour tables in the figures' colours.
Figures use matplotlib's object API on the Agg canvas (no pyplot), so they draw headless.

Orientation: arrays are (X, Y, Z) in RAS+. Slices follow the radiological convention of
ITK-SNAP and most cardiac viewers: axial (X-Y plane) with anterior up and the patient's
right on the viewer's left; coronal (X-Z) with superior up, right on the left; sagittal
(Y-Z) with superior up, anterior on the left. Each panel is labelled with these letters.
"""
from __future__ import annotations

import html
import math
import os
import re
import urllib.parse
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from scipy import ndimage

from wh_errmap.atomic import atomic_path, write_text
from wh_errmap.data.nifti_io import STRUCTURES

# Okabe-Ito's colour-blind-safe palette, keyed by internal structure name, with white for its
# black (the scans are dark) and without its vermillion (too close to the red error overlay).
STRUCTURE_RGB: dict[str, tuple[int, int, int]] = {
    "Myo": (230, 159, 0), "LA": (86, 180, 233), "LV": (0, 158, 115), "RA": (240, 228, 66),
    "RV": (0, 114, 178), "AO": (204, 121, 167), "PA": (255, 255, 255)}
UNKNOWN_RGB = (153, 153, 153)
ERROR_RGB = (255, 0, 0)
ERROR_ALPHA = 0.45
VERDICTS = ("out_of_distribution", "fail", "review", "ok")  # most severe first
FIGSIZE = (10.5, 4.2)  # inches; case_figure's PNG is FIGSIZE * DPI pixels
DPI = 110
THUMBNAIL_WIDTH = 160  # pixels
WORST_BOX = 5  # voxels: side of the box the error probability is averaged over
DASH = "–"
# name, fixed axis, row axis, column axis, edge letters (left, right, top, bottom). Rows and
# columns both run from high to low coordinates (R, A, S are high in RAS+).
VIEWS = (("axial", 2, 1, 0, "RLAP"), ("coronal", 1, 2, 0, "RLSI"),
         ("sagittal", 0, 2, 1, "APSI"))


def structure_rgb(name: str) -> tuple[int, int, int]:
  """The fixed colour of an internal structure name ("Myo", ...); grey for unknown names."""
  return STRUCTURE_RGB.get(name, UNKNOWN_RGB)


def _class_name(label: int) -> str:
  return STRUCTURES[label - 1] if 1 <= label <= len(STRUCTURES) else str(label)


def _rgb01(rgb: tuple[int, int, int]) -> tuple[float, float, float]:
  return tuple(c / 255 for c in rgb)


def worst_point(error_prob: np.ndarray, valid: np.ndarray | None = None,
                threshold: float = 0.5, box: int = WORST_BOX) -> tuple[int, int, int] | None:
  """The valid voxel where the error probability averaged over a `box`^3 box is highest.

  error_prob: (X, Y, Z) float in [0, 1]. valid: (X, Y, Z) bool, True on real (non-padding)
  voxels; None means all. Averaging prefers a region of errors to a lone voxel; padding
  counts as 0. Returns None when no valid voxel has error_prob > threshold.
  """
  prob = np.asarray(error_prob, np.float32)
  if valid is not None:
    prob = np.where(valid, prob, np.float32(0))
  if not (prob > threshold).any():
    return None
  smooth = ndimage.uniform_filter(prob, size=box, mode="constant")
  if valid is not None:
    smooth = np.where(valid, smooth, np.float32(-1))
  # Of a plateau of equal maxima (a block of certain errors), its voxel nearest its mean.
  ties = np.argwhere(smooth >= smooth.max() - 1e-6)
  nearest = np.argmin(((ties - ties.mean(axis=0)) ** 2).sum(axis=1))
  return tuple(int(i) for i in ties[nearest])


def focus_point(error_prob: np.ndarray, mask: np.ndarray, valid: np.ndarray | None = None,
                threshold: float = 0.5) -> tuple[int, int, int]:
  """Where the figure's slices cross: `worst_point`, else the centre of the mask's
  foreground, else the centre of the volume."""
  point = worst_point(error_prob, valid, threshold)
  if point is not None:
    return point
  foreground = np.argwhere(mask > 0)
  if len(foreground):
    return tuple(int(round(c)) for c in foreground.mean(axis=0))
  return tuple(s // 2 for s in mask.shape)


def view_slice(volume: np.ndarray, point: Sequence[int], view: tuple) -> np.ndarray:
  """The 2D slice of (X, Y, Z) `volume` through `point` for one of VIEWS, in display order:
  row 0 at the top (anterior or superior), column 0 at the left (right or anterior)."""
  _, fixed, row_axis, col_axis, _ = view
  plane = np.take(volume, point[fixed], axis=fixed)
  rest = [a for a in range(3) if a != fixed]
  return plane.transpose(rest.index(row_axis), rest.index(col_axis))[::-1, ::-1]


def _draw_view(ax, image: np.ndarray, mask: np.ndarray, errors: np.ndarray,
               point: Sequence[int], spacing: Sequence[float], view: tuple,
               image_range: tuple[float, float], annotate: bool) -> None:
  name, fixed, row_axis, col_axis, letters = view
  aspect = spacing[row_axis] / spacing[col_axis]
  ax.imshow(view_slice(image, point, view), cmap="gray", vmin=image_range[0],
            vmax=image_range[1], aspect=aspect, interpolation="nearest")
  labels = view_slice(mask, point, view)
  for label in np.unique(labels):
    region = labels == label
    if label != 0 and not region.all():
      ax.contour(region.astype(np.float32), levels=[0.5], linewidths=0.9,
                 colors=[_rgb01(structure_rgb(_class_name(int(label))))])
  wrong = view_slice(errors, point, view)
  overlay = np.zeros(wrong.shape + (4,), np.float32)
  overlay[wrong] = (*_rgb01(ERROR_RGB), ERROR_ALPHA)
  ax.imshow(overlay, aspect=aspect, interpolation="nearest")
  ax.set_axis_off()
  if not annotate:
    return
  # Short ticks at the edges mark the other two slices without hiding the worst region.
  row = image.shape[row_axis] - 1 - point[row_axis]
  col = image.shape[col_axis] - 1 - point[col_axis]
  for lo, hi in ((0.0, 0.04), (0.96, 1.0)):
    ax.axhline(row, xmin=lo, xmax=hi, color="yellow", linewidth=1.5)
    ax.axvline(col, ymin=lo, ymax=hi, color="yellow", linewidth=1.5)
  ax.set_title(f"{name}  {'xyz'[fixed]}={point[fixed]}", fontsize=8, color="white")
  for (x, y), letter in zip(((0.02, 0.5), (0.98, 0.5), (0.5, 0.97), (0.5, 0.03)), letters):
    ax.text(x, y, letter, transform=ax.transAxes, color="white", fontsize=7,
            ha="center", va="center", fontweight="bold")


def _save(fig: Figure, path: str | os.PathLike, dpi: int) -> None:
  FigureCanvasAgg(fig)
  with atomic_path(path, ".png") as tmp:
    fig.savefig(tmp, format="png", dpi=dpi)


def case_figure(path: str | os.PathLike, image: np.ndarray, mask: np.ndarray,
                error_prob: np.ndarray, spacing: tuple[float, float, float], title: str,
                threshold: float = 0.5, valid: np.ndarray | None = None,
                thumbnail_path: str | os.PathLike | None = None) -> None:
  """Writes a PNG (FIGSIZE * DPI pixels) of axial, coronal and sagittal slices through
  `focus_point`: the scan in grey, mask contours per structure and predicted errors
  (error_prob > threshold) in translucent red, with `title` and a legend.

  image: (X, Y, Z) float32, RAS+. mask: (X, Y, Z) int, internal classes 0..7 (other values
  are drawn grey). error_prob: (X, Y, Z) float in [0, 1]. spacing: voxel size in mm along
  X, Y, Z. valid: (X, Y, Z) bool, True on real voxels (None: all); errors outside it are
  neither drawn nor looked at. thumbnail_path: if given, also writes there the axial panel
  alone, THUMBNAIL_WIDTH pixels wide, without text (for the gallery). Both atomically.
  """
  errors = error_prob > threshold
  if valid is not None:
    errors &= valid
  point = focus_point(error_prob, mask, valid, threshold)
  sample = image[::2, ::2, ::2] if valid is None else image[::2, ::2, ::2][valid[::2, ::2, ::2]]
  low, high = np.percentile(sample, (1, 99)) if sample.size else (-1.0, 1.0)
  image_range = (float(low), float(max(high, low + 1e-6)))

  fig = Figure(figsize=FIGSIZE, facecolor="black")
  fig.subplots_adjust(left=0.005, right=0.995, top=0.86, bottom=0.1, wspace=0.03)
  for ax, view in zip(fig.subplots(1, len(VIEWS)), VIEWS):
    _draw_view(ax, image, mask, errors, point, spacing, view, image_range, annotate=True)
  fig.suptitle(title, fontsize=10, color="white")
  present = [int(v) for v in np.flatnonzero(np.bincount(mask.ravel().astype(np.int64)))]
  handles = [Patch(color=_rgb01(structure_rgb(_class_name(v))), label=_class_name(v))
             for v in present if v != 0]
  handles.append(Patch(color=_rgb01(ERROR_RGB), label=f"predicted error (p > {threshold:g})"))
  fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False,
             fontsize=8, labelcolor="white", handlelength=1.2)
  _save(fig, path, DPI)

  if thumbnail_path is not None:
    height = THUMBNAIL_WIDTH / 100 * image.shape[1] * spacing[1] / (image.shape[0] * spacing[0])
    thumb = Figure(figsize=(THUMBNAIL_WIDTH / 100, height), facecolor="black")
    ax = thumb.add_axes((0, 0, 1, 1))
    _draw_view(ax, image, mask, errors, point, spacing, VIEWS[0], image_range, annotate=False)
    _save(thumb, thumbnail_path, 100)


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
  return VERDICTS.index(verdict) if verdict in VERDICTS else len(VERDICTS)


def _badge(verdict: str, text: str) -> str:
  kind = verdict if verdict in VERDICTS else "other"
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
  summary = " ".join(_badge(v, f"{n} {v}") for v, n in reversed(counts.items()))
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


_ITKSNAP_HEADER = """\
################################################
# ITK-SnAP Label Description File
# File format:
# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL
# Fields: IDX label value; -R- -G- -B- colour (0..255); -A-- opacity (0..1);
#   VIS, MSH visibility in the slices and in 3D (0 or 1); LABEL description
################################################
"""


def _itksnap(entries: Sequence[tuple[int, str, tuple[int, int, int]]], clear: str) -> str:
  lines = [f'{0:5d} {0:5d} {0:4d} {0:4d} {0:8g} {0:2d} {0:2d}    "{clear}"']
  for value, name, (r, g, b) in entries:
    label = name.replace('"', "'")
    lines.append(f'{value:5d} {r:5d} {g:4d} {b:4d} {1:8g} {1:2d} {1:2d}    "{label}"')
  return _ITKSNAP_HEADER + "\n".join(lines) + "\n"


def _slicer(entries: Sequence[tuple[int, str, tuple[int, int, int]]], clear: str,
            table: str) -> str:
  lines = [f"# Color table file {table}", f"# {len(entries) + 1} values",
           f"0 {clear} 0 0 0 0"]
  for value, name, (r, g, b) in entries:
    words = "_".join(name.split())  # Slicer's names cannot hold spaces
    lines.append(f"{value} {words} {r} {g} {b} 255")
  return "\n".join(lines) + "\n"


def write_colour_tables(output_dir: str | os.PathLike,
                        structures: list[tuple[int, str]]) -> list[Path]:
  """Writes colour tables for the masks and the binary error maps, atomically:
  labels.itksnap.txt, labels.slicer.ctbl, errors.itksnap.txt, errors.slicer.ctbl (in that
  order, returned).

  structures: (the user's label value, internal structure name) per structure, e.g.
  [(205, "Myo"), (420, "LA")]. Values must be distinct positive integers (0 is the
  background). Each structure gets its `structure_rgb` colour; the error maps have 0
  "correct" (clear) and 1 "predicted error" (red).
  """
  values = [int(v) for v, _ in structures]
  if len(set(values)) != len(values) or min(values, default=1) <= 0:
    raise ValueError(f"label values must be distinct and positive, got {values}")
  labels = [(int(v), name, structure_rgb(name)) for v, name in structures]
  errors = [(1, "predicted error", ERROR_RGB)]
  output_dir = Path(output_dir)
  texts = {"labels.itksnap.txt": _itksnap(labels, "Clear Label"),
           "labels.slicer.ctbl": _slicer(labels, "Background", "labels.slicer.ctbl"),
           "errors.itksnap.txt": _itksnap(errors, "correct"),
           "errors.slicer.ctbl": _slicer(errors, "correct", "errors.slicer.ctbl")}
  for name, text in texts.items():
    write_text(output_dir / name, text)
  return [output_dir / name for name in texts]
