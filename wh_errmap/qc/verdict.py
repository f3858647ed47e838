"""The verdict of one assessed mask, and the checks that a case is unlike the training data.

The verdict is the first rule that applies:
- `fail`: the mask is empty;
- `out_of_distribution`: the scan looks like another modality than the predictor's
  training scans (`modality_reasons`; `allow_modality` overrides it), or the case is unlike
  the predictor's training data (`ood_reasons`), so its scores are not trusted;
- `fail`: the mask misses a structure of its convention;
- `fail`: mean predicted Dice below `failure_dice`;
- `review`: mean predicted Dice below `failure_dice + review_band`, or one structure's
  predicted Dice below `failure_dice`, or (calibrated predictors) the lower bound on the
  true mean Dice below `failure_dice`;
- `ok` otherwise.
The mean is over the structures of the mask's convention; a missing one counts as 0.
A predictor calibrated on the user's own cases (`--experiment=calibrate`) brings its
error threshold, calibrated Dice (which the rules then read instead of the predicted
Dice) and per-structure lower bounds on the true Dice (`qc.calibration`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from wh_errmap.data.labels import LabelConvention
from wh_errmap.data.modality import evidence, looks_like
from wh_errmap.data.structures import NUM_CLASSES, STRUCTURES
from wh_errmap.data.training_reference import (appearance_distance, histogram_distance,
                                                intensity_histogram)

VERDICTS = ("ok", "review", "fail", "out_of_distribution")   # from best to worst


@dataclasses.dataclass(frozen=True)
class Settings:
  """Thresholds of the verdicts (config: predictor.threshold, report.*, qc.*)."""
  threshold: float = 0.5          # error probability above which a voxel counts as wrong
  failure_dice: float = 0.75      # mean predicted Dice below this: fail
  review_band: float = 0.10       # ... below failure_dice + this: review
  min_real_fraction: float = 0.5  # scan share of the assessed box below this: OOD
  volume_factor: float = 2.0      # structure volume outside [min / f, max * f] of training
  intensity_margin: float = 0.25  # histogram distance above training's largest + this
  appearance_factor: float = 1.2  # appearance distance above training's limit times this
  allow_modality: bool = False    # a scan of another modality is assessed, not OOD

  @classmethod
  def from_config(cls, config) -> "Settings":
    return cls(float(config.threshold), float(config.report.failure_dice),
               float(config.report.review_band), float(config.qc.min_real_fraction),
               float(config.qc.volume_factor), float(config.qc.intensity_margin),
               float(config.qc.appearance_factor), bool(config.allow_modality))


_SEEN_AS = {"ct": "CT in Hounsfield units", "mr": "MR, not CT in Hounsfield units"}


def modality_reasons(profile: dict[str, float], convention: LabelConvention,
                     reference: dict | None) -> list[str]:
  """Why a scan looks like another modality than the predictor's training scans (empty: it
  does not, or the reference records no modality, as before it was recorded):
    - its raw intensity `profile` (`data.modality.intensity_profile`) looks like the other
      modality (`looks_like`), as none of the training scans' profiles did;
    - its masks' label `convention` is made for the other modality's images (TotalSegmentator's
      CT task, a dataset.json's channel names), and the intensities do not say that the scan
      is of the training modality after all (they, not the masks' origin, are the scan's).
  """
  model = (reference or {}).get("modality")
  if model is None:
    return []
  looks = looks_like(profile)
  trained = {looks_like(p) for p in reference["intensity_profiles"]}
  reasons = []
  if looks not in (None, model, *trained):
    reasons.append(f"the image looks like {_SEEN_AS[looks]} ({evidence(profile)}) while the "
                   f"model was trained on {model.upper()}")
  if convention.modality not in (None, model) and looks != model:
    reasons.append(f"the masks' label convention {convention.name} is made for "
                   f"{convention.modality.upper()} images while the model was trained on "
                   f"{model.upper()}")
  return reasons


def modality_notice(reference: dict | None, allow: bool) -> str | None:
  """The line a predict run states once about the modality check: that the predictor's
  reference predates it, or what `allow_modality` overrides; None when the check runs as
  usual (or there is no reference at all, which predict states itself)."""
  if reference is None:
    return None
  model = reference.get("modality")
  if model is None:
    return ("warning: the predictor records no training modality (made before it was "
            "recorded): scans are not checked for another modality; export the model again, "
            "or run its fold again, to record it")
  if allow:
    return (f"warning: --allow_modality: scans that look like another modality than the "
            f"model's training scans ({model.upper()}), by their intensities or their masks' "
            f"label convention, are assessed as {model.upper()} instead of out_of_distribution "
            f"(each result's modality.findings names what was overridden)")
  return None


def ood_reasons(image: np.ndarray, mask: np.ndarray, valid: np.ndarray, properties: dict,
                reference: dict | None, settings: Settings) -> list[str]:
  """Why a case is unlike the predictor's training data (empty: it is not):
    - the scan covers less than `min_real_fraction` of the assessed box (a small field of
      view: most of what the predictor would see is padding);
    - a structure's volume is outside the training range widened by `volume_factor`;
    - the histogram of preprocessed intensities is farther from the training one (total
      variation distance) than any training case's, plus `intensity_margin`;
    - the image inside the mask's structures looks unlike any training case's heart
      (`data.training_reference.appearance`): its distance to the nearest training
      description exceeds the reference's leave-one-case-out limit times
      `appearance_factor` (another anatomy, contrast or patient than the mask's).
  Without a training reference only the first check runs; a reference made before
  appearances were recorded skips the last.
  """
  reasons = []
  fraction = float(valid.mean())
  if fraction < settings.min_real_fraction:
    extent = np.asarray(properties["canonical_shape"]) * np.asarray(
        properties["canonical_spacing"])
    reasons.append(f"the scan covers {fraction:.0%} of the assessed heart box (field of view "
                   f"{' x '.join(f'{e:.0f}' for e in extent)} mm)")
  if reference is None:
    return reasons
  ml = float(np.prod(properties["spacing"])) / 1000.0
  counts = np.bincount(mask.ravel(), minlength=NUM_CLASSES)
  f = settings.volume_factor
  for c, name in enumerate(STRUCTURES, start=1):
    low, high = reference["volume_ml"][name]
    volume = counts[c] * ml
    if counts[c] and not low / f <= volume <= high * f:
      reasons.append(f"{name} volume {volume:.1f} ml is outside the training range "
                     f"{low:.1f}-{high:.1f} ml (x{f:g})")
  distance = histogram_distance(intensity_histogram(image, valid),
                                reference["intensity_histogram"])
  limit = reference["intensity_distance_max"] + settings.intensity_margin
  if distance > limit:
    reasons.append(f"intensity distribution unlike training (distance {distance:.2f} > "
                   f"{limit:.2f})")
  looks = reference.get("appearance")
  if looks is not None:
    distance = appearance_distance(image, mask, valid, properties["spacing"], looks)
    limit = looks["limit"] * settings.appearance_factor
    if distance > limit:
      reasons.append(f"the image inside the mask looks unlike any training heart "
                     f"(appearance distance {distance:.2f} > {limit:.2f}): is it the mask's "
                     f"own scan, of the heart, in the training's modality?")
  return reasons


def verdict(scores: dict[str, Any], ood: list[str], settings: Settings,
            ) -> tuple[str, list[str]]:
  """(verdict, reasons) by the rules of the module docstring."""
  if scores["empty"]:
    return "fail", ["the mask is empty: none of the heart structures is labelled", *ood]
  missing = [f"missing structure(s): {', '.join(scores['missing'])}"] if scores["missing"] else []
  if ood:   # a scan cut short may lack structures: the scan's problem comes first
    return "out_of_distribution", ood + missing
  if missing:
    return "fail", missing
  # With a calibration the rules read the calibrated Dice, and "ok" also needs the lower
  # bound on the true mean Dice to clear failure_dice.
  calibrated = "calibrated_mean_dice" in scores
  key, word = (("calibrated_dice", "calibrated Dice") if calibrated
               else ("predicted_dice", "predicted Dice"))
  mean = scores["calibrated_mean_dice" if calibrated else "mean_predicted_dice"]
  low = settings.failure_dice
  weak = [f"{name} {s[key]:.2f}" for name, s in scores["structures"].items()
          if s.get(key) is not None and s[key] < low]
  if mean < low:
    return "fail", [f"mean {word} {mean:.3f} < {low:g}"]
  bound = scores.get("mean_dice_lower_bound")
  unsure = bound is not None and bound < low
  if mean < low + settings.review_band or weak or unsure:
    level = 1 - scores["calibration"]["alpha"] if calibrated else None
    reasons = [f"mean {word} {mean:.3f} < {low + settings.review_band:g}"
               if mean < low + settings.review_band else None,
               f"{word} below {low:g}: {', '.join(weak)}" if weak else None,
               f"the {level:.0%} lower bound on the mean Dice, {bound:.3f}, is below {low:g}"
               if unsure else None]
    return "review", [r for r in reasons if r]
  return "ok", []
