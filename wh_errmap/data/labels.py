"""Label conventions: which value of a user's mask is which heart structure.

Internally a mask holds uint8 classes: 0 background, 1..7 the structures of
`nifti_io.STRUCTURES` (Myo, LA, LV, RA, RV, AO, PA). A `LabelConvention` maps a user's own
values (MMWHS codes, TotalSegmentator's, an nnU-Net dataset.json's, an inline map) to those
classes and back. Policies: value 0 is always background; foreground values the convention
does not map ("other classes") become background and are reported, never an error; an
empty mask is reported, never an error.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np

from wh_errmap.data.modality import channel_modality
from wh_errmap.data.nifti_io import AFFINE_TOLERANCE, InvalidCaseError, read_volume_file
from wh_errmap.data.structures import MMWHS_CODES, STRUCTURES
from wh_errmap.errors import UserError

# Names accepted for each structure, compared case-insensitively without spaces, "_" and
# "-". "Myocardium" is the LV myocardium, as in MMWHS and TotalSegmentator.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "Myo": ("myo", "myocardium", "lv myocardium", "lv myo", "lvm", "left ventricular myocardium",
            "left ventricle myocardium", "myocardium of the left ventricle", "heart_myocardium"),
    "LA": ("la", "left atrium", "left atrial blood cavity", "left atrium blood cavity",
           "left atrial cavity", "left atrial blood pool", "heart_atrium_left", "atrium_left"),
    "LV": ("lv", "left ventricle", "left ventricular blood pool", "left ventricular cavity",
           "left ventricle blood cavity", "left ventricle blood pool", "lv cavity",
           "lv blood pool", "heart_ventricle_left", "ventricle_left"),
    "RA": ("ra", "right atrium", "right atrial blood cavity", "right atrium blood cavity",
           "right atrial cavity", "right atrial blood pool", "heart_atrium_right",
           "atrium_right"),
    "RV": ("rv", "right ventricle", "right ventricular blood pool", "right ventricular cavity",
           "right ventricle blood cavity", "right ventricle blood pool", "rv cavity",
           "rv blood pool", "heart_ventricle_right", "ventricle_right"),
    "AO": ("ao", "aorta", "ascending aorta"),
    "PA": ("pa", "pulmonary artery", "pulmonary trunk", "main pulmonary artery",
           "pulmonary_artery"),
}
_MMWHS_NAMES = ("myocardium of the left ventricle", "left atrium blood cavity",
                "left ventricle blood cavity", "right atrium blood cavity",
                "right ventricle blood cavity", "ascending aorta", "pulmonary artery")
# TotalSegmentator's task `heartchambers_highres` (a CT task), values 1..7: `class_map` in
# totalsegmentator/map_to_binary.py of github.com/wasserth/TotalSegmentator (read at commit
# 0e65a448d557, Aug 2026). Per-structure outputs (without --ml) are named `<name>.nii.gz`.
TOTALSEGMENTATOR_NAMES = ("heart_myocardium", "heart_atrium_left", "heart_ventricle_left",
                          "heart_atrium_right", "heart_ventricle_right", "aorta",
                          "pulmonary_artery")
_CHOICES = ("mmwhs, totalsegmentator, the path of an nnU-Net dataset.json, or an inline map "
            "like 1:RV,2:Myo,3:LV")
# Masks whose values span less than this are mapped through a dense lookup table; wider
# ranges go through np.unique, so no table larger than the number of distinct values.
_DENSE_SPAN = 1 << 16


def _key(name: str) -> str:
  return re.sub(r"[\s_\-]+", "", name).lower()


_STRUCTURE_OF = {_key(n): c for c, s in enumerate(STRUCTURES, 1) for n in (s, *SYNONYMS[s])}


def accepted_names() -> str:
  """The accepted names of every structure, on one line, for documentation and errors."""
  return "; ".join(f"{s}: {', '.join(SYNONYMS[s])}" for s in STRUCTURES)


def structure_of(name: str) -> int | None:
  """The internal class 1..7 a structure name means (through SYNONYMS), None if none."""
  return _STRUCTURE_OF.get(_key(name))


@dataclasses.dataclass(frozen=True)
class EncodedMask:
  """classes: uint8 internal classes 0..7, the raw mask's shape. dropped: user value ->
  voxel count of the foreground values outside the 7 structures (now background). missing:
  the STRUCTURES with no voxel. empty: no voxel of any structure."""
  classes: np.ndarray
  dropped: dict[int, int]
  missing: tuple[str, ...]
  empty: bool


@dataclasses.dataclass(frozen=True)
class LabelConvention:
  """name: where it comes from. values: user value -> internal class 1..7, for the
  structures it maps (one value per structure). names: user value -> the user's name for
  it, mapped or not. Value 0 is background; values not in `values` are other classes.
  modality: "ct" or "mr" when the convention says what the masks' images are (a CT-only
  tool, a dataset.json's channel names), else None."""
  name: str
  values: dict[int, int]
  names: dict[int, str]
  modality: str | None = None

  def __post_init__(self):
    classes = list(self.values.values())
    if 0 in self.values or any(not 1 <= c <= len(STRUCTURES) for c in classes):
      raise UserError(f"label convention {self.name}: values must be nonzero and map to "
                      f"classes 1..{len(STRUCTURES)}, got {self.values}")
    if len(set(classes)) != len(classes):
      raise UserError(f"label convention {self.name}: two values map to one structure")

  def structure_value(self, cls: int) -> int | None:
    """The user value of internal class `cls`, None if the convention lacks the structure."""
    return next((v for v, c in self.values.items() if c == cls), None)

  def encode(self, path: str | os.PathLike, raw: np.ndarray) -> EncodedMask:
    """A mask of user values (integers, or integer-valued floats), any shape, as internal
    classes; InvalidCaseError naming `path` for non-integer values."""
    values, counts, index = _value_index(_integers(path, raw))
    table = np.zeros(len(values), np.uint8)
    for value, cls in self.values.items():
      at = int(np.searchsorted(values, value))
      if at < len(values) and values[at] == value:
        table[at] = cls
    class_counts = np.zeros(len(STRUCTURES) + 1, np.int64)
    np.add.at(class_counts, table, counts)
    dropped = {int(values[i]): int(counts[i]) for i in np.flatnonzero(counts)
               if values[i] != 0 and int(values[i]) not in self.values}
    missing = tuple(s for c, s in enumerate(STRUCTURES, 1) if class_counts[c] == 0)
    return EncodedMask(table[index], dropped, missing, len(missing) == len(STRUCTURES))

  def decode(self, classes: np.ndarray) -> np.ndarray:
    """Internal classes 0..7 (any shape) -> user values, in the smallest integer dtype that
    holds them; a structure the convention lacks becomes 0."""
    low, high = min(0, *self.values), max(0, *self.values)
    dtype = next(d for d in (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32,
                             np.int64) if np.iinfo(d).min <= low and high <= np.iinfo(d).max)
    table = np.zeros(len(STRUCTURES) + 1, dtype)
    for value, cls in self.values.items():
      table[cls] = value
    return table[np.asarray(classes, np.uint8)]

  def to_json(self) -> dict:
    """{"name", "values": {"<user value>": "<structure>"}, "names": {"<user value>": name}},
    and "modality" when the convention has one."""
    stored = {"name": self.name,
              "values": {str(v): STRUCTURES[c - 1] for v, c in sorted(self.values.items())},
              "names": {str(v): n for v, n in sorted(self.names.items())}}
    return stored if self.modality is None else {**stored, "modality": self.modality}

  @classmethod
  def from_json(cls, d: dict) -> LabelConvention:
    """The inverse of `to_json`."""
    return cls(d["name"], {int(v): STRUCTURES.index(s) + 1 for v, s in d["values"].items()},
               {int(v): n for v, n in d["names"].items()}, d.get("modality"))


MMWHS = LabelConvention("mmwhs", {v: c for c, v in enumerate(MMWHS_CODES, 1)},
                        dict(zip(MMWHS_CODES, _MMWHS_NAMES)))
TOTALSEGMENTATOR = LabelConvention(
    "totalsegmentator", {v: structure_of(n) for v, n in enumerate(TOTALSEGMENTATOR_NAMES, 1)},
    dict(enumerate(TOTALSEGMENTATOR_NAMES, 1)), "ct")


def _voxels(count: int) -> str:
  return f"{count:,} voxel" + ("" if count == 1 else "s")


def _integers(path: str | os.PathLike, raw: np.ndarray) -> np.ndarray:
  """`raw` as an integer array; InvalidCaseError for NaN, infinite or fractional values."""
  raw = np.asarray(raw)
  if raw.dtype.kind in "iu":
    return raw
  if raw.dtype.kind == "b":
    return raw.astype(np.uint8)
  if raw.dtype.kind != "f":
    raise InvalidCaseError(path, f"label voxel type {raw.dtype} is not a number type")
  bad = ~((raw == np.round(raw)) & (np.abs(raw) < 2.0**62))
  if bad.any():
    raise InvalidCaseError(path, f"label values are not all integers (found {raw[bad][0]}, "
                                 f"{_voxels(int(bad.sum()))})")
  return raw.astype(np.int64)


def _value_index(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(values, counts, index): sorted candidate values, the voxel count of each, and per
  voxel the position of its value in `values` (raw's shape)."""
  if raw.size == 0:
    return np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(raw.shape, np.uint8)
  low, high = int(raw.min()), int(raw.max())
  if high - low < _DENSE_SPAN:
    index = (raw if low == 0 and raw.dtype != np.uint64
             else np.subtract(raw, low, dtype=np.int64, casting="unsafe"))
    return np.arange(low, high + 1), np.bincount(index.ravel(), minlength=high - low + 1), index
  values, index, counts = np.unique(raw, return_inverse=True, return_counts=True)
  return values, counts, index.reshape(raw.shape)


def dropped_warning(path: str | os.PathLike, encoded: EncodedMask,
                    convention: LabelConvention) -> str | None:
  """One warning line naming the values set to background, None when there are none."""
  if not encoded.dropped:
    return None
  shown = [f"{v}" + (f" ({convention.names[v]})" if v in convention.names else "")
           + f": {_voxels(n)}" for v, n in sorted(encoded.dropped.items())[:10]]
  more = len(encoded.dropped) - len(shown)
  hint = ""
  if convention.name == "totalsegmentator" and max(encoded.dropped) > len(STRUCTURES):
    hint = ("; values above 7 suggest another TotalSegmentator task than "
            "heartchambers_highres, whose values mean other organs")
  return (f"warning: {path}: label values outside the 7 heart structures of {convention.name} "
          f"set to background: {', '.join(shown)}" + (f" and {more} more" if more else "")
          + hint)


def detect(path: str | os.PathLike, raw: np.ndarray) -> LabelConvention:
  """The MMWHS convention if every nonzero value of `raw` is an MMWHS code (an empty mask
  included); otherwise InvalidCaseError asking for --labels, since values like 1..3 mean
  different structures in different tools."""
  values = np.unique(_integers(path, raw))
  foreground = values[values != 0]
  if np.isin(foreground, MMWHS_CODES).all():
    return MMWHS
  shown = ", ".join(str(v) for v in foreground[:10].tolist()) + (
      f" ... ({len(foreground)} values)" if len(foreground) > 10 else "")
  raise InvalidCaseError(path, f"label values {shown} are not the MMWHS codes "
                               f"{', '.join(map(str, MMWHS_CODES))}; say what they mean with "
                               f"--labels: {_CHOICES}")


def _convention(name: str, pairs: list[tuple[int, str]], where: str, known_only: bool,
                modality: str | None = None) -> LabelConvention:
  """A convention from (user value, user name) pairs; names matching no structure are other
  classes, or an error when `known_only`."""
  values, names, claimed = {}, {}, {}
  for value, label in pairs:
    if value in names:
      raise UserError(f"{where}: value {value} is given twice ({names[value]!r}, {label!r})")
    cls = structure_of(label)
    if cls is None and known_only:
      raise UserError(f"{where}: unknown structure name {label!r}; accepted names: "
                      f"{accepted_names()}")
    if cls in claimed:
      raise UserError(f"{where}: {claimed[cls]!r} and {label!r} both name structure "
                      f"{STRUCTURES[cls - 1]}")
    names[value] = label
    if cls is not None:
      values[value], claimed[cls] = cls, label
  if not values:
    raise UserError(f"{where}: no label names a heart structure; accepted names: "
                    f"{accepted_names()}")
  return LabelConvention(name, values, names, modality)


def _dataset_json(path: Path) -> LabelConvention:
  """nnU-Net's dataset.json: v2 `"labels": {"RV": 1}` or v1 `"labels": {"1": "RV"}`; the
  images' modality from v2 `"channel_names"` or v1 `"modality"` (e.g. {"0": "CT"})."""
  try:
    text = path.read_text()
  except OSError as e:
    raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None
  except UnicodeDecodeError:
    raise UserError(f"{path}: not a text file") from None
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise UserError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
  labels = data.get("labels") if isinstance(data, dict) else None
  if not isinstance(labels, dict) or not labels:
    raise UserError(f"{path}: no \"labels\" object as in an nnU-Net dataset.json")
  v1 = all(re.fullmatch(r"\d+", str(k)) and isinstance(n, str) for k, n in labels.items())
  pairs = ([(int(k), n) for k, n in labels.items()] if v1
           else [(v, n) for n, v in labels.items()])
  for value, label in pairs:
    if isinstance(value, list):
      raise UserError(f"{path}: label {label!r} is region-based ({value}); region-based "
                      "labels are not supported, give the masks as one value per structure")
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
      raise UserError(f"{path}: label {label!r} has value {value!r}, not an integer >= 0")
  channels = data.get("channel_names", data.get("modality"))
  modality = channel_modality(channels.values()) if isinstance(channels, dict) else None
  return _convention(f"dataset.json ({path})", [p for p in pairs if p[0] != 0], str(path),
                     known_only=False, modality=modality)


def parse_labels(spec: str) -> LabelConvention:
  """The convention a --labels value names; UserError (one line) for anything else.

  mmwhs: codes 205..850. totalsegmentator: task heartchambers_highres, values 1..7; caveat:
  its "aorta" is the whole aorta where MMWHS has the ascending aorta only, and its
  "heart_myocardium" is the LV myocardium. A path of an nnU-Net dataset.json (or its folder):
  labels matched by name through SYNONYMS, unmatched names are other classes. An inline map
  `1:RV,2:Myo,3:LV`: values >= 1, every name must be in SYNONYMS.
  """
  text = spec.strip()
  if text.lower() in ("mmwhs", "totalsegmentator"):
    return MMWHS if text.lower() == "mmwhs" else TOTALSEGMENTATOR
  if re.fullmatch(r"\s*-?\d+\s*:[^,:]+(,\s*-?\d+\s*:[^,:]+)*,?", text):
    pairs = [tuple(item.split(":")) for item in text.rstrip(",").split(",")]
    for value, _ in pairs:
      if int(value) < 1:
        raise UserError(f"--labels {spec}: value {int(value)} is not >= 1 (0 is background)")
    return _convention(f"inline {text}", [(int(v), n.strip()) for v, n in pairs],
                       f"--labels {spec}", known_only=True)
  path = Path(text)
  if path.is_dir() and (path / "dataset.json").is_file():
    path = path / "dataset.json"
  if path.suffix == ".json" or path.is_file():
    return _dataset_json(path)
  if path.is_dir():
    raise UserError(f"--labels {spec}: the folder holds no dataset.json")
  raise UserError(f"--labels {spec!r}: expected {_CHOICES}")


def _structure_files(folder: Path) -> list[tuple[int, Path]]:
  """(class, file) for each TotalSegmentator heart structure file in `folder`, the .nii.gz
  where both it and the .nii exist."""
  found = [(cls, [folder / f"{name}{s}" for s in (".nii.gz", ".nii")])
           for cls, name in enumerate(TOTALSEGMENTATOR_NAMES, 1)]
  return [(cls, next(p for p in paths if p.is_file())) for cls, paths in found
          if any(p.is_file() for p in paths)]


def is_structure_folder(path: str | os.PathLike) -> bool:
  """Whether `path` is a folder holding at least one TotalSegmentator heart structure file."""
  return Path(path).is_dir() and bool(_structure_files(Path(path)))


def read_structure_folder(folder: str | os.PathLike
                          ) -> tuple[np.ndarray, np.ndarray, LabelConvention]:
  """TotalSegmentator's per-structure output (no --ml) as one (X, Y, Z) uint8 volume of its
  multilabel values, the files' affine, and the TOTALSEGMENTATOR convention.

  Nonzero voxels of `<name>.nii.gz` (or .nii) belong to the structure. Files must share
  shape and affine; other files are ignored; a missing structure file is a missing
  structure. A voxel claimed by two files goes to the later one in class order (Myo, LA,
  LV, RA, RV, AO, PA); TotalSegmentator's own outputs never overlap, so overlaps are not
  reported.
  """
  folder = Path(folder)
  if not folder.is_dir():
    raise InvalidCaseError(folder, "not a folder")
  files = _structure_files(folder)
  if not files:
    raise InvalidCaseError(folder, "holds none of the heart structure files "
                                   f"{', '.join(n + '.nii.gz' for n in TOTALSEGMENTATOR_NAMES)}")
  volume = affine = first = None
  for cls, path in files:
    data, file_affine = read_volume_file(path)
    if volume is None:
      volume, affine, first = np.zeros(data.shape, np.uint8), file_affine, path
    elif data.shape != volume.shape:
      raise InvalidCaseError(path, f"shape {data.shape} differs from {volume.shape} of {first}")
    elif not np.allclose(file_affine, affine, atol=AFFINE_TOLERANCE):
      raise InvalidCaseError(path, f"affine differs from the affine of {first}")
    volume[_integers(path, data) != 0] = cls
  return volume, affine, TOTALSEGMENTATOR
