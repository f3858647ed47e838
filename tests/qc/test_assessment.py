"""QC of other people's masks: label conventions, nnU-Net and TotalSegmentator folders,
verdicts, qc.tsv, the gallery, the model file and the in-memory API."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from experiments import export_model, predict
from tests.conftest import ROOT, cpu_env
from wh_errmap import qc
from wh_errmap.data.labels import TOTALSEGMENTATOR_NAMES
from wh_errmap.data.phantom import make_phantom_case
from wh_errmap.data.structures import STRUCTURES
from wh_errmap.errors import UserError
from wh_errmap.models.inference import error_probability
from wh_errmap.qc.predictor import Predictor, load_predictor, load_predictor_file

MMWHS = dict(zip(STRUCTURES, (205, 420, 500, 550, 600, 820, 850)))
# An nnU-Net dataset in another order than MMWHS's, with one class that is not a heart
# structure.
NNUNET_LABELS = {"background": 0, "right ventricle": 1, "Myocardium": 2, "LV": 3,
                 "left atrium": 4, "RA": 5, "aorta": 6, "pulmonary trunk": 7, "coronary": 8}
NNUNET_VALUE = {"RV": 1, "Myo": 2, "LV": 3, "LA": 4, "RA": 5, "AO": 6, "PA": 7}


@pytest.fixture(scope="module")
def run_dir(tiny_run):
  """The session's tiny run (conftest): a barely trained predictor with a training
  reference from three phantom cases, with appearances."""
  return tiny_run


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
  """(image, MMWHS-coded label, affine) of one phantom case."""
  return make_phantom_case(seed=3, index=1, spacing_scale=2.0)


class EverythingWrong(Predictor):
  """Error probability 0.9 on every voxel of the assessed box."""

  def error_map(self, image, mask):
    return np.full(mask.shape, 0.9, np.float32)


def recode(label: np.ndarray, values: dict[str, int]) -> np.ndarray:
  out = np.zeros(label.shape, np.uint16)
  for name, code in MMWHS.items():
    if name in values:
      out[label == code] = values[name]
  return out


def run_predict(workdir, out, image, mask, **settings) -> None:
  config = predict.get_config()
  config.image, config.mask, config.output_dir = str(image), str(mask), str(out)
  for field, value in settings.items():
    setattr(config, field, value)
  predict.run(config, str(workdir))


def read_tsv(path: Path) -> list[dict]:
  with open(path, newline="") as f:
    return list(csv.DictReader(f, delimiter="\t"))


def test_nnunet_folder_with_dataset_json_in_another_label_order(run_dir, phantom, tmp_path,
                                                               capsys):
  image, label, affine = phantom
  raw, masks = tmp_path / "imagesTs", tmp_path / "predictions"
  raw.mkdir()
  masks.mkdir()
  mask = recode(label, NNUNET_VALUE)
  mask[:3, :3, :3] = 8   # a coronary label: not one of the seven, dropped with a warning
  for case in ("heart_001", "heart_002"):
    nib.save(nib.Nifti1Image(image, affine), str(raw / f"{case}_0000.nii.gz"))
    nib.save(nib.Nifti1Image(mask, affine), str(masks / f"{case}.nii.gz"))
  (masks / "dataset.json").write_text(json.dumps({"labels": NNUNET_LABELS}))
  out = tmp_path / "qc"
  run_predict(run_dir, out, raw, masks, labels=str(masks / "dataset.json"))
  printed = capsys.readouterr().out
  assert "warning:" in printed and "coronary" in printed
  result = json.loads((out / "heart_001__heart_001_qc.json").read_text())
  # Read in the dataset's order: every structure is present, none is misread as another.
  assert result["missing"] == [] and not result["empty"]
  assert {s: v["label_value"] for s, v in result["structures"].items()} == NNUNET_VALUE
  volumes = {s: v["mask_volume_ml"] for s, v in result["structures"].items()}
  mmwhs = qc.assess(raw / "heart_001_0000.nii.gz", nib.Nifti1Image(label, affine),
                    load_predictor(run_dir, 0), labels="mmwhs", progress=lambda _: None)
  for s in STRUCTURES:   # the same anatomy, read through either convention
    assert volumes[s] == pytest.approx(mmwhs.scores["structures"][s]["mask_volume_ml"])
  assert min(volumes.values()) > 0
  # The maps in the user's own values: only the dataset's values appear.
  by_structure = np.asarray(nib.load(str(out / "heart_001__heart_001_errors_by_structure.nii.gz"))
                            .dataobj)
  assert set(np.unique(by_structure)) <= {0, *NNUNET_VALUE.values()}
  rows = read_tsv(out / "qc.tsv")
  assert [r["pair"] for r in rows] == ["heart_001__heart_001", "heart_002__heart_002"]
  # The same anatomy read in MMWHS codes gets the same scores and verdict (the coronary
  # voxels, dropped, lie in the background).
  assert all(r["verdict"] == mmwhs.scores["verdict"] and r["dropped_labels"] == "8"
             and float(r["mean_predicted_dice"]) == pytest.approx(
                 mmwhs.scores["mean_predicted_dice"], abs=1e-4) for r in rows)
  # The label files for ITK-SNAP and Slicer name the user's values.
  slicer = [line.split() for line in (out / "labels.slicer.ctbl").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
  assert {int(fields[0]): fields[1] for fields in slicer} == {
      0: "Background", **{v: s for s, v in NNUNET_VALUE.items()}}


def test_bare_class_indices_without_labels_are_one_line_naming_values_and_choices(
    run_dir, phantom, tmp_path):
  image, label, affine = phantom
  nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "case_image.nii.gz"))
  nib.save(nib.Nifti1Image(recode(label, NNUNET_VALUE), affine), str(tmp_path / "case.nii.gz"))
  with pytest.raises(UserError) as info:
    run_predict(run_dir, tmp_path / "out", tmp_path / "case_image.nii.gz",
                tmp_path / "case.nii.gz")
  message = str(info.value)
  assert "\n" not in message and "case.nii.gz" in message
  assert "1, 2, 3" in message and "--labels" in message and "totalsegmentator" in message


def test_totalsegmentator_structure_folders(run_dir, phantom, tmp_path):
  image, label, affine = phantom
  images, masks = tmp_path / "images", tmp_path / "masks"
  images.mkdir()
  nib.save(nib.Nifti1Image(image, affine), str(images / "s0001.nii.gz"))
  folder = masks / "s0001"
  folder.mkdir(parents=True)
  for name, code in zip(TOTALSEGMENTATOR_NAMES, MMWHS.values()):
    nib.save(nib.Nifti1Image((label == code).astype(np.uint8), affine),
             str(folder / f"{name}.nii.gz"))
  nib.save(nib.Nifti1Image(np.zeros(label.shape, np.uint8), affine), str(folder / "liver.nii.gz"))
  out = tmp_path / "qc"
  run_predict(run_dir, out, images, masks)
  result = json.loads((out / "s0001__s0001_qc.json").read_text())
  assert result["label_convention"] == "totalsegmentator" and result["missing"] == []
  assert {s: v["label_value"] for s, v in result["structures"].items()} == dict(
      zip(STRUCTURES, range(1, 8)))
  assert len(read_tsv(out / "qc.tsv")) == 1


def test_empty_mask_and_two_missing_structures_fail(run_dir, phantom, tmp_path):
  image, label, affine = phantom
  folder = tmp_path / "cases"
  folder.mkdir()
  nib.save(nib.Nifti1Image(image, affine), str(folder / "a_image.nii.gz"))
  shutil.copy(folder / "a_image.nii.gz", folder / "b_image.nii.gz")
  nib.save(nib.Nifti1Image(np.zeros_like(label), affine), str(folder / "a_mask.nii.gz"))
  partial = label.copy()
  partial[np.isin(partial, [820, 850])] = 0   # no aorta, no pulmonary artery
  nib.save(nib.Nifti1Image(partial, affine), str(folder / "b_mask.nii.gz"))
  out = tmp_path / "qc"
  run_predict(run_dir, out, folder, folder, labels="mmwhs")
  empty = json.loads((out / "a__a_mask_qc.json").read_text())
  assert empty["verdict"] == "fail" and empty["empty"] and "empty" in empty["reasons"][0]
  assert empty["mean_predicted_dice"] == 0.0
  missing = json.loads((out / "b__b_mask_qc.json").read_text())
  assert missing["verdict"] == "fail" and missing["missing"] == ["AO", "PA"]
  assert "AO, PA" in missing["reasons"][0]
  assert missing["structures"]["AO"]["predicted_dice"] is None
  rows = {r["pair"]: r for r in read_tsv(out / "qc.tsv")}
  assert rows["b__b_mask"]["missing"] == "AO,PA" and rows["a__a_mask"]["verdict"] == "fail"


def test_a_small_field_of_view_is_out_of_distribution_and_padding_is_not_assessed(
    run_dir, phantom):
  image, label, affine = phantom
  centre = [int(np.mean(i)) for i in np.nonzero(label)]
  box = tuple(slice(c - 2, c + 3) for c in centre)
  # A predictor that calls every voxel wrong, the padding's too: QI is 0 over the scan's
  # voxels (over the whole box it would be near 1).
  trained = load_predictor(run_dir, 0)
  predictor = EverythingWrong(*(getattr(trained, f.name) for f in dataclasses.fields(trained)))
  small = qc.assess(nib.Nifti1Image(image[box], affine), nib.Nifti1Image(label[box], affine),
                    predictor, labels="mmwhs", progress=lambda _: None)
  assert small.scores["verdict"] == "out_of_distribution"
  assert "covers" in small.scores["reasons"][0]
  # Scores are over the scan's voxels only: a few hundred at 2 mm, not the whole box.
  assert small.scores["assessed_voxels"] < 0.01 * small.scores["box_voxels"]
  valid = small.crop["valid"]
  assert (small.crop["error_prob"][~valid] == 0).all()
  assert (small.crop["error_prob"][valid] == pytest.approx(0.9))
  assert small.scores["qi"] == 0.0 and small.scores["soft_qi"] == pytest.approx(0.1)


def test_structure_volumes_far_from_training_are_out_of_distribution(run_dir, phantom):
  image, label, affine = phantom
  big = label.copy()
  lo, hi = (np.array([f(i) for i in np.nonzero(label == 500)]) for f in (np.min, np.max))
  box = tuple(slice(max(0, a - 30), b + 30) for a, b in zip(lo, hi))
  big[box][label[box] == 0] = 500   # an LV leaking into all the background around it
  result = qc.assess(nib.Nifti1Image(image, affine), nib.Nifti1Image(big, affine),
                     load_predictor(run_dir, 0), progress=lambda _: None)
  assert result.scores["verdict"] == "out_of_distribution"
  assert any(r.startswith("LV volume") for r in result.scores["reasons"])


def test_inverted_intensities_are_out_of_distribution(run_dir, phantom):
  image, label, affine = phantom
  inverted = (image.max() - image).astype(np.int16)   # bright blood turned dark
  predictor = load_predictor(run_dir, 0)
  normal = qc.assess(nib.Nifti1Image(image, affine), nib.Nifti1Image(label, affine),
                     predictor, progress=lambda _: None)
  odd = qc.assess(nib.Nifti1Image(inverted, affine), nib.Nifti1Image(label, affine),
                  predictor, progress=lambda _: None)
  assert not any("intensity" in r for r in normal.scores["reasons"])
  assert odd.scores["verdict"] == "out_of_distribution"
  assert any(r.startswith("intensity distribution unlike training") for r in odd.scores["reasons"])


def head_like(shape: tuple[int, int, int]) -> np.ndarray:
  """A synthetic head on a scan's grid: nested ellipsoids of scalp, skull, grey and white
  matter and ventricles with MR-like brightness, and noise. No heart anywhere."""
  grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij"))
  radius = np.sqrt(((grid / np.array([0.9, 0.8, 0.85])[:, None, None, None]) ** 2).sum(0))
  image = np.select([radius < 0.25, radius < 0.75, radius < 0.85, radius < 0.9, radius < 1.0],
                    [300.0, 700.0, 550.0, 80.0, 500.0], 20.0)
  return image + np.random.default_rng(0).normal(0, 20, shape)


@pytest.mark.parametrize("kind", ["head", "texture", "other heart's mask"])
def test_a_scan_that_is_not_the_masks_heart_is_out_of_distribution(run_dir, phantom, kind):
  # A heart mask on something else: never a verdict as if it were this heart's scan.
  image, label, affine = phantom
  predictor = load_predictor(run_dir, 0)
  own = qc.assess(nib.Nifti1Image(image, affine), nib.Nifti1Image(label, affine), predictor,
                  progress=lambda _: None)
  assert not any("appearance" in r for r in own.scores["reasons"]), own.scores["reasons"]
  mask = label
  if kind == "head":
    image = head_like(image.shape).astype(np.float32)
  elif kind == "texture":   # smooth random tissue, brightness of the phantom's range
    noise = ndimage.gaussian_filter(np.random.default_rng(1).normal(size=image.shape), 3)
    image = (np.percentile(image, 5) + (noise - noise.min()) / np.ptp(noise)
             * np.ptp(np.percentile(image, (5, 95)))).astype(np.float32)
  else:   # another phantom patient's heart mask, brought onto this scan's grid
    _, other, _ = make_phantom_case(seed=7, index=0, spacing_scale=2.0)
    mask = ndimage.zoom(other, [a / b for a, b in zip(label.shape, other.shape)], order=0)
    mask = np.pad(mask, [(0, max(0, a - b)) for a, b in zip(label.shape, mask.shape)])
    mask = mask[:label.shape[0], :label.shape[1], :label.shape[2]]
  result = qc.assess(nib.Nifti1Image(image, affine), nib.Nifti1Image(mask, affine), predictor,
                     progress=lambda _: None)
  assert result.scores["verdict"] == "out_of_distribution", result.scores["reasons"]
  assert any("looks unlike any training heart" in r for r in result.scores["reasons"])


def test_assess_in_memory_writes_nothing(run_dir, phantom, tmp_path, monkeypatch):
  image, label, affine = phantom
  monkeypatch.chdir(tmp_path)
  result = qc.assess(nib.Nifti1Image(image, affine), nib.Nifti1Image(label, affine),
                     load_predictor(run_dir, 0), progress=lambda _: None)
  assert list(tmp_path.iterdir()) == []
  assert result.error_prob.shape == image.shape and result.error_prob.dtype == np.float32
  assert set(result.scores["structures"]) == set(STRUCTURES)
  np.testing.assert_array_equal(result.error, result.error_prob > result.scores["threshold"])
  written = result.write(tmp_path, "x")
  assert sorted(p.name for p in written.values()) == [
      "x_error.nii.gz", "x_error_prob.nii.gz", "x_errors_by_structure.nii.gz"]


def test_crops_of_one_bucket_compile_once(run_dir):
  predictor = load_predictor(run_dir, 0)
  rng = np.random.default_rng(0)
  before = error_probability._cache_size()
  for shape in ((33, 35, 30), (40, 38, 31), (36, 47, 32)):   # all pad to 48 x 48 x 32
    out = predictor.error_map(rng.uniform(-1, 1, shape).astype(np.float32),
                              rng.integers(0, 8, shape))
    assert out.shape == shape
  assert error_probability._cache_size() == before + 1


def test_export_model_and_predict_with_the_file_alone(run_dir, phantom, tmp_path):
  image, label, affine = phantom
  model = tmp_path / "heart.whqc"
  config = export_model.get_config()
  config.output = str(model)
  export_model.run(config, str(run_dir))
  with pytest.raises(UserError, match="exists"):
    export_model.run(config, str(run_dir))
  loaded = load_predictor_file(model)
  assert loaded.reference is not None and loaded.fold == 0
  # The run is gone: the file alone assesses a case, with the run's scores.
  moved = tmp_path / "elsewhere"
  shutil.copytree(run_dir, moved)
  pair = tmp_path / "pair"
  pair.mkdir()
  nib.save(nib.Nifti1Image(image, affine), str(pair / "p_image.nii.gz"))
  nib.save(nib.Nifti1Image(label, affine), str(pair / "p_label.nii.gz"))
  from_run = qc.assess(pair / "p_image.nii.gz", pair / "p_label.nii.gz",
                       load_predictor(run_dir, 0), progress=lambda _: None)
  from_file = qc.assess(pair / "p_image.nii.gz", pair / "p_label.nii.gz", str(model),
                        progress=lambda _: None)
  np.testing.assert_array_equal(from_file.error_prob, from_run.error_prob)
  config = predict.get_config()
  config.image, config.mask = str(pair / "p_image.nii.gz"), str(pair / "p_label.nii.gz")
  config.model_file = str(model)
  predict.run(config, str(tmp_path / "no_such_run"))
  result = json.loads((tmp_path / "predict" / "p__p_label_qc.json").read_text())
  assert result["predictor"]["model_file"] == str(model)


@pytest.mark.parametrize("damage", ["missing", "truncated", "flipped", "nifti"])
def test_a_bad_model_file_is_one_line_and_status_2(run_dir, phantom, tmp_path, damage):
  model = tmp_path / "m.whqc"
  if damage != "missing":
    config = export_model.get_config()
    config.output = str(model)
    export_model.run(config, str(run_dir))
    data = bytearray(model.read_bytes())
    if damage == "truncated":
      data = data[: len(data) - 100]
    elif damage == "flipped":
      data[-50] ^= 0xFF
    else:
      data = bytearray(b"\x1f\x8b" + bytes(300))
    model.write_bytes(bytes(data))
  image, label, affine = phantom
  nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "p_image.nii.gz"))
  nib.save(nib.Nifti1Image(label, affine), str(tmp_path / "p_label.nii.gz"))
  result = subprocess.run(
      [sys.executable, "launch.py", "--experiment=predict", f"--model={model}",
       f"--image={tmp_path / 'p_image.nii.gz'}", f"--mask={tmp_path / 'p_label.nii.gz'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=cpu_env())
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and str(model) in lines[0], lines
  assert not (tmp_path / "predict").exists() or not list((tmp_path / "predict").iterdir())


def test_the_gallery_of_a_predict_folder_in_a_headless_browser(run_dir, phantom, tmp_path):
  """Every case of a real predict folder is in index.html, images load, sorting works.
  Saves a screenshot to $WH_QC_SCREENSHOT if set."""
  webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
  from tests.qc.test_gallery import _browser_paths, headless_chromium
  paths = _browser_paths()
  if paths is None:
    pytest.skip("chromium and chromedriver are not on PATH (CI installs them)")
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait
  image, label, affine = phantom
  folder = tmp_path / "cases"
  folder.mkdir()
  masks = {"good": label, "empty": np.zeros_like(label),
           "no_vessels": np.where(np.isin(label, [820, 850]), 0, label),
           "eroded": np.where(np.isin(label, [205]), 0, label)}
  for name, mask in masks.items():
    nib.save(nib.Nifti1Image(image, affine), str(folder / f"{name}_image.nii.gz"))
    nib.save(nib.Nifti1Image(mask, affine), str(folder / f"{name}_label.nii.gz"))
  out = tmp_path / "qc"
  run_predict(run_dir, out, folder, folder)
  results = {r["pair"]: r for r in map(json.loads, map(Path.read_text, out.glob("*_qc.json")))}
  driver = headless_chromium(webdriver, paths, height=900)
  try:
    driver.get((out / "index.html").as_uri())

    def shown() -> list[str]:
      return [r.get_attribute("data-pair") for r in
              driver.find_elements(By.CSS_SELECTOR, "#cases tbody tr") if r.is_displayed()]

    assert sorted(shown()) == sorted(results)
    WebDriverWait(driver, 10).until(lambda d: d.execute_script(
        "return document.images.length > 0 && Array.from(document.images).every("
        "i => i.complete && i.naturalWidth > 0)"))
    assert len(driver.find_elements(By.CSS_SELECTOR, "#cases tbody img")) == len(results)
    driver.find_element(By.ID, "sort-mean_predicted_dice").click()
    dice = [results[p]["mean_predicted_dice"] for p in shown()]
    assert dice == sorted(dice)
    if os.environ.get("WH_QC_SCREENSHOT"):
      driver.find_element(By.ID, "sort-verdict").click()
      assert driver.save_screenshot(os.environ["WH_QC_SCREENSHOT"])
  finally:
    driver.quit()
