"""Which image goes with which mask: pair names and the pairing of two folders.

Images are `X_image`, nnU-Net's `X_0000` or `X`; masks `X_label`, `X_mask` or `X` files, or
a folder `X/` of TotalSegmentator's per-structure files. A pair's outputs are named
`<image case>__<mask name>`, so two masks of one scan never share a file.
"""
from __future__ import annotations

import collections
import re
from pathlib import Path

from wh_errmap.data.labels import is_structure_folder
from wh_errmap.data.nifti_io import case_id_from_path

_NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def pair_name(image_path: str | Path, mask_path: str | Path) -> str:
  """`<image case>__<mask file name without .nii/.nii.gz>`: how a pair's outputs begin. The
  image case drops `_image` and nnU-Net's channel suffix `_0000`."""
  return f"{image_case(Path(image_path))}__{nifti_stem(Path(mask_path))}"


def image_case(path: Path) -> str:
  """The case an image belongs to: `X_image` -> X, nnU-Net's `X_0000` -> X."""
  case = case_id_from_path(path)
  match = _NNUNET_CHANNEL.match(case)
  return match["case"] if match and match["channel"] == "0000" else case


def pair_folder(image_dir: Path, mask_dir: Path) -> tuple[list[tuple[Path, Path]], list[str]]:
  """Pairs each image of `image_dir` with its mask in `mask_dir`. Returns (pairs, problems).

  Images: `X_image`, nnU-Net's `X_0000` or `X` (.nii or .nii.gz). Masks: `X_label`,
  `X_mask` or `X` files, or a folder `X/` of TotalSegmentator's per-structure files. A
  multi-channel nnU-Net case (`X_0001`, ... beside `X_0000`) is assessed on `X_0000`.

  Nothing is guessed: an image without a mask, an image with several (`X_label` and
  `X_mask`, or `X.nii` and `X.nii.gz`), and two images of one case are problems naming the
  files. When both folders are one, `X_label` / `X_mask` files, and `X` beside `X_image` or
  `X_0000`, are masks, not images.
  """
  masks = collections.defaultdict(list)
  for path in nifti_files(mask_dir):
    masks[nifti_stem(path)].append(path)
  for path in sorted(p for p in mask_dir.iterdir() if p.is_dir() and is_structure_folder(p)):
    masks[path.name].append(path)
  images = nifti_files(image_dir)
  if image_dir.resolve() == mask_dir.resolve():
    images = [p for p in images if not nifti_stem(p).endswith(("_label", "_mask"))]
    tagged = {image_case(p) for p in images if image_case(p) != case_id_from_path(p)
              or nifti_stem(p).endswith("_image")}
    images = [p for p in images if image_case(p) != nifti_stem(p) or nifti_stem(p) not in tagged]
  by_case = collections.defaultdict(list)
  for image in images:
    match = _NNUNET_CHANNEL.match(case_id_from_path(image))
    if match and match["channel"] != "0000" and any(
        image_case(p) == match["case"] and p != image for p in images):
      continue   # another channel of a case assessed on its _0000 image
    by_case[image_case(image)].append(image)
  pairs, problems = [], []
  for case, found in sorted(by_case.items()):
    if len(found) > 1:
      problems.append(f"{' and '.join(map(str, found))} are images of the same case {case}: "
                      f"keep one of them in {image_dir}")
      continue
    image = found[0]
    candidates = [m for tag in ("_label", "_mask", "") for m in masks[case + tag] if m != image]
    if not candidates:
      problems.append(f"{image}: no mask for it in {mask_dir} (looked for {case}_label, "
                      f"{case}_mask and {case}, as files or a per-structure folder)")
    elif len(candidates) > 1:
      problems.append(f"{image}: ambiguous mask, {' and '.join(map(str, candidates))} both "
                      f"match; keep one of them in {mask_dir}")
    else:
      pairs.append((image, candidates[0]))
  return pairs, problems


def nifti_files(folder: Path) -> list[Path]:
  """The NIfTI files of a folder; hidden ones are temporary files of writers."""
  return sorted(p for p in folder.iterdir()
                if p.name.endswith((".nii", ".nii.gz")) and not p.name.startswith("."))


def nifti_stem(path: Path) -> str:
  """The file name without .nii or .nii.gz."""
  name = path.name
  return name[:-len(".nii.gz")] if name.endswith(".nii.gz") else name.removesuffix(".nii")
