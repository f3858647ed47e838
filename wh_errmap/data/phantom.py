"""Synthetic whole-heart MR phantom, written in the MMWHS 2017 file layout.

A case depends only on (seed, index). Its heart is drawn by `anatomy.draw_anatomy` (shapes in
template millimetres, placed in the world with a per-case scale, rotation, translation and
smooth deformation); this module puts it on a scanner grid, renders the intensities and
writes the files. Overlaps of structures resolve by a fixed priority (painting order).

The scan is a raw scanner grid: anisotropic spacing (in-plane 0.9-1.3 mm, slices 1.4-2.0 mm)
and an affine that is a permuted, flipped diagonal (axial, sagittal or coronal slices, in
several axis orders), so that reorientation and resampling are exercised. Such a grid is a
permutation of an axis-aligned world grid with the same voxel centres; the volumes are
computed in world (RAS) order and permuted into the raw order at the end.

Appearance imitates bright-blood (bSSFP) MR: blood pools bright and nearly equal (the atria
and ventricles meet at valve planes with no visible edge), myocardium and papillary muscles
dark, a fat/tissue layer around the heart whose brightness varies smoothly (so in places
the myocardium has no contrast to it), dark lungs, liver, spine and an unlabelled descending
aorta, a chest-shaped body with a bright fat rim in dark air; then partial-volume blur, a
multiplicative bias field and Rician noise, scaled to an int16 range of about 0..2000.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import gzip
import multiprocessing
import os
import re
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
from scipy import ndimage

from wh_errmap.data.anatomy import OUTLINE_SLACK_MM, Anatomy, Ellipsoid, draw_anatomy, unit_vector
from wh_errmap.data.nifti_io import save_nifti
from wh_errmap.data.structures import MMWHS_CODES
from wh_errmap.errors import UserError
from wh_errmap.utils.progress import console

MYO, LA, LV, RA, RV, AO, PA = MMWHS_CODES
# Later entries overwrite earlier ones where shapes overlap: the LV cavity sits inside the
# myocardial shell, the myocardium cuts the septal side out of the RV, and the valve planes
# of the outflow tracts belong to the vessels.
PAINT_ORDER = (RA, LA, RV, MYO, LV, PA, AO)
# Axis codes of the raw grids (nibabel's aff2axcodes of the affine): axial, sagittal and
# coronal slice stacks in several orders; the third voxel axis is always the slice axis.
ORIENTATIONS = ("LPS", "RAS", "LAS", "RPI", "PSR", "ASL", "LSA", "RIP")
_AXIS_OF = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0),
            "S": (2, 1.0), "I": (2, -1.0)}
MIN_MARGIN_MM = 20.0  # scan coverage beyond the heart, more than the crop margin of 16 mm
# Start of the header description (NIfTI `descrip`) of every file the phantom writes. Its
# file names are those of the real MMWHS data, so write_phantom writes only into a folder
# whose files all carry it.
DESCRIPTION = "wh_errmap phantom"
# Temporary files of a save_nifti that was killed (atomic_path names them `.NAME.*`).
_LEFTOVER = re.compile(r"^\.mr_train_\d+_(image|label)\.nii\.gz\.")


# --- Scan geometry. ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Grid:
  """The raw grid as a world-aligned grid plus an axis order.

  World axis w has n[w] voxels at lo[w] + spacing[w] * i. Raw voxel axis v runs along world
  axis perm[v], in the direction signs[v].
  """
  lo: np.ndarray       # (3,) mm
  spacing: np.ndarray  # (3,) mm, by world axis
  n: tuple             # voxels by world axis
  perm: tuple
  signs: tuple

  @property
  def raw_shape(self) -> tuple[int, int, int]:
    return tuple(self.n[w] for w in self.perm)

  def affine(self) -> np.ndarray:
    affine = np.zeros((4, 4))
    affine[3, 3] = 1.0
    for v, (w, sign) in enumerate(zip(self.perm, self.signs)):
      affine[w, v] = sign * self.spacing[w]
      affine[w, 3] = self.lo[w] if sign > 0 else self.lo[w] + (self.n[w] - 1) * self.spacing[w]
    return affine

  def coords(self, w: int) -> np.ndarray:
    return (self.lo[w] + self.spacing[w] * np.arange(self.n[w])).astype(np.float32)

  def to_raw(self, volume: np.ndarray) -> np.ndarray:
    """A (nx, ny, nz) world-ordered volume in the raw voxel order."""
    raw = np.transpose(volume, self.perm)
    flips = tuple(v for v, sign in enumerate(self.signs) if sign < 0)
    return np.ascontiguousarray(np.flip(raw, flips) if flips else raw)


def _draw_grid(rng: np.random.Generator, heart_lo: np.ndarray, heart_hi: np.ndarray,
               spacing_scale: float) -> _Grid:
  code = ORIENTATIONS[rng.integers(len(ORIENTATIONS))]
  perm = tuple(_AXIS_OF[c][0] for c in code)
  signs = tuple(_AXIS_OF[c][1] for c in code)
  in_plane = rng.uniform(0.9, 1.3)
  slice_gap = rng.uniform(1.4, 2.0)
  spacing = np.full(3, in_plane)
  spacing[perm[2]] = slice_gap
  spacing *= spacing_scale
  need = heart_hi - heart_lo + 2 * MIN_MARGIN_MM
  # One square in-plane matrix of a typical size, enlarged when the heart would not fit.
  n_in_plane = max(int(rng.integers(200, 289) / spacing_scale),
                   *(int(np.ceil(need[w] / spacing[w])) + 1 for w in perm[:2]))
  n = [n_in_plane] * 3
  n[perm[2]] = int(np.ceil(need[perm[2]] / spacing[perm[2]])) + 1 + int(
      rng.integers(0, 12) / spacing_scale)
  lo = np.empty(3)
  for w in range(3):
    slack = (n[w] - 1) * spacing[w] - (heart_hi[w] - heart_lo[w]) - 2 * MIN_MARGIN_MM
    lo[w] = heart_lo[w] - MIN_MARGIN_MM - rng.uniform(0, max(slack, 0.0))
  return _Grid(lo=lo, spacing=spacing, n=tuple(n), perm=perm, signs=signs)


@dataclasses.dataclass(frozen=True)
class _Case:
  anatomy: Anatomy
  grid: _Grid
  appearance_seq: np.random.SeedSequence


def _draw_case(seed: int, index: int, spacing_scale: float) -> _Case:
  if seed < 0 or index < 0:
    raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
  anatomy_seq, grid_seq, appearance_seq = np.random.SeedSequence([seed, index]).spawn(3)
  anatomy = draw_anatomy(np.random.default_rng(anatomy_seq))
  lo, hi = anatomy.world_bounds(anatomy.all_shapes())
  grid = _draw_grid(np.random.default_rng(grid_seq), lo, hi, spacing_scale)
  return _Case(anatomy, grid, appearance_seq)


def phantom_geometry(seed: int, index: int,
                     spacing_scale: float = 1.0) -> tuple[tuple[int, int, int], np.ndarray]:
  """The raw grid shape (I, J, K) and 4x4 float64 affine of a case, without its volumes."""
  case = _draw_case(seed, index, spacing_scale)
  return case.grid.raw_shape, case.grid.affine()


# --- Rendering. -------------------------------------------------------------------------------

def _index_box(grid: _Grid, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, ...]:
  """The voxel index ranges of the world-ordered grid inside the world box [lo, hi]."""
  start = np.floor((lo - grid.lo) / grid.spacing).astype(int)
  stop = np.ceil((hi - grid.lo) / grid.spacing).astype(int) + 1
  return tuple(slice(int(np.clip(a, 0, n)), int(np.clip(b, 0, n)))
               for a, b, n in zip(start, stop, grid.n))


def _paint(target: np.ndarray, value, shapes, anatomy: Anatomy, grid: _Grid,
           box: tuple[slice, ...], q) -> None:
  """Sets `target` (the heart box) to `value` inside the shapes, each on its own sub-box."""
  for shape in shapes:
    sub = _index_box(grid, *anatomy.world_bounds([shape]))
    local = tuple(slice(max(s.start, b.start) - b.start, min(s.stop, b.stop) - b.start)
                  for s, b in zip(sub, box))
    if any(s.stop <= s.start for s in local):
      continue
    target[local][shape.inside([c[local] for c in q])] = value


def _smooth_field(rng: np.random.Generator, x, y, z, wavelength: tuple[float, float],
                  num_waves: int = 3) -> np.ndarray:
  """A smooth random field in about [-1, 1] on the broadcast grid x, y, z (float32)."""
  field = np.float32(0)
  for _ in range(num_waves):
    f = (2 * np.pi * unit_vector(rng.normal(size=3)) / rng.uniform(*wavelength)).astype(np.float32)
    field = field + np.cos(f[0] * x + f[1] * y + (f[2] * z + np.float32(rng.uniform(0, 7))))
  return field / np.float32(num_waves)


def _paint_body(image: np.ndarray, rng: np.random.Generator, grid: _Grid, x, y, z,
                heart_lo: np.ndarray, heart_hi: np.ndarray) -> None:
  """Paints air, chest wall, liver, lungs, spine and descending aorta into `image`."""
  # An elliptical chest (constant along z) with a subcutaneous fat rim; the heart sits left
  # of the midline in the anterior half of the chest.
  heart_mid = (heart_lo + heart_hi) / 2
  body = heart_mid + np.array([rng.uniform(10, 25), rng.uniform(-45, -30), 0.0])
  semi = np.array([rng.uniform(150, 180), rng.uniform(105, 125)])
  ex = (x[:, :, 0] - np.float32(body[0])) / np.float32(semi[0])
  ey = (y[:, :, 0] - np.float32(body[1])) / np.float32(semi[1])
  chest = ex * ex + ey * ey  # (nx, ny): < 1 inside the chest
  inner = 1 - rng.uniform(8.0, 18.0) / semi.mean()
  image[chest < 1] = rng.uniform(0.75, 0.95)
  image[chest < inner * inner] = rng.uniform(0.25, 0.4)

  def ellipsoid(center, radii) -> tuple[tuple[slice, ...], np.ndarray]:
    shape = Ellipsoid(np.asarray(center, np.float64), np.eye(3), np.asarray(radii, np.float64))
    outline = shape.outline()
    box = _index_box(grid, outline.min(axis=0) - OUTLINE_SLACK_MM,
                     outline.max(axis=0) + OUTLINE_SLACK_MM)
    return box, shape.inside([x[box[0]], y[:, box[1]], z[:, :, box[2]]])

  # Liver under the right dome of the diaphragm, lungs on both sides (the pericardial layer,
  # painted later, pushes them off the heart).
  box, mask = ellipsoid(body + [55.0, 10.0, heart_lo[2] - 45.0], [120.0, 95.0, 75.0])
  image[box][mask] = rng.uniform(0.3, 0.45)
  lung = rng.uniform(0.03, 0.08)
  for side in (-1.0, 1.0):
    center = body + [side * rng.uniform(80, 90), rng.uniform(-5, 10), heart_mid[2] + 30]
    box, mask = ellipsoid(center, [rng.uniform(60, 70), 95.0, 130.0])
    image[box][mask] = lung
  # Vertebral bodies and the descending aorta: bright blood that is not labelled.
  for offset, radius, value in (([0.0, -85.0], 20.0, rng.uniform(0.35, 0.55)),
                                ([-25.0, -60.0], rng.uniform(10, 13), rng.uniform(0.85, 1.0))):
    dx = x[:, :, 0] - np.float32(body[0] + offset[0])
    dy = y[:, :, 0] - np.float32(body[1] + offset[1])
    image[dx * dx + dy * dy <= radius * radius] = value


def _paint_heart(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                 anatomy: Anatomy, grid: _Grid, box: tuple[slice, ...], x, y, z) -> None:
  """Paints the labels and the heart's intensities into the heart box of image and label."""
  q = anatomy.template_coords(x[box[0]], y[:, box[1]], z[:, :, box[2]])
  codes = label[box]
  for code in PAINT_ORDER:
    _paint(codes, code, anatomy.structures[code], anatomy, grid, box, q)
  heart = image[box]

  # Pericardial fat and tissue whose brightness wanders between myocardium-dark and fat-bright.
  hull = np.zeros(codes.shape, bool)
  _paint(hull, True, anatomy.hull, anatomy, grid, box, q)
  lo, hi = rng.uniform(0.2, 0.3), rng.uniform(0.7, 0.95)
  layer = _smooth_field(rng, *q, wavelength=(40.0, 90.0))
  heart[hull] = np.float32(lo) + np.float32((hi - lo) / 2) * (layer[hull] + 1)
  del hull, layer

  # Blood pools differ by a few percent (less than the noise), and all labelled tissue varies
  # smoothly by a few percent, so that no structure is told apart by its mean alone.
  value = np.zeros(max(MMWHS_CODES) + 1, np.float32)
  for code in MMWHS_CODES:
    value[code] = 1.0 + np.clip(rng.normal(0, 0.02), -0.04, 0.04)
  myo = rng.uniform(0.28, 0.42)
  value[MYO] = myo
  labelled = codes > 0
  drift = _smooth_field(rng, *(c[labelled] for c in q), wavelength=(30.0, 80.0))
  heart[labelled] = value[codes[labelled]] * (1 + np.float32(0.04) * drift)
  muscle = np.zeros(codes.shape, bool)
  _paint(muscle, True, anatomy.papillary, anatomy, grid, box, q)
  heart[muscle & (codes == LV)] = myo


def _render(case: _Case) -> tuple[np.ndarray, np.ndarray]:
  """World-ordered (nx, ny, nz) image float32 (blood ~ 1) and label uint16 MMWHS codes."""
  anatomy, grid = case.anatomy, case.grid
  rng = np.random.default_rng(case.appearance_seq)
  x, y, z = (grid.coords(w).reshape([-1 if k == w else 1 for k in range(3)]) for w in range(3))
  heart_lo, heart_hi = anatomy.world_bounds(anatomy.all_shapes())
  image = np.zeros(grid.n, np.float32)
  label = np.zeros(grid.n, np.uint16)
  _paint_body(image, rng, grid, x, y, z, heart_lo, heart_hi)
  _paint_heart(image, label, rng, anatomy, grid, _index_box(grid, heart_lo, heart_hi), x, y, z)

  # Acquisition: partial-volume blur, smooth multiplicative bias, Rician noise, scale.
  image = ndimage.gaussian_filter(image, rng.uniform(0.6, 1.1), truncate=3.0)
  extent = (np.asarray(grid.n) - 1) * grid.spacing
  for axis, v in enumerate((x, y, z)):
    t = (v - np.float32(grid.lo[axis])) / np.float32(extent[axis]) - np.float32(0.5)
    a, b = rng.uniform(-0.2, 0.2), rng.uniform(-0.12, 0.12)
    image *= np.exp(np.float32(a) * t + np.float32(b) * np.cos(np.float32(np.pi) * t))
  sigma = np.float32(rng.uniform(0.04, 0.08))
  real = image + sigma * rng.standard_normal(image.shape, np.float32)
  imag = sigma * rng.standard_normal(image.shape, np.float32)
  image = np.sqrt(real * real + imag * imag)
  image *= np.float32(rng.uniform(700.0, 1300.0))
  return image, label


def make_phantom_case(seed: int, index: int, spacing_scale: float = 1.0
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Case `index` of the phantom with base `seed`: (image, label, affine).

  image: (I, J, K) int16 in the raw scanner grid (blood ~ 700-1300). label: (I, J, K) uint16
  MMWHS codes 0/205/420/500/550/600/820/850. affine: (4, 4) float64 voxel -> world (RAS+ mm).
  spacing_scale > 1 coarsens the grid (fewer, larger voxels) for fast tests.
  """
  case = _draw_case(seed, index, spacing_scale)
  image, label = _render(case)
  image = np.clip(np.rint(image), 0, np.iinfo(np.int16).max).astype(np.int16)
  return case.grid.to_raw(image), case.grid.to_raw(label), case.grid.affine()


def _write_case(data_dir: Path, seed: int, index: int,
                spacing_scale: float) -> tuple[Path, Path, str]:
  image, label, affine = make_phantom_case(seed, index, spacing_scale)
  name = f"mr_train_{1001 + index}"
  image_path, label_path = data_dir / f"{name}_image.nii.gz", data_dir / f"{name}_label.nii.gz"
  description = f"{DESCRIPTION}, seed {seed}, case {index}"
  save_nifti(image_path, image, affine, description)
  save_nifti(label_path, label, affine, description)
  spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
  summary = (f"{name}: {'x'.join(map(str, image.shape))} voxels, "
             f"{'x'.join(f'{s:.2f}' for s in spacing)} mm, {''.join(nib.aff2axcodes(affine))}")
  return image_path, label_path, summary


def _written_by_phantom(path: Path) -> bool:
  """Whether `path` is a .nii.gz file whose NIfTI-1 header description starts with
  DESCRIPTION."""
  if not (path.name.endswith(".nii.gz") and path.is_file()):
    return False
  try:
    with gzip.open(path, "rb") as f:
      header = nib.Nifti1Header.from_fileobj(f, check=False)
  except Exception:  # not gzip, not NIfTI-1, truncated: not a phantom file in any case
    return False
  return header["descrip"].item().startswith(DESCRIPTION.encode())


def _check_only_phantom_files(data_dir: Path) -> None:
  """Refuses a folder holding anything but phantom files (and leftovers of writing them)."""
  if not data_dir.exists():
    return
  if not data_dir.is_dir():
    raise UserError(f"{data_dir}: is a file, not a folder to write the phantom to")
  foreign = [p.name for p in sorted(data_dir.iterdir())
             if not (_LEFTOVER.match(p.name) or _written_by_phantom(p))]
  if foreign:
    listing = ", ".join(foreign[:3])
    if len(foreign) > 3:
      listing += f" and {len(foreign) - 3} more"
    raise UserError(
        f"{data_dir}: holds files the phantom generator did not write ({listing}); its files "
        "take the names of the real MMWHS data (mr_train_1001_image.nii.gz, ...), so it writes "
        "only into a new or empty folder or over its own earlier output: choose another folder")


def write_phantom(data_dir: str | os.PathLike, num_cases: int = 20, seed: int = 0,
                  progress: Callable[[str], None] | None = console, *, workers: int = 2,
                  spacing_scale: float = 1.0) -> list[tuple[Path, Path]]:
  """Writes `num_cases` phantom cases as mr_train_{1001+i}_{image,label}.nii.gz.

  `data_dir` must be new, empty or hold only earlier phantom output (files whose header
  description starts with DESCRIPTION), which is overwritten; anything else raises
  UserError before a file is written. Cases are generated in `workers` processes; each case
  depends only on (seed, index), so the files are the same for any number of workers.
  Returns the (image, label) paths in case order; `progress` gets one line per case.
  """
  data_dir = Path(data_dir)
  _check_only_phantom_files(data_dir)
  data_dir.mkdir(parents=True, exist_ok=True)
  args = [(data_dir, seed, i, spacing_scale) for i in range(num_cases)]
  paths = []

  def done(i: int, result: tuple[Path, Path, str]) -> None:
    paths.append(result[:2])
    if progress is not None:
      progress(f"phantom case {i + 1}/{num_cases}: {result[2]}")

  if workers <= 1 or num_cases <= 1:
    for i, a in enumerate(args):
      done(i, _write_case(*a))
    return paths
  # spawn, not fork: the caller may hold threads (JAX) that a forked child would inherit.
  with concurrent.futures.ProcessPoolExecutor(
      min(workers, num_cases), mp_context=multiprocessing.get_context("spawn")) as pool:
    for i, result in enumerate(pool.map(_write_case, *zip(*args))):
      done(i, result)
  return paths
