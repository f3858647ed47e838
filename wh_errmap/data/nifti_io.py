"""Reading and writing NIfTI volumes, with validation that names the file and the problem.

Every case is reoriented to RAS+ (nibabel's closest canonical orientation) on load, so the
rest of the package sees one orientation whatever the scanner wrote in the header.
"""
from __future__ import annotations

import dataclasses
import gzip
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from wh_errmap.atomic import atomic_path
from wh_errmap.errors import UserError

# MMWHS label codes -> class index (0 is background).
MMWHS_CODES = (205, 420, 500, 550, 600, 820, 850)
STRUCTURES = ("Myo", "LA", "LV", "RA", "RV", "AO", "PA")
NUM_CLASSES = len(STRUCTURES) + 1
# Header affines of an image and its label may differ by rounding in the writer.
AFFINE_TOLERANCE = 1e-3


class InvalidCaseError(UserError, ValueError):
  """An input file that cannot be used; the message names the file and the problem."""

  def __init__(self, path: str | os.PathLike, problem: str):
    self.path = str(path)
    self.problem = problem
    super().__init__(f"{self.path}: {problem}")


@dataclasses.dataclass
class Case:
  """One scan in RAS+ orientation.

  image: (X, Y, Z) float32. label: (X, Y, Z) uint8 classes 0..7, or None.
  spacing: voxel size in mm along X, Y, Z. affine: 4x4 voxel -> world (RAS+ axes).
  original_affine / original_shape: the header as stored on disk, needed to write
  results back in the file's own orientation.
  """
  case_id: str
  image: np.ndarray
  label: np.ndarray | None
  spacing: tuple[float, float, float]
  affine: np.ndarray
  original_affine: np.ndarray
  original_shape: tuple[int, int, int]
  image_path: str
  label_path: str | None = None


def case_id_from_path(path: str | os.PathLike) -> str:
  """`.../mr_train_1001_image.nii.gz` -> `mr_train_1001`."""
  name = Path(path).name
  for suffix in (".nii.gz", ".nii"):
    if name.endswith(suffix):
      name = name[: -len(suffix)]
  for tag in ("_image", "_label"):
    if name.endswith(tag):
      name = name[: -len(tag)]
  return name


def _open_nifti(path: Path) -> nib.Nifti1Image:
  """Parses a .nii or .nii.gz file fully in memory.

  A .gz file is decompressed whole first, so its CRC is checked: nibabel alone stops
  reading at the end of the data and never sees a corrupted stream's bad checksum.
  """
  raw = path.read_bytes()
  if raw[:2] == b"\x1f\x8b":
    try:
      raw = gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
      raise InvalidCaseError(path, f"corrupt or truncated gzip data ({e})") from None
  elif path.name.endswith(".gz"):
    raise InvalidCaseError(path, "not a gzip file although the name ends in .gz")
  header_size = {int.from_bytes(raw[:4], order) for order in ("little", "big")}
  if 348 in header_size:
    image_class = nib.Nifti1Image
  elif 540 in header_size:
    image_class = nib.Nifti2Image
  else:
    raise InvalidCaseError(path, "not a NIfTI file (no NIfTI-1/2 header)")
  try:
    return image_class.from_bytes(raw)
  except Exception as e:  # nibabel raises many types for malformed headers
    raise InvalidCaseError(path, f"not a valid NIfTI file ({type(e).__name__}: {e})") from None


def _read(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """Loads data and affine, turning every failure into InvalidCaseError."""
  path = Path(path)
  if not path.is_file():
    raise InvalidCaseError(path, "file not found")
  if path.stat().st_size == 0:
    raise InvalidCaseError(path, "file is empty")
  img = _open_nifti(path)
  try:
    data = np.asanyarray(img.dataobj)
  except Exception as e:  # a header that promises more data than the file holds, etc.
    raise InvalidCaseError(path, f"corrupt or truncated data ({type(e).__name__}: {e})") from None
  return data, img.affine


def _as_3d(path, data: np.ndarray) -> np.ndarray:
  extra = [d for d in data.shape[3:] if d != 1]
  if data.ndim < 3 or extra or min(data.shape[:3]) <= 1:
    raise InvalidCaseError(path, f"expected a 3D volume, got shape {tuple(data.shape)}")
  return data.reshape(data.shape[:3])


def to_canonical(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Reorients a (X, Y, Z) volume to RAS+; returns (volume, affine)."""
  img = nib.as_closest_canonical(nib.Nifti1Image(volume, affine))
  return np.asanyarray(img.dataobj), img.affine


def from_canonical(volume: np.ndarray, original_affine: np.ndarray) -> np.ndarray:
  """Inverse of `to_canonical`: a RAS+ volume back to the orientation of `original_affine`."""
  ornt = nib.orientations.io_orientation(original_affine)
  # ornt maps original axes to RAS; its inverse maps RAS back to the original axes.
  back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
  return nib.orientations.apply_orientation(volume, back)


def encode_label(path, raw: np.ndarray) -> np.ndarray:
  """Maps MMWHS codes (or classes 0..7 already) to uint8 classes 0..7."""
  if not np.issubdtype(raw.dtype, np.integer):
    if not np.all(np.isfinite(raw)) or np.any(raw != np.round(raw)):
      raise InvalidCaseError(path, "label values are not integers")
  values = np.unique(raw).astype(np.int64)
  foreground = values[values != 0]
  if foreground.size == 0:
    raise InvalidCaseError(path, "label volume has no foreground")
  if np.all(np.isin(foreground, MMWHS_CODES)):
    lut = np.zeros(max(MMWHS_CODES) + 1, np.uint8)
    lut[list(MMWHS_CODES)] = np.arange(1, NUM_CLASSES, dtype=np.uint8)
    return lut[raw.astype(np.int64)]
  if np.all((foreground >= 1) & (foreground < NUM_CLASSES)):
    return raw.astype(np.uint8)
  bad = [int(v) for v in foreground if v not in MMWHS_CODES][:5]
  raise InvalidCaseError(
      path, f"label values {bad} are neither MMWHS codes {list(MMWHS_CODES)} nor classes 1..7")


def load_case(image_path: str | os.PathLike,
              label_path: str | os.PathLike | None = None,
              case_id: str | None = None) -> Case:
  """Loads and validates an image (and its label), reoriented to RAS+."""
  raw_image, affine = _read(image_path)
  raw_image = _as_3d(image_path, raw_image)
  image = np.asarray(raw_image, dtype=np.float32)
  if not np.all(np.isfinite(image)):
    raise InvalidCaseError(image_path, "image has NaN or Inf intensities")
  label = None
  if label_path is not None:
    raw_label, label_affine = _read(label_path)
    raw_label = _as_3d(label_path, raw_label)
    if raw_label.shape != image.shape:
      raise InvalidCaseError(
          label_path, f"label shape {raw_label.shape} does not match image shape {image.shape} "
          f"of {image_path}")
    if not np.allclose(label_affine, affine, atol=AFFINE_TOLERANCE):
      raise InvalidCaseError(
          label_path, f"label affine differs from the affine of {image_path}:\n"
          f"{np.round(label_affine, 4)} vs {np.round(affine, 4)}".replace("\n", " "))
    label = encode_label(label_path, raw_label)
  canon_image, canon_affine = to_canonical(image, affine)
  if label is not None:
    label, _ = to_canonical(label, affine)
    label = np.ascontiguousarray(label)
  spacing = tuple(float(s) for s in np.sqrt((canon_affine[:3, :3] ** 2).sum(axis=0)))
  return Case(
      case_id=case_id or case_id_from_path(image_path),
      image=np.ascontiguousarray(canon_image, dtype=np.float32),
      label=label,
      spacing=spacing,
      affine=canon_affine,
      original_affine=affine,
      original_shape=tuple(int(s) for s in image.shape),
      image_path=str(image_path),
      label_path=None if label_path is None else str(label_path),
  )


def save_nifti(path: str | os.PathLike, volume: np.ndarray, affine: np.ndarray) -> None:
  """Writes a NIfTI file atomically: a crash never leaves a truncated file under `path`."""
  suffix = ".nii.gz" if str(path).endswith(".nii.gz") else ".nii"
  img = nib.Nifti1Image(volume, affine)
  img.header.set_xyzt_units("mm")
  with atomic_path(path, suffix) as tmp:
    nib.save(img, str(tmp))
