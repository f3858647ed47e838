"""launch.py as a user meets it: bad input is one line on stderr and exit status 2."""
from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import blob_label, cpu_env, write_nifti

ROOT = Path(__file__).resolve().parents[1]


def launch(*args, cache):
  env = cpu_env(WH_ERRMAP_CACHE=str(cache))
  return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def bad_folder(tmp_path, problem):
  """A data folder with one valid case and one case broken in the given way."""
  folder = tmp_path / "data"
  folder.mkdir()
  label = blob_label()
  image = np.full(label.shape, 100, np.float32) + (label > 0)
  write_nifti(folder / "mr_train_1001_image.nii.gz", image)
  write_nifti(folder / "mr_train_1001_label.nii.gz", label)
  bad_image, bad_label = folder / "mr_train_1002_image.nii.gz", folder / "mr_train_1002_label.nii.gz"
  write_nifti(bad_image, image)
  write_nifti(bad_label, label)
  if problem == "truncated":
    bad_image.write_bytes(bad_image.read_bytes()[:200])
    return bad_image
  if problem == "not_nifti":
    with gzip.open(bad_image, "wb") as f:
      f.write(b"plain text, not an image " * 40)
    return bad_image
  if problem == "not_3d":
    write_nifti(bad_image, image[:, :, :1])
    return bad_image
  if problem == "shape":
    write_nifti(bad_label, label[:, :, :-1])
    return bad_label
  if problem == "affine":
    write_nifti(bad_label, label, np.diag([2.0, 1, 1, 1]))
    return bad_label
  if problem == "label_values":
    bad = label.copy()
    bad[0, 0, 0] = 7000
    write_nifti(bad_label, bad)
    return bad_label
  if problem == "nan":
    bad = image.copy()
    bad[1, 1, 1] = np.nan
    write_nifti(bad_image, bad)
    return bad_image
  if problem == "no_foreground":
    write_nifti(bad_label, np.zeros_like(label))
    return bad_label
  if problem == "missing_label":
    bad_label.unlink()
    return bad_image
  raise ValueError(problem)


@pytest.mark.parametrize("problem", ["truncated", "not_nifti", "not_3d", "shape", "affine",
                                     "label_values", "nan", "no_foreground", "missing_label"])
def test_bad_input_is_one_line_and_status_2(tmp_path, problem):
  culprit = bad_folder(tmp_path, problem)
  result = launch("--experiment=prepare_data", f"--data_dir={tmp_path / 'data'}",
                  "--set=splits.num_folds=2", cache=tmp_path / "cache")
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  assert culprit.name in lines[0]
  assert "Traceback" not in result.stdout + result.stderr


def test_unknown_experiment_and_bad_override(tmp_path):
  result = launch("--experiment=nope", cache=tmp_path)
  assert result.returncode == 2 and "prepare_data" in result.stderr
  result = launch("--experiment=prepare_data", "--set=input.no_such_field=3", cache=tmp_path)
  assert result.returncode == 2 and "no_such_field" in result.stderr
  result = launch("--experiment=make_phantom", cache=tmp_path)
  assert result.returncode == 2 and "--data_dir" in result.stderr


def test_make_phantom_then_prepare_data(tmp_path):
  data = tmp_path / "phantom"
  result = launch("--experiment=make_phantom", f"--data_dir={data}", "--num_cases=2", "--seed=0",
                  "--set=phantom_scale=3", cache=tmp_path / "cache")
  assert result.returncode == 0, result.stderr
  assert sorted(p.name for p in data.iterdir()) == [
      "mr_train_1001_image.nii.gz", "mr_train_1001_label.nii.gz",
      "mr_train_1002_image.nii.gz", "mr_train_1002_label.nii.gz"]
  # phantom_scale reached the writer: in-plane voxels of 0.9-1.3 mm, times 3.
  spacing = sorted(nib.load(data / "mr_train_1001_image.nii.gz").header.get_zooms())
  assert 2.6 < spacing[0] <= spacing[1] < 4.0, spacing
  result = launch("--experiment=prepare_data", f"--data_dir={data}", "--set=splits.num_folds=2",
                  cache=tmp_path / "cache")
  assert result.returncode == 0, result.stderr
  assert "mr_train_1002" in result.stdout and "120x120x90" in result.stdout
  assert len(list((tmp_path / "cache").rglob("splits.json"))) == 1


@pytest.mark.parametrize("settings, named", [
    ((), "mesh.space=4"),                                   # batch 2 on 8 devices, space 1
    (("--set=mesh.space=3",), "mesh.space=3 does not divide"),
    (("--set=mesh.space=auto", "--set=input.crop_3d=(24,96,80)"), "input.crop_3d[0]=24"),
    (("--set=mesh.space=auto", "--set=train.seg2d.per_device_batch_size=-1"),
     "per_device_batch_size"),
])
def test_a_batch_that_cannot_be_laid_out_is_one_line_and_status_2(tmp_path, settings, named):
  """On 8 devices the default batch of 2 needs mesh.space: refused before any data work or
  recorded settings, naming the setting to change."""
  env = cpu_env(8, WH_ERRMAP_CACHE=str(tmp_path / "cache"))
  result = subprocess.run([sys.executable, "launch.py", "--experiment=cv_fold",
                           f"--workdir={tmp_path / 'run'}", *settings], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], result.stderr
  assert not (tmp_path / "run" / "config.json").exists()
  assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").glob("phantom*"))


def _two_cases(folder: Path) -> Path:
  folder.mkdir()
  label = blob_label()
  for number in (1001, 1002):
    write_nifti(folder / f"mr_train_{number}_image.nii.gz",
                np.full(label.shape, 100, np.float32) + (label > 0))
    write_nifti(folder / f"mr_train_{number}_label.nii.gz", label)
  return folder


def _one_error_line(result) -> str:
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  assert "Traceback" not in result.stdout + result.stderr
  return lines[0]


def test_make_phantom_refuses_a_folder_it_did_not_write(tmp_path):
  """The phantom's file names are those of the real MMWHS data: it never overwrites them."""
  data = tmp_path / "mmwhs"
  data.mkdir()
  real = write_nifti(data / "mr_train_1001_image.nii.gz", np.ones((4, 4, 4), np.int16))
  stored = real.read_bytes()
  line = _one_error_line(launch("--experiment=make_phantom", f"--data_dir={data}",
                                "--num_cases=1", cache=tmp_path / "cache"))
  assert str(data) in line and "mr_train_1001_image.nii.gz" in line
  assert real.read_bytes() == stored and [p.name for p in data.iterdir()] == [real.name]


@pytest.mark.parametrize("problem, named", [("nan_sform", "sform affine has NaN"),
                                            ("huge", "larger than the limit")])
def test_bad_header_is_one_line_and_status_2(tmp_path, problem, named):
  culprit = _two_cases(tmp_path / "data") / "mr_train_1002_image.nii.gz"
  raw = bytearray(gzip.decompress(culprit.read_bytes()))
  if problem == "nan_sform":
    raw[280:284] = np.array([np.nan], "<f4").tobytes()  # the first entry of srow_x
  else:
    raw[40:56] = np.array([3, 2048, 2048, 300, 1, 1, 1, 1], "<i2").tobytes()  # dim
    del raw[352:]  # the header alone: a complete file would hold 5 GB of float32
  culprit.write_bytes(gzip.compress(bytes(raw)))
  line = _one_error_line(launch("--experiment=prepare_data", f"--data_dir={tmp_path / 'data'}",
                                "--set=splits.num_folds=2", cache=tmp_path / "cache"))
  assert culprit.name in line and named in line


def test_prepare_data_follows_a_symlinked_folder(tmp_path):
  elsewhere = _two_cases(tmp_path / "elsewhere")
  (tmp_path / "data").mkdir()
  (tmp_path / "data" / "mr_train").symlink_to(elsewhere, target_is_directory=True)
  result = launch("--experiment=prepare_data", f"--data_dir={tmp_path / 'data'}",
                  "--set=splits.num_folds=2", cache=tmp_path / "cache")
  assert result.returncode == 0, result.stderr
  assert "mr_train_1002" in result.stdout
