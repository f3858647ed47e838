"""Precomputed masks as predictor training data: only the fold's training cases are read,
each mask lands on its case's preprocessed grid and crop, and the step trains on them."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from tests.train.tiny import tiny_config, tiny_segmentors
from wh_errmap.data.nifti_io import load_case
from wh_errmap.data.phantom import make_phantom_case
from wh_errmap.data.preprocess import PreprocessConfig, preprocess_case
from wh_errmap.errors import UserError
from wh_errmap.models.factory import make_model
from wh_errmap.train.masks import mask_sources
from wh_errmap.train.precomputed import find_masks, training_masks
from wh_errmap.train.state import create_state, make_optimizer
from wh_errmap.train.steps import make_predictor_step
from wh_errmap.utils.mesh import make_mesh

CONFIG = PreprocessConfig(spacing=(3.0, 3.0, 3.0))


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
  """Two preprocessed phantom cases (train_a, test_b) and a mask folder holding: train_a's
  label itself, train_a's label without the LV (500), and test_b's label."""
  data, masks = tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("masks")
  out = []
  for index, name in enumerate(("train_a", "test_b")):
    image, label, affine = make_phantom_case(seed=4, index=index, spacing_scale=2.0)
    paths = [data / f"{name}_{kind}.nii.gz" for kind in ("image", "label")]
    for path, volume in zip(paths, (image, label)):
      nib.save(nib.Nifti1Image(volume, affine), str(path))
    out.append(preprocess_case(load_case(*paths), CONFIG))
    nib.save(nib.Nifti1Image(label, affine), str(masks / f"{name}.nii.gz"))
    if name == "train_a":
      no_lv = np.where(label == 500, 0, label).astype(label.dtype)
      nib.save(nib.Nifti1Image(no_lv, affine), str(masks / f"{name}_nolv.nii.gz"))
  return out, masks


def test_only_training_cases_are_read_and_masks_land_on_their_crop(cases):
  (train, test), folder = cases
  found, ignored = find_masks([folder], [train.case_id])
  assert [p.name for p in found["train_a"]] == ["train_a.nii.gz", "train_a_nolv.nii.gz"]
  assert ignored == ["test_b.nii.gz"]       # the test case's mask is never read
  masks, line = training_masks(str(folder), "mmwhs", [train], CONFIG)
  assert "2 precomputed masks of 1 of 1 training cases" in line and "1 file(s)" in line
  (same, no_lv), = masks
  np.testing.assert_array_equal(same, train.label)   # the label's own grid and crop
  assert not (no_lv == 3).any()
  # Labels resample by class indicators, so removing the LV moves a handful of voxels at
  # its border; everywhere else the mask is the label's.
  assert np.mean(no_lv != np.where(train.label == 3, 0, train.label)) < 1e-4
  with pytest.raises(UserError, match="no mask of a training case"):
    training_masks(str(folder), "mmwhs", [test.__class__(
        "other", test.image, test.label, test.properties)], CONFIG)
  with pytest.raises(UserError, match="needs predictor.mask_dirs"):
    training_masks(" ", "", [train], CONFIG)


def test_the_step_trains_on_the_batchs_precomputed_masks():
  config = tiny_config()
  model = make_model(config.model, 3, 1)
  segmentors = tiny_segmentors()
  step = jax.jit(make_predictor_step(model, segmentors["seg3d"][0], segmentors["seg2d"][0],
                                     config.loss, 0.0, 8,
                                     mask_sources({"segmentors": 0.0, "precomputed": 1.0})))
  label = np.zeros((2, 16, 16, 8), np.int32)
  label[:, 4:12, 4:12, 2:6] = 3
  mask = label.copy()
  mask[0, 4:6] = 0          # sample 0's mask misses 2 x 8 x 4 voxels; sample 1 has none
  batch = {"image": jnp.zeros((2, 16, 16, 8, 1)), "label": jnp.asarray(label),
           "mask": jnp.asarray(mask), "has_mask": jnp.array([True, False])}
  state = create_state(model, make_optimizer(config.optim, 10), (2, 16, 16, 8, 9),
                       jax.random.key(1), make_mesh(jax.devices()[:1]))
  frozen = {name: variables for name, (_, variables) in segmentors.items()}
  _, metrics = step(state, batch, jax.random.key(2), frozen)
  # Sample 1 has no mask: it keeps the (ground-truth) fallback, error-free.
  assert float(metrics["precomputed_fraction"]) == 0.5
  assert float(metrics["true_error_rate"]) == pytest.approx(64 / (2 * 16 * 16 * 8))


@pytest.mark.parametrize("order", [("a", "a_1", "a_10"), ("a_10", "a_1", "a"),
                                   ("a_1", "a", "a_10")])
def test_case_ids_that_prefix_one_another_each_get_their_own_files(tmp_path, order):
  # Case ids a, a_1, a_10: `a_1_x` is a mask of a_1 (not of a), `a_10` one of a_10 (not of
  # a_1), whatever order the ids come in. Expected by the rule CASE.nii[.gz] / CASE_*.nii[.gz]
  # with the longest matching id winning, written out by hand.
  names = ["a.nii.gz", "a_x.nii", "a_1.nii.gz", "a_1_x.nii.gz", "a_10.nii.gz", "a_10_x.nii",
           "a_2.nii.gz", "b.nii.gz", "a.txt"]
  for name in names:
    (tmp_path / name).write_bytes(b"")
  found, ignored = find_masks([tmp_path], list(order))
  assert {case: [p.name for p in paths] for case, paths in found.items()} == {
      "a": ["a.nii.gz", "a_2.nii.gz", "a_x.nii"],
      "a_1": ["a_1.nii.gz", "a_1_x.nii.gz"],
      "a_10": ["a_10.nii.gz", "a_10_x.nii"]}
  assert ignored == ["b.nii.gz"]
