"""load_case: orientation, label mapping, and one test per class of bad input."""
from __future__ import annotations

import gzip
import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import blob_label, write_nifti
from wh_errmap.data.nifti_io import (MAX_VOXELS, InvalidCaseError, from_canonical, load_case,
                                     save_nifti, to_canonical)
from wh_errmap.data import nifti_io


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


def _rotation_z(degrees: float) -> np.ndarray:
  c, s = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
  return np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])


@pytest.mark.parametrize("degrees", [0.0, 10.0])
def test_canonical_round_trip(degrees):
  """A PLS header (voxel axes along -y, -x, +z), axis-aligned or rotated 10 degrees (oblique,
  same closest orientation), against arrays and affines worked out by hand."""
  data = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
  affine = _rotation_z(degrees) @ np.array(
      [[0, -3.0, 0, 10], [-2.0, 0, 0, 20], [0, 0, 4.0, 30], [0, 0, 0, 1]])
  canon, canon_affine = to_canonical(data, affine)
  # RAS axis 0 (toward R) is voxel axis 1 reversed, axis 1 (A) is voxel axis 0 reversed.
  expected = np.flip(data.transpose(1, 0, 2), axis=(0, 1))
  np.testing.assert_array_equal(canon, expected)
  assert canon[0, 0, 0] == data[1, 2, 0] and canon[2, 1, 3] == data[0, 0, 3]
  # Canonical index (a, b, c) is original index (1 - b, 2 - a, c).
  index_map = np.array([[0, -1, 0, 1], [-1, 0, 0, 2], [0, 0, 1, 0], [0, 0, 0, 1.0]])
  np.testing.assert_allclose(canon_affine, affine @ index_map, atol=1e-12)
  if degrees == 0:
    # The voxel at index 0 is original (1, 2, 0), at x = 10 - 3 * 2, y = 20 - 2 * 1, z = 30.
    np.testing.assert_allclose(canon_affine, [[3, 0, 0, 4], [0, 2, 0, 18], [0, 0, 4, 30],
                                              [0, 0, 0, 1]])
  np.testing.assert_array_equal(from_canonical(expected, affine), data)


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


def _with_header(source: Path, target: Path, **fields) -> Path:
  """A copy of the .nii.gz file `source` with NIfTI-1 header fields replaced, data unchanged."""
  raw = gzip.decompress(source.read_bytes())
  header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw), check=False)
  for name, value in fields.items():
    header[name] = value
  target.write_bytes(gzip.compress(header.binaryblock + raw[header.sizeof_hdr:]))
  return target


NAN, INF = float("nan"), float("inf")
SFORM = {"sform_code": 1, "srow_x": [1.2, 0, 0, 0], "srow_y": [0, 1.1, 0, 0],
         "srow_z": [0, 0, 1.5, 0]}
QFORM = {"sform_code": 0, "qform_code": 1, "quatern_b": 0, "quatern_c": 0, "quatern_d": 0,
         "pixdim": [1, 1.2, 1.1, 1.5, 0, 0, 0, 0]}


@pytest.mark.filterwarnings("error")  # no warning lines before the error either
@pytest.mark.parametrize("fields, match", [
    ({**SFORM, "srow_x": [NAN, 0, 0, 0]}, "sform affine has NaN or infinite"),
    ({**SFORM, "srow_y": [0, 1.1, 0, INF]}, "sform affine has NaN or infinite"),
    ({**SFORM, "srow_z": [0, 0, 0, 0]}, "sform affine is singular"),
    ({**SFORM, "srow_x": [1, 1, 0, 0], "srow_y": [1, 1, 0, 0]}, "sform affine is singular"),
    ({**QFORM, "quatern_b": NAN}, "qform affine has NaN or infinite"),
    ({**QFORM, "qoffset_x": INF}, "qform affine has NaN or infinite"),
    ({**QFORM, "pixdim": [1, 1.2, 0, 1.5, 0, 0, 0, 0]}, r"pixdim\[1:4\] = \[1.2, 0.0, 1.5\]"),
    ({**QFORM, "qform_code": 0, "pixdim": [1, NAN, 1.1, 1.5, 0, 0, 0, 0]}, "pixdim.*no sform"),
])
def test_header_without_an_orientation(tmp_path, tiny_case, fields, match):
  image_path, label_path = tiny_case
  good = _with_header(image_path, tmp_path / "good_image.nii.gz", **SFORM)
  assert load_case(good).spacing == pytest.approx((1.2, 1.1, 1.5))
  message = _expect(match, _with_header(image_path, tmp_path / "bad_image.nii.gz", **fields))
  assert "bad_image.nii.gz" in message and "no orientation can be derived" in message
  bad_label = _with_header(label_path, tmp_path / "bad_label.nii.gz", **fields)
  assert "bad_label.nii.gz" in _expect(match, good, bad_label)


@pytest.mark.parametrize("dim, match", [
    ([3, 2048, 2048, 300, 1, 1, 1, 1], f"1,258,291,200 voxels.*limit of {MAX_VOXELS:,}"),
    ([4, 256, 256, 128, 40, 1, 1, 1], r"3D volume, got shape \(256, 256, 128, 40\)"),
])
def test_shape_and_size_are_checked_before_the_data(tmp_path, tiny_case, dim, match):
  """Headers promising a huge or 4D volume, followed by a few kB of data: refused for what
  they describe, not reported as truncated after reading."""
  big = _with_header(tiny_case[0], tmp_path / "big_image.nii.gz", dim=dim)
  assert "big_image.nii.gz" in _expect(match, big)


def test_truncated_plain_nifti(tmp_path, tiny_case):
  raw = gzip.decompress(tiny_case[0].read_bytes())
  cut = tmp_path / "cut_image.nii"
  cut.write_bytes(raw[:-100])
  _expect(f"truncated: the header describes {len(raw):,} bytes, "
          f"the file holds {len(raw) - 100:,}", cut)


def test_data_that_are_not_real_numbers(tmp_path):
  data = np.ones((24, 20, 16), np.complex64)
  _expect("complex64 is not a real number type", write_nifti(tmp_path / "c.nii.gz", data))


def _raise_memory_error(*args, **kwargs):
  raise MemoryError()


@pytest.mark.parametrize("owner, name", [(nib.arrayproxy.ArrayProxy, "__array__"),
                                         (nib.Nifti1Image, "from_bytes")])
def test_out_of_memory_is_not_called_corrupt(monkeypatch, tiny_case, owner, name):
  monkeypatch.setattr(owner, name, _raise_memory_error)
  message = _expect("not enough memory to read it", tiny_case[0])
  assert "corrupt" not in message and "7,680 voxels, 0.0 GB" in message


def test_unreadable_file(monkeypatch, tiny_case):
  def denied(path, *args, **kwargs):
    raise PermissionError(13, "Permission denied", str(path))
  monkeypatch.setattr(nifti_io, "open", denied, raising=False)
  _expect(r"cannot be read \(Permission denied\)", tiny_case[0])


def test_message_is_one_line():
  error = InvalidCaseError("a.nii", "Expected 10 bytes, got 5\n - could the file be damaged?")
  assert str(error) == "a.nii: Expected 10 bytes, got 5 - could the file be damaged?"


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
