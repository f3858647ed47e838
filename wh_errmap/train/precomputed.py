"""Masks made by other segmentors, as predictor training data (`predictor.mask_sources`).

For example nnU-Net's out-of-fold cross-validation predictions: folders of NIfTI masks
named after the training cases (`CASE.nii.gz`, or `CASE_anything.nii.gz` for several masks
of one case), in a label convention (`predictor.mask_labels`, as `--labels` of predict).
Each mask is resampled and cropped exactly as its case's label was
(`preprocess_case(crop_label=...)`: the ground truth sets the training crop, as it does for
the label itself), so the training pipeline then crops and flips image, label and mask
together.

Only the fold's training cases are looked up: a mask of a test case is never read, and
`find_masks` reports how many it left aside.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from wh_errmap.data.labels import LabelConvention, parse_labels
from wh_errmap.data.nifti_io import make_case, read_volume_file
from wh_errmap.data.preprocess import PreprocessConfig, PreprocessedCase, preprocess_case
from wh_errmap.errors import UserError

_NIFTI = re.compile(r"^(?P<stem>.+?)(\.nii|\.nii\.gz)$")


def find_masks(folders: Sequence[str | Path], case_ids: Sequence[str]
               ) -> tuple[dict[str, list[Path]], list[str]]:
  """{case id: mask files} of `case_ids` in `folders` (`CASE.nii[.gz]` or `CASE_*.nii[.gz]`),
  and the names of files left aside (other cases, e.g. the fold's test cases).

  A file matching two case ids (`a_1` for cases `a` and `a_1`) goes to the longer one.
  Raises UserError for a folder that does not exist.
  """
  ids = sorted(case_ids, key=len, reverse=True)
  found: dict[str, list[Path]] = {case: [] for case in case_ids}
  ignored = []
  for folder in map(Path, folders):
    if not folder.is_dir():
      raise UserError(f"predictor.mask_dirs: {folder} is not a folder")
    for path in sorted(folder.iterdir()):
      match = _NIFTI.match(path.name)
      if not match or not path.is_file():
        continue
      stem = match["stem"]
      case = next((c for c in ids if stem == c or stem.startswith(c + "_")), None)
      if case is None:
        ignored.append(path.name)
      else:
        found[case].append(path)
  return found, ignored


def load_masks(case: PreprocessedCase, paths: Sequence[Path], convention: LabelConvention,
               config: PreprocessConfig) -> np.ndarray:
  """(K, X, Y, Z) uint8 classes of `paths`, on the preprocessed case's grid and crop.

  The case is re-read from its files (properties image_path, label_path) so that every mask
  goes through the same resampling as its label, and the label places the crop. A mask
  whose shape or orientation differs from the image is an InvalidCaseError naming it.
  """
  image = read_volume_file(case.properties["image_path"])
  image = (*image, case.properties["image_path"])
  truth = read_volume_file(case.properties["label_path"])
  truth = make_case(image, (*truth, case.properties["label_path"]), case.case_id)
  out = []
  for path in paths:
    masked = make_case(image, (*read_volume_file(path), str(path)), case.case_id,
                       lambda p, raw: convention.encode(p, raw).classes)
    pre = preprocess_case(masked, config, crop_label=truth.label)
    if pre.label.shape != case.label.shape:
      raise UserError(f"{path}: preprocessed to {pre.label.shape}, but its case "
                      f"{case.case_id} to {case.label.shape}")
    out.append(pre.label.astype(np.uint8))
  return (np.stack(out) if out else np.zeros((0, *case.label.shape), np.uint8))


def training_masks(folders: str, labels: str, cases: Sequence[PreprocessedCase],
                   config: PreprocessConfig) -> tuple[list[np.ndarray], str]:
  """Masks of each training case from comma-separated `folders`; and a line saying what was
  found. Raises UserError when no training case has one."""
  dirs = [f.strip() for f in folders.split(",") if f.strip()]
  if not dirs:
    raise UserError("predictor.mask_sources.precomputed > 0 needs predictor.mask_dirs "
                    "(comma-separated folders of masks named after the training cases)")
  convention = parse_labels(labels or "mmwhs")
  found, ignored = find_masks(dirs, [c.case_id for c in cases])
  masks = [load_masks(c, found[c.case_id], convention, config) for c in cases]
  count = sum(len(m) for m in masks)
  if not count:
    raise UserError(f"no mask of a training case in {', '.join(dirs)} (looked for CASE.nii.gz "
                    f"or CASE_*.nii.gz with CASE one of {', '.join(c.case_id for c in cases)})")
  line = (f"[predictor] {count} precomputed masks of {sum(1 for m in masks if len(m))} of "
          f"{len(cases)} training cases from {', '.join(dirs)}"
          + (f"; {len(ignored)} file(s) of other cases left aside" if ignored else ""))
  return masks, line
