"""Which modality a scan is, MR or CT, by its raw intensities or by its masks' dataset.

A predictor learns one modality's appearance, but preprocessing maps every scan's robust
intensity range to [-1, 1], after which units no longer tell an MR from a CT. Before it they
do: CT is in Hounsfield units (HU), anchored to physics (air -1000, water 0, blood and soft
tissue 0..100, bone up to 3000; the padding outside the field of view is often -1024 or
-2048), while MR comes in arbitrary units (0..255, 0..4095, floats 0..1) and, being a
magnitude image, is non-negative up to a small offset (bias correction, for one).

`intensity_profile` describes a scan's raw intensities by features that no rescaling of MR
changes or that HU pin down:
  p0.5, p99.5: the 0.5th and 99.5th percentiles; `negativity` = -p0.5 / (p99.5 - p0.5) is
    how far the scan reaches below 0 as a share of its range (scale-free);
  air_share: the share of voxels in AIR_BAND, -1100..-900 HU (air outside the body, the
    darkest lung, -1024 padding); no MR value is near -1000 unless shifted by about that.
`looks_like` reads them: "ct" needs both an air band and a range reaching well below 0,
"mr" a range that hardly reaches below 0; anything between (a z-scored MR, a CT cropped
inside the body) is undecided (None), so it is never called the other modality.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

MODALITIES = ("mr", "ct")
AIR_BAND = (-1100.0, -900.0)   # HU: air is -1000, CT noise a few tens of HU
# Measured on six phantom cases, resampled to 2 mm as predict does: MR as generated, x1e-3,
# x1e3, -3% and +100 offsets, gamma 0.5 and 2, inverted, 8-bit; CT as the same scenes in HU
# (air, lungs, tissue, blood, myocardium, bone specks, -1024 or -2048 padding outside a
# circular field of view, or none).
# "ct": at least this share of voxels in AIR_BAND. A chest CT has air around the body and in
# the lungs (CT 6-62%, 12% at the least without padding); MR has none there at any scale or
# small offset (0 in every MR variant).
MIN_AIR_SHARE = 0.01
# "ct": negativity at least this. With air at -1000 it holds up to p99.5 = 5667 HU, above
# bone and contrast (CT 0.49-0.97); an MR whose small offset reaches -1000 only because its
# range is huge (x1000) stays near 0.
MIN_CT_NEGATIVITY = 0.15
# "mr": negativity at most this: non-negative up to an offset of 5% of the range (MR -0.36
# (inverted) to 0.013 (-3% offset)); a CT that shows air, lung or fat in its lowest 0.5% is
# far above it, and a z-scored MR (0.21-0.25) stays undecided.
MAX_MR_NEGATIVITY = 0.05
# Channel names of an nnU-Net dataset.json ("channel_names", v1 "modality"), as words.
_CT_WORDS = {"ct", "cta", "ccta", "hu"}
_MR_WORDS = {"mr", "mri", "cmr", "t1", "t2", "t1w", "t2w", "flair", "ssfp", "bssfp", "cine",
             "lge", "dixon", "mra"}


def intensity_profile(image: np.ndarray) -> dict[str, float]:
  """The raw intensity profile of a whole (X, Y, Z) scan, any real dtype, in its own units:
  {"p0.5", "p99.5", "air_share"} (see the module docstring)."""
  values = np.asarray(image)
  low, high = np.percentile(values, (0.5, 99.5))
  air = np.count_nonzero((values >= AIR_BAND[0]) & (values <= AIR_BAND[1]))
  return {"p0.5": float(low), "p99.5": float(high), "air_share": air / max(1, values.size)}


def negativity(profile: dict[str, float]) -> float:
  """-p0.5 / (p99.5 - p0.5): how far below 0 the scan reaches, as a share of its range (0
  for a constant scan)."""
  span = profile["p99.5"] - profile["p0.5"]
  return -profile["p0.5"] / span if span > 0 else 0.0


def looks_like(profile: dict[str, float]) -> str | None:
  """"ct", "mr" or None (undecided) by the rule of the module docstring."""
  reach = negativity(profile)
  if profile["air_share"] >= MIN_AIR_SHARE and reach >= MIN_CT_NEGATIVITY:
    return "ct"
  if reach <= MAX_MR_NEGATIVITY:
    return "mr"
  return None


def evidence(profile: dict[str, float]) -> str:
  """The profile in words, for a reason: the air band share, p0.5 and its negativity."""
  return (f"{profile['air_share']:.1%} of voxels in the air band {AIR_BAND[0]:g}.."
          f"{AIR_BAND[1]:g} HU; 0.5th percentile {profile['p0.5']:.4g}, "
          f"{negativity(profile):.0%} of the 0.5th-99.5th percentile range below 0")


def channel_modality(names: Iterable[str]) -> str | None:
  """The modality that a dataset's channel names (e.g. nnU-Net's {"0": "CT"}) all say, None
  when one says none or they disagree."""
  found = set()
  for name in names:
    words = set(re.findall(r"[a-z0-9]+", str(name).lower()))
    modality = "ct" if words & _CT_WORDS else "mr" if words & _MR_WORDS else None
    if modality is None:
      return None
    found.add(modality)
  return found.pop() if len(found) == 1 else None
