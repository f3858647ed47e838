"""Quality metrics of error-map predictions and segmentations, the quality indicator (QI) and
the statistics that relate QI to the true segmentation accuracy (paper section 3, Table 1).

Per-mask metrics are pure jnp functions over a batch, jit-compiled here (so the one-hot
comparisons fuse into the reductions even when called eagerly) and usable inside other jitted
code: the first axis is the mask index N, any number of spatial axes S follow, and every
metric comes back as an (N,) float32 vector. Counts are summed in int32 (exact up to
2**31 - 1 voxels per mask) and then cast to float32, which is exact up to 2**24 (16.7M)
voxels and has a relative error under 1e-7 above that; preprocessed MMWHS volumes have
about 1.3M voxels.

Empty-set policy of the error-map scores (error voxels are the positive class, as in the
paper). A perfect mask has an all-zero true error map, and the paper's GT row of Table 1
(DSC 0.25, Prec 0.25, Recl 1 over 20 GT masks) shows how it was scored: a prediction with no
error voxel is perfect (DSC = Prec = Recl = 1), a single false alarm makes it a failure
(DSC = Prec = 0, Recl = 1). So:
  DSC  = 2TP / (2TP + FP + FN), and 1 when nothing is predicted and nothing is true;
  Prec = TP / (TP + FP); with no predicted error voxel, 1 if there is no true error either,
         else 0 (predicting "all correct" for a flawed mask is a failure, as DSC says);
  Recl = TP / (TP + FN), and 1 when there is no true error (nothing to miss);
  Acc  = (TP + TN) / |S|, always defined.

Segmentation DSC is the mean over the foreground classes 1..C-1 present in the label or in
the mask of that sample; a class absent from both has no Dice (NaN per class) and is left
out of the mean, and a sample with no foreground class in either (both all background)
has DSC 1.

QI = 1 - mean of the thresholded predicted error map, so that a perfect prediction gives
exactly the segmentation's voxel accuracy. Thresholding is strict (p > 0.5), which for a
sigmoid output is logit > 0 and matches an argmax that breaks ties towards "correct".

How well QI tracks the true accuracy (PCC, its p-value, MAE) is a report statistic, computed
on the host in float64 by `metrics.quality.correlations`.

Every per-mask metric takes an optional `valid` (N, *S) bool: only those voxels are scored,
as if the others were not there (|S| becomes the number of valid voxels). Scoring a padded
or partial volume this way keeps one compiled program per array shape, where selecting the
valid voxels first (`x[valid]`) would compile one per count of valid voxels.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


# The paper's "thresholded binary map": a voxel is predicted wrong when its error
# probability exceeds this.
ERROR_THRESHOLD = 0.5


@jax.jit
def confusion_counts(pred: jax.Array, target: jax.Array,
                     valid: jax.Array | None = None) -> dict[str, jax.Array]:
  """Per-mask binary confusion counts.

  Args:
    pred: (N, *S) predicted map, bool or integer; nonzero is the positive class.
    target: (N, *S) true map, same convention.
    valid: optional (N, *S) bool, the voxels counted (module docstring); None: all.
  Returns:
    {"tp", "fp", "fn", "tn"}, each (N,) float32 voxel counts; tp + fp + fn + tn is prod(S),
    or the number of valid voxels.
  """
  _check_batch_shapes(pred, target)
  pred, target = pred.astype(bool), target.astype(bool)
  if valid is not None:
    _check_batch_shapes(pred, valid)
    pred, target = pred & valid, target & valid
  spatial = tuple(range(1, pred.ndim))
  tp = jnp.sum(pred & target, axis=spatial, dtype=jnp.int32)
  predicted = jnp.sum(pred, axis=spatial, dtype=jnp.int32)
  actual = jnp.sum(target, axis=spatial, dtype=jnp.int32)
  fp, fn = predicted - tp, actual - tp
  tn = _count(pred, valid) - tp - fp - fn
  return {k: v.astype(jnp.float32) for k, v in (("tp", tp), ("fp", fp), ("fn", fn), ("tn", tn))}


@jax.jit
def error_map_scores(pred_error: jax.Array, true_error: jax.Array,
                     valid: jax.Array | None = None) -> dict[str, jax.Array]:
  """DSC, accuracy, precision and recall of predicted error maps, error voxels positive.

  Args:
    pred_error: (N, *S) binary predicted error map (bool or {0, 1}; see `binary_error_map`).
    true_error: (N, *S) binary true error map (1 where the mask differs from the label).
    valid: optional (N, *S) bool, the voxels scored (module docstring); None: all.
  Returns:
    {"dsc", "acc", "prec", "recl"}, each (N,) float32 in [0, 1], with the empty-set policy
    of the module docstring (empty true map: DSC = Prec = 1 if the prediction is empty too,
    else 0; Recl = 1).
  """
  c = confusion_counts(pred_error, true_error, valid)
  tp, fp, fn, tn = c["tp"], c["fp"], c["fn"], c["tn"]
  no_true_error = (tp + fn) == 0
  return {
      "dsc": _ratio(2.0 * tp, 2.0 * tp + fp + fn, 1.0),
      "acc": (tp + tn) / (tp + fp + fn + tn),
      "prec": _ratio(tp, tp + fp, jnp.where(no_true_error, 1.0, 0.0)),
      "recl": _ratio(tp, tp + fn, 1.0),
  }


@functools.partial(jax.jit, static_argnames="num_classes")
def segmentation_scores(mask: jax.Array, label: jax.Array, num_classes: int,
                        valid: jax.Array | None = None) -> dict[str, jax.Array]:
  """Multi-class Dice and voxel accuracy of segmentation masks against labels.

  Args:
    mask: (N, *S) integer classes in [0, num_classes); 0 is background.
    label: (N, *S) integer ground-truth classes, same range.
    num_classes: C including background (static under jit), at least 2.
    valid: optional (N, *S) bool, the voxels scored (module docstring); None: all.
  Returns:
    "dsc": (N,) float32 mean Dice over the foreground classes present in the label or the
      mask of each sample; 1 when no foreground class is present in either.
    "acc": (N,) float32 fraction of voxels where mask == label.
    "dsc_per_class": (N, C - 1) float32 Dice of classes 1..C-1, NaN where a class is absent
      from both mask and label.
  """
  _check_batch_shapes(mask, label)
  if num_classes < 2:
    raise ValueError(f"num_classes must count background and >= 1 foreground class, "
                     f"got {num_classes}")
  if valid is not None:
    _check_batch_shapes(mask, valid)
  spatial = tuple(range(1, mask.ndim))
  # Comparisons against the class ids fuse into the reductions, so the (N, *S, C) one-hot
  # volumes are never materialised; unlike a scatter-based bincount this has no atomics.
  classes = jnp.arange(1, num_classes)
  mask_is = mask[..., None] == classes
  label_is = label[..., None] == classes
  if valid is not None:
    mask_is, label_is = mask_is & valid[..., None], label_is & valid[..., None]
  tp = jnp.sum(mask_is & label_is, axis=spatial, dtype=jnp.int32).astype(jnp.float32)
  size = (jnp.sum(mask_is, axis=spatial, dtype=jnp.int32)
          + jnp.sum(label_is, axis=spatial, dtype=jnp.int32)).astype(jnp.float32)
  present = size > 0
  dsc_per_class = _ratio(2.0 * tp, size, jnp.nan)
  num_present = jnp.sum(present, axis=-1)
  dsc_sum = jnp.sum(jnp.where(present, dsc_per_class, 0.0), axis=-1)
  agree = mask == label
  correct = jnp.sum(agree if valid is None else agree & valid, axis=spatial,
                    dtype=jnp.int32).astype(jnp.float32)
  return {
      "dsc": _ratio(dsc_sum, num_present.astype(jnp.float32), 1.0),
      "acc": correct / _count(mask, valid).astype(jnp.float32),
      "dsc_per_class": dsc_per_class,
  }


def binary_error_map(error_prob: jax.Array, threshold: float = ERROR_THRESHOLD) -> jax.Array:
  """(N, *S) float error probabilities -> (N, *S) bool error map, True where p > threshold."""
  return error_prob > threshold


@jax.jit
def quality_indicator(error_prob: jax.Array, threshold: float = ERROR_THRESHOLD,
                      valid: jax.Array | None = None) -> jax.Array:
  """QI: estimated voxel accuracy of each mask from its predicted error probabilities.

  Args:
    error_prob: (N, *S) float probability that each voxel of the mask is wrong.
    threshold: a voxel counts as an error when its probability is strictly above this.
    valid: optional (N, *S) bool, the voxels scored (module docstring); None: all.
  Returns:
    (N,) float32, 1 - fraction of (valid) voxels predicted wrong.
  """
  spatial = tuple(range(1, error_prob.ndim))
  wrong = binary_error_map(error_prob, threshold)
  if valid is not None:
    _check_batch_shapes(error_prob, valid)
    wrong = wrong & valid
  errors = jnp.sum(wrong, axis=spatial, dtype=jnp.int32)
  return 1.0 - errors.astype(jnp.float32) / _count(error_prob, valid).astype(jnp.float32)


@jax.jit
def soft_quality_indicator(error_prob: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """Threshold-free QI: (N, *S) float error probabilities -> (N,) float32 1 - mean(p),
  the mean over the `valid` voxels when given ((N, *S) bool)."""
  spatial = tuple(range(1, error_prob.ndim))
  p = error_prob.astype(jnp.float32)
  if valid is None:
    return 1.0 - jnp.mean(p, axis=spatial)
  _check_batch_shapes(error_prob, valid)
  return 1.0 - (jnp.sum(jnp.where(valid, p, 0.0), axis=spatial)
                / _count(p, valid).astype(jnp.float32))


def _ratio(num: jax.Array, den: jax.Array, empty: float | jax.Array) -> jax.Array:
  """num / den, and `empty` where den == 0 (no NaN created, so gradients stay finite)."""
  nonzero = den != 0
  return jnp.where(nonzero, num / jnp.where(nonzero, den, 1.0), empty)


def _count(a: jax.Array, valid: jax.Array | None) -> jax.Array:
  """Voxels per sample of an (N, *S) array, int32: prod(S), or the (N,) count of `valid`."""
  if valid is None:
    return jnp.int32(math.prod(a.shape[1:]))
  return jnp.sum(valid, axis=tuple(range(1, valid.ndim)), dtype=jnp.int32)


def _check_batch_shapes(a: jax.Array, b: jax.Array) -> None:
  if a.shape != b.shape or a.ndim < 2:
    raise ValueError(f"expected two (N, *S) arrays of one shape with at least one spatial "
                     f"axis, got {a.shape} and {b.shape}")
