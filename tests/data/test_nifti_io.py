"""load_case: orientation, label mapping, and one test per class of bad input."""
from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import blob_label, write_nifti
from wh_errmap.data import InvalidCaseError, load_case, save_nifti
from wh_errmap.data.nifti_io import from_canonical, to_canonical


def test_loads_and_reorients_to_ras(tiny_case):
  image_path, label_path = tiny_case
  case = load_case(image_path, label_path)
  assert case.case_id == "mr_train_1001"
  assert nib.aff2axcodes(case.affine) == ("R", "A", "S")
  assert case.image.dtype == np.float32 and case.label.dtype == np.uint8
  assert case.image.shape == case.label.shape
  # The LPS-like header has spacing 1.2, 1.1, 1.5 along its axes; RAS reorders it.
  assert case.spacing == pytest.approx((1.2, 1.5, 1.1))
  assert sorted(np.unique(case.label)) == list(range(8))
  # Each voxel keeps its world position: compare world coordinates of a labelled voxel.
  raw = nib.load(str(label_path))
  raw_index = np.argwhere(np.asarray(raw.dataobj) == 500)[0]
  world = raw.affine @ np.append(raw_index, 1)
  ras_index = np.round(np.linalg.solve(case.affine, world)[:3]).astype(int)
  assert case.label[tuple(ras_index)] == 3  # LV


def test_canonical_round_trip(tiny_case):
  image_path, _ = tiny_case
  img = nib.load(str(image_path))
  data = np.asarray(img.dataobj)
  canon, _ = to_canonical(data, img.affine)
  np.testing.assert_array_equal(from_canonical(canon, img.affine), data)


def test_labels_as_classes_are_accepted(tmp_path):
  label = write_nifti(tmp_path / "l.nii.gz", blob_label(codes=False))
  image = write_nifti(tmp_path / "i.nii.gz", np.ones((24, 20, 16), np.float32))
  assert sorted(np.unique(load_case(image, label).label)) == list(range(8))


def test_image_without_label_loads(tiny_case):
  assert load_case(tiny_case[0]).label is None


def test_4d_with_singleton_is_3d(tmp_path):
  image = write_nifti(tmp_path / "i.nii.gz", np.ones((24, 20, 16, 1), np.float32))
  assert load_case(image).image.shape == (24, 20, 16)


def _expect(match, image, label=None):
  with pytest.raises(InvalidCaseError, match=match) as info:
    load_case(image, label)
  assert isinstance(info.value, ValueError)
  return str(info.value)


def test_missing_file(tmp_path, tiny_case):
  message = _expect("not found", tmp_path / "nope_image.nii.gz")
  assert "nope_image.nii.gz" in message
  _expect("not found", tiny_case[0], tmp_path / "missing_label.nii.gz")


def test_truncated_gzip(tmp_path, tiny_case):
  data = tiny_case[0].read_bytes()
  broken = tmp_path / "broken_image.nii.gz"
  broken.write_bytes(data[: len(data) // 2])
  assert "broken_image.nii.gz" in _expect("corrupt|truncated", broken)


def test_corrupt_gzip(tmp_path, tiny_case):
  data = bytearray(tiny_case[0].read_bytes())
  data[len(data) // 2: len(data) // 2 + 64] = b"\x00" * 64
  broken = tmp_path / "bad_image.nii.gz"
  broken.write_bytes(bytes(data))
  _expect("corrupt|truncated", broken)


def test_not_nifti(tmp_path):
  text = tmp_path / "notes_image.nii.gz"
  with gzip.open(text, "wb") as f:
    f.write(b"this is not an image" * 30)
  _expect("not a NIfTI", text)
  plain = tmp_path / "plain.nii"
  plain.write_bytes(b"\x01" * 500)
  _expect("not a NIfTI|corrupt", plain)


def test_empty_file(tmp_path):
  empty = tmp_path / "empty.nii.gz"
  empty.write_bytes(b"")
  _expect("empty", empty)


@pytest.mark.parametrize("shape", [(24, 20), (24, 20, 1), (24, 20, 16, 3)])
def test_not_3d(tmp_path, shape):
  image = write_nifti(tmp_path / "i.nii.gz", np.ones(shape, np.float32))
  _expect("3D", image)


def test_shape_mismatch(tmp_path, tiny_case):
  label = write_nifti(tmp_path / "l.nii.gz", blob_label((24, 20, 15)))
  assert "l.nii.gz" in _expect("shape", tiny_case[0], label)


def test_affine_mismatch(tmp_path, tiny_case):
  label = write_nifti(tmp_path / "l.nii.gz", blob_label(), np.diag([1.0, 1.0, 2.0, 1.0]))
  _expect("affine", tiny_case[0], label)


def test_affines_within_tolerance_are_accepted(tmp_path, tiny_case):
  affine = nib.load(str(tiny_case[0])).affine.copy()
  affine[0, 3] += 1e-5
  label = write_nifti(tmp_path / "l.nii.gz", blob_label(), affine)
  assert load_case(tiny_case[0], label).label is not None


def test_unknown_label_values(tmp_path, tiny_case):
  bad = blob_label()
  bad[0, 0, 0] = 421
  label = write_nifti(tmp_path / "l.nii.gz", bad, nib.load(str(tiny_case[0])).affine)
  _expect("421", tiny_case[0], label)


def test_non_integer_labels(tmp_path, tiny_case):
  bad = blob_label().astype(np.float32)
  bad[0, 0, 0] = 0.5
  label = write_nifti(tmp_path / "l.nii.gz", bad, nib.load(str(tiny_case[0])).affine)
  _expect("integer", tiny_case[0], label)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_intensities(tmp_path, value):
  data = np.ones((24, 20, 16), np.float32)
  data[3, 4, 5] = value
  _expect("NaN or Inf", write_nifti(tmp_path / "i.nii.gz", data))


def test_label_without_foreground(tmp_path, tiny_case):
  label = write_nifti(tmp_path / "l.nii.gz", np.zeros((24, 20, 16), np.int16),
                      nib.load(str(tiny_case[0])).affine)
  _expect("no foreground", tiny_case[0], label)


def test_save_nifti_is_atomic_and_round_trips(tmp_path):
  volume = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
  target = tmp_path / "out" / "v.nii.gz"
  save_nifti(target, volume, np.diag([2.0, 2.0, 2.0, 1.0]))
  np.testing.assert_array_equal(np.asarray(nib.load(str(target)).dataobj), volume)
  assert [p.name for p in target.parent.iterdir()] == ["v.nii.gz"]  # no temp file left
