"""Error-map panels (paper Fig. 3): image, mask, ground truth, true and predicted error maps.

Reads the NIfTI outputs of the evaluation (`fold{k}/predictions/<case>/`) and the original
scans named in `fold{k}/test_cases.json`, all reoriented to RAS+, and shows one axial slice
through the heart's centre per (case, mask type).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from wh_errmap.data.nifti_io import load_case
from wh_errmap.data.structures import MMWHS_CODES, STRUCTURES
from wh_errmap.errors import UserError
from wh_errmap.report.figures import save_figure
from wh_errmap.report.folds import Fold
from wh_errmap.report.tables import mask_type_label
from wh_errmap.train.masks import MASK_TYPES

# Besides its first available mask, the median case also shows these (when written): a
# coarse side output has large errors, unlike the final outputs (the paper's Fig. 3 rows).
EXTRA_MASK_TYPES = ("3d-side2", "2d-final", "gt")
STRUCTURE_COLORS = ListedColormap(["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231",
                                   "#911eb4", "#42d4f4"])
# Share of the heart's extent added around it, so the boundary errors are not at the edge.
CROP_MARGIN = 0.25


@dataclasses.dataclass
class PanelRow:
  """One (case, mask type) of the figure, with its record and the files it is drawn from."""
  fold: int
  case_id: str
  mask_type: str
  record: dict[str, Any]
  image_path: str
  label_path: str
  prediction_dir: Path


def _written_types(directory: Path) -> list[str]:
  return [t for t in MASK_TYPES if all((directory / f"{t}_{kind}.nii.gz").is_file()
                                       for kind in ("mask", "error_prob"))]


def _candidates(fold: Fold) -> list[list[PanelRow]]:
  """Per test case of `fold` with NIfTI outputs: a row for each written mask type."""
  path = fold.directory / "test_cases.json"
  if not fold.records or not path.is_file():
    return []
  test_cases = json.loads(path.read_text())
  by_case = {(r["case_id"], r["mask_type"]): r for r in fold.records}
  candidates = []
  for case_id in fold.case_ids:
    if case_id not in test_cases:
      continue
    directory = fold.directory / "predictions" / case_id
    files = test_cases[case_id]
    rows = [PanelRow(fold.index, case_id, t, by_case[case_id, t], files["image_path"],
                     files["label_path"], directory)
            for t in _written_types(directory) if (case_id, t) in by_case]
    if rows:
      candidates.append(rows)
  return candidates


def choose_rows(folds: Sequence[Fold]) -> tuple[list[PanelRow], list[str]]:
  """The test cases with the lowest, median and highest Dice of their first written mask
  (3d-final when written), the median case also with EXTRA_MASK_TYPES.

  Returns (rows, notes): notes say why no case could be shown, in words.
  """
  candidates = sorted((rows for fold in folds for rows in _candidates(fold)),
                      key=lambda rows: rows[0].record["seg_dsc"])
  if not candidates:
    return [], ["no test case has both NIfTI outputs (`fold{k}/predictions/`) and an entry in "
                "`fold{k}/test_cases.json`; run the evaluation with nifti='all' or 'final'"]
  median = len(candidates) // 2
  chosen = []
  for i in dict.fromkeys([0, median, len(candidates) - 1]):
    rows = candidates[i]
    chosen.append(rows[0])
    if i == median:
      chosen += [row for row in rows[1:] if row.mask_type in EXTRA_MASK_TYPES]
  return chosen, []


def _mask_classes(codes: np.ndarray) -> np.ndarray:
  """MMWHS codes (read as floats) -> classes 0..7."""
  lut = np.asarray((0,) + MMWHS_CODES)
  classes = np.clip(np.searchsorted(lut, np.rint(codes)), 0, len(lut) - 1)
  if not np.array_equal(lut[classes], np.rint(codes)):
    raise ValueError("values other than the MMWHS codes")
  return classes


def _view(volume: np.ndarray, z: int, box: tuple[slice, slice]) -> np.ndarray:
  """RAS+ (X, Y, Z) -> the axial slice z as displayed radiologically: anterior at the top,
  the patient's right on the viewer's left."""
  return volume[box[0], box[1], z][::-1, ::-1].T


def _heart_view(label: np.ndarray) -> tuple[int, tuple[slice, slice]]:
  """The axial slice through the heart's centre and an in-plane box around the heart."""
  foreground = np.argwhere(label > 0)
  z = int(round(foreground[:, 2].mean()))
  low, high = foreground[:, :2].min(axis=0), foreground[:, :2].max(axis=0) + 1
  pad = np.ceil((high - low) * CROP_MARGIN).astype(int)
  low, high = np.maximum(low - pad, 0), np.minimum(high + pad, label.shape[:2])
  return z, (slice(low[0], high[0]), slice(low[1], high[1]))


def load_row(row: PanelRow, threshold: float) -> dict[str, Any]:
  """One row as displayed: {"slices": {name: (H, W) array}, "aspect": pixel height / width,
  "z": the axial slice index in RAS+}; slices are image, mask and label (classes 0..7),
  true_error and pred_error (0/1), prob (float)."""
  case = load_case(row.image_path, row.label_path)
  files = {kind: row.prediction_dir / f"{row.mask_type}_{kind}.nii.gz"
           for kind in ("mask", "error_prob")}
  # load_case reorients to RAS+ as the scan, so the volumes line up voxel by voxel.
  volumes = {kind: load_case(path).image for kind, path in files.items()}
  for kind, volume in volumes.items():
    if volume.shape != case.image.shape:
      raise ValueError(f"{files[kind]}: shape {volume.shape} differs from the scan's "
                       f"{case.image.shape}")
  mask = _mask_classes(volumes["mask"])
  z, box = _heart_view(case.label)
  slices = {"image": case.image, "mask": mask, "label": case.label,
            "true_error": (mask != case.label).astype(np.uint8), "prob": volumes["error_prob"],
            "pred_error": (volumes["error_prob"] > threshold).astype(np.uint8)}
  return {"slices": {k: _view(v, z, box) for k, v in slices.items()},
          "aspect": case.spacing[1] / case.spacing[0], "z": z}


def _show_image(ax, image: np.ndarray, aspect: float) -> None:
  # A percentile window, so a few bright voxels do not leave the heart dark.
  low, high = np.percentile(image, (1, 99))
  ax.imshow(image, cmap="gray", vmin=low, vmax=high, aspect=aspect, interpolation="nearest")


def _overlay(ax, image: np.ndarray, layer: np.ndarray, cmap, aspect: float, **kwargs) -> None:
  """The image in grey under the non-zero voxels of `layer`."""
  _show_image(ax, image, aspect)
  ax.imshow(np.ma.masked_equal(layer, 0), cmap=cmap, aspect=aspect,
                   interpolation="nearest", **kwargs)


def _error_map(ax, error: np.ndarray, aspect: float) -> None:
  # Reversed as in the paper's figures: wrong voxels black on white.
  ax.imshow(1 - error, cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")


def _row_label(row: PanelRow, z: int) -> str:
  r = row.record
  return (f"{row.case_id} (fold {row.fold}, slice z={z})\n"
          f"{mask_type_label(row.mask_type)} mask: Dice {r['seg_dsc']:.3f}\n"
          f"QI {r['qi']:.4f} vs Acc {r['true_acc']:.4f}\nerror-map Dice {r['err_dsc']:.3f}")


def _draw(loaded: Sequence[tuple[PanelRow, dict[str, Any]]], threshold: float,
          path: Path) -> None:
  titles = ("image", "mask", "ground truth", "true error map\n(black: mask ≠ GT)",
            "predicted error probability",
            f"predicted error map\n(black: probability > {threshold})")
  fig = Figure(figsize=(3.2 * len(titles), 3.2 * len(loaded) + 1.0), layout="constrained")
  axes = fig.subplots(len(loaded), len(titles), squeeze=False)
  for r, (row, view) in enumerate(loaded):
    s, aspect = view["slices"], view["aspect"]
    _show_image(axes[r, 0], s["image"], aspect)
    _overlay(axes[r, 1], s["image"], s["mask"], STRUCTURE_COLORS, aspect, vmin=1, vmax=7,
             alpha=0.6)
    _overlay(axes[r, 2], s["image"], s["label"], STRUCTURE_COLORS, aspect, vmin=1, vmax=7,
             alpha=0.6)
    _error_map(axes[r, 3], s["true_error"], aspect)
    prob = axes[r, 4].imshow(s["prob"], cmap="magma", vmin=0.0, vmax=1.0, aspect=aspect,
                             interpolation="nearest")
    fig.colorbar(prob, ax=axes[r, 4], shrink=0.9, label="error probability")
    _error_map(axes[r, 5], s["pred_error"], aspect)
    for c, ax in enumerate(axes[r]):
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(titles[c], fontsize="medium")
    axes[r, 0].set_ylabel(_row_label(row, view["z"]), fontsize="small")
  handles = [Patch(color=STRUCTURE_COLORS(i), label=name) for i, name in enumerate(STRUCTURES)]
  fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False,
             title="structures (mask and ground truth)")
  fig.suptitle("Error maps on axial slices through the heart's centre (radiological view: "
               "patient's right on the left, anterior up)", fontsize="large")
  save_figure(fig, path)


def error_panels(folds: Sequence[Fold], path: Path,
                 threshold: float) -> tuple[list[PanelRow], list[str]]:
  """Draws the rows of `choose_rows` to `path` (paper Fig. 3).

  Returns (rows drawn, notes on what could not be drawn); no file is written without rows.
  """
  rows, notes = choose_rows(folds)
  loaded = []
  for row in rows:
    try:
      loaded.append((row, load_row(row, threshold)))
    except (UserError, ValueError) as e:
      notes.append(f"{row.case_id} {row.mask_type} not shown: {e}")
  if loaded:
    _draw(loaded, threshold, path)
  return [row for row, _ in loaded], notes
