"""Masks generated on the device for the predictor's training step.

The paper collects each segmentor's fused and side outputs as training masks for the
error-map predictor. Here they are produced inside the predictor's jitted step from the
segmentors' parameters (step arguments, never updated), so no mask is written to disk or
crosses to the host, and every augmented crop gets fresh masks. A second source
(`MaskSources.perturbed`, off by default) perturbs the crop's ground truth with synthetic
errors of known kinds (`train.perturbations`), so the predictor also sees errors that
its own segmentors do not make.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from wh_errmap.errors import UserError
from wh_errmap.models.inference import segment_volume, slicewise
from wh_errmap.models.voxresnet import OUTPUT_NAMES, VoxResNet
from wh_errmap.train.perturbations import Settings, erode_dilate, perturb, settings_from_mapping

# Mask types in the order of `auto_masks`; "gt" is the ground truth itself.
AUTO_MASK_TYPES = tuple(f"{dims}-{output}" for dims in ("3d", "2d") for output in OUTPUT_NAMES)
MASK_TYPES = AUTO_MASK_TYPES + ("gt",)


def auto_masks(seg3d: tuple[VoxResNet, Any], seg2d: tuple[VoxResNet, Any],
               image: jax.Array) -> jax.Array:
  """The 10 auto masks of every volume in a batch.

  Args:
    seg3d, seg2d: (model, variables) of the frozen segmentors.
    image: (N, X, Y, Z, 1) float32.
  Returns:
    (10, N, X, Y, Z) int32 class maps in the order of AUTO_MASK_TYPES.
  """
  model3d, variables3d = seg3d
  model2d, variables2d = seg2d
  outputs3d = model3d.apply(variables3d, image, train=False)
  outputs2d = slicewise(model2d, variables2d, image)
  return jnp.stack([jnp.argmax(outputs[name], axis=-1).astype(jnp.int32)
                    for outputs in (outputs3d, outputs2d) for name in OUTPUT_NAMES])


def case_masks(seg3d: tuple[VoxResNet, Any], seg2d: tuple[VoxResNet, Any],
               images: Sequence[np.ndarray]) -> list[np.ndarray]:
  """The 10 auto masks of whole cases, made once on the host side (one device).

  Args:
    seg3d, seg2d: (model, variables) of the trained segmentors.
    images: (X, Y, Z) float32 preprocessed volumes, each of its own shape.
  Returns:
    One (10, X, Y, Z) uint8 array per image, in the order of AUTO_MASK_TYPES.
  """
  out = []
  for image in images:
    outputs = [segment_volume(model, variables, np.asarray(image)[..., None])
               for model, variables in (seg3d, seg2d)]
    out.append(np.stack([o[name] for o in outputs for name in OUTPUT_NAMES]).astype(np.uint8))
  return out


def pick_masks(masks: jax.Array, label: jax.Array, rng: jax.Array,
               gt_probability: float) -> tuple[jax.Array, jax.Array]:
  """Chooses one training mask per sample.

  Args:
    masks: (M, N, *S) auto masks; label: (N, *S) ground truth.
    gt_probability: chance of training on the ground truth itself; otherwise one of the M
      auto masks, uniformly.
  Returns:
    ((N, *S) int32 chosen masks, (N,) int32 index into MASK_TYPES, M meaning "gt").
  """
  num_auto, n = masks.shape[:2]
  auto_rng, gt_rng = jax.random.split(rng)
  choice = jax.random.randint(auto_rng, (n,), 0, num_auto)
  choice = jnp.where(jax.random.uniform(gt_rng, (n,)) < gt_probability, num_auto, choice)
  candidates = jnp.concatenate([masks, label[None].astype(masks.dtype)])
  chosen = jnp.take_along_axis(candidates, choice.reshape(1, n, *([1] * (masks.ndim - 2))),
                               axis=0)[0]
  return chosen, choice


@dataclasses.dataclass(frozen=True)
class MaskSources:
  """Where the predictor's training masks come from, as relative weights per sample.

  segmentors: the frozen segmentors' 10 outputs (the paper's masks; `pick_masks`).
  perturbed: the crop's ground truth with synthetic errors (`perturbations.perturb`; a
    sample that no perturbation changed gets an erosion or dilation, so every perturbed
    mask is wrong somewhere).
  precomputed: masks of other segmentors from folders (`train.precomputed`), carried
    by the batch; a sample of a case without one keeps its segmentor mask.
  Hashable: the step closes over it as a constant.
  """
  segmentors: float = 1.0
  perturbed: float = 0.0
  precomputed: float = 0.0
  perturbations: Settings = Settings()

  @property
  def perturbed_share(self) -> float:
    return self.perturbed / (self.segmentors + self.perturbed + self.precomputed)

  @property
  def precomputed_share(self) -> float:
    return self.precomputed / (self.segmentors + self.perturbed + self.precomputed)


def mask_sources(sources: Mapping[str, Any], perturbations: Mapping[str, Any] | None = None
                 ) -> MaskSources:
  """MaskSources from config.predictor.mask_sources and .perturbations, checked.

  Raises UserError naming an unknown source or setting, a negative weight, or all zero.
  """
  sources = dict(sources)
  known = [f.name for f in dataclasses.fields(MaskSources) if f.name != "perturbations"]
  unknown = sorted(set(sources) - set(known))
  if unknown:
    raise UserError(f"predictor.mask_sources has unknown source(s) {', '.join(unknown)}; "
                    f"known: {', '.join(known)}")
  weights = {name: float(sources.get(name, 0.0)) for name in known}
  if any(w < 0 for w in weights.values()) or not sum(weights.values()) > 0:
    raise UserError(f"predictor.mask_sources weights must be >= 0 and not all 0, got "
                    f"{weights}")
  try:
    settings = settings_from_mapping(perturbations or {})
  except ValueError as e:
    raise UserError(f"predictor.perturbations: {e}") from None
  return MaskSources(**weights, perturbations=settings)


def predictor_mask_sources(config: Any) -> MaskSources:
  """config.predictor.mask_sources and .perturbations, checked (UserError)."""
  predictor = config.predictor
  return mask_sources(predictor.get("mask_sources", {"segmentors": 1.0}),
                      predictor.get("perturbations"))


def perturbed_masks(label: jax.Array, rng: jax.Array, settings: Settings,
                    num_classes: int) -> jax.Array:
  """(N, *S) ground truth -> (N, *S) int32 masks with at least one synthetic error each
  (unless a sample has no structure to erode or dilate)."""
  label = label.astype(jnp.int32)
  rng, fallback_rng = jax.random.split(rng)
  masks = perturb(label, rng, settings, num_classes)
  unchanged = jnp.all(masks == label, axis=tuple(range(1, label.ndim)))
  fallback = erode_dilate(label, fallback_rng, settings.max_radius, num_classes)
  return jnp.where(unchanged.reshape(-1, *([1] * (label.ndim - 1))), fallback, masks)
