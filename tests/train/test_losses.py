"""Losses against numpy and hand-computed values; safety for absent classes; deep supervision."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wh_errmap.train import losses


def log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def onehot_logits(labels, num_classes, scale=50.0):
  return scale * jax.nn.one_hot(labels, num_classes)


@pytest.mark.parametrize("shape", [(2, 5, 4, 3), (3, 6, 5)])
def test_cross_entropy_matches_numpy(shape):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(*shape, 4)).astype(np.float32) * 3
  labels = rng.integers(0, 4, size=shape)
  expected = -np.take_along_axis(log_softmax(logits), labels[..., None], axis=-1).mean()
  np.testing.assert_allclose(losses.softmax_cross_entropy(logits, labels), expected, rtol=1e-5)


def test_dice_of_perfect_logits_is_zero():
  labels = np.random.default_rng(1).integers(0, 3, size=(2, 6, 5, 4))
  for include_background in (False, True):
    loss = losses.soft_dice_loss(onehot_logits(labels, 3), labels, 3,
                                 include_background=include_background)
    assert loss == pytest.approx(0.0, abs=1e-6)


def test_dice_hand_computed():
  # One sample, 4 voxels, classes {0, 1, 2}: probabilities given by log-probability logits.
  probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
  labels = np.array([[0, 1, 1, 0]])
  logits = np.log(probs)[None]
  # Class 1: intersection 0.8 + 0.3, |P| = 1.6, |G| = 2. Class 2: intersection 0, |P| = 0.8.
  dice1 = (2 * 1.1 + 1) / (1.6 + 2 + 1)
  dice2 = (0 + 1) / (0.8 + 0 + 1)
  dice0 = (2 * 1.3 + 1) / (1.6 + 2 + 1)
  np.testing.assert_allclose(losses.soft_dice_loss(logits, labels, 3),
                             1 - (dice1 + dice2) / 2, rtol=1e-5)
  np.testing.assert_allclose(losses.soft_dice_loss(logits, labels, 3, include_background=True),
                             1 - (dice0 + dice1 + dice2) / 3, rtol=1e-5)
  np.testing.assert_allclose(losses.soft_dice_loss(logits, labels, 3, eps=1e-3),
                             1 - (2.2 / 3.6 + 0) / 2, atol=2e-3)


def test_dice_is_per_sample():
  # Sample 0 is perfect, sample 1 predicts class 1 where the label is 2. Batch Dice would
  # pool the samples (0.6 for both classes); per-sample Dice averages 1, 1, 1/3, 1/3.
  labels = np.array([[1, 2], [2, 2]])
  logits = onehot_logits(np.array([[1, 2], [1, 1]]), 3)
  per_class_1 = (0 + 1) / (2 + 0 + 1)  # sample 1, class 1: predicted twice, absent in label
  per_class_2 = (0 + 1) / (0 + 2 + 1)
  expected = 1 - (1 + 1 + per_class_1 + per_class_2) / 4
  np.testing.assert_allclose(losses.soft_dice_loss(logits, labels, 3, eps=1.0), expected,
                             rtol=1e-5)


def test_batch_dice_pools_the_samples():
  # The example above pooled over the batch: class 1 predicted 3 times, labelled once, hit
  # once; class 2 predicted once, labelled 3 times, hit once: Dice (2 + 1) / (4 + 1) each.
  labels = np.array([[1, 2], [2, 2]])
  logits = onehot_logits(np.array([[1, 2], [1, 1]]), 3)
  np.testing.assert_allclose(losses.soft_dice_loss(logits, labels, 3, over_batch=True), 0.4,
                             rtol=1e-5)
  outputs = {name: logits for name in ("final", "side2")}
  for batch_dice, expected in ((True, 0.4), (False, 1 - (2 + 2 / 3) / 4)):
    _, aux = losses.segmentation_loss(outputs, labels, 3, (1.0,), batch_dice=batch_dice)
    np.testing.assert_allclose([aux["final/dice"], aux["side2/dice"]], expected, rtol=1e-5)


def test_absent_classes_give_finite_loss_and_gradient():
  labels = np.zeros((2, 4, 4, 3), np.int32)  # only background present
  for logits in (onehot_logits(labels, 8), jnp.zeros((2, 4, 4, 3, 8))):
    for eps in (1.0, 1e-7):
      loss, grad = jax.value_and_grad(
          lambda z: losses.soft_dice_loss(z, labels, 8, eps=eps, include_background=True))(logits)
      assert np.isfinite(loss) and np.isfinite(grad).all()
  # Absent from both label and (confident) prediction: Dice 1, so perfect logits give ~0.
  assert losses.soft_dice_loss(onehot_logits(labels, 8), labels, 8) == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("channel_axis", [False, True])
def test_binary_losses_match_numpy(channel_axis):
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(3, 5, 4, 2)).astype(np.float32) * 4
  targets = rng.integers(0, 2, size=logits.shape)
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  expected_ce = -(targets * np.log(p) + (1 - targets) * np.log(1 - p)).mean()
  axes = (1, 2, 3)
  dice = (2 * (p * targets).sum(axes) + 1) / (p.sum(axes) + targets.sum(axes) + 1)
  model_logits = logits[..., None] if channel_axis else logits
  np.testing.assert_allclose(losses.binary_cross_entropy(model_logits, targets), expected_ce,
                             rtol=1e-5)
  np.testing.assert_allclose(losses.binary_soft_dice_loss(model_logits, targets),
                             1 - dice.mean(), rtol=1e-5)


def test_binary_losses_are_safe_for_all_zero_targets():
  targets = np.zeros((2, 6, 6), np.int32)
  for logits in (jnp.full((2, 6, 6, 1), -30.0), jnp.zeros((2, 6, 6, 1))):
    for loss_fn in (losses.binary_cross_entropy, losses.binary_soft_dice_loss):
      loss, grad = jax.value_and_grad(loss_fn)(logits, targets)
      assert np.isfinite(loss) and np.isfinite(grad).all()
  # Confidently no errors on a perfect mask: both losses ~0.
  assert losses.binary_soft_dice_loss(jnp.full((2, 6, 6), -30.0), targets) < 1e-6
  assert losses.binary_cross_entropy(jnp.full((2, 6, 6), -30.0), targets) < 1e-6


def test_binary_losses_reject_mismatched_shapes():
  with pytest.raises(ValueError, match="do not match"):
    losses.binary_cross_entropy(jnp.zeros((2, 4, 4, 2)), jnp.zeros((2, 4, 4)))


def random_outputs(rng, shape, channels):
  names = ("final", "side2", "side3", "side4", "side5")
  return {name: rng.normal(size=(*shape, channels)).astype(np.float32) for name in names}


def test_segmentation_loss_sums_weighted_terms():
  rng = np.random.default_rng(3)
  outputs = random_outputs(rng, (2, 4, 4, 3), 5)
  labels = rng.integers(0, 5, size=(2, 4, 4, 3))
  side_weights = (0.5, 0.25, 0.125, 0.0625)
  loss, aux = losses.segmentation_loss(outputs, labels, 5, side_weights, dice_weight=2.0)
  expected = 0.0
  for name, weight in zip(("final", "side2", "side3", "side4", "side5"), (1.0, *side_weights)):
    ce = losses.softmax_cross_entropy(outputs[name], labels)
    dice = losses.soft_dice_loss(outputs[name], labels, 5)
    np.testing.assert_allclose(aux[f"{name}/ce"], ce, rtol=1e-6)
    np.testing.assert_allclose(aux[f"{name}/dice"], dice, rtol=1e-6)
    expected += weight * (ce + 2.0 * dice)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(aux["loss"], loss)


def test_error_map_loss_sums_weighted_terms_with_traced_weights():
  rng = np.random.default_rng(4)
  same = rng.normal(size=(2, 8, 8, 1)).astype(np.float32)
  outputs = {name: same for name in ("final", "side2", "side3", "side4", "side5")}
  targets = rng.integers(0, 2, size=(2, 8, 8))
  per_output = (losses.binary_cross_entropy(same, targets)
                + losses.binary_soft_dice_loss(same, targets))
  # Weights as traced scalars: a decaying deep-supervision schedule runs inside jit.
  loss_fn = jax.jit(lambda w: losses.error_map_loss(outputs, targets, list(w))[0])
  np.testing.assert_allclose(loss_fn(jnp.array([1.0, 1.0, 1.0, 1.0])), 5 * per_output, rtol=1e-5)
  np.testing.assert_allclose(loss_fn(jnp.array([0.0, 0.0, 0.0, 0.0])), per_output, rtol=1e-5)


def test_deep_supervision_checks_side_weight_count():
  rng = np.random.default_rng(5)
  outputs = random_outputs(rng, (1, 4, 4), 3)
  with pytest.raises(ValueError, match="side weight"):
    losses.segmentation_loss(outputs, np.zeros((1, 4, 4), np.int32), 3, (1.0, 1.0))
