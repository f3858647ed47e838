"""The maps predict writes: on the input file's grid in any orientation, and the
per-structure map naming only wrong voxels."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from tests.qc.test_folder import KnownPredictor
from wh_errmap.data.phantom import make_phantom_case
from wh_errmap.qc.folder import assess
from wh_errmap.qc.predictor import Predictor
from wh_errmap.utils.workdir import load_run_config


@pytest.fixture(scope="module")
def run_dir(tiny_run):
  """The session's tiny run (conftest): its config is what the maps are made with."""
  return tiny_run


@pytest.fixture(scope="module")
def ramp_pair(tmp_path_factory):
  """The phantom's label with an image that is a linear function of world position, saved
  as generated and reoriented to S-L-P axes."""
  folder = tmp_path_factory.mktemp("ramp")
  _, label, affine = make_phantom_case(seed=3, index=1, spacing_scale=2.0)
  ijk = np.stack(np.meshgrid(*map(np.arange, label.shape), indexing="ij"), axis=-1)
  world = ijk @ affine[:3, :3].T + affine[:3, 3]
  image = (1000.0 + world @ np.array([3.0, 5.0, 7.0])).astype(np.float32)
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


class HalfWrong(Predictor):
  """Error probability 0.9 where the preprocessed image is above 0 (half the ramp), else
  0.1, whatever the mask: wrong voxels inside structures and in the background."""

  def error_map(self, image, mask):
    return np.where(image > 0, 0.9, 0.1).astype(np.float32)


@pytest.mark.parametrize("orientation", ["as_generated", "reoriented"])
def test_errors_by_structure_name_the_masks_own_structure_and_only_wrong_voxels(
    run_dir, ramp_pair, tmp_path, orientation):
  predictor = HalfWrong(None, None, load_run_config(run_dir), str(run_dir), 0, 1, 1)
  result, _ = assess(ramp_pair[orientation, "image"], ramp_pair[orientation, "label"],
                     predictor, tmp_path, figures=False)
  def read(kind):
    return np.asarray(nib.load(str(tmp_path / f"{result['pair']}_{kind}.nii.gz")).dataobj)
  mask_image = nib.load(str(ramp_pair[orientation, "label"]))
  mask = np.asarray(mask_image.dataobj)
  error, by_structure = read("error"), read("errors_by_structure")
  assert by_structure.shape == mask.shape
  inside, outside = (error == 1) & (mask > 0), (error == 1) & (mask == 0)
  assert inside.sum() > 1000 and outside.sum() > 1000
  # Nonzero only on wrong voxels; on a wrong voxel of a structure, that structure's value.
  assert not by_structure[error == 0].any()
  np.testing.assert_array_equal(by_structure[inside], mask[inside])
  # A wrong background voxel names a structure only within 2 voxels of the model's grid
  # (+ half a voxel's diagonal of each grid for the resampling), and one of the mask's values.
  voxel_mm = np.asarray(mask_image.header.get_zooms()[:3], float)
  model_mm = float(max(predictor.config.preprocess.spacing))
  distance, index = ndimage.distance_transform_edt(mask == 0, sampling=voxel_mm,
                                                   return_indices=True)
  named = outside & (by_structure > 0)
  reach = 2 * model_mm + np.sqrt(3) / 2 * (model_mm + voxel_mm.max())
  assert named.any() and distance[named].max() <= reach
  assert not by_structure[outside & (distance > reach)].any()
  assert np.isin(by_structure[named], np.unique(mask[mask > 0])).all()
  # Within 1.5 model voxels of a structure, one is named (measured: 99.97% of 3093 voxels;
  # 87% at 3-4 mm, 43% at 4-5 mm, none beyond 6 mm).
  near = outside & (distance <= 1.5 * model_mm)
  assert near.sum() > 1000 and (by_structure[near] > 0).mean() > 0.95


def test_error_map_is_on_the_input_grid_in_any_orientation(run_dir, ramp_pair, tmp_path):
  # With a linear image, linear resampling to the model's grid and back must give, voxel
  # by voxel of the input file, a * image + b + 0.5 * mask away from the crop's and the
  # mask's edges: a flipped axis or a grid shifted by one voxel breaks this.
  known = KnownPredictor(None, None, load_run_config(run_dir), str(run_dir), 0, 1, 1)
  outputs = {}
  for name in ("as_generated", "reoriented"):
    image = ramp_pair[name, "image"]
    result, reused = assess(image, ramp_pair[name, "label"], known, tmp_path,
                           figures=False)
    assert not reused
    out = nib.load(str(tmp_path / f"{result['pair']}_error_prob.nii.gz"))
    source = nib.load(str(image))
    assert out.shape == source.shape
    np.testing.assert_allclose(out.affine, source.affine, atol=1e-5)
    outputs[name] = out
  prob = np.asarray(outputs["as_generated"].dataobj)
  intensity = np.asarray(nib.load(str(ramp_pair["as_generated", "image"])).dataobj)
  foreground = np.asarray(nib.load(str(ramp_pair["as_generated", "label"])).dataobj) > 0
  lo, hi = np.percentile(intensity, [2, 98])   # away from the clipped intensities
  inside = (ndimage.binary_erosion(prob > 0, iterations=3)
            & (ndimage.binary_erosion(foreground, iterations=5)
               | ndimage.binary_erosion(~foreground, iterations=5))
            & (intensity > lo) & (intensity < hi))
  assert inside.mean() > 0.3 and foreground[inside].any() and (~foreground[inside]).any()
  design = np.stack([intensity[inside], foreground[inside], np.ones(inside.sum())], axis=1)
  coef, *_ = np.linalg.lstsq(design.astype(np.float64), prob[inside].astype(np.float64),
                             rcond=None)
  assert coef[0] > 0 and abs(coef[1] - 0.5) < 1e-4
  # Measured: 7e-8 as it is; 1.1e-4 to 2.6e-4 with the map shifted by one voxel on any axis.
  assert np.abs(design @ coef - prob[inside]).max() < 1e-5
  # The reoriented case's map, put back into the first file's orientation, is the same map.
  back = outputs["reoriented"].as_reoriented(nib.orientations.ornt_transform(
      nib.orientations.io_orientation(outputs["reoriented"].affine),
      nib.orientations.io_orientation(outputs["as_generated"].affine)))
  np.testing.assert_allclose(back.affine, outputs["as_generated"].affine, atol=1e-4)
  np.testing.assert_allclose(np.asarray(back.dataobj), prob, atol=1e-5)
