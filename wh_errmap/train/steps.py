"""Pure training steps `(state, batch, rng) -> (state, metrics)`.

They are plain functions of arrays: the loop compiles them once with the mesh's shardings
(batch split over 'data', state replicated) and donates the state.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from wh_errmap.models.inference import predictor_input
from wh_errmap.models.voxresnet import VoxResNet
from wh_errmap.train.losses import error_map_loss, segmentation_loss
from wh_errmap.train.masks import (AUTO_MASK_TYPES, MaskSources, auto_masks, perturbed_masks,
                                   pick_masks)
from wh_errmap.train.state import TrainState

Batch = dict[str, jax.Array]
StepFn = Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict[str, jax.Array]]]


def apply_train(model: VoxResNet, state: TrainState, params: Any,
                inputs: jax.Array) -> tuple[dict[str, jax.Array], Any]:
  """Training-mode forward pass; returns (outputs, new batch_stats)."""
  outputs, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, inputs,
                                 train=True, mutable=["batch_stats"])
  return outputs, updates["batch_stats"]


def make_segmentor_step(model: VoxResNet, loss: ml_collections.ConfigDict,
                        batch_dice: bool = False) -> StepFn:
  """Step of a segmentor on {"image": (N, *S, 1) float32, "label": (N, *S) int32}.

  batch_dice: the soft Dice is pooled over the batch (`losses.soft_dice_loss`).
  """

  def train_step(state: TrainState, batch: Batch, rng: jax.Array):
    del rng  # no stochastic layers; the signature is shared with the predictor step

    def loss_fn(params):
      outputs, batch_stats = apply_train(model, state, params, batch["image"])
      total, aux = segmentation_loss(outputs, batch["label"], model.num_classes,
                                     loss.side_weights, loss.dice_weight,
                                     batch_dice=batch_dice)
      return total, (aux, batch_stats)

    (_, (aux, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads, batch_stats), aux

  return train_step


def make_predictor_step(model: VoxResNet, seg3d: VoxResNet, seg2d: VoxResNet,
                        loss: ml_collections.ConfigDict, gt_probability: float,
                        num_classes: int, sources: MaskSources = MaskSources()) -> Callable:
  """Step of the error-map predictor: `(state, batch, rng, frozen) -> (state, metrics)`.

  frozen: {"seg3d": variables, "seg2d": variables} of the trained segmentors. They are
  arguments, not constants, and get no gradient: inside the step they generate the 10 auto
  masks of each crop, one mask per sample is picked (or the ground truth), and the
  predictor learns its error map `mask != label`. With `sources.perturbed` > 0, each
  sample instead takes a perturbed ground truth with probability `sources.perturbed_share`,
  and with `sources.precomputed` > 0 the batch's "mask" (where "has_mask") with probability
  `sources.precomputed_share` (the segmentors are not run at all when their weight is 0;
  then a sample that drew a carried mask trains on the ground truth instead with probability
  `gt_probability`, as `pick_masks` does for in-step masks).
  """
  num_auto = len(AUTO_MASK_TYPES)

  def train_step(state: TrainState, batch: Batch, rng: jax.Array, frozen: dict[str, Any]):
    frozen = jax.lax.stop_gradient(frozen)
    label = batch["label"]
    n = label.shape[0]
    mixed = sources.perturbed > 0 or sources.precomputed > 0
    if mixed:
      # Only then is the key split: the segmentor-only step draws exactly as before.
      rng, perturb_rng, share_rng = jax.random.split(rng, 3)
      draw = jax.random.uniform(share_rng, (n,))
    if sources.segmentors > 0:
      masks = auto_masks((seg3d, frozen["seg3d"]), (seg2d, frozen["seg2d"]), batch["image"])
      mask, choice = pick_masks(masks, label, rng, gt_probability)
    else:
      mask, choice = label.astype(jnp.int32), jnp.full((n,), num_auto, jnp.int32)
    per_sample = (n, *([1] * (label.ndim - 1)))
    perturbed = precomputed = jnp.zeros((n,), bool)
    if sources.perturbed > 0:
      perturbed = draw < sources.perturbed_share
      synthetic = perturbed_masks(label, perturb_rng, sources.perturbations, num_classes)
      mask = jnp.where(perturbed.reshape(per_sample), synthetic, mask)
    if sources.precomputed > 0:
      low = sources.perturbed_share
      precomputed = ((draw >= low) & (draw < low + sources.precomputed_share)
                     & batch["has_mask"])
      if sources.segmentors == 0 and gt_probability > 0:
        # The segmentors' masks are carried ("case"): the ground truth is drawn here.
        keep = jax.random.uniform(jax.random.fold_in(share_rng, 1), (n,)) >= gt_probability
        precomputed = precomputed & keep
      mask = jnp.where(precomputed.reshape(per_sample), batch["mask"], mask)
    inputs = predictor_input(batch["image"], mask, num_classes)
    error = (mask != label).astype(jnp.float32)

    def loss_fn(params):
      outputs, batch_stats = apply_train(model, state, params, inputs)
      total, aux = error_map_loss(outputs, error, loss.side_weights, loss.dice_weight)
      return total, (aux, batch_stats)

    (_, (aux, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    aux = {**aux, "true_error_rate": error.mean(),
           "gt_fraction": ((choice == num_auto) & ~perturbed & ~precomputed).mean()}
    if sources.perturbed > 0:
      aux["perturbed_fraction"] = perturbed.mean()
    if sources.precomputed > 0:
      aux["precomputed_fraction"] = precomputed.mean()
    return state.apply_gradients(grads, batch_stats), aux

  return train_step
