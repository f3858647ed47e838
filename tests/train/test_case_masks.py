"""predictor.segmentor_masks = "case": the segmentors' 10 masks made once per whole training
case and carried through the crops; the predictor's step then runs no segmentor."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train.tiny import tiny_cases, tiny_config, tiny_segmentors
from wh_errmap.errors import UserError
from wh_errmap.train import stages, steps
from wh_errmap.models.factory import make_model
from wh_errmap.train.masks import case_masks, mask_sources
from wh_errmap.train.state import create_state, make_optimizer
from wh_errmap.utils.mesh import make_mesh

# Spelled out, not imported: the order of the auto masks.
OUTPUTS = ("final", "side2", "side3", "side4", "side5")


@pytest.mark.parametrize("where,weights,gt_probability,expected", [
    ("crop", {"segmentors": 1.0}, 0.0, False),
    ("case", {"segmentors": 1.0}, 0.0, True),
    ("case", {"segmentors": 1.0, "perturbed": 1.0}, 0.0, True),
    ("case", {"perturbed": 1.0}, 0.0, False),   # no segmentor mask to make
    ("case", {"segmentors": 1.0, "precomputed": 1.0}, 0.0, "precomputed"),
    ("case", {"segmentors": 1.0}, 0.1, True),   # the step draws the ground truth itself
    ("crop", {"segmentors": 1.0}, 0.1, False),
    ("cases", {"segmentors": 1.0}, 0.0, "must be one of crop, case")])
def test_the_setting_and_what_it_cannot_be_combined_with(where, weights, gt_probability,
                                                         expected):
  config = tiny_config()
  config.predictor.segmentor_masks = where
  config.predictor.gt_probability = gt_probability
  sources = mask_sources(weights)
  if isinstance(expected, str):
    with pytest.raises(UserError, match=expected):
      stages.segmentor_masks_per_case(config, sources)
  else:
    assert stages.segmentor_masks_per_case(config, sources) is expected


def test_a_setting_it_cannot_honour_is_refused_before_any_training():
  # model_layouts runs before any data or training work (cv_fold, cv_fold_small).
  config = tiny_config()
  config.predictor.segmentor_masks = "case"
  config.predictor.mask_sources.precomputed = 1.0
  with pytest.raises(UserError, match="precomputed"):
    stages.model_layouts(config)
  config.predictor.mask_sources.precomputed = 0.0
  assert set(stages.model_layouts(config)) == {"seg3d", "seg2d", "predictor"}


def test_case_masks_are_each_segmentors_outputs_on_the_whole_case():
  segmentors = tiny_segmentors()
  images = [tiny_cases(1, shape=(20, 18, 14))[0].image,
            tiny_cases(1, shape=(13, 17, 9))[0].image]
  masks = case_masks(segmentors["seg3d"], segmentors["seg2d"], images)
  for image, mask in zip(images, masks):
    assert mask.shape == (10, *image.shape) and mask.dtype == np.uint8
    model3d, variables3d = segmentors["seg3d"]
    model2d, variables2d = segmentors["seg2d"]
    # Independently: the 3D model on the volume as it is, the 2D one on its axial slices.
    out3d = jax.jit(model3d.apply, static_argnames="train")(
        variables3d, image[None, ..., None], train=False)
    out2d = jax.jit(model2d.apply, static_argnames="train")(
        variables2d, np.moveaxis(image, 2, 0)[..., None], train=False)
    expected = ([np.argmax(out3d[o][0], -1) for o in OUTPUTS]
                + [np.moveaxis(np.argmax(out2d[o], -1), 0, 2) for o in OUTPUTS])
    for k, want in enumerate(expected):
      np.testing.assert_array_equal(mask[k], want, err_msg=f"mask {k}")


def test_the_predictor_trains_on_case_masks_without_running_a_segmentor(tmp_path,
                                                                         monkeypatch):
  config = tiny_config()
  config.predictor.segmentor_masks = "case"
  config.input.crop_predictor = (16, 16, 12)
  config.train.predictor.steps = 2
  config.train.log_every = config.train.checkpoint_every = 1
  # Segmentor outputs made inside the step would fail the run.
  monkeypatch.setattr(steps, "auto_masks", lambda *a: pytest.fail("segmentors ran in a step"))
  lines = []
  segmentors = {name: variables for name, (_, variables) in tiny_segmentors().items()}
  cases = tiny_cases(3)
  variables = stages.train_predictor(config, segmentors, cases, tmp_path,
                                     stages.model_layouts(config)["predictor"], None,
                                     progress=lines.append)
  assert set(variables) == {"params", "batch_stats"}
  assert any("the segmentors' 30 masks of the 3 whole training cases" in line
             for line in lines), lines
  logged = [json.loads(line) for line in
            (tmp_path / "predictor" / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in logged] == [1, 2]
  # Every sample took one of its case's masks (none fell back to the ground truth).
  assert all(m["precomputed_fraction"] == 1.0 and m["gt_fraction"] == 0.0 for m in logged)
  assert all(np.isfinite(m["loss"]) for m in logged)


@pytest.mark.parametrize("gt_probability", [0.0, 0.5, 1.0])
def test_carried_case_masks_give_way_to_the_ground_truth_at_gt_probability(gt_probability):
  # The stage hands "case" masks to the step as carried masks (segmentors 0, precomputed 1).
  config = tiny_config()
  model = make_model(config.model, 3, 1)
  segmentors = tiny_segmentors()
  step = jax.jit(steps.make_predictor_step(
      model, segmentors["seg3d"][0], segmentors["seg2d"][0], config.loss, gt_probability, 8,
      mask_sources({"segmentors": 0.0, "precomputed": 1.0})))
  n = 64
  label = np.zeros((n, 8, 8, 8), np.int32)
  label[:, 2:6, 2:6, 2:6] = 3
  mask = np.zeros_like(label)      # every carried mask misses the whole LV: 64 voxels wrong
  batch = {"image": jnp.zeros((n, 8, 8, 8, 1)), "label": jnp.asarray(label),
           "mask": jnp.asarray(mask), "has_mask": jnp.ones((n,), bool)}
  state = create_state(model, make_optimizer(config.optim, 10), (n, 8, 8, 8, 9),
                       jax.random.key(1), make_mesh(jax.devices()[:1]))
  frozen = {name: variables for name, (_, variables) in segmentors.items()}
  _, metrics = step(state, batch, jax.random.key(2), frozen)
  gt = float(metrics["gt_fraction"])
  assert gt + float(metrics["precomputed_fraction"]) == 1.0
  # The error rate follows from the draw: 64 of 512 voxels wrong in each carried mask.
  assert float(metrics["true_error_rate"]) == pytest.approx((1 - gt) * 64 / 512)
  if gt_probability in (0.0, 1.0):
    assert gt == gt_probability
  else:
    # Binomial(64, 0.5): outside 0.5 +- 5 standard deviations (0.0625) with chance < 1e-6.
    assert 0.5 - 5 * 0.0625 < gt < 0.5 + 5 * 0.0625
