"""The modality check of predict: the rule of `data.modality` on hand-built intensities, each
threshold on both sides; `qc.verdict.modality_reasons` on CT given to an MR model, MR at
other scales, MR given to a CT model, label conventions that say CT, and references from
before the check; and one predict run of a CT scan through an MR model file, with and
without --allow_modality. Expected numbers are computed here from the construction, never
by the code under test.
"""
from __future__ import annotations

import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest

from experiments import predict
from tests.train.tiny import tiny_config
from wh_errmap.data.labels import MMWHS, TOTALSEGMENTATOR, parse_labels
from wh_errmap.data.modality import channel_modality, intensity_profile, looks_like
from wh_errmap.data.nifti_io import make_case
from wh_errmap.data.phantom import make_phantom_case
from wh_errmap.data.preprocess import PreprocessConfig, preprocess_case
from wh_errmap.data.training_reference import training_reference
from wh_errmap.qc.bench import untrained_model_file
from wh_errmap.qc.predictor import export_predictor, load_predictor_file
from wh_errmap.qc.verdict import Settings, modality_notice, modality_reasons

N = 2000   # voxels of a hand-built scan
# np.percentile (linear) reads the 0.5th percentile of N sorted values between the 10th and
# 11th and the 99.5th between the 1990th and 1991st: 11 equal values at either end pin them.
PINNED = 11


def scan(low: float, high: float, extra: dict[float, int] | None = None,
         middle: float = 50.0) -> np.ndarray:
  """(10, 10, 20) float64 volume: PINNED voxels at `low` and at `high` (its 0.5th and 99.5th
  percentiles), `extra` {value: count} voxels (between them), the rest at `middle`."""
  values = [low] * PINNED + [high] * PINNED
  for value, count in (extra or {}).items():
    values += [value] * count
  values += [middle] * (N - len(values))
  return np.random.default_rng(0).permutation(np.asarray(values, np.float64)).reshape(10, 10, 20)


def body(shape=(40, 36, 30)) -> tuple[np.ndarray, np.ndarray]:
  """A small chest-like scene: (label of MMWHS codes, tissue map) with 0 outside an
  elliptical body, 1 body tissue, 2 blood (LV, LA, RV), 3 myocardium, 4 lungs."""
  grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij"))
  radius = np.sqrt((grid[0] / 0.9) ** 2 + (grid[1] / 0.7) ** 2)
  tissue = np.where(radius < 1, 1, 0)
  tissue[(radius < 0.8) & (np.abs(grid[0]) > 0.45)] = 4
  label = np.zeros(shape, np.int16)
  label[14:26, 12:24, 8:22] = 205
  label[16:24, 14:22, 10:20] = 500
  label[10:14, 14:22, 10:20] = 420
  label[26:30, 14:22, 10:20] = 600
  tissue[label > 0] = 2
  tissue[label == 205] = 3
  return label, tissue


def as_mr(tissue: np.ndarray) -> np.ndarray:
  """bSSFP-like MR of `body`'s tissue map (bright blood, dark myocardium and lungs), with
  Rician-like noise: float64 about 0..1000."""
  level = np.array([0.0, 350.0, 900.0, 300.0, 40.0])[tissue]
  rng = np.random.default_rng(1)
  return np.hypot(level + rng.normal(0, 30, tissue.shape), rng.normal(0, 30, tissue.shape))


def as_ct(tissue: np.ndarray, padding: float = -1024.0) -> np.ndarray:
  """The same scene in Hounsfield units: air -1000, body 20, blood 40, myocardium 60, lungs
  -850, noise 10 HU, integer valued, and `padding` outside a circular field of view."""
  hu = np.array([-1000.0, 20.0, 40.0, 60.0, -850.0])[tissue]
  hu = np.rint(hu + np.random.default_rng(2).normal(0, 10, tissue.shape))
  grid = np.meshgrid(*(np.linspace(-1, 1, n) for n in tissue.shape[:2]), indexing="ij")
  hu[grid[0] ** 2 + grid[1] ** 2 > 1.0] = padding
  return hu


def reference_of(modality: str, *images: np.ndarray) -> dict:
  """The part of a training reference the modality check reads."""
  return {"modality": modality, "intensity_profiles": [intensity_profile(i) for i in images]}


LABEL, TISSUE = body()
MR_MODEL = reference_of("mr", as_mr(TISSUE), 4.0 * as_mr(TISSUE))
CT_MODEL = reference_of("ct", as_ct(TISSUE), as_ct(TISSUE, padding=-2048.0))


# ---------------------------------------------------------------- the rule, threshold by threshold

def test_the_profile_is_the_pinned_percentiles_and_the_air_band_share_with_its_edges():
  # AIR_BAND is -1100..-900 HU, both ends included: of 5 voxels each at -1100.5, -1100, -900
  # and -899.5 and 10 at -1000, 20 of the 2000 are in it; the pinned ones at -2000 are not.
  image = scan(-2000.0, 100.0, {-1100.5: 5, -1100.0: 5, -1000.0: 10, -900.0: 5, -899.5: 5})
  assert intensity_profile(image) == pytest.approx(
      {"p0.5": -2000.0, "p99.5": 100.0, "air_share": 20 / N})


@pytest.mark.parametrize("air_voxels, expected", [(19, None), (20, "ct"), (21, "ct")])
def test_ct_needs_one_percent_of_voxels_in_the_air_band(air_voxels, expected):
  # The PINNED lowest voxels at -1024 are air; the rest of the air at -1000. The scan reaches
  # 1024 / 1124 = 91% of its range below 0, far past 0.15, so the air share alone decides:
  # 19 / 2000 = 0.95% < 1% is undecided (too negative for MR), 20 / 2000 = 1% is CT.
  image = scan(-1024.0, 100.0, {-1000.0: air_voxels - PINNED})
  profile = intensity_profile(image)
  assert profile["air_share"] == pytest.approx(air_voxels / N)
  assert looks_like(profile) == expected


@pytest.mark.parametrize("high, expected", [(5666.0, "ct"), (5668.0, None)])
def test_ct_needs_a_range_reaching_fifteen_percent_below_zero(high, expected):
  # Air at -1000 in 5% of the voxels; the scan reaches 1000 / (1000 + high) of its range below
  # 0: 1000 / 6666 = 0.150015 >= 0.15 is CT, 1000 / 6668 = 0.149970 is not (nor MR).
  image = scan(-1000.0, high, {-1000.0: 100 - PINNED})
  reach = 1000.0 / (1000.0 + high)
  assert (reach >= 0.15) == (expected == "ct")
  assert looks_like(intensity_profile(image)) == expected


@pytest.mark.parametrize("low, expected", [(-52.0, "mr"), (-53.0, None)])
def test_mr_reaches_at_most_five_percent_of_its_range_below_zero(low, expected):
  # No air; 52 / 1052 = 0.0494 of the range below 0 is MR with a small offset, 53 / 1053 =
  # 0.0503 is undecided.
  image = scan(low, 1000.0)
  assert (-low / (1000.0 - low) <= 0.05) == (expected == "mr")
  assert looks_like(intensity_profile(image)) == expected


def test_channel_names_say_the_modality_when_they_all_agree():
  assert channel_modality(["CT"]) == "ct" and channel_modality(["cardiac CTA"]) == "ct"
  assert channel_modality(["MRI"]) == "mr" and channel_modality(["T2w", "bSSFP"]) == "mr"
  for undecided in (["noNorm"], ["zscore"], ["CT", "MRI"], ["CT", "noNorm"], []):
    assert channel_modality(undecided) is None, undecided


# ---------------------------------------------------------------- the check against a model

def test_a_ct_scan_given_to_an_mr_model_is_named_ct():
  image = as_ct(TISSUE)
  reasons = modality_reasons(intensity_profile(image), MMWHS, MR_MODEL)
  air = np.mean((image >= -1100) & (image <= -900))   # the air and the -1024 padding
  assert air > 0.3 and len(reasons) == 1
  assert reasons[0].startswith("the image looks like CT in Hounsfield units")
  reach = 1024.0 / (np.percentile(image, 99.5) + 1024.0)   # the -1024 padding is the 0.5th
  assert (f"({air:.1%} of voxels in the air band -1100..-900 HU; 0.5th percentile -1024, "
          f"{reach:.0%} of the 0.5th-99.5th percentile range below 0)") in reasons[0]
  assert reasons[0].endswith("while the model was trained on MR")


@pytest.mark.parametrize("scale, offset", [(1e-3, 0.0), (1.0, 0.0), (1e3, 0.0), (1.0, -20.0),
                                           (1.0, 60.0), (1e3, -2e4)])
def test_mr_at_other_scales_and_small_offsets_is_not_flagged(scale, offset):
  image = as_mr(TISSUE) * scale + offset
  profile = intensity_profile(image)
  assert looks_like(profile) == "mr"
  assert modality_reasons(profile, MMWHS, MR_MODEL) == []


def test_mr_of_another_contrast_is_not_flagged():
  # dark blood and bright myocardium, as a black-blood sequence, on another scale
  level = np.array([0.0, 900.0, 60.0, 1500.0, 10.0])[TISSUE]
  image = level + np.abs(np.random.default_rng(3).normal(0, 20, TISSUE.shape))
  assert modality_reasons(intensity_profile(image), MMWHS, MR_MODEL) == []


def test_an_mr_scan_given_to_a_ct_model_is_named_and_a_ct_scan_is_not():
  reasons = modality_reasons(intensity_profile(as_mr(TISSUE)), MMWHS, CT_MODEL)
  assert len(reasons) == 1
  assert reasons[0].startswith("the image looks like MR, not CT in Hounsfield units (0.0% of "
                               "voxels in the air band")
  assert reasons[0].endswith("while the model was trained on CT")
  assert modality_reasons(intensity_profile(as_ct(TISSUE, -2048.0)), MMWHS, CT_MODEL) == []


def test_a_scan_like_the_training_scans_is_not_flagged_whatever_the_models_modality():
  # An "MR" model whose training scans already looked like CT: CT-looking scans are its usual.
  odd = reference_of("mr", as_mr(TISSUE), as_ct(TISSUE))
  assert modality_reasons(intensity_profile(as_ct(TISSUE)), MMWHS, odd) == []


def test_a_ct_label_convention_flags_unless_the_intensities_say_the_models_modality(tmp_path):
  ct_image = intensity_profile(as_ct(TISSUE))
  zscored = intensity_profile((as_mr(TISSUE) - as_mr(TISSUE).mean()) / as_mr(TISSUE).std())
  assert looks_like(zscored) is None   # 0.5th percentile near -0.9 of a range near 4
  reasons = modality_reasons(ct_image, TOTALSEGMENTATOR, MR_MODEL)
  assert len(reasons) == 2 and reasons[1] == (
      "the masks' label convention totalsegmentator is made for CT images while the model "
      "was trained on MR")
  assert len(modality_reasons(zscored, TOTALSEGMENTATOR, MR_MODEL)) == 1
  # The scan's own intensities outweigh where its masks come from.
  assert modality_reasons(intensity_profile(as_mr(TISSUE)), TOTALSEGMENTATOR, MR_MODEL) == []
  labels = {"background": 0, "LV": 1, "Myocardium": 2}
  for channels, expected in (({"0": "CT"}, "ct"), ({"0": "MRI"}, "mr"), ({"0": "noNorm"}, None)):
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": channels,
                                                       "labels": labels}))
    assert parse_labels(str(tmp_path / "dataset.json")).modality == expected
  (tmp_path / "dataset.json").write_text(json.dumps({"modality": {"0": "CT"},   # nnU-Net v1
                                                     "labels": {"0": "background", "1": "LV"}}))
  convention = parse_labels(str(tmp_path / "dataset.json"))
  assert modality_reasons(zscored, convention, MR_MODEL)[0].endswith(
      "is made for CT images while the model was trained on MR")
  assert modality_reasons(zscored, convention, CT_MODEL) == []


def test_a_reference_from_before_the_check_flags_nothing_and_says_so_once():
  old = {"volume_ml": {}, "intensity_histogram": []}   # no modality, no profiles
  ct = intensity_profile(as_ct(TISSUE))
  assert modality_reasons(ct, TOTALSEGMENTATOR, old) == []
  assert modality_reasons(ct, TOTALSEGMENTATOR, None) == []
  for allow in (False, True):
    assert "records no training modality" in modality_notice(old, allow)
  assert modality_notice(None, True) is None   # predict's no-reference line covers it
  assert modality_notice(MR_MODEL, False) is None
  assert modality_notice(MR_MODEL, True).startswith("warning: --allow_modality: ")


def test_the_training_reference_records_the_modality_and_the_raw_profiles():
  config = PreprocessConfig(spacing=(3.0, 3.0, 3.0), crop_size=(16, 16, 12), margin_mm=3.0)
  affine = np.diag([1.5, 1.5, 2.0, 1.0])
  cases = []
  for k, scale in enumerate((1.0, 1000.0)):   # one scan, and the same x1000
    case = make_case((as_mr(TISSUE) * scale, affine, f"s{k}_image.nii.gz"),
                     (LABEL, affine, f"s{k}_label.nii.gz"), f"s{k}",
                     lambda path, raw: MMWHS.encode(path, raw).classes)
    cases.append(preprocess_case(case, config))
  # Preprocessing erases the scale; the profile, in raw units, keeps it.
  np.testing.assert_allclose(cases[0].image, cases[1].image, atol=1e-5)
  low, high = (c.properties["intensity_profile"] for c in cases)
  assert high["p0.5"] == pytest.approx(1000.0 * low["p0.5"], rel=1e-5)
  assert high["p99.5"] == pytest.approx(1000.0 * low["p99.5"], rel=1e-5)
  reference = training_reference(cases, modality="mr")
  assert reference["modality"] == "mr"
  assert reference["intensity_profiles"] == [low, high]
  with pytest.raises(ValueError, match="modality"):
    training_reference(cases, modality="xray")


# ---------------------------------------------------------------- predict, end to end

@pytest.fixture(scope="module")
def mr_model(tmp_path_factory):
  """(model file, folder): an untrained tiny predictor whose training reference is two
  coarse phantom MR cases (modality "mr"), and a third phantom case mapped to HU there
  (`ct_image.nii.gz`, `ct_label.nii.gz`)."""
  folder = tmp_path_factory.mktemp("modality")
  config = tiny_config()
  config.preprocess.spacing, config.preprocess.crop_size = (6.0, 6.0, 6.0), (32, 32, 32)
  config.preprocess.margin_mm, config.input.crop_predictor = 6.0, (16, 16, 8)
  cases = []
  for index in (0, 1, 2):
    image, label, affine = make_phantom_case(seed=4, index=index, spacing_scale=3.0)
    name = f"mr{index}" if index < 2 else "ct"
    if index == 2:   # air where the MR is dark, soft tissue, blood, myocardium, in HU
      blood = np.median(image[label > 0])
      hu = np.where(image < 0.15 * blood, -1000.0, 20.0)
      hu[label > 0], hu[label == 205] = 40.0, 60.0
      image = np.rint(hu + np.random.default_rng(0).normal(0, 10, hu.shape)).astype(np.int16)
      image[:2], image[-2:] = -1024, -1024   # padding beyond the field of view
    for kind, data in (("image", image), ("label", label)):
      nib.save(nib.Nifti1Image(data, affine), str(folder / f"{name}_{kind}.nii.gz"))
    cases.append((folder / f"{name}_image.nii.gz", folder / f"{name}_label.nii.gz"))
  return untrained_model_file(folder / "mr.whqc", config, cases[:2]), folder


def run_ct_pair(model, folder, out, **fields) -> dict:
  """predict of the HU pair with `model`; only the modality check may mark it out of
  distribution (the other checks are set to let everything through). Returns its result."""
  config = predict.get_config()
  config.image, config.mask = str(folder / "ct_image.nii.gz"), str(folder / "ct_label.nii.gz")
  config.model_file, config.output_dir, config.figures = str(model), str(out), False
  config.qc.min_real_fraction, config.qc.volume_factor = 0.0, 1e9
  config.qc.intensity_margin, config.qc.appearance_factor = 1.0, 1e9
  for field, value in fields.items():
    setattr(config, field, value)
  predict.run(config, str(out / "no_run"))
  return json.loads((out / "ct__ct_label_qc.json").read_text())


def test_predict_marks_a_ct_scan_given_to_an_mr_model_out_of_distribution(mr_model, tmp_path,
                                                                          capsys):
  model, folder = mr_model
  assert load_predictor_file(model).reference["modality"] == "mr"   # carried in the file
  result = run_ct_pair(model, folder, tmp_path / "checked")
  assert result["verdict"] == "out_of_distribution"
  assert result["reasons"][0].startswith("the image looks like CT in Hounsfield units")
  assert result["modality"]["image"] == "ct" and not result["modality"]["allowed"]
  assert "--allow_modality" not in capsys.readouterr().out

  allowed = run_ct_pair(model, folder, tmp_path / "allowed", allow_modality=True)
  printed = capsys.readouterr().out.splitlines()
  assert allowed["verdict"] != "out_of_distribution", allowed["reasons"]
  assert not any("CT" in r for r in allowed["reasons"])
  assert allowed["modality"]["allowed"] and allowed["modality"]["findings"] == [
      result["reasons"][0]]
  warnings = [line for line in printed if "--allow_modality" in line]
  assert len(warnings) == 1 and warnings[0].startswith("warning: --allow_modality: ")
  assert "(MR)" in warnings[0]


def test_predict_with_a_model_from_before_the_check_says_so_once(mr_model, tmp_path, capsys):
  model, folder = mr_model
  predictor = load_predictor_file(model)
  old = {k: v for k, v in predictor.reference.items()
         if k not in ("modality", "intensity_profiles")}
  old_model = export_predictor(dataclasses.replace(predictor, reference=old),
                               tmp_path / "old.whqc", predictor.training_record())
  result = run_ct_pair(old_model, folder, tmp_path / "old")
  assert result["verdict"] != "out_of_distribution", result["reasons"]
  assert result["modality"]["model"] is None and result["modality"]["findings"] == []
  printed = capsys.readouterr().out
  assert printed.count("records no training modality") == 1


def test_allow_modality_is_a_verdict_setting():
  config = predict.get_config()
  assert Settings.from_config(config).allow_modality is False
  config.allow_modality = True
  assert Settings.from_config(config).allow_modality is True
