"""On-device mask generation and the predictor step's use of the frozen segmentors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train.tiny import tiny_config, tiny_segmentors
from wh_errmap.errors import UserError
from wh_errmap.models.factory import make_model
from wh_errmap.models.inference import slicewise
from wh_errmap.train.masks import (AUTO_MASK_TYPES, MASK_TYPES, MaskSources, auto_masks,
                                   mask_sources, perturbed_masks, pick_masks)
from wh_errmap.train.perturbations import DEFAULTS, Settings, settings_from_mapping
from wh_errmap.train.state import create_state, make_optimizer
from wh_errmap.train.steps import make_predictor_step
from wh_errmap.utils.mesh import make_mesh


def test_mask_types_follow_the_paper():
  assert len(AUTO_MASK_TYPES) == 10 and MASK_TYPES[-1] == "gt"
  assert AUTO_MASK_TYPES[:5] == ("3d-final", "3d-side2", "3d-side3", "3d-side4", "3d-side5")


def test_slicewise_applies_the_2d_model_to_every_axial_slice():
  model, variables = tiny_segmentors()["seg2d"]
  volume = jax.random.normal(jax.random.key(0), (2, 8, 8, 5, 1))
  # Jitted, as in training (eagerly each operation compiles on its own).
  out = jax.jit(lambda v, x: slicewise(model, v, x)["final"])(variables, volume)
  assert out.shape == (2, 8, 8, 5, 8)
  one = jax.jit(lambda v, x: model.apply(v, x, train=False)["final"])(
      variables, volume[1:2, :, :, 3])
  np.testing.assert_allclose(out[1:2, :, :, 3], one, rtol=1e-5, atol=1e-5)


def test_auto_masks_are_the_segmentors_argmax():
  segmentors = tiny_segmentors()
  image = jax.random.normal(jax.random.key(0), (2, 16, 16, 8, 1))
  masks = jax.jit(lambda x: auto_masks(segmentors["seg3d"], segmentors["seg2d"], x))(image)
  assert masks.shape == (10, 2, 16, 16, 8)
  model, variables = segmentors["seg3d"]
  side4 = jax.jit(lambda v, x: model.apply(v, x, train=False)["side4"])(variables, image)
  np.testing.assert_array_equal(masks[AUTO_MASK_TYPES.index("3d-side4")],
                                jnp.argmax(side4, -1))


def test_pick_masks():
  masks = jnp.arange(10)[:, None, None] * jnp.ones((10, 6, 4), jnp.int32)
  label = jnp.full((6, 4), 77)
  chosen, choice = pick_masks(masks, label, jax.random.key(0), gt_probability=0.0)
  assert (choice < 10).all() and len(set(np.asarray(choice).tolist())) > 1
  np.testing.assert_array_equal(chosen[:, 0], choice)
  chosen, choice = pick_masks(masks, label, jax.random.key(0), gt_probability=1.0)
  assert (choice == 10).all() and (chosen == 77).all()


def test_predictor_step_generates_masks_from_the_frozen_segmentors_inside_jit():
  config = tiny_config()
  model = make_model(config.model, 3, 1)
  mesh = make_mesh(jax.devices()[:1])
  segmentors_a, segmentors_b = tiny_segmentors(seed=0), tiny_segmentors(seed=10)
  step = jax.jit(make_predictor_step(model, segmentors_a["seg3d"][0], segmentors_a["seg2d"][0],
                                     config.loss, gt_probability=0.0, num_classes=8))
  rng = np.random.default_rng(0)
  # The batch holds only the image and the label: no mask comes from the host.
  batch = {"image": jnp.asarray(rng.normal(size=(2, 16, 16, 8, 1)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 8, (2, 16, 16, 8)), jnp.int32)}

  def run(segmentors):
    state = create_state(model, make_optimizer(config.optim, 10), (2, 16, 16, 8, 9),
                         jax.random.key(1), mesh)
    frozen = {name: variables for name, (_, variables) in segmentors.items()}
    before = jax.tree.map(np.asarray, frozen)
    _, metrics = step(state, batch, jax.random.key(2), frozen)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(frozen)):
      np.testing.assert_array_equal(a, b)   # never updated
    return {k: float(v) for k, v in metrics.items()}

  a, b = run(segmentors_a), run(segmentors_b)
  assert a["true_error_rate"] != b["true_error_rate"]
  assert a["loss"] != b["loss"]
  # Re-running with the same segmentors reproduces the masks exactly.
  assert run(segmentors_a) == a


def box_label(n: int = 2) -> jnp.ndarray:
  label = np.zeros((n, 16, 16, 8), np.int32)
  label[:, 2:8, 3:9, 1:6] = 1
  label[:, 9:14, 4:12, 2:7] = 3
  label[:, 4:7, 10:15, 3:8] = 5
  return jnp.asarray(label)


def test_perturbed_masks_always_differ_from_the_ground_truth():
  label = box_label(6)
  # Rates 0: only the fallback erosion or dilation acts, so each sample still has errors.
  none = MaskSources(perturbed=1.0, perturbations=settings_from_mapping(
      {k: 0.0 for k, v in DEFAULTS.items() if k.endswith("_rate")}))
  for settings in (none.perturbations, MaskSources().perturbations):
    masks = jax.jit(perturbed_masks, static_argnums=(2, 3))(label, jax.random.key(3),
                                                            settings, 8)
    changed = np.asarray(jnp.any(masks != label, axis=(1, 2, 3)))
    assert changed.all(), changed


def test_predictor_step_on_perturbed_ground_truth_only():
  config = tiny_config()
  model = make_model(config.model, 3, 1)
  mesh = make_mesh(jax.devices()[:1])
  segmentors_a, segmentors_b = tiny_segmentors(seed=0), tiny_segmentors(seed=10)
  sources = mask_sources({"segmentors": 0.0, "perturbed": 1.0})
  step = jax.jit(make_predictor_step(model, segmentors_a["seg3d"][0], segmentors_a["seg2d"][0],
                                     config.loss, 0.0, 8, sources))
  batch = {"image": jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 8, 1)),
                                jnp.float32), "label": box_label()}

  def run(segmentors):
    state = create_state(model, make_optimizer(config.optim, 10), (2, 16, 16, 8, 9),
                         jax.random.key(1), mesh)
    frozen = {name: variables for name, (_, variables) in segmentors.items()}
    return {k: float(v) for k, v in step(state, batch, jax.random.key(2), frozen)[1].items()}

  a = run(segmentors_a)
  assert a["perturbed_fraction"] == 1.0 and a["gt_fraction"] == 0.0
  assert 0 < a["true_error_rate"] < 0.5
  # The segmentors are not run: other weights, the same masks and loss.
  assert run(segmentors_b) == a


@pytest.mark.parametrize("sources, perturbations, message", [
    ({"segmentors": 1.0, "nnunet": 1.0}, None, "unknown source.*nnunet"),
    ({"segmentors": -1.0, "perturbed": 1.0}, None, "must be >= 0"),
    ({"segmentors": 0.0, "perturbed": 0.0}, None, "not all 0"),
    ({"segmentors": 1.0}, {"max_radus": 2}, "predictor.perturbations.*max_radus"),
])
def test_mask_sources_are_checked(sources, perturbations, message):
  with pytest.raises(UserError, match=message):
    mask_sources(sources, perturbations)


def test_mask_sources_default_to_the_segmentors_alone():
  from experiments import base
  config = base.get_config()
  sources = mask_sources(config.predictor.mask_sources, config.predictor.perturbations)
  assert (sources.segmentors, sources.perturbed) == (1.0, 0.0)
  assert sources.perturbations == Settings()
