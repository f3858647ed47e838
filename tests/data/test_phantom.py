"""Synthetic phantom: determinism, labels, header geometry, file layout, anatomy, appearance."""
from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from tests.conftest import write_nifti
from wh_errmap.data.nifti_io import load_case
from wh_errmap.data.dataset import check_phantom_scale, phantom_dir
from wh_errmap.data.phantom import make_phantom_case, phantom_geometry, write_phantom
from wh_errmap.data import anatomy, phantom
from wh_errmap.data.structures import MMWHS_CODES, STRUCTURES
from wh_errmap.errors import UserError

# Coarse voxels keep the volumes small; the geometry and appearance code paths are the same.
COARSE = 2.0
CLASS = {name: c + 1 for c, name in enumerate(STRUCTURES)}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("phantom")
  messages = []
  paths = write_phantom(data_dir, num_cases=2, seed=7, progress=messages.append, workers=2,
                        spacing_scale=COARSE)
  return data_dir, paths, messages


@pytest.fixture(scope="module")
def cases(written):
  return [load_case(image, label) for image, label in written[1]]


def test_deterministic_per_seed_and_index():
  first = make_phantom_case(3, 1, spacing_scale=COARSE)
  again = make_phantom_case(3, 1, spacing_scale=COARSE)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  other = make_phantom_case(3, 2, spacing_scale=COARSE)
  assert first[0].shape != other[0].shape or not np.array_equal(first[0], other[0])
  assert not np.array_equal(first[2], other[2])


def test_dtypes_and_label_codes():
  image, label, affine = make_phantom_case(0, 0, spacing_scale=COARSE)
  assert image.dtype == np.int16 and label.dtype == np.uint16 and affine.dtype == np.float64
  assert image.shape == label.shape and affine.shape == (4, 4)
  assert set(np.unique(label)) == {0, *MMWHS_CODES}
  assert image.min() >= 0 and 500 < np.percentile(image[label > 0], 90) < 3000


def test_template_coords_undo_the_placement():
  # Without the deformation, world = translation + scale * rotation @ template: the map that
  # world_bounds applies to outline points, which template_coords must invert.
  heart = anatomy.draw_anatomy(np.random.default_rng(0))
  rigid = dataclasses.replace(heart, amp=np.zeros_like(heart.amp))
  template = np.random.default_rng(1).uniform(-80, 80, (3, 5))
  world = (rigid.translation[:, None] + rigid.scale * rigid.rotation @ template).astype(np.float32)
  q = rigid.template_coords(*(w.reshape(-1, 1, 1) for w in world))
  np.testing.assert_allclose([c[:, 0, 0] for c in q], template, atol=1e-3)
  # The deformation moves points by at most max_displacement (mm) before the inverse placement.
  deformed = heart.template_coords(*(w.reshape(-1, 1, 1) for w in world))
  shift = np.linalg.norm(np.array([c[:, 0, 0] for c in deformed]) - template, axis=0)
  assert shift.max() <= heart.max_displacement() / heart.scale + 1e-3


def test_geometry_matches_the_case():
  shape, affine = phantom_geometry(5, 3, spacing_scale=COARSE)
  image, _, case_affine = make_phantom_case(5, 3, spacing_scale=COARSE)
  assert image.shape == shape
  np.testing.assert_array_equal(affine, case_affine)


def test_orientation_spacing_and_size_vary_like_raw_scans():
  geometries = [phantom_geometry(0, i) for i in range(8)]
  assert len({nib.aff2axcodes(affine) for _, affine in geometries}) >= 3
  for shape, affine in geometries:
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    # Voxel axes 0 and 1 are in-plane, axis 2 is the slice axis.
    assert spacing[0] == spacing[1] and 0.9 <= spacing[0] <= 1.3
    assert 1.4 <= spacing[2] <= 2.0
    assert shape[0] == shape[1] and 200 <= shape[0] <= 320
    assert 90 <= shape[2] <= 170
    # A permuted, flipped diagonal: one non-zero per row and column.
    assert (np.count_nonzero(affine[:3, :3], axis=0) == 1).all()
    assert (np.count_nonzero(affine[:3, :3], axis=1) == 1).all()


def test_writes_the_mmwhs_layout(written):
  data_dir, paths, messages = written
  assert [(p.name, q.name) for p, q in paths] == [
      ("mr_train_1001_image.nii.gz", "mr_train_1001_label.nii.gz"),
      ("mr_train_1002_image.nii.gz", "mr_train_1002_label.nii.gz")]
  assert all(p.parent == data_dir and p.is_file() and q.is_file() for p, q in paths)
  assert len(messages) == 2 and "mr_train_1002" in messages[1]


def test_written_files_do_not_depend_on_the_process(written, cases):
  image, label, affine = make_phantom_case(7, 1, spacing_scale=COARSE)
  stored = nib.load(str(written[1][1][0]))
  np.testing.assert_array_equal(np.asarray(stored.dataobj), image)
  np.testing.assert_allclose(stored.affine, affine, atol=1e-4)
  assert sorted(np.unique(cases[1].label)) == list(range(8))


def _centroid(case, name: str) -> np.ndarray:
  index = np.argwhere(case.label == CLASS[name]).mean(axis=0)
  return case.affine[:3, :3] @ index + case.affine[:3, 3]


def _top(case, name: str) -> float:
  return float(case.affine[2, 2] * np.nonzero(case.label == CLASS[name])[2].max()
               + case.affine[2, 3])


def test_anatomy_in_world_coordinates(cases):
  for case in cases:
    assert sorted(np.unique(case.label)) == list(range(8))
    c = {name: _centroid(case, name) for name in STRUCTURES}
    x, y, z = 0, 1, 2  # RAS+: toward the patient's right, anterior, superior
    assert c["LV"][x] < c["RA"][x] and c["LV"][x] < c["RV"][x]
    assert c["RV"][y] > c["LA"][y] and c["LV"][y] > c["LA"][y]
    assert c["LA"][z] > c["LV"][z] and c["RA"][z] > c["LV"][z]
    assert c["RA"][x] > c["LA"][x]
    vessels_top = min(_top(case, "AO"), _top(case, "PA"))
    assert vessels_top > max(_top(case, name) for name in ("LV", "RV", "Myo"))
    lv = case.label == CLASS["LV"]
    assert (ndimage.binary_dilation(lv, iterations=2) & (case.label == CLASS["Myo"])).any()
    ml = np.prod(case.spacing) / 1000
    volume = {name: (case.label == CLASS[name]).sum() * ml for name in STRUCTURES}
    for name, (lo, hi) in {"LV": (70, 200), "Myo": (70, 200), "RV": (70, 230), "LA": (40, 140),
                           "RA": (40, 140), "AO": (15, 70), "PA": (15, 70)}.items():
      assert lo < volume[name] < hi, (name, volume[name])


def test_blood_bright_myocardium_dark(cases):
  for case in cases:
    mean = {name: case.image[case.label == CLASS[name]].mean() for name in STRUCTURES}
    pools = ("LV", "RV", "LA", "RA", "AO", "PA")
    assert min(mean[name] for name in pools) > 1.5 * mean["Myo"]
    assert abs(mean["LV"] - mean["LA"]) / mean["LV"] < 0.15


def _tiny_case(seed, index, spacing_scale):
  """Stands in for make_phantom_case where only the files written matter."""
  label = np.zeros((4, 4, 4), np.uint16)
  label[1:3, 1:3, 1:3] = MMWHS_CODES[index % 7]
  return (label > 0).astype(np.int16), label, np.eye(4)


def test_header_names_the_phantom(written):
  for image, label in written[1]:
    for path in (image, label):
      assert bytes(nib.load(str(path)).header["descrip"]).startswith(b"wh_errmap phantom, seed 7")


def test_writes_over_its_own_output_only(tmp_path, monkeypatch):
  monkeypatch.setattr(phantom, "make_phantom_case", _tiny_case)
  data_dir = tmp_path / "new" / "data"
  write_phantom(data_dir, num_cases=2, progress=None, workers=1)
  (data_dir / ".mr_train_1003_image.nii.gz.k2x9.nii.gz").write_bytes(b"")  # killed mid-write
  write_phantom(data_dir, num_cases=3, progress=None, workers=1)
  assert len(list(data_dir.glob("mr_train_*.nii.gz"))) == 6


@pytest.mark.parametrize("foreign", ["mr_train_1001_image.nii.gz", "notes.txt", "mr_train/"])
def test_refuses_a_folder_with_files_it_did_not_write(tmp_path, monkeypatch, foreign):
  """Its file names are those of the real MMWHS data: never overwrite what it did not write."""
  monkeypatch.setattr(phantom, "make_phantom_case", _tiny_case)
  data_dir = tmp_path / "data"
  write_phantom(data_dir, num_cases=1, progress=None, workers=1)
  if foreign.endswith("/"):
    (data_dir / foreign).mkdir()
  elif foreign.endswith(".nii.gz"):
    write_nifti(data_dir / foreign, np.ones((4, 4, 4), np.int16))
  else:
    (data_dir / foreign).write_text("x")
  before = {p.name: p.read_bytes() for p in data_dir.iterdir() if p.is_file()}
  with pytest.raises(UserError, match=f"{data_dir}: holds files the phantom generator did not "
                                      f"write \\({foreign.rstrip('/')}\\)"):
    write_phantom(data_dir, num_cases=2, progress=None, workers=1)
  assert {p.name: p.read_bytes() for p in data_dir.iterdir() if p.is_file()} == before


def test_refuses_a_file_as_its_folder(tmp_path):
  (tmp_path / "data").write_text("x")
  with pytest.raises(UserError, match="is a file, not a folder"):
    write_phantom(tmp_path / "data", num_cases=1, progress=None, workers=1)


@pytest.mark.parametrize("scale, ok", [(0.99, False), (1, True), (1.0, True), (3, True),
                                       (8, True), (8.01, False), (0, False), (-2, False),
                                       (float("nan"), False), (float("inf"), False),
                                       ("x", False), (None, False)])
def test_phantom_scale_is_from_1_to_8(scale, ok):
  if ok:
    assert check_phantom_scale(scale) == float(scale)
  else:
    with pytest.raises(UserError, match="phantom_scale must be a number from 1 to 8"):
      check_phantom_scale(scale)


def test_a_coarser_phantom_has_its_own_folder_and_voxels_scale_times_larger(tmp_path):
  """phantom_scale = 3: the same case's voxel sizes times 3 (from the scale-1 geometry,
  drawn without rendering), in a folder of its own beside the scale-1 name; a scale out of
  range writes nothing."""
  lines = []
  folder = phantom_dir(tmp_path, 1, 4, lines.append, scale=3)
  assert folder.name == "phantom-v1-n1-s4-x3" and (folder / ".complete").exists()
  assert "voxels 3x coarser" in lines[0]
  affine = nib.load(folder / "mr_train_1001_image.nii.gz").affine
  _, fine = phantom_geometry(4, 0, 1.0)
  np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0),
                             3 * np.linalg.norm(fine[:3, :3], axis=0), rtol=1e-6)
  with pytest.raises(UserError, match="phantom_scale"):
    phantom_dir(tmp_path / "none", 1, 4, lines.append, scale=9)
  assert not (tmp_path / "none").exists()
