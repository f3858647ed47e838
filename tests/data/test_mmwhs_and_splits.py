"""Case discovery in the MMWHS layout, and the K-fold split."""
from __future__ import annotations

import json

import pytest

from wh_errmap.data.mmwhs import find_cases
from wh_errmap.data.nifti_io import InvalidCaseError
from wh_errmap.data.splits import fold_cases, load_or_create_splits, make_splits
from wh_errmap.errors import UserError


def touch(folder, *names):
  folder.mkdir(parents=True, exist_ok=True)
  for name in names:
    (folder / name).write_bytes(b"x")


def test_find_cases_pairs_and_sorts(tmp_path):
  touch(tmp_path / "mr_train", "mr_train_1010_label.nii.gz", "mr_train_1010_image.nii.gz",
        "mr_train_1002_image.nii.gz", "mr_train_1002_label.nii.gz", "README.txt")
  touch(tmp_path / "mr_test", "mr_test_2001_image.nii.gz")
  touch(tmp_path / "ct_train", "ct_train_1001_image.nii", "ct_train_1001_label.nii")
  cases = find_cases(tmp_path)
  assert [c.case_id for c in cases] == ["ct_train_1001", "mr_test_2001", "mr_train_1002",
                                        "mr_train_1010"]
  assert cases[1].label_path is None
  assert cases[2].label_path.name == "mr_train_1002_label.nii.gz"
  assert [c.case_id for c in find_cases(tmp_path, modality="ct")] == ["ct_train_1001"]


def test_find_cases_errors(tmp_path):
  with pytest.raises(InvalidCaseError, match="not found"):
    find_cases(tmp_path / "absent")
  touch(tmp_path, "notes.txt")
  with pytest.raises(InvalidCaseError, match="no MMWHS cases"):
    find_cases(tmp_path)
  touch(tmp_path, "mr_train_1001_image.nii.gz")
  with pytest.raises(InvalidCaseError, match="mr_train_1001_image.nii.gz.*without its label"):
    find_cases(tmp_path, require_labels=True)
  touch(tmp_path, "mr_train_1003_label.nii.gz")
  with pytest.raises(InvalidCaseError, match="mr_train_1003_label.nii.gz.*without its image"):
    find_cases(tmp_path)


def test_find_cases_follows_symlinked_folders(tmp_path):
  touch(tmp_path / "elsewhere", "mr_train_1001_image.nii.gz", "mr_train_1001_label.nii.gz")
  data = tmp_path / "data"
  data.mkdir()
  (data / "mr_train").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
  (tmp_path / "elsewhere" / "loop").symlink_to(data, target_is_directory=True)  # a cycle
  cases = find_cases(data, require_labels=True)
  assert [c.case_id for c in cases] == ["mr_train_1001"]
  assert cases[0].image_path == data / "mr_train" / "mr_train_1001_image.nii.gz"
  # A second link to the same folder is not a second copy of its cases.
  (data / "second").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
  assert [c.case_id for c in find_cases(data)] == ["mr_train_1001"]


@pytest.mark.parametrize("num_cases", [5, 20, 23])
def test_every_case_tested_exactly_once(num_cases):
  ids = [f"case{i:02d}" for i in range(num_cases)]
  folds = make_splits(ids, num_folds=5, seed=3)
  tested = [c for fold in folds for c in fold["test"]]
  assert sorted(tested) == ids
  for fold in folds:
    assert not set(fold["train"]) & set(fold["test"])
    assert sorted(fold["train"] + fold["test"]) == ids
  sizes = [len(f["test"]) for f in folds]
  assert max(sizes) - min(sizes) <= 1


def test_split_depends_on_seed_only():
  ids = [f"c{i}" for i in range(20)]
  assert make_splits(ids, seed=1) == make_splits(list(reversed(ids)), seed=1)
  assert make_splits(ids, seed=1) != make_splits(ids, seed=2)


def test_split_written_once(tmp_path):
  path = tmp_path / "splits.json"
  ids = [f"c{i}" for i in range(10)]
  first = load_or_create_splits(path, ids, seed=0)
  stored = path.read_text()
  # A different seed does not re-split an existing file: the split is fixed once written.
  assert load_or_create_splits(path, ids, seed=5) == first
  assert path.read_text() == stored
  assert json.loads(stored)["folds"] == first
  train, test = fold_cases(first, 4)
  assert test == first[4]["test"]
  with pytest.raises(UserError, match="fold 5"):
    fold_cases(first, 5)
  with pytest.raises(UserError, match="delete it"):
    load_or_create_splits(path, ids[:-1])
