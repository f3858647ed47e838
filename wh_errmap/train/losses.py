"""Segmentation and error-map losses: cross entropy + soft Dice on every deeply supervised output.

All losses are computed in float32 (logits of a bf16 model are cast) and reduce to a scalar.
Soft Dice is computed per sample and class and smoothed by `eps` in numerator and
denominator (Dice = (2|P.G| + eps) / (|P| + |G| + eps)). This makes it finite everywhere:
a class absent from both the label and the prediction has Dice 1 (no loss), and a class
absent from the label but predicted has Dice eps / (|P| + eps), which pushes its
probabilities down. eps = 1 (one voxel) leaves the Dice of structures of hundreds of voxels
practically unchanged, while with a tiny eps a random crop that misses a small structure,
or the all-zero error map of a perfect mask, would turn a few stray probability-0.01 voxels
into a Dice near 0 and a large, noisy gradient.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from wh_errmap.errors import UserError
from wh_errmap.models.factory import SEGMENTORS

# Dice smoothing: one voxel's worth in numerator and denominator (see module docstring).
DICE_EPS = 1.0


def batch_dice(config: Any, name: str) -> bool:
  """Whether segmentor `name` pools its soft Dice over the batch (config.loss.batch_dice)."""
  names = config.loss.batch_dice
  names = (names,) if isinstance(names, str) else tuple(names or ())
  unknown = sorted(set(names) - set(SEGMENTORS))
  if unknown:
    raise UserError(f"loss.batch_dice names {', '.join(map(repr, unknown))}: it lists "
                    f"segmentors, out of {', '.join(SEGMENTORS)} (or is empty)")
  return name in names


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean multi-class cross entropy over all voxels.

  Args:
    logits: (N, *S, C) float logits.
    labels: (N, *S) integer class indices in [0, C).
  Returns:
    float32 scalar.
  """
  # Picking the label's log-probability with a one-hot product rather than optax's
  # take_along_axis(...).take(0): the gradient of that gather is a scatter with constant
  # indices and updates, which XLA spent ~3 s of every compilation constant-folding.
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
  return -jnp.mean(jnp.sum(log_probs * onehot, axis=-1))


def soft_dice_loss(logits: jax.Array, labels: jax.Array, num_classes: int,
                   eps: float = DICE_EPS, include_background: bool = False,
                   over_batch: bool = False) -> jax.Array:
  """1 - mean soft Dice of softmax probabilities against one-hot labels.

  Args:
    logits: (N, *S, num_classes) float logits.
    labels: (N, *S) integer class indices in [0, num_classes).
    num_classes: C, including background (class 0).
    eps: smoothing added to numerator and denominator of each sample's and class's Dice.
    include_background: whether class 0 takes part in the mean. Off by default: background
      Dice is near 1 from the first steps, so including it only dilutes the structures'
      gradient (cross entropy already covers background), and the reported segmentation
      DSC is the mean over the foreground classes too.
    over_batch: one Dice per class over the whole batch ("batch Dice") instead of one per
      sample and class. For 2D slices most samples hold only some structures: per sample,
      a structure absent from a slice scores Dice ~1 when not predicted and ~0 when a few
      voxels are, so small structures (AO, PA, LA) are mostly pushed down; pooled over the
      batch, each structure's Dice weighs its voxels wherever they are.
  Returns:
    float32 scalar in [0, 1].
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if not include_background:
    probs, onehot = probs[..., 1:], onehot[..., 1:]
  return 1.0 - _soft_dice(probs, onehot, eps, over_batch).mean()


def binary_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean sigmoid cross entropy over all voxels.

  Args:
    logits: (N, *S) or (N, *S, 1) float logits of the positive class.
    targets: (N, *S) {0, 1} targets (bool, int or float).
  Returns:
    float32 scalar.
  """
  logits = _squeeze_channel(logits, targets)
  return optax.sigmoid_binary_cross_entropy(logits, targets.astype(jnp.float32)).mean()


def binary_soft_dice_loss(logits: jax.Array, targets: jax.Array,
                          eps: float = DICE_EPS) -> jax.Array:
  """1 - mean over samples of the soft Dice of the positive class (target 1).

  Args:
    logits: (N, *S) or (N, *S, 1) float logits of the positive class.
    targets: (N, *S) {0, 1} targets; an all-zero sample gives Dice eps / (sum(p) + eps).
    eps: smoothing added to numerator and denominator.
  Returns:
    float32 scalar in [0, 1].
  """
  probs = jax.nn.sigmoid(_squeeze_channel(logits, targets))
  return 1.0 - _soft_dice(probs[..., None], targets.astype(jnp.float32)[..., None], eps).mean()


def segmentation_loss(outputs: Mapping[str, jax.Array], labels: jax.Array, num_classes: int,
                      side_weights: Sequence[float | jax.Array], dice_weight: float = 1.0,
                      include_background: bool = False, batch_dice: bool = False,
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Deeply supervised CE + soft Dice of a segmentor.

  Args:
    outputs: the model's {"final": ..., side names: ...}, each (N, *S, num_classes) logits.
    labels: (N, *S) integer classes.
    num_classes: C including background.
    side_weights: one weight per side output, paired with the side names in sorted order
      (side2..side5 of VoxResNet: shallow to deep); "final" has weight 1. They may be traced
      scalars, so a schedule that decays deep supervision can set them inside a jitted step.
    dice_weight: weight of the Dice term relative to CE in each output.
    include_background: see `soft_dice_loss`.
    batch_dice: Dice pooled over the batch (`soft_dice_loss(over_batch=True)`).
  Returns:
    (total loss, aux) where aux maps "loss" and "<output>/ce", "<output>/dice" to float32
    scalars for logging.
  """
  return _deeply_supervised(
      outputs, side_weights, dice_weight,
      ce=lambda logits: softmax_cross_entropy(logits, labels),
      dice=lambda logits: soft_dice_loss(logits, labels, num_classes,
                                         include_background=include_background,
                                         over_batch=batch_dice))


def error_map_loss(outputs: Mapping[str, jax.Array], error_targets: jax.Array,
                   side_weights: Sequence[float | jax.Array], dice_weight: float = 1.0,
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Deeply supervised binary CE + binary soft Dice of the error-map predictor.

  Args:
    outputs: the model's {"final": ..., side names: ...}, each (N, *S, 1) error logits.
    error_targets: (N, *S) {0, 1} true error map (1 where the input mask is wrong).
    side_weights, dice_weight: as in `segmentation_loss`.
  Returns:
    (total loss, aux) as in `segmentation_loss`.
  """
  return _deeply_supervised(
      outputs, side_weights, dice_weight,
      ce=lambda logits: binary_cross_entropy(logits, error_targets),
      dice=lambda logits: binary_soft_dice_loss(logits, error_targets))


def _soft_dice(probs: jax.Array, targets: jax.Array, eps: float,
               over_batch: bool = False) -> jax.Array:
  """(N, K) smoothed Dice per sample and class of (N, *S, K) probabilities and targets, or
  (1, K) per class over the whole batch when over_batch."""
  spatial = tuple(range(0 if over_batch else 1, probs.ndim - 1))
  intersection = jnp.sum(probs * targets, axis=spatial)
  denominator = jnp.sum(probs, axis=spatial) + jnp.sum(targets, axis=spatial)
  dice = (2.0 * intersection + eps) / (denominator + eps)
  return dice[None] if over_batch else dice


def _squeeze_channel(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """float32 logits shaped like targets, dropping a trailing channel axis of size 1."""
  if logits.ndim == targets.ndim + 1 and logits.shape[-1] == 1:
    logits = logits[..., 0]
  if logits.shape != targets.shape:
    raise ValueError(f"logits {logits.shape} do not match targets {targets.shape}")
  return logits.astype(jnp.float32)


def _deeply_supervised(outputs: Mapping[str, jax.Array],
                       side_weights: Sequence[float | jax.Array], dice_weight: float, *,
                       ce: Callable[[jax.Array], jax.Array],
                       dice: Callable[[jax.Array], jax.Array],
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """sum over outputs of weight * (ce + dice_weight * dice), "final" weighted 1."""
  sides = sorted(name for name in outputs if name != "final")
  if "final" not in outputs or len(sides) != len(side_weights):
    raise ValueError(f"expected 'final' and {len(side_weights)} side outputs (one per side "
                     f"weight), got {sorted(outputs)}")
  aux = {}
  total = jnp.zeros((), jnp.float32)
  for name, weight in zip(["final", *sides], [1.0, *side_weights]):
    aux[f"{name}/ce"] = ce(outputs[name])
    aux[f"{name}/dice"] = dice(outputs[name])
    total = total + weight * (aux[f"{name}/ce"] + dice_weight * aux[f"{name}/dice"])
  aux["loss"] = total
  return total, aux
