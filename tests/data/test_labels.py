"""Label conventions: parsing --labels, encoding user masks to classes 0..7 and back."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from wh_errmap.data.labels import (MMWHS, SYNONYMS, TOTALSEGMENTATOR, LabelConvention,
                                   accepted_names, detect, dropped_warning, is_structure_folder,
                                   parse_labels, read_structure_folder)
from wh_errmap.data.nifti_io import InvalidCaseError
from wh_errmap.data.structures import MMWHS_CODES, STRUCTURES
from wh_errmap.errors import UserError

MYO, LA, LV, RA, RV, AO, PA = range(1, 8)


def _one_line(error: pytest.ExceptionInfo) -> str:
  message = str(error.value)
  assert "\n" not in message
  return message


def _dataset_json(tmp_path, labels) -> str:
  path = tmp_path / "dataset.json"
  path.write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels}))
  return str(path)


def test_nnunet_v2_dataset_json_in_another_order_encodes_by_name(tmp_path):
  convention = parse_labels(_dataset_json(tmp_path, {"background": 0, "RV": 1, "Myo": 2,
                                                     "LV": 3}))
  encoded = convention.encode("mask.nii.gz", np.array([[0, 1], [2, 3]], np.uint8))
  np.testing.assert_array_equal(encoded.classes, [[0, RV], [MYO, LV]])
  assert encoded.classes.dtype == np.uint8
  assert encoded.missing == ("LA", "RA", "AO", "PA") and not encoded.empty
  assert convention.structure_value(RV) == 1 and convention.structure_value(AO) is None


def test_nnunet_v1_dataset_json_and_synonyms(tmp_path):
  convention = parse_labels(_dataset_json(tmp_path, {
      "0": "background", "1": "Left Ventricular Myocardium", "2": "left-atrium",
      "3": "LEFT_VENTRICLE", "4": "Pulmonary Trunk", "5": "spleen"}))
  assert convention.values == {1: MYO, 2: LA, 3: LV, 4: PA}
  assert convention.names[5] == "spleen"
  encoded = convention.encode("m.nii", np.array([0, 1, 2, 3, 4, 5, 5]))
  np.testing.assert_array_equal(encoded.classes, [0, MYO, LA, LV, PA, 0, 0])
  assert encoded.dropped == {5: 2}


def test_the_folder_of_a_dataset_json_is_accepted(tmp_path):
  _dataset_json(tmp_path, {"background": 0, "aorta": 1})
  assert parse_labels(str(tmp_path)).values == {1: AO}


@pytest.mark.parametrize("labels, expected", [
    ({"background": 0, "heart": [1, 2]}, "region-based"),
    ({"background": 0, "RV": 1, "right ventricle": 2}, "'RV' and 'right ventricle'"),
    ({"background": 0, "spleen": 1}, "no label names a heart structure"),
])
def test_unusable_dataset_json_is_one_line_naming_the_file(tmp_path, labels, expected):
  path = _dataset_json(tmp_path, labels)
  with pytest.raises(UserError) as error:
    parse_labels(path)
  assert path in _one_line(error) and expected in str(error.value)


@pytest.mark.parametrize("text, expected", [
    ("{not json", "not valid JSON"), ('{"name": "x"}', 'no "labels"'), ("[1]", 'no "labels"')])
def test_bad_dataset_json_files(tmp_path, text, expected):
  path = tmp_path / "dataset.json"
  path.write_text(text)
  with pytest.raises(UserError) as error:
    parse_labels(str(path))
  assert _one_line(error).startswith(str(path)) and expected in str(error.value)
  with pytest.raises(UserError, match="missing.json"):
    parse_labels(str(tmp_path / "missing.json"))


def test_inline_map_round_trips_its_values():
  convention = parse_labels(" 3:RV, 7:myocardium ,12:Ascending Aorta")
  raw = np.array([[0, 3], [7, 12]], np.int16)
  encoded = convention.encode("m.nii", raw)
  np.testing.assert_array_equal(encoded.classes, [[0, RV], [MYO, AO]])
  decoded = convention.decode(encoded.classes)
  np.testing.assert_array_equal(decoded, raw)
  assert decoded.dtype == np.uint8


@pytest.mark.parametrize("spec, expected", [
    ("1:RV,1:LV", "given twice"), ("1:RV,2:heart", "accepted names"), ("0:RV", ">= 1"),
    ("1:RV,2:rv", "both name structure RV"), ("segmentation", "inline map like 1:RV")])
def test_bad_inline_maps_and_choices_are_one_line(spec, expected):
  with pytest.raises(UserError) as error:
    parse_labels(spec)
  assert expected in _one_line(error)


def test_synonym_table_covers_every_structure_and_names_are_unique():
  assert set(SYNONYMS) == set(STRUCTURES)
  for cls, structure in enumerate(STRUCTURES, 1):
    for name in SYNONYMS[structure]:
      assert parse_labels(f"5:{name}").values == {5: cls}, name
  assert "pulmonary trunk" in accepted_names()


def test_mmwhs_round_trip_and_decode_of_missing_structures():
  raw = np.array(MMWHS_CODES + (0,), np.int32).reshape(2, 4)
  encoded = parse_labels("MMWHS").encode("m.nii", raw)
  np.testing.assert_array_equal(encoded.classes.ravel(), [1, 2, 3, 4, 5, 6, 7, 0])
  assert encoded.missing == () and encoded.dropped == {}
  decoded = MMWHS.decode(encoded.classes)
  np.testing.assert_array_equal(decoded, raw)
  assert decoded.dtype == np.uint16
  only_rv = parse_labels("1:RV")
  np.testing.assert_array_equal(only_rv.decode(np.arange(8)), [0, 0, 0, 0, 0, 1, 0, 0])


def test_totalsegmentator_multilabel_volume():
  convention = parse_labels("totalsegmentator")
  assert convention.names[6] == "aorta" and convention.names[1] == "heart_myocardium"
  raw = np.array([0, 1, 2, 3, 4, 5, 6, 7, 118, 118, -1], np.int16)
  encoded = convention.encode("ts.nii.gz", raw)
  np.testing.assert_array_equal(encoded.classes, [0, MYO, LA, LV, RA, RV, AO, PA, 0, 0, 0])
  assert encoded.dropped == {-1: 1, 118: 2}
  line = dropped_warning("ts.nii.gz", encoded, convention)
  assert "\n" not in line and "ts.nii.gz" in line and "118: 2 voxels" in line
  assert "heartchambers_highres" in line


def test_values_far_apart_and_integer_floats_encode():
  convention = parse_labels("1:LV,100000:RV")
  raw = np.array([0, 1, 100000, -100000, 2**40], np.int64)
  encoded = convention.encode("m.nii", raw)
  np.testing.assert_array_equal(encoded.classes, [0, LV, RV, 0, 0])
  assert encoded.dropped == {-100000: 1, 2**40: 1}
  assert convention.decode(encoded.classes).dtype == np.uint32
  floats = MMWHS.encode("m.nii", np.array([205.0, 0.0, 850.0], np.float32))
  np.testing.assert_array_equal(floats.classes, [MYO, 0, PA])


@pytest.mark.parametrize("raw", [np.array([0.0, 0.5]), np.array([205.0, np.nan])])
def test_non_integer_values_name_the_file(raw):
  with pytest.raises(InvalidCaseError) as error:
    MMWHS.encode("case_7.nii.gz", raw)
  assert _one_line(error).startswith("case_7.nii.gz: label values are not all integers")


def test_dropped_classes_are_counted_and_named():
  convention = parse_labels("1:LV,2:RV")
  encoded = convention.encode("m.nii", np.array([0, 1, 3, 3, 3, 9], np.uint8))
  assert encoded.dropped == {3: 3, 9: 1}
  assert "3: 3 voxels, 9: 1 voxel" in dropped_warning("m.nii", encoded, convention)
  assert dropped_warning("m.nii", convention.encode("m.nii", np.ones(2, int)), convention) is None


def test_empty_mask_is_reported_not_refused():
  encoded = MMWHS.encode("m.nii", np.zeros((3, 3, 3), np.uint8))
  assert encoded.empty and encoded.missing == STRUCTURES and encoded.dropped == {}
  only_other = parse_labels("1:LV").encode("m", np.array([0, 2]))
  assert only_other.empty and only_other.dropped == {2: 1}


def test_detect_accepts_mmwhs_and_refuses_other_values():
  assert detect("m.nii", np.array([0, 205, 850])) is MMWHS
  assert detect("m.nii", np.zeros(4)) is MMWHS
  with pytest.raises(InvalidCaseError) as error:
    detect("nnunet_001.nii.gz", np.array([0, 3, 1, 2, 2]))
  message = _one_line(error)
  assert message.startswith("nnunet_001.nii.gz") and "1, 2, 3" in message
  assert "--labels" in message and "totalsegmentator" in message and "1:RV" in message


@pytest.mark.parametrize("values", [[0, 205, 500, 3], [205, 420, 500, 550, 600, 820, 850, 1],
                                    [0, 850, 206], [420, 1000]])
def test_a_mask_mixing_mmwhs_codes_with_other_values_is_not_read_as_mmwhs(values):
  # One foreign value is enough: read as MMWHS it would silently drop to background (an
  # nnU-Net mask whose classes happen to include a 205 would lose its other structures).
  foreign = [v for v in values if v != 0 and v not in MMWHS_CODES]
  with pytest.raises(InvalidCaseError) as error:
    detect("mixed.nii.gz", np.array(values, np.int32))
  message = _one_line(error)
  assert message.startswith("mixed.nii.gz") and "--labels" in message
  assert all(str(v) in message for v in foreign)


def test_to_json_round_trip():
  for convention in (MMWHS, TOTALSEGMENTATOR, parse_labels("4:RV,9:LA")):
    stored = json.loads(json.dumps(convention.to_json()))
    assert LabelConvention.from_json(stored) == convention
  assert parse_labels("4:RV").to_json()["values"] == {"4": "RV"}


def _save(path, data, affine=np.eye(4)):
  nib.save(nib.Nifti1Image(np.asarray(data, np.uint8), affine), str(path))


def test_structure_folder_combines_files_in_totalsegmentator_values(tmp_path):
  shape = (3, 3, 3)
  affine = np.diag([1.5, 1.5, 2.0, 1.0])
  for i, name in enumerate(["heart_myocardium", "heart_atrium_left", "heart_ventricle_left",
                            "heart_atrium_right", "heart_ventricle_right", "aorta"]):
    mask = np.zeros(shape)
    mask.flat[i] = 1
    _save(tmp_path / f"{name}.nii.gz", mask, affine)
  _save(tmp_path / "spleen.nii.gz", np.ones(shape), affine)  # not a heart file
  assert is_structure_folder(tmp_path) and not is_structure_folder(tmp_path / "spleen.nii.gz")
  volume, read_affine, convention = read_structure_folder(tmp_path)
  assert convention is TOTALSEGMENTATOR and volume.dtype == np.uint8
  np.testing.assert_allclose(read_affine, affine)
  np.testing.assert_array_equal(volume.ravel()[:7], [1, 2, 3, 4, 5, 6, 0])
  assert volume.sum() == 21
  assert convention.encode(tmp_path, volume).missing == ("PA",)


def test_structure_folder_overlap_goes_to_the_later_structure(tmp_path):
  _save(tmp_path / "heart_myocardium.nii", np.ones((2, 2, 2)))
  _save(tmp_path / "pulmonary_artery.nii.gz", np.eye(2)[:, :, None].repeat(2, axis=2))
  volume, _, _ = read_structure_folder(tmp_path)
  np.testing.assert_array_equal(volume[:, :, 0], [[PA, MYO], [MYO, PA]])


def test_structure_folder_errors_name_the_files(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(InvalidCaseError) as error:
    read_structure_folder(tmp_path / "empty")
  assert "empty" in _one_line(error) and "heart_ventricle_right.nii.gz" in str(error.value)
  assert not is_structure_folder(tmp_path / "empty")
  _save(tmp_path / "aorta.nii.gz", np.ones((2, 2, 2)))
  _save(tmp_path / "heart_atrium_left.nii.gz", np.ones((2, 2, 3)))
  with pytest.raises(InvalidCaseError) as error:
    read_structure_folder(tmp_path)
  assert "heart_atrium_left.nii.gz" in _one_line(error) and "aorta.nii.gz" in str(error.value)
  _save(tmp_path / "heart_atrium_left.nii.gz", np.ones((2, 2, 2)), np.diag([2, 1, 1, 1]))
  with pytest.raises(InvalidCaseError) as error:
    read_structure_folder(tmp_path)
  assert "affine differs" in _one_line(error) and "heart_atrium_left.nii.gz" in str(error.value)
  assert "aorta.nii.gz" in str(error.value)
