"""Reading and writing NIfTI volumes, with validation that names the file and the problem.

Every case is reoriented to RAS+ (nibabel's closest canonical orientation) on load, so the
rest of the package sees one orientation whatever the scanner wrote in the header.
"""
from __future__ import annotations

import dataclasses
import gzip
import io
import math
import os
import re
import zlib
from pathlib import Path
from typing import BinaryIO, Callable

import nibabel as nib
import numpy as np

from wh_errmap.data.structures import MMWHS_CODES, NUM_CLASSES
from wh_errmap.errors import UserError
from wh_errmap.utils.atomic import atomic_path

# Header affines of an image and its label may differ by rounding in the writer.
AFFINE_TOLERANCE = 1e-3
# Volumes with more voxels are refused from their header, before any data is read. A
# whole-body CT at 1 mm is about 512 x 512 x 2000 = 5.2e8 voxels, half the limit; a volume
# at the limit takes 4.3 GB per float32 copy, and loading and preprocessing hold several.
MAX_VOXELS = 2**30
_READ_CHUNK = 1 << 24  # bytes


class InvalidCaseError(UserError, ValueError):
  """An input file that cannot be used; the message names the file and the problem, on one
  line (the messages of nibabel's exceptions, quoted in some problems, can span several)."""

  def __init__(self, path: str | os.PathLike, problem: str):
    self.path = str(path)
    self.problem = re.sub(r"\s*\n\s*", " ", problem)
    super().__init__(f"{self.path}: {self.problem}")


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


def _header(path: Path, head: bytes) -> nib.Nifti1Header:
  """The NIfTI-1 or -2 header at the start of `head`, as stored (nibabel's fixes unapplied)."""
  sizes = {int.from_bytes(head[:4], order) for order in ("little", "big")}
  header_class = (nib.Nifti1Header if 348 in sizes else nib.Nifti2Header if 540 in sizes
                  else None)
  if header_class is None:
    raise InvalidCaseError(path, "not a NIfTI file (no NIfTI-1/2 header)")
  if len(head) < header_class.sizeof_hdr:
    raise InvalidCaseError(path, "truncated inside its NIfTI header")
  try:
    return header_class.from_fileobj(io.BytesIO(head), check=False)
  except Exception as e:  # nibabel raises many types for malformed headers
    raise InvalidCaseError(path, f"not a valid NIfTI file ({type(e).__name__}: {e})") from None


def _volume_layout(path: Path, header: nib.Nifti1Header) -> tuple[tuple[int, int, int], int]:
  """The (X, Y, Z) shape a header describes, and the length the file must have to hold it.

  Checked from the header alone, before any voxel is read: a 4D file, a huge file or one of
  a type that is not real numbers is refused without decompressing it.
  """
  try:
    shape = tuple(int(d) for d in header.get_data_shape())
    dtype = header.get_data_dtype()
    offset = int(header.get_data_offset())
  except Exception as e:
    raise InvalidCaseError(path, f"not a valid NIfTI file ({type(e).__name__}: {e})") from None
  if len(shape) < 3 or any(d != 1 for d in shape[3:]) or min(shape[:3]) <= 1:
    raise InvalidCaseError(path, f"expected a 3D volume, got shape {shape}")
  voxels = math.prod(shape[:3])
  if voxels > MAX_VOXELS:
    raise InvalidCaseError(
        path, f"volume of {'x'.join(map(str, shape[:3]))} = {voxels:,} voxels is larger than "
        f"the limit of {MAX_VOXELS:,} (MAX_VOXELS in wh_errmap/data/nifti_io.py)")
  if dtype.kind not in "biuf":
    raise InvalidCaseError(path, f"voxel type {dtype} is not a real number type")
  # nibabel reads the data from at least just past the header and its extension flag.
  start = max(offset, header.sizeof_hdr + 4)
  return shape[:3], start + voxels * dtype.itemsize


def _out_of_memory(path: Path, voxels: int) -> InvalidCaseError:
  return InvalidCaseError(path, f"not enough memory to read it ({voxels:,} voxels, "
                                f"{4 * voxels / 1e9:.1f} GB as float32)")


def _read_up_to(stream: BinaryIO, size: int, head: bytes) -> bytes:
  """`head` and then at most `size` more bytes of `stream`, fewer at its end. Read in chunks,
  so that a header promising more data than the file holds costs no more memory than the
  file's data does."""
  chunks = [head]
  while size > 0 and (chunk := stream.read(min(size, _READ_CHUNK))):
    chunks.append(chunk)
    size -= len(chunk)
  return b"".join(chunks)


def _read_nifti(path: Path) -> tuple[bytes, nib.Nifti1Header, tuple[int, int, int]]:
  """The bytes of a .nii or .nii.gz file up to the end of its data, its header as stored and
  its (X, Y, Z) shape.

  The header is checked first, and only the bytes it describes are kept; a .gz stream is
  still read to its end, so that its CRC is checked (nibabel alone stops reading at the end
  of the data and never sees a corrupted stream's bad checksum).
  """
  try:
    with open(path, "rb") as f:
      compressed = f.read(2) == b"\x1f\x8b"
  except OSError as e:
    raise InvalidCaseError(path, f"cannot be read ({e.strerror or e})") from None
  if not compressed and path.name.endswith(".gz"):
    raise InvalidCaseError(path, "not a gzip file although the name ends in .gz")
  try:
    with (gzip.open(path, "rb") if compressed else open(path, "rb")) as stream:
      head = stream.read(nib.Nifti2Header.sizeof_hdr)
      header = _header(path, head)
      shape, needed = _volume_layout(path, header)
      try:
        raw = _read_up_to(stream, needed - len(head), head)
      except MemoryError:
        raise _out_of_memory(path, math.prod(shape)) from None
      if len(raw) < needed:
        holder = "decompressed file" if compressed else "file"
        raise InvalidCaseError(path, f"truncated: the header describes {needed:,} bytes, "
                                     f"the {holder} holds {len(raw):,}")
      while compressed and stream.read(_READ_CHUNK):
        pass
  except (EOFError, OSError, zlib.error) as e:
    if not compressed:
      raise InvalidCaseError(path, f"cannot be read ({getattr(e, 'strerror', None) or e})"
                             ) from None
    raise InvalidCaseError(path, f"corrupt or truncated gzip data ({e})") from None
  return raw, header, shape


def _check_voxel_size(path: Path, header: nib.Nifti1Header) -> None:
  """Without an sform, pixdim[1:4] scale the voxel axes; nibabel would silently turn a zero
  into 1 mm, so the header as stored is checked before nibabel reads it."""
  zooms = np.asarray(header["pixdim"][1:4], np.float64)
  if header["sform_code"] == 0 and not np.all(np.isfinite(zooms) & (zooms != 0)):
    raise InvalidCaseError(path, f"voxel size pixdim[1:4] = {np.round(zooms, 4).tolist()} is "
                                 "zero or not finite, and the header has no sform: no "
                                 "orientation can be derived")


def _check_affine(path: Path, header: nib.Nifti1Header, affine: np.ndarray) -> None:
  """Refuses a voxel -> world affine that is not finite and invertible."""
  source = ("sform" if header["sform_code"] != 0 else
            "qform" if header["qform_code"] != 0 else "pixdim")
  if not np.all(np.isfinite(affine)):
    raise InvalidCaseError(path, f"the header's {source} affine has NaN or infinite entries: "
                                 "no orientation can be derived")
  axes = affine[:3, :3]
  sizes = np.linalg.norm(axes, axis=0)
  # |det| of the unit voxel axes: 1 when they are orthogonal, 0 when they do not span 3D.
  if np.any(sizes == 0) or abs(np.linalg.det(axes / sizes)) < 1e-6:
    raise InvalidCaseError(path, f"the header's {source} affine is singular (its voxel axes "
                                 "do not span 3D space): no orientation can be derived")


def read_volume_file(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """Loads an (X, Y, Z) volume and its affine, turning every failure into InvalidCaseError."""
  path = Path(path)
  if not path.is_file():
    raise InvalidCaseError(path, "file not found")
  if path.stat().st_size == 0:
    raise InvalidCaseError(path, "file is empty")
  raw, header, shape = _read_nifti(path)
  _check_voxel_size(path, header)
  image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
  try:
    img = image_class.from_bytes(raw)
  except MemoryError:
    raise _out_of_memory(path, math.prod(shape)) from None
  except Exception as e:  # nibabel raises many types for malformed headers
    raise InvalidCaseError(path, f"not a valid NIfTI file ({type(e).__name__}: {e})") from None
  affine = np.asarray(img.affine, np.float64)
  _check_affine(path, header, affine)
  try:
    data = np.asanyarray(img.dataobj)
  except MemoryError:
    raise _out_of_memory(path, math.prod(shape)) from None
  except Exception as e:  # data that nibabel cannot decode as the header describes it
    raise InvalidCaseError(path, f"corrupt or truncated data ({type(e).__name__}: {e})") from None
  return data.reshape(shape), affine


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
  raw_image, affine = read_volume_file(image_path)
  label = None if label_path is None else (*read_volume_file(label_path), label_path)
  return make_case((raw_image, affine, image_path), label,
                   case_id or case_id_from_path(image_path))


def make_case(image: tuple[np.ndarray, np.ndarray, str | os.PathLike],
              label: tuple[np.ndarray, np.ndarray, str | os.PathLike] | None, case_id: str,
              encode: Callable[[str | os.PathLike, np.ndarray], np.ndarray] = None) -> Case:
  """A validated RAS+ Case from volumes already read: image and label are
  (raw (X, Y, Z) data, affine, name for messages), the label None or checked against the
  image's shape and affine. encode(name, raw label) -> uint8 classes 0..7 (default
  `encode_label`: MMWHS codes or classes 1..7)."""
  raw_image, affine, image_path = image
  try:
    return _make_case(raw_image, affine, image_path, label, case_id, encode or encode_label)
  except MemoryError:
    raise _out_of_memory(image_path, raw_image.size) from None


def _make_case(raw_image: np.ndarray, affine: np.ndarray, image_path: str | os.PathLike,
               raw: tuple[np.ndarray, np.ndarray, str | os.PathLike] | None, case_id: str,
               encode: Callable[[str | os.PathLike, np.ndarray], np.ndarray]) -> Case:
  image = np.asarray(raw_image, dtype=np.float32)
  if not np.all(np.isfinite(image)):
    raise InvalidCaseError(image_path, "image has NaN or Inf intensities")
  label, label_path = None, None
  if raw is not None:
    raw_label, label_affine, label_path = raw
    if raw_label.shape != image.shape:
      raise InvalidCaseError(
          label_path, f"label shape {raw_label.shape} does not match image shape {image.shape} "
          f"of {image_path}")
    if not np.allclose(label_affine, affine, atol=AFFINE_TOLERANCE):
      raise InvalidCaseError(
          label_path, f"label affine differs from the affine of {image_path}:\n"
          f"{np.round(label_affine, 4)} vs {np.round(affine, 4)}".replace("\n", " "))
    label = encode(label_path, raw_label)
  canon_image, canon_affine = to_canonical(image, affine)
  if label is not None:
    label, _ = to_canonical(label, affine)
    label = np.ascontiguousarray(label)
  spacing = tuple(float(s) for s in np.sqrt((canon_affine[:3, :3] ** 2).sum(axis=0)))
  return Case(
      case_id=case_id,
      image=np.ascontiguousarray(canon_image, dtype=np.float32),
      label=label,
      spacing=spacing,
      affine=canon_affine,
      original_affine=affine,
      original_shape=tuple(int(s) for s in image.shape),
      image_path=str(image_path),
      label_path=None if label_path is None else str(label_path),
  )


def save_nifti(path: str | os.PathLike, volume: np.ndarray, affine: np.ndarray,
               description: str = "") -> None:
  """Writes a NIfTI file atomically: a crash never leaves a truncated file under `path`.

  description: the header's `descrip` text (at most 80 ASCII characters).
  """
  suffix = ".nii.gz" if str(path).endswith(".nii.gz") else ".nii"
  img = nib.Nifti1Image(volume, affine)
  img.header.set_xyzt_units("mm")
  img.header["descrip"] = description
  with atomic_path(path, suffix) as tmp:
    nib.save(img, str(tmp))


def read_image_object(img, name: str) -> tuple[np.ndarray, np.ndarray]:
  """(X, Y, Z) data and affine of an in-memory nibabel image, validated like a file
  (`name` stands for the file in messages). A trailing axis of length 1 is dropped."""
  if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
    raise InvalidCaseError(name, f"expected a NIfTI file path or a nibabel NIfTI image, got "
                                 f"{type(img).__name__}")
  shape = tuple(int(s) for s in img.shape)
  while len(shape) > 3 and shape[-1] == 1:
    shape = shape[:-1]
  if len(shape) != 3 or min(shape) < 1:
    raise InvalidCaseError(name, f"expected a 3D volume, got shape {tuple(img.shape)}")
  affine = np.asarray(img.affine, np.float64)
  _check_affine(Path(name), img.header, affine)
  try:
    data = np.asanyarray(img.dataobj)
  except MemoryError:
    raise _out_of_memory(name, math.prod(shape)) from None
  return data.reshape(shape), affine
