"""The defaults that make a run follow the paper's protocol, and saying what data it uses."""
from __future__ import annotations

import pytest

from experiments import cv_fold, cv_fold_small, quickstart


@pytest.mark.parametrize("experiment", [cv_fold, cv_fold_small, quickstart])
def test_the_predictor_trains_on_automatic_masks_only_by_default(experiment):
  # Eq. 3 of the paper averages the loss over the m automatic masks of each training scan.
  assert experiment.get_config().predictor.gt_probability == 0.0


@pytest.mark.parametrize("experiment", [cv_fold, cv_fold_small, quickstart])
def test_only_the_2d_segmentor_pools_its_dice_over_the_batch(experiment):
  from wh_errmap.train.losses import batch_dice
  config = experiment.get_config()
  assert batch_dice(config, "seg2d") and not batch_dice(config, "seg3d")


@pytest.mark.parametrize("value", [("seg3D",), ("seg2d", "predictor")])
def test_an_unknown_batch_dice_model_is_named(value):
  from wh_errmap.errors import UserError
  from wh_errmap.train.losses import batch_dice
  config = cv_fold.get_config()
  config.loss.batch_dice = value
  with pytest.raises(UserError, match="loss.batch_dice names '(seg3D|predictor)'"):
    batch_dice(config, "seg2d")


def test_the_first_line_names_the_data():
  config = cv_fold.get_config()
  assert "synthetic whole-heart phantom" in cv_fold.data_line(config)
  assert "--data_dir" in cv_fold.data_line(config)
  config.data_dir = "/data/mmwhs"
  assert cv_fold.data_line(config) == "data: MMWHS MR data in /data/mmwhs"


def test_report_and_table1_name_the_data_source(tmp_path):
  from tests.report.test_report import make_run
  from wh_errmap.report.build import build_report
  from wh_errmap.utils.workdir import record_config
  make_run(tmp_path)
  record_config(tmp_path, cv_fold.get_config())
  build_report(tmp_path, num_folds=5)
  for name in ("report.md", "table1.md"):
    head = (tmp_path / "report" / name).read_text().splitlines()[:4]
    assert any("synthetic whole-heart phantom (20 cases, seed 0), not MMWHS" in line
               for line in head), (name, head)
  config = cv_fold.get_config()
  config.data_dir = "/data/mmwhs"
  record_config(tmp_path / "real", config)
  make_run(tmp_path / "real")
  build_report(tmp_path / "real", num_folds=5)
  assert (tmp_path / "real" / "report" / "table1.md").read_text().startswith(
      "Table 1 on MMWHS MR data in /data/mmwhs.")


def test_test_masks_are_cropped_around_themselves_never_around_the_ground_truth(tmp_path):
  """The auto masks' records must not change when only the ground truth moves: the crop of
  each assessed mask is placed by the mask (as predict does), the label only scores."""
  import types

  import jax
  import numpy as np

  from tests.train.tiny import tiny_config
  from wh_errmap.data.preprocess import PreprocessConfig
  from wh_errmap.cv.evaluate import assessed_crop, evaluate_fold
  from wh_errmap.models.factory import make_model

  config = tiny_config()
  models = {}
  for name, dims, channels in (("seg3d", 3, 1), ("seg2d", 2, 1), ("predictor", 3, 9)):
    model = make_model(config.model, dims, 8 if name != "predictor" else 1)
    shape = (1, 16, 16, 12, channels)[: dims + 1] + (channels,)
    # Jitted: eagerly, init compiles each of its ~200 operations on its own (about 10 s).
    models[name] = (model, jax.jit(lambda key, model=model, shape=shape: model.init(
        key, np.zeros(shape, np.float32), train=False))(jax.random.key(0)))
  rng = np.random.default_rng(0)
  image = rng.uniform(-1, 1, (40, 36, 28)).astype(np.float32)
  near, far = np.zeros(image.shape, np.uint8), np.zeros(image.shape, np.uint8)
  near[4:12, 4:12, 4:10] = 3
  far[26:36, 24:32, 16:24] = 3
  preprocess = PreprocessConfig(crop_size=(16, 16, 12), margin_mm=2.0)
  properties = {"image_path": "-", "label_path": "-", "spacing": [2.0] * 3,
                "crop_start": [0] * 3}
  case = types.SimpleNamespace(case_id="c", image=image, label=near, properties=properties)
  # The crop of a mask is placed by that mask.
  crop, valid = assessed_crop(case, far, preprocess)
  assert crop["crop_start"] == [23, 20, 14] and valid.all()
  records = {}
  for name, label in (("near", near), ("far", far)):
    moved = types.SimpleNamespace(case_id="c", image=image, label=label, properties=properties)
    evaluate_fold({k: models[k] for k in ("seg3d", "seg2d")}, models["predictor"], [moved], 0,
                  tmp_path / name, nifti="none", progress=lambda _: None,
                  preprocess=preprocess)
    records[name] = {r["mask_type"]: r for r in
                     __import__("json").loads((tmp_path / name / "records.json").read_text())}
  for t, record in records["near"].items():
    if t != "gt":   # the predictor saw the same crop of the same mask
      assert record["soft_qi"] == records["far"][t]["soft_qi"], t
  assert records["near"]["gt"]["soft_qi"] != records["far"]["gt"]["soft_qi"]


def test_whole_scans_are_the_uncropped_resampled_scans(tmp_path):
  import nibabel as nib
  import numpy as np

  from wh_errmap.data.dataset import Dataset
  from wh_errmap.data.phantom import make_phantom_case
  from wh_errmap.data.preprocess import PreprocessConfig, preprocess_cached

  image, label, affine = make_phantom_case(seed=1, index=0, spacing_scale=3.0)
  paths = [tmp_path / f"mr_train_1001_{kind}.nii.gz" for kind in ("image", "label")]
  for path, data in zip(paths, (image, label)):
    nib.save(nib.Nifti1Image(data, affine), str(path))
  config = PreprocessConfig(spacing=(3.0, 3.0, 3.0), crop_size=(40, 40, 30))
  cropped, _ = preprocess_cached(*paths, tmp_path / "cache" / "preprocessed", config)
  dataset = Dataset(tmp_path, tmp_path / "cache", {cropped.case_id: cropped}, [], config)
  whole, = dataset.whole_scans([cropped])
  assert whole.case_id == cropped.case_id
  assert list(whole.image.shape) == whole.properties["resampled_shape"]
  assert whole.properties["crop_start"] == [0, 0, 0]
  assert whole.image.shape != cropped.image.shape
  # The cropped case is a window of the whole scan.
  start = np.maximum(cropped.properties["crop_start"], 0)
  stop = np.minimum(cropped.properties["crop_stop"], whole.image.shape)
  window = tuple(slice(a, b) for a, b in zip(start, stop))
  inner = tuple(slice(a - c, b - c) for a, b, c in zip(start, stop,
                                                         cropped.properties["crop_start"]))
  np.testing.assert_array_equal(whole.label[window], cropped.label[inner])
