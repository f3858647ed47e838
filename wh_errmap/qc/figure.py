"""The case figure of the visual QC report: three orthogonal slices through the region the
predictor marks worst, with the mask's contours and the predicted errors.

Figures use matplotlib's object API on the Agg canvas (no pyplot), so they draw headless.

Orientation: arrays are (X, Y, Z) in RAS+. Slices follow the radiological convention of
ITK-SNAP and most cardiac viewers: axial (X-Y plane) with anterior up and the patient's
right on the viewer's left; coronal (X-Z) with superior up, right on the left; sagittal
(Y-Z) with superior up, anterior on the left. Each panel is labelled with these letters.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Sequence

import numpy as np
from scipy import ndimage

from wh_errmap.qc.colours import ERROR_RGB, class_name, rgb01, structure_rgb
from wh_errmap.utils.atomic import atomic_path

# matplotlib is imported where a figure is drawn: it takes most of a second to import, in
# every predict command, also those that draw nothing (figures off, a one-line error).
if TYPE_CHECKING:
  from matplotlib.figure import Figure

ERROR_ALPHA = 0.45
FIGSIZE = (10.5, 4.2)  # inches; case_figure's PNG is FIGSIZE * DPI pixels
DPI = 110
THUMBNAIL_WIDTH = 160  # pixels
WORST_BOX = 5  # voxels: side of the box the error probability is averaged over
# name, fixed axis, row axis, column axis, edge letters (left, right, top, bottom). Rows and
# columns both run from high to low coordinates (R, A, S are high in RAS+).
VIEWS = (("axial", 2, 1, 0, "RLAP"), ("coronal", 1, 2, 0, "RLSI"),
         ("sagittal", 0, 2, 1, "APSI"))


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
                 colors=[rgb01(structure_rgb(class_name(int(label))))])
  wrong = view_slice(errors, point, view)
  overlay = np.zeros(wrong.shape + (4,), np.float32)
  overlay[wrong] = (*rgb01(ERROR_RGB), ERROR_ALPHA)
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
  from matplotlib.backends.backend_agg import FigureCanvasAgg
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
  from matplotlib.figure import Figure
  from matplotlib.patches import Patch
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
  handles = [Patch(color=rgb01(structure_rgb(class_name(v))), label=class_name(v))
             for v in present if v != 0]
  handles.append(Patch(color=rgb01(ERROR_RGB), label=f"predicted error (p > {threshold:g})"))
  fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False,
             fontsize=8, labelcolor="white", handlelength=1.2)
  _save(fig, path, DPI)

  if thumbnail_path is not None:
    height = THUMBNAIL_WIDTH / 100 * image.shape[1] * spacing[1] / (image.shape[0] * spacing[0])
    thumb = Figure(figsize=(THUMBNAIL_WIDTH / 100, height), facecolor="black")
    ax = thumb.add_axes((0, 0, 1, 1))
    _draw_view(ax, image, mask, errors, point, spacing, VIEWS[0], image_range, annotate=False)
    _save(thumb, thumbnail_path, 100)
