"""The README's first command, `python launch.py` (the quickstart experiment), end to end
at a tiny size: phantom -> preprocessing -> both segmentors -> predictor -> evaluation
with NIfTI outputs -> report; then the same fold again in another process, from XLA's
persistent cache: same seed and config, byte-identical results. And the tests' own cache,
which keeps them out of the user's."""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import jax
import nibabel as nib
import numpy as np

from tests.conftest import SESSION_CACHE, TINY_FOLD, launch
from wh_errmap.utils.cache import default_cache_dir

# Spelled out, not imported: a wrong list in the package must not agree with itself here.
MASK_TYPES = {"3d-final", "3d-side2", "3d-side3", "3d-side4", "3d-side5",
              "2d-final", "2d-side2", "2d-side3", "2d-side4", "2d-side5", "gt"}
NIFTI_MASK_TYPES = ("3d-final", "2d-final", "gt")     # cv_fold_small's nifti = "final"
MMWHS_CODES = {205, 420, 500, 550, 600, 820, 850}     # Myo, LA, LV, RA, RV, AO, PA


def test_the_tests_use_a_temporary_cache_not_the_users():
  """conftest points WH_ERRMAP_CACHE (inherited by subprocesses) and XLA's cache at a
  session folder under the temp dir, whatever the user's environment says."""
  home = Path.home() / ".cache" / "wh_errmap"
  assert default_cache_dir() == SESSION_CACHE
  assert SESSION_CACHE.is_dir() and SESSION_CACHE.is_relative_to(tempfile.gettempdir())
  assert not SESSION_CACHE.resolve().is_relative_to(home.resolve())
  assert Path(jax.config.jax_compilation_cache_dir) == SESSION_CACHE / "xla"


def fold_outputs(fold_dir: Path) -> dict[str, bytes]:
  """What a fold computed, by path: scores, records, calibration, the losses of every
  logged step (timings left out) and the NIfTI predictions' decompressed bytes (a gzip
  header holds the time of writing)."""
  outputs = {name: (fold_dir / name).read_bytes()
             for name in ("segmentors.json", "records.json", "calibration.json")}
  for model in ("seg3d", "seg2d", "predictor"):
    lines = (fold_dir / model / "metrics.jsonl").read_text().splitlines()
    outputs[f"{model}/metrics.jsonl"] = json.dumps(
        [{k: v for k, v in json.loads(line).items() if k not in ("steps_per_s", "time_s")}
         for line in lines]).encode()
  for path in sorted((fold_dir / "predictions").rglob("*.nii.gz")):
    outputs[str(path.relative_to(fold_dir))] = gzip.decompress(path.read_bytes())
  return outputs


def test_quickstart_end_to_end_then_again_from_the_compilation_cache(tmp_path):
  """`python launch.py` with an empty cache root: it generates the phantom, preprocesses it,
  compiles every program and trains and evaluates fold 0. Exit status 0; 11 records per test
  case; NIfTI outputs on each test case's original grid (shape and affine of its image
  file), masks in MMWHS codes, the GT mask back where the original label is; report.md.

  Then the same fold in a second process (cv_fold_small, the quick start's fold) with the
  same cache root: it compiles nothing, reading every program from XLA's persistent cache,
  preprocesses a copy of the phantom in another folder again, and must write the same
  records, losses and NIfTI predictions, to the byte. (One root for both: jax puts the
  cache's own path into its keys, so a copy of the programs elsewhere is cold.)"""
  cache, data, workdir = tmp_path / "cache", tmp_path / "data", tmp_path / "run"
  start = time.monotonic()
  result = launch(f"--workdir={workdir}", *TINY_FOLD, cache=cache)   # no --experiment
  print(f"launch.py: {time.monotonic() - start:.0f} s")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "generating the synthetic phantom" in result.stdout
  # Each stage's time, and the breakdown as the second-to-last line (the last: the report).
  for stage in ("data", "test scans", "seg3d", "seg2d", "segmentor scores", "predictor",
                "evaluate", "report"):
    assert re.search(rf"^\[time\] {stage}: [0-9.]+ (s|min)$", result.stdout, re.M), stage
  breakdown = result.stdout.strip().splitlines()[-2]
  assert re.fullmatch(r"time by stage: data .*, test scans .*, seg3d .*, seg2d .*, "
                      r"segmentor scores .*, "
                      r"predictor .*, training reference .*, evaluate .*, report [0-9.]+ "
                      r"(s|min) \(\d+%\).*; total [0-9.]+ (s|min)", breakdown), breakdown
  fold = workdir / "fold0"

  test_cases = json.loads((fold / "test_cases.json").read_text())
  assert len(test_cases) == 2   # 4 cases in 2 folds
  records = json.loads((fold / "records.json").read_text())
  mask_types = {case_id: sorted(r["mask_type"] for r in records if r["case_id"] == case_id)
                for case_id in test_cases}
  assert len(records) == 11 * len(test_cases)
  assert all(t == sorted(MASK_TYPES) for t in mask_types.values()), mask_types

  for case_id, paths in test_cases.items():
    # launch.py generated the phantom in the cache root it was given (WH_ERRMAP_CACHE).
    assert Path(paths["image_path"]).is_relative_to(cache), paths
    image = nib.load(paths["image_path"])
    label = np.asarray(nib.load(paths["label_path"]).dataobj)
    for mask_type in NIFTI_MASK_TYPES:
      outputs = {kind: nib.load(fold / "predictions" / case_id / f"{mask_type}_{kind}.nii.gz")
                 for kind in ("mask", "error_prob", "error")}
      for kind, output in outputs.items():
        assert output.shape == image.shape, (case_id, mask_type, kind)
        np.testing.assert_allclose(output.affine, image.affine, atol=1e-4,
                                   err_msg=f"{case_id} {mask_type}_{kind}")
      mask = np.asarray(outputs["mask"].dataobj)
      assert set(np.unique(mask).tolist()) <= {0} | MMWHS_CODES, (case_id, mask_type)
      prob = np.asarray(outputs["error_prob"].dataobj)
      assert prob.min() >= 0 and prob.max() <= 1
      # The error map is the probability thresholded at predictor.threshold (0.5).
      np.testing.assert_array_equal(np.asarray(outputs["error"].dataobj), prob > 0.5)
    # The GT mask went to 8 mm and back: it must still cover the original label (a flipped
    # or shifted axis would not; measured: 85-86% of the foreground, 99.7% of the background).
    gt = np.asarray(nib.load(fold / "predictions" / case_id / "gt_mask.nii.gz").dataobj)
    assert set(np.unique(gt).tolist()) == {0} | MMWHS_CODES, case_id
    foreground = label > 0
    assert (gt[foreground] == label[foreground]).mean() > 0.8, case_id
    assert (gt[~foreground] == 0).mean() > 0.98, case_id

  report = (workdir / "report" / "report.md").read_text()
  assert "22 masks" in report

  programs = set(os.listdir(cache / "xla"))
  shutil.copytree(next(cache.glob("phantom-*")), data)
  warm = launch(f"--workdir={tmp_path / 'warm'}", "--experiment=cv_fold_small",
                f"--data_dir={data}", *TINY_FOLD, cache=cache)
  assert warm.returncode == 0, warm.stderr[-3000:]
  assert "preprocessed mr_train_1001" in warm.stdout
  assert set(os.listdir(cache / "xla")) == programs   # nothing compiled again
  first, second = fold_outputs(fold), fold_outputs(tmp_path / "warm" / "fold0")
  assert sum(name.endswith(".nii.gz") for name in first) == 2 * 3 * 3   # cases x masks x maps
  assert first.keys() == second.keys()
  different = [name for name in first if first[name] != second[name]]
  assert not different, different


def test_a_stage_without_test_records_ends_without_a_report(tmp_path, monkeypatch, capsys):
  """`python launch.py --set=stage=segmentors` (or predictor) trains what it asks and stops
  there: no report of records that no stage wrote, and no error after the work is done."""
  from experiments import cv_fold, quickstart

  ran = []
  monkeypatch.setattr(cv_fold, "run", lambda config, workdir, clock: ran.append(config.stage))
  monkeypatch.setattr(quickstart, "build_report",
                      lambda *a, **k: ran.append("report") or tmp_path / "report.md")
  config = quickstart.get_config()
  for stage, reported in (("segmentors", False), ("predictor", False), ("evaluate", True),
                          ("all", True)):
    ran.clear()
    config.stage = stage
    quickstart.run(config, str(tmp_path))
    assert ran == [stage, "report"] if reported else ran == [stage], (stage, ran)
    out = capsys.readouterr().out
    assert ("no report: stage=" in out) is not reported, (stage, out)
