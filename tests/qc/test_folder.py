"""predict: error maps land on each input file's own grid, whatever its orientation; the run
is only read; results are never lost or replaced unasked; one bad pair never stops a batch."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import nibabel as nib
import numpy as np
import pytest

from experiments import predict
from tests.conftest import ROOT, cpu_env
from tests.train.tiny import (tiny_config, tiny_segmentors,
                              train_tiny_predictor)
from wh_errmap.qc import folder as folder_lib
from wh_errmap.data.phantom import make_phantom_case
from wh_errmap.errors import UserError
from wh_errmap.qc.cohort import assess_many
from wh_errmap.qc.folder import assess
from wh_errmap.qc.pairing import pair_folder
from wh_errmap.qc.predictor import Predictor, load_predictor
from wh_errmap.utils.mesh import make_mesh
from wh_errmap.utils.workdir import load_run_config, record_config



@pytest.fixture(scope="module")
def run_dir(tiny_run):
  """The session's tiny run (conftest): a barely trained predictor for fold 0."""
  return tiny_run


@pytest.fixture(scope="module")
def phantom_pair(tmp_path_factory):
  """One phantom case: {("as_generated", "image" or "label"): path}."""
  folder = tmp_path_factory.mktemp("cases")
  image, label, affine = make_phantom_case(seed=3, index=1, spacing_scale=2.0)
  paths = {}
  for kind, data in (("image", image), ("label", label)):
    paths["as_generated", kind] = folder / f"as_generated_{kind}.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(paths["as_generated", kind]))
  return paths


def run_predict(run_dir, out, image, mask, **settings):
  config = predict.get_config()
  config.image, config.mask, config.output_dir = str(image), str(mask), str(out)
  for field, value in settings.items():
    setattr(config, field, value)
  predict.run(config, str(run_dir))


def copy_run(run_dir: Path, dest: Path, steps: int) -> Path:
  """A copy of `run_dir` whose recorded config trains the predictor for `steps` steps."""
  config = tiny_config()
  config.train.predictor.steps = steps
  record_config(dest, config)
  shutil.copytree(run_dir / "fold0", dest / "fold0")
  return dest


def snapshot(folder: Path) -> dict[str, str]:
  """{relative path: sha256} of every file under `folder`."""
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob("*")) if p.is_file()}


class KnownPredictor(Predictor):
  """Error probability = a known function of the preprocessed input: (image + 1) / 4 (the
  image is scaled to [-1, 1]) plus 0.5 where the mask is foreground."""

  def error_map(self, image, mask):
    return ((image + 1.0) / 4.0 + 0.5 * (mask > 0)).astype(np.float32)


def test_two_masks_of_one_scan_keep_their_own_outputs(run_dir, phantom_pair, tmp_path):
  image, label = phantom_pair["as_generated", "image"], phantom_pair["as_generated", "label"]
  edited = nib.load(str(label))
  data = np.asarray(edited.dataobj).copy()
  data[data == 205] = 0   # a mask that misses the left ventricular myocardium
  other = tmp_path / "edited.nii.gz"
  nib.save(nib.Nifti1Image(data, edited.affine), str(other))
  run_predict(run_dir, tmp_path / "out", image, label)
  run_predict(run_dir, tmp_path / "out", image, other)
  first = json.loads((tmp_path / "out" / "as_generated__as_generated_label_qc.json").read_text())
  second = json.loads((tmp_path / "out" / "as_generated__edited_qc.json").read_text())
  assert first["mask"] == str(label) and second["mask"] == str(other)
  assert first["mask_sha256"] != second["mask_sha256"]
  assert (tmp_path / "out" / "as_generated__as_generated_label_error_prob.nii.gz").exists()
  assert (tmp_path / "out" / "as_generated__edited_error_prob.nii.gz").exists()
  assert first["predictor"] == {"workdir": str(run_dir.absolute()), "fold": 0,
                                "checkpoint_step": 1, "total_steps": 1}


def test_a_pair_whose_outputs_fail_half_way_leaves_none_of_them(run_dir, phantom_pair,
                                                               tmp_path, monkeypatch):
  # The error maps are written before the figure; a figure that fails must take them along,
  # so no result is left that looks finished or half-finished. The next run redoes the pair.
  image, label = phantom_pair["as_generated", "image"], phantom_pair["as_generated", "label"]
  predictor = load_predictor(run_dir, 0)

  def broken_figure(path, *args, **kwargs):
    Path(path).write_bytes(b"half a PNG")
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(folder_lib, "case_figure", broken_figure)
  with pytest.raises(OSError, match="No space"):
    assess(image, label, predictor, tmp_path / "out", progress=lambda _: None)
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []
  monkeypatch.undo()
  result, reused = assess(image, label, predictor, tmp_path / "out", progress=lambda _: None)
  assert not reused and sorted(result["files"]) == sorted(
      p.name for p in (tmp_path / "out").iterdir() if not p.name.endswith("_qc.json"))


def test_an_existing_result_is_kept_unless_overwrite(run_dir, phantom_pair, tmp_path, capsys):
  image, label = phantom_pair["as_generated", "image"], phantom_pair["as_generated", "label"]
  out = tmp_path / "out"
  run_predict(run_dir, out, image, label)
  before = snapshot(out)
  report = out / "as_generated__as_generated_label_qc.json"
  pair_files = {name for name in before if name.startswith("as_generated__")}
  assert report.name in before and len(pair_files) == 6, pair_files
  capsys.readouterr()
  run_predict(run_dir, out, image, label)   # the same assessment: kept, not redone
  assert "already assessed, kept" in capsys.readouterr().out
  assert snapshot(out) == before
  with pytest.raises(UserError, match="another threshold.*--overwrite"):
    run_predict(run_dir, out, image, label, threshold=0.3)
  assert snapshot(out) == before
  run_predict(run_dir, out, image, label, threshold=0.3, overwrite=True)
  assert json.loads(report.read_text())["threshold"] == 0.3


def make_folders(tmp_path, phantom_pair, names):
  """images/<name>_image.nii.gz and masks/<name>_label.nii.gz, copies of the phantom pair."""
  images, masks = tmp_path / "images", tmp_path / "masks"
  images.mkdir()
  masks.mkdir()
  for name in names:
    shutil.copy(phantom_pair["as_generated", "image"], images / f"{name}_image.nii.gz")
    shutil.copy(phantom_pair["as_generated", "label"], masks / f"{name}_label.nii.gz")
  return images, masks


def test_folder_run_skips_bad_pairs_and_a_second_run_resumes(run_dir, phantom_pair, tmp_path):
  images, masks = make_folders(tmp_path, phantom_pair, ["good", "broken"])
  source = phantom_pair["as_generated", "image"]
  (images / "broken_image.nii.gz").write_bytes(source.read_bytes()[:300])
  shutil.copy(source, images / "lonely_image.nii.gz")
  out = tmp_path / "out"
  with pytest.raises(UserError, match="2 input") as info:
    run_predict(run_dir, out, images, masks)
  assert "broken_image.nii.gz" in str(info.value) and "lonely_image.nii.gz" in str(info.value)
  assert (out / "good__good_label_error.nii.gz").exists()
  assert not list(out.glob("broken*"))
  # Fixed inputs, same command: the good pair is kept, the others are assessed, and the
  # first run's summary is still there beside the second's.
  shutil.copy(source, images / "broken_image.nii.gz")
  (images / "lonely_image.nii.gz").unlink()
  kept = {name: h for name, h in snapshot(out).items() if name.startswith("good__")}
  run_predict(run_dir, out, images, masks)
  assert {name: h for name, h in snapshot(out).items() if name in kept} == kept
  # The folder's table describes every result in it, the kept one included.
  assert [line.split("\t")[0] for line in (out / "qc.tsv").read_text().splitlines()] == [
      "pair", "broken__broken_label", "good__good_label"]
  summaries = sorted(out.glob("summary-*.json"), key=lambda p: p.stat().st_mtime_ns)
  assert len(summaries) == 2
  first, second = (json.loads(p.read_text()) for p in summaries)
  assert [c["pair"] for c in first["cases"]] == ["good__good_label"] and len(first["problems"]) == 2
  assert sorted(c["pair"] for c in second["cases"]) == ["broken__broken_label", "good__good_label"]
  assert second["already_assessed"] == ["good__good_label"] and second["problems"] == []


@pytest.mark.parametrize("error", [
    PermissionError(13, "Permission denied"), MemoryError(),
    nib.spatialimages.HeaderDataError("sform is not invertible"), RuntimeError("boom")],
    ids=lambda e: type(e).__name__)
def test_any_failure_of_a_pair_is_reported_and_the_others_complete(run_dir, phantom_pair,
                                                                   tmp_path, monkeypatch, error):
  images, masks = make_folders(tmp_path, phantom_pair, ["bad", "good"])
  real_prepare = folder_lib.prepare

  def assess_pair(image, mask, *args, **kwargs):
    if Path(image).name.startswith("bad"):
      raise error
    return real_prepare(image, mask, *args, **kwargs)

  monkeypatch.setattr(folder_lib, "prepare", assess_pair)
  with pytest.raises(UserError, match="^1 input") as info:
    run_predict(run_dir, tmp_path / "out", images, masks)
  message = str(info.value)
  assert "\n" not in message and str(images / "bad_image.nii.gz") in message
  assert (str(error) or "out of memory") in message
  assert (tmp_path / "out" / "good__good_label_qc.json").exists()
  summary = json.loads(next((tmp_path / "out").glob("summary-*.json")).read_text())
  assert [c["pair"] for c in summary["cases"]] == ["good__good_label"]
  assert len(summary["problems"]) == 1 and "bad_image" in summary["problems"][0]


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_interrupting_a_folder_run_is_not_swallowed(run_dir, phantom_pair, tmp_path,
                                                     monkeypatch, stop):
  def assess_pair(*args, **kwargs):
    raise stop()

  monkeypatch.setattr(folder_lib, "prepare", assess_pair)
  known = KnownPredictor(None, None, load_run_config(run_dir), str(run_dir), 0, 1, 1)
  pair = (phantom_pair["as_generated", "image"], phantom_pair["as_generated", "label"])
  with pytest.raises(stop):
    assess_many([pair, pair], known, tmp_path, progress=lambda _: None)


def test_ambiguous_pairing_is_an_error_naming_both_files(tmp_path):
  images, masks, both = tmp_path / "images", tmp_path / "masks", tmp_path / "both"
  for folder, names in (
      (images, ["a_image.nii.gz", "b_image.nii.gz", "c_image.nii.gz", "c.nii.gz",
                "d_image.nii.gz"]),
      (masks, ["a_label.nii.gz", "a_mask.nii.gz", "b_mask.nii.gz", "c_label.nii.gz",
               "d_label.nii", "d_label.nii.gz"]),
      (both, ["x_image.nii.gz", "x.nii.gz", "y_image.nii.gz", "y_label.nii.gz", "z.nii",
              "z_mask.nii"])):
    folder.mkdir()
    for name in names:
      (folder / name).touch()
  pairs, problems = pair_folder(images, masks)
  assert pairs == [(images / "b_image.nii.gz", masks / "b_mask.nii.gz")]
  assert len(problems) == 3
  for names in (["a_image", "a_label.nii.gz", "a_mask.nii.gz"], ["c_image.nii.gz", "c.nii.gz"],
                ["d_image", "d_label.nii ", "d_label.nii.gz"]):
    assert any(all(n in p + " " for n in names) for p in problems), (names, problems)
  pairs, problems = pair_folder(both, both)
  assert problems == []
  assert pairs == [(both / "x_image.nii.gz", both / "x.nii.gz"),
                   (both / "y_image.nii.gz", both / "y_label.nii.gz"),
                   (both / "z.nii", both / "z_mask.nii")]


def test_partly_trained_predictor_is_refused_unless_allowed(run_dir, phantom_pair, tmp_path,
                                                            capsys):
  partial = copy_run(run_dir, tmp_path / "partial", steps=5)
  image, label = phantom_pair["as_generated", "image"], phantom_pair["as_generated", "label"]
  with pytest.raises(UserError, match="trained for 1 of 5 steps.*allow_partial=True"):
    run_predict(partial, tmp_path / "out", image, label)
  assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
  capsys.readouterr()
  run_predict(partial, tmp_path / "out", image, label, allow_partial=True)
  printed = capsys.readouterr().out
  assert "PARTLY TRAINED predictor: fold 0 at step 1 of 5" in printed
  assert "step 1 of 5" in printed.strip().splitlines()[-1]
  report = json.loads((tmp_path / "out" / "as_generated__as_generated_label_qc.json").read_text())
  assert report["predictor"] == {"workdir": str(partial.absolute()), "fold": 0,
                                 "checkpoint_step": 1, "total_steps": 5}


def test_damaged_newest_checkpoint_is_left_in_place(run_dir, phantom_pair, tmp_path, capsys):
  run = copy_run(run_dir, tmp_path / "run", steps=2)
  train_tiny_predictor(run / "fold0", make_mesh(jax.devices()[:1]), num_steps=2,
                       segmentors=tiny_segmentors(), batch_size=2)
  checkpoints = run / "fold0" / "predictor" / "checkpoints"
  assert (checkpoints / "1").is_dir() and (checkpoints / "2").is_dir()
  victim = max((p for p in (checkpoints / "2" / "state").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])   # truncated
  before = snapshot(run)
  image, label = phantom_pair["as_generated", "image"], phantom_pair["as_generated", "label"]
  # The older checkpoint is used, and it is not the end of training.
  with pytest.raises(UserError, match="trained for 1 of 2 steps"):
    run_predict(run, tmp_path / "out", image, label)
  assert snapshot(run) == before
  capsys.readouterr()
  run_predict(run, tmp_path / "out", image, label, allow_partial=True)
  warning = next(line for line in capsys.readouterr().out.splitlines()
                 if line.startswith("warning: checkpoint"))
  assert str(checkpoints / "2") in warning
  assert snapshot(run) == before
  report = json.loads((tmp_path / "out" / "as_generated__as_generated_label_qc.json").read_text())
  assert report["predictor"]["checkpoint_step"] == 1


def test_missing_run_is_a_clear_error(tmp_path, phantom_pair):
  with pytest.raises(UserError, match="config.json"):
    run_predict(tmp_path, tmp_path / "out", phantom_pair["as_generated", "image"],
                phantom_pair["as_generated", "label"])


@pytest.mark.parametrize("problem", ["shape", "affine", "labels"])
def test_mismatched_mask_through_launch_is_one_line_and_status_2(run_dir, phantom_pair,
                                                                 tmp_path, problem):
  image_path = phantom_pair["as_generated", "image"]
  label = nib.load(str(phantom_pair["as_generated", "label"]))
  data, affine = np.asarray(label.dataobj), label.affine.copy()
  if problem == "shape":
    data = data[:-3]
  elif problem == "affine":
    affine[:3, 3] += 25.0
  else:
    data = data.copy()
    data.flat[data.size // 2] = 42   # not an MMWHS code nor a class index
  mask_path = tmp_path / f"bad_{problem}_mask.nii.gz"
  nib.save(nib.Nifti1Image(data, affine), str(mask_path))
  result = subprocess.run(
      [sys.executable, "launch.py", "--experiment=predict", f"--workdir={run_dir}",
       f"--image={image_path}", f"--mask={mask_path}"], cwd=ROOT, capture_output=True,
      text=True, timeout=300, env=cpu_env())
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  assert mask_path.name in lines[0] or image_path.name in lines[0]
  assert not list((run_dir / "predict").glob(f"*bad_{problem}*"))
