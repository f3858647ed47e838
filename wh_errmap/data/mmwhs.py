"""Discovery of cases in the MMWHS 2017 file layout.

    mr_train_1001_image.nii.gz   mr_train_1001_label.nii.gz
    ct_train_1001_image.nii.gz   ct_train_1001_label.nii.gz
    mr_test_2001_image.nii.gz    (no label)

`.nii` files are accepted as well; subfolders are searched too (MMWHS ships the train
cases in `mr_train/` and the test images in `mr_test/`), symlinked ones included.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from wh_errmap.data.nifti_io import InvalidCaseError

_NAME = re.compile(r"^(?P<modality>mr|ct)_(?P<split>train|test)_(?P<number>\d+)_"
                   r"(?P<kind>image|label)\.nii(\.gz)?$")


@dataclasses.dataclass(frozen=True)
class CasePaths:
  case_id: str                 # e.g. "mr_train_1001"
  modality: str                # "mr" or "ct"
  image_path: Path
  label_path: Path | None      # None for unlabelled (test) images


def _files_under(root: Path) -> list[Path]:
  """All files under `root`, sorted, following symlinked folders (which `Path.rglob` does not
  enter). A folder reached again through a link, as in a link cycle, is searched once."""
  seen, files = set(), []
  for folder, subfolders, names in os.walk(root, followlinks=True):
    real = os.path.realpath(folder)
    if real in seen:
      subfolders.clear()
      continue
    seen.add(real)
    subfolders.sort()  # the first path to a folder reached twice is the one kept
    files += [Path(folder) / name for name in names]
  return sorted(files)


def find_cases(data_dir: str | os.PathLike, modality: str | None = None,
               require_labels: bool = False) -> list[CasePaths]:
  """Finds image/label pairs under `data_dir`, sorted by modality, split and number.

  modality: "mr", "ct" or None for both. require_labels: an image without its label (or a
  label without its image) raises InvalidCaseError naming the file.
  """
  root = Path(data_dir)
  if not root.is_dir():
    raise InvalidCaseError(root, "data directory not found")
  found: dict[tuple, dict[str, Path]] = {}
  for path in _files_under(root):
    match = _NAME.match(path.name)
    if match is None or (modality and match["modality"] != modality):
      continue
    key = (match["modality"], match["split"], int(match["number"]))
    kinds = found.setdefault(key, {})
    if match["kind"] in kinds:
      raise InvalidCaseError(path, f"duplicate of {kinds[match['kind']]}")
    kinds[match["kind"]] = path
  cases = []
  for (mod, split, number), kinds in sorted(found.items()):
    if "image" not in kinds:
      raise InvalidCaseError(kinds["label"], "label file without its image")
    if require_labels and "label" not in kinds:
      raise InvalidCaseError(kinds["image"], "image file without its label (labels are required)")
    cases.append(CasePaths(f"{mod}_{split}_{number}", mod, kinds["image"], kinds.get("label")))
  if not cases:
    what = f"{modality}_*" if modality else "mr_*/ct_*"
    raise InvalidCaseError(root, f"no MMWHS cases ({what}_image.nii[.gz]) found")
  return cases
