"""Synthetic mask perturbations against NumPy/scipy references on small hand-made volumes."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import ndimage

from wh_errmap.train import perturbations as P

K = 8
CROSS = ndimage.generate_binary_structure(3, 1)


def phantom() -> np.ndarray:
  """(16, 16, 12) int32: a box of class 1 touching a ball of class 3, a box of 5 cut by the
  volume's edge and a tube of 2 through every slice (so any slab corruption shows)."""
  x, y, z = np.meshgrid(np.arange(16), np.arange(16), np.arange(12), indexing="ij")
  mask = np.zeros((16, 16, 12), np.int32)
  mask[3:9, 4:11, 3:9] = 1
  mask[(x - 10) ** 2 + (y - 8) ** 2 + (z - 6) ** 2 <= 9] = 3
  mask[12:, :5, :4] = 5
  mask[1:3, 12:15, :] = 2
  return mask


def batch(*masks: np.ndarray) -> jnp.ndarray:
  return jnp.asarray(np.stack(masks))


def reference_morph(mask: np.ndarray, label: int, radius: int, dilate: bool) -> np.ndarray:
  structure = mask == label
  out = mask.copy()
  if dilate:
    out[ndimage.binary_dilation(structure, CROSS, radius)] = label
  else:
    out[structure & ~ndimage.binary_erosion(structure, CROSS, radius, border_value=1)] = 0
  return out


def reference_shift(mask: np.ndarray, label: int | None, offset: tuple[int, int, int],
                    whole: bool = False) -> np.ndarray:
  """Structure `label` moved by `offset`, no wrap-around; whole: the whole class map moved
  (what leaves it is lost, what it vacates is 0)."""
  src = tuple(slice(max(0, -o), n - max(0, o)) for o, n in zip(offset, mask.shape))
  dst = tuple(slice(max(0, o), n - max(0, -o)) for o, n in zip(offset, mask.shape))
  if whole:
    moved = np.zeros_like(mask)
    moved[dst] = mask[src]
    return moved
  structure = mask == label
  moved = np.zeros_like(structure)
  moved[dst] = structure[src]
  return np.where(moved, label, np.where(structure, 0, mask))


# Jitted once each: op-by-op dispatch of the vmapped kinds compiles many small programs.
morph_structure = jax.jit(P.morph_structure, static_argnums=4)
erode_dilate = jax.jit(P.erode_dilate, static_argnums=(2, 3))
remove = jax.jit(P.remove, static_argnums=2)
swap = jax.jit(P.swap, static_argnums=2)
shift_structure = jax.jit(P.shift_structure)
shift = jax.jit(P.shift, static_argnums=(2, 3))
boundary_noise = jax.jit(P.boundary_noise, static_argnums=3)  # flip_prob may be traced
corrupt_slab = jax.jit(P.corrupt_slab)
slice_failure = jax.jit(P.slice_failure, static_argnums=(2, 3, 4))
perturb = jax.jit(P.perturb, static_argnums=(2, 3))
NO_PERTURBATION = P.Settings(**{name: 0.0 for name in P.DEFAULTS if name.endswith("rate")})


@pytest.mark.parametrize("label", [1, 5])
def test_morph_structure_matches_scipy_with_the_cross(label):
  mask = phantom()
  cases = [(radius, dilate) for radius in (1, 2, 3) for dilate in (False, True)]
  out = np.asarray(morph_structure(
      batch(*[mask] * len(cases)), jnp.full(len(cases), label),
      jnp.array([r for r, _ in cases]), jnp.array([d for _, d in cases]), 3))
  for got, (radius, dilate) in zip(out, cases):
    expected = reference_morph(mask, label, radius, dilate)
    np.testing.assert_array_equal(got, expected, err_msg=f"r={radius} dilate={dilate}")
    assert (got != mask).any()
    # Only the structure's own voxels (erosion) or its new voxels (dilation) change.
    changed = got != mask
    assert (got[changed] == label).all() if dilate else (mask[changed] == label).all()


def test_erode_dilate_draws_a_present_structure_radius_and_direction():
  mask = np.where(phantom() == 1, 1, 0).astype(np.int32)
  empty = np.zeros_like(mask)
  out = np.asarray(erode_dilate(batch(*[mask] * 7, empty), jax.random.key(0), 3, K))
  candidates = [reference_morph(mask, 1, r, d) for r in (1, 2, 3) for d in (False, True)]
  matched = [next(i for i, c in enumerate(candidates) if (c == o).all()) for o in out[:-1]]
  assert len(set(matched)) > 2
  np.testing.assert_array_equal(out[-1], empty)   # no structure: nothing to erode or dilate


def test_remove_takes_one_structure_away():
  mask = phantom()
  out = np.asarray(remove(batch(*[mask] * 6), jax.random.key(1), K))
  removed = set()
  for got in out:
    gone = [c for c in (1, 2, 3, 5) if not (got == c).any()]
    assert len(gone) == 1
    np.testing.assert_array_equal(got, np.where(mask == gone[0], 0, mask))
    removed.add(gone[0])
  assert len(removed) > 1


def test_swap_exchanges_two_label_sets_exactly():
  mask = np.where(np.isin(phantom(), (1, 3)), phantom(), 0).astype(np.int32)
  expected = np.where(mask == 1, 3, np.where(mask == 3, 1, mask))
  single = np.where(mask == 3, 0, mask).astype(np.int32)
  out = np.asarray(swap(batch(mask, mask, single), jax.random.key(2), K))
  np.testing.assert_array_equal(out[0], expected)
  np.testing.assert_array_equal(out[1], expected)
  np.testing.assert_array_equal(out[2], single)   # one structure: nothing to swap with


def test_shift_structure_matches_a_numpy_shift_without_wrap_around():
  mask = phantom()
  # Class 5 sits at the X edge: moved towards it, part of it leaves the volume for good.
  offsets = [(2, -1, 0), (-3, 0, 4), (0, 5, -2), (2, 0, 0)]
  labels = [1, 3, 2, 5]
  out = np.asarray(shift_structure(
      batch(*[mask] * 4), jnp.array(labels), jnp.array(offsets)))
  for got, label, offset in zip(out, labels, offsets):
    np.testing.assert_array_equal(got, reference_shift(mask, label, offset))
  assert 0 < (out[3] == 5).sum() < (mask == 5).sum()


def test_random_shift_moves_one_structure_by_at_most_max_shift():
  mask = np.where(phantom() == 1, 1, 0).astype(np.int32)
  out = np.asarray(shift(batch(*[mask] * 4), jax.random.key(3), 2, K))
  offsets = [(a, b, c) for a in range(-2, 3) for b in range(-2, 3) for c in range(-2, 3)]
  for got in out:
    assert not (got == mask).all()
    assert any((got == reference_shift(mask, 1, o)).all() for o in offsets if any(o))


def test_boundary_noise_flips_only_boundary_voxels_to_a_neighbour_class():
  mask = phantom()
  padded = np.pad(mask, 1, mode="edge")
  neighbours = np.stack([np.roll(padded, s, a)[1:-1, 1:-1, 1:-1]
                         for a in range(3) for s in (1, -1)])
  boundary = (neighbours != mask).any(0)
  out = np.asarray(boundary_noise(batch(mask, mask), jax.random.key(4), 1.0, K))
  for got in out:
    changed = got != mask
    np.testing.assert_array_equal(changed, boundary)   # p = 1: every boundary voxel flips
    assert (neighbours == got)[:, changed].any(0).all()
  assert not (out[0] == out[1]).all()
  still = boundary_noise(batch(mask, mask), jax.random.key(4), 0.0, K)
  np.testing.assert_array_equal(still, batch(mask, mask))
  half = np.asarray(boundary_noise(batch(mask, mask), jax.random.key(5), 0.5, K))
  assert 0.3 < (half != mask).sum() / (2 * boundary.sum()) < 0.7


def test_corrupt_slab_erases_or_moves_only_the_chosen_slices():
  mask = phantom()
  out = np.asarray(corrupt_slab(
      batch(mask, mask), jnp.array([4, 2]), jnp.array([3, 2]), jnp.array([[0, 0], [-2, 3]]),
      jnp.array([True, False])))
  expected = mask.copy()
  expected[:, :, 4:7] = 0
  np.testing.assert_array_equal(out[0], expected)
  expected = mask.copy()
  expected[:, :, 2:4] = 0
  expected[:-2, 3:, 2:4] = mask[2:, :-3, 2:4]
  np.testing.assert_array_equal(out[1], expected)


def test_slice_failure_changes_one_contiguous_slab_at_most_max_slices_thick():
  mask = phantom()
  out = np.asarray(slice_failure(batch(*[mask] * 6), jax.random.key(6), 3, 2, K))
  for got in out:
    slices = np.flatnonzero((got != mask).any((0, 1)))
    assert 1 <= len(slices) <= 3 and slices[-1] - slices[0] == len(slices) - 1


def test_perturb_with_zero_rates_is_the_identity():
  masks = batch(phantom(), phantom()[::-1], phantom()[:, ::-1])
  np.testing.assert_array_equal(perturb(masks, jax.random.key(0), NO_PERTURBATION, K), masks)


def _is_kind(kind: str, mask: np.ndarray, got: np.ndarray) -> bool:
  """Whether `got` is one perturbation of `kind` (default magnitudes) of `mask`, by the
  NumPy/scipy references of this file: some structure, radius, offset or slab gives it."""
  s, present = P.Settings(), [int(c) for c in np.unique(mask) if c]
  if kind == "erode_dilate_rate":
    return any((got == reference_morph(mask, c, r, d)).all() for c in present
               for r in range(1, s.max_radius + 1) for d in (False, True))
  if kind == "remove_rate":
    return any((got == np.where(mask == c, 0, mask)).all() for c in present)
  if kind == "swap_rate":
    return any((got == np.where(mask == a, b, np.where(mask == b, a, mask))).all()
               for a in present for b in present if a < b)
  if kind == "shift_rate":
    span = range(-s.max_shift, s.max_shift + 1)
    return any((got == reference_shift(mask, c, (a, b, d))).all() for c in present
               for a in span for b in span for d in span if (a, b, d) != (0, 0, 0))
  if kind == "boundary_noise_rate":
    padded = np.pad(mask, 1, mode="edge")
    neighbours = np.stack([np.roll(padded, sh, a)[1:-1, 1:-1, 1:-1]
                           for a in range(3) for sh in (1, -1)])
    changed = got != mask
    return bool(changed.any() and (neighbours != mask).any(0)[changed].all()
                and (neighbours == got)[:, changed].any(0).all())
  slices = np.flatnonzero((got != mask).any((0, 1)))   # slice_failure_rate
  if not 1 <= len(slices) <= s.max_slices or slices[-1] - slices[0] != len(slices) - 1:
    return False
  slab = slice(slices[0], slices[-1] + 1)
  if (got[:, :, slab] == 0).all():
    return True
  span = range(-s.max_slab_shift, s.max_slab_shift + 1)
  return any((got[:, :, slab] == reference_shift(mask, None, (a, b, 0), whole=True)[:, :, slab]
              ).all() for a in span for b in span if (a, b) != (0, 0))


KINDS = ["erode_dilate_rate", "remove_rate", "swap_rate", "shift_rate", "boundary_noise_rate",
         "slice_failure_rate"]


@pytest.mark.parametrize("rate", KINDS)
def test_perturb_applies_the_kind_with_rate_one(rate):
  # Every sample is exactly one perturbation of that kind of its mask (some structure,
  # magnitude or slab gives it), not merely a changed mask: another kind applied instead,
  # or two at once, fails.
  masks = batch(phantom(), phantom(), phantom())
  settings = dataclasses.replace(NO_PERTURBATION, **{rate: 1.0})
  out = np.asarray(perturb(masks, jax.random.key(7), settings, K))
  for got in out:
    assert (got != phantom()).any() and _is_kind(rate, phantom(), got)


# ---------------------------------------------------------------- the draws' ranges
# Each draw is checked over enough samples that missing one of its values by chance is
# below 1e-9; the expected sets come from the documented ranges, written out here.


def test_shift_offsets_reach_every_nonzero_offset_and_nothing_else():
  # One voxel of class 1 at the centre of a 7^3 volume: its new position is the offset.
  # 124 offsets, 4000 draws: a given one is missed with probability (123/124)^4000 < 1e-13.
  mask = np.zeros((7, 7, 7), np.int32)
  mask[3, 3, 3] = 1
  out = np.asarray(shift(batch(*[mask] * 4000), jax.random.key(11), 2, K))
  seen = {tuple(int(v) for v in np.argwhere(got == 1)[0] - 3) for got in out}
  expected = {(a, b, c) for a in range(-2, 3) for b in range(-2, 3) for c in range(-2, 3)}
  assert seen == expected - {(0, 0, 0)}


def test_slab_starts_thicknesses_and_offsets_reach_their_whole_ranges():
  # A (3, 3, 6) volume whose in-plane voxels all differ: a moved slab shows its offset at the
  # centre, an erased one is 0. Depth 6, max_slices 3: (start, thickness) ranges over the 15
  # pairs with start + thickness <= 6; the offset over the 8 nonzero ones in [-1, 1]^2.
  # 3000 draws: a pair (p >= 1/18) or an offset (p = 1/16) is missed with p < 1e-70.
  mask = np.broadcast_to(np.arange(1, 10, dtype=np.int32).reshape(3, 3, 1), (3, 3, 6)).copy()
  out = np.asarray(slice_failure(batch(*[mask] * 3000), jax.random.key(12), 3, 1, K))
  slabs, offsets, erased = set(), set(), 0
  for got in out:
    slices = np.flatnonzero((got != mask).any((0, 1)))
    assert len(slices) and slices[-1] - slices[0] == len(slices) - 1
    slabs.add((int(slices[0]), len(slices)))
    centre = int(got[1, 1, slices[0]])
    if (got[:, :, slices] == 0).all():
      erased += 1
    else:
      source = np.argwhere(mask[:, :, 0] == centre)[0]
      offsets.add((1 - int(source[0]), 1 - int(source[1])))
  assert slabs == {(start, t) for t in (1, 2, 3) for start in range(0, 6 - t + 1)}
  assert offsets == {(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)} - {(0, 0)}
  assert 0.4 < erased / len(out) < 0.6   # erased or moved, 50/50


def test_erosion_and_dilation_radii_reach_1_to_max_radius():
  # A 7-voxel cube in a 15^3 volume: along the line through its centre, dilation by r makes
  # it 7 + 2r long, erosion 7 - 2r. 600 draws: a (radius, direction) pair, p = 1/6, is
  # missed with probability (5/6)^600 < 1e-47.
  mask = np.zeros((15, 15, 15), np.int32)
  mask[4:11, 4:11, 4:11] = 1
  out = np.asarray(erode_dilate(batch(*[mask] * 600), jax.random.key(13), 3, K))
  seen = {int((got[:, 7, 7] == 1).sum()) - 7 for got in out}
  assert seen == {-6, -4, -2, 2, 4, 6}


def test_perturb_is_per_sample_and_deterministic_under_jit():
  masks = batch(phantom(), phantom(), phantom())
  # Erosion/dilation and boundary noise always on: no sample is left as it was.
  settings = dataclasses.replace(P.Settings(), erode_dilate_rate=1.0, boundary_noise_rate=1.0)
  out = np.asarray(perturb(masks, jax.random.key(8), settings, K))
  assert out.shape == masks.shape and out.dtype == np.int32
  assert not (out[0] == out[1]).all() and not (out[1] == out[2]).all()
  np.testing.assert_array_equal(out, perturb(masks, jax.random.key(8), settings, K))
  assert not (out == np.asarray(perturb(masks, jax.random.key(9), settings, K))).all()


def test_settings_from_a_config_overrides_defaults_and_rejects_unknown_fields():
  config = ml_collections.ConfigDict({"max_radius": 2, "swap_rate": 0.0})
  settings = P.settings_from_mapping(config)
  assert settings.max_radius == 2 and settings.swap_rate == 0.0
  assert settings.shift_rate == P.DEFAULTS["shift_rate"]
  with pytest.raises(ValueError, match="max_radus"):
    P.settings_from_mapping({"max_radus": 2})
  with pytest.raises(ValueError, match="remove_rate"):
    P.settings_from_mapping({"remove_rate": 1.5})
  with pytest.raises(ValueError, match="max_shift"):
    P.settings_from_mapping({"max_shift": 2.5})

