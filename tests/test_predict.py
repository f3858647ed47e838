"""predict: error maps land on each input file's own grid, whatever its orientation."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import nibabel as nib
import numpy as np
import pytest

from experiments import predict
from tests.train.tiny import tiny_config, tiny_segmentors, train_tiny_predictor
from wh_errmap.data.phantom import make_phantom_case
from wh_errmap.errors import UserError
from wh_errmap.workdir import record_config
from wh_errmap.train.sharding import make_mesh

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A run with a (barely) trained tiny predictor for fold 0 and its config.json."""
  run = tmp_path_factory.mktemp("run")
  config = tiny_config()
  config.train.predictor.steps = 1
  record_config(run, config)
  train_tiny_predictor(run / "fold0", make_mesh(jax.devices()[:1]), num_steps=1,
                       segmentors=tiny_segmentors(), batch_size=2)
  return run


@pytest.fixture(scope="module")
def phantom_pair(tmp_path_factory):
  """One phantom case saved twice: as generated, and reoriented to S-L-P axes."""
  folder = tmp_path_factory.mktemp("cases")
  image, label, affine = make_phantom_case(seed=3, index=1)
  paths = {}
  for name, codes in (("as_generated", None), ("reoriented", ("S", "L", "P"))):
    for kind, data in (("image", image), ("label", label)):
      img = nib.Nifti1Image(data, affine)
      if codes:
        img = img.as_reoriented(nib.orientations.ornt_transform(
            nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt(codes)))
      paths[name, kind] = folder / f"{name}_{kind}.nii.gz"
      nib.save(img, str(paths[name, kind]))
  assert nib.aff2axcodes(nib.load(str(paths["reoriented", "image"])).affine) == ("S", "L", "P")
  return paths


def run_predict(run_dir, out, image, mask):
  config = predict.get_config()
  config.image, config.mask, config.output_dir = str(image), str(mask), str(out)
  predict.run(config, str(run_dir))


def test_error_map_is_on_the_input_grid_in_any_orientation(run_dir, phantom_pair, tmp_path):
  outputs = {}
  for name in ("as_generated", "reoriented"):
    image = phantom_pair[name, "image"]
    run_predict(run_dir, tmp_path / name, image, phantom_pair[name, "label"])
    out = nib.load(str(tmp_path / name / f"{name}_error_prob.nii.gz"))
    source = nib.load(str(image))
    assert out.shape == source.shape
    np.testing.assert_allclose(out.affine, source.affine, atol=1e-5)
    outputs[name] = out
  prob = np.asarray(outputs["as_generated"].dataobj)
  assert prob.max() > 0  # the crop around the mask was assessed
  # The reoriented case's map, put back into the first file's orientation, is the same map.
  back = outputs["reoriented"].as_reoriented(nib.orientations.ornt_transform(
      nib.orientations.io_orientation(outputs["reoriented"].affine),
      nib.orientations.io_orientation(outputs["as_generated"].affine)))
  np.testing.assert_allclose(back.affine, outputs["as_generated"].affine, atol=1e-4)
  np.testing.assert_allclose(np.asarray(back.dataobj), prob, atol=1e-5)
  report = (tmp_path / "as_generated" / "as_generated_qc.json").read_text()
  assert '"qi"' in report


def test_folder_run_skips_bad_pairs_and_completes_the_others(run_dir, phantom_pair, tmp_path):
  images, masks = tmp_path / "images", tmp_path / "masks"
  images.mkdir()
  masks.mkdir()
  source = phantom_pair["as_generated", "image"]
  (images / "good_image.nii.gz").write_bytes(source.read_bytes())
  (masks / "good_label.nii.gz").write_bytes(phantom_pair["as_generated", "label"].read_bytes())
  (images / "broken_image.nii.gz").write_bytes(source.read_bytes()[:300])
  (masks / "broken_label.nii.gz").write_bytes(phantom_pair["as_generated", "label"].read_bytes())
  (images / "lonely_image.nii.gz").write_bytes(source.read_bytes())
  with pytest.raises(UserError, match="2 input") as info:
    run_predict(run_dir, tmp_path / "out", images, masks)
  assert "broken_image.nii.gz" in str(info.value) and "lonely_image.nii.gz" in str(info.value)
  assert (tmp_path / "out" / "good_error.nii.gz").exists()
  assert not list((tmp_path / "out").glob("broken*"))


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
      text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  assert mask_path.name in lines[0] or image_path.name in lines[0]
  assert not list((run_dir / "predict").glob(f"*bad_{problem}*"))
