"""Tests of the training and evaluation input pipeline on tiny synthetic volumes."""
import types

import numpy as np
import pytest
from absl import flags

from tests.conftest import take_batches
from wh_errmap.data import pipeline

SHAPE = (20, 18, 14)


def _case(case_id, label, image=None):
  if image is None:
    image = _image_of(label)
  return types.SimpleNamespace(case_id=case_id, image=image, label=label)


def _image_of(label):
  """An image that is a one-to-one function of the label, to check image/label consistency."""
  return (label.astype(np.float32) / 7.0) * 2.0 - 1.0


def _random_label(seed, shape=SHAPE, values=(0, 2, 3, 5)):
  rng = np.random.default_rng(seed)
  return rng.choice(np.array(values, np.uint8), size=shape)


def _cases(n=4, shape=SHAPE):
  return [_case(f"case_{i}", _random_label(i, shape)) for i in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert set(x) == set(y)
    for key in y:
      np.testing.assert_array_equal(x[key], y[key])


@pytest.mark.parametrize("crop_size", [(8, 10, 6), (9, 7)])
def test_train_batch_shapes_and_dtypes(crop_size):
  ds = pipeline.train_dataset(_cases(), crop_size=crop_size, batch_size=3, seed=0,
                              shard_index=0, shard_count=1)
  for batch in take_batches(ds, 3):
    assert batch["image"].shape == (3, *crop_size, 1)
    assert batch["image"].dtype == np.float32
    assert batch["label"].shape == (3, *crop_size)
    assert batch["label"].dtype == np.int32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0


def test_scaling_never_creates_new_label_values():
  values = (0, 2, 3, 5)
  ds = pipeline.train_dataset(_cases(), crop_size=(11, 9, 7), batch_size=4, seed=1,
                              scale_range=(0.6, 1.5), shard_index=0, shard_count=1)
  for batch in take_batches(ds, 10):
    assert set(np.unique(batch["label"])) <= set(values)


def test_scale_factor_enlarges_anatomy():
  # A linear ramp along each axis stays linear under linear interpolation: a scale of 2
  # halves its slope.
  grid = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in SHAPE), indexing="ij")
  ramp = sum(g * w for g, w in zip(grid, (1.0, 10.0, 100.0)))
  label = np.zeros(SHAPE, np.uint8)
  image, _ = pipeline.RandAffineCrop((6, 6, 6), (2.0, 2.0))(ramp, label, np.random.default_rng(0))
  np.testing.assert_allclose(np.diff(image, axis=0), 0.5, rtol=1e-5)
  np.testing.assert_allclose(np.diff(image, axis=1), 5.0, rtol=1e-5)
  np.testing.assert_allclose(np.diff(image, axis=2), 50.0, rtol=1e-5)


def test_unit_scale_is_an_exact_crop():
  image = np.random.default_rng(0).random(SHAPE, dtype=np.float32)
  label = _random_label(0)
  crop = pipeline.RandAffineCrop((8, 10, 6))
  seen = set()
  for seed in range(30):
    out_image, out_label = crop(image, label, np.random.default_rng(seed))
    matches = [(x, y, z) for x in range(SHAPE[0] - 7) for y in range(SHAPE[1] - 9)
               for z in range(SHAPE[2] - 5)
               if np.array_equal(out_image, image[x:x + 8, y:y + 10, z:z + 6])]
    assert len(matches) == 1
    np.testing.assert_array_equal(out_label, label[tuple(slice(o, o + c) for o, c in
                                                         zip(matches[0], (8, 10, 6)))])
    seen.add(matches[0])
  assert len(seen) > 20  # positions vary


@pytest.mark.parametrize("crop_size", [(12, 12, 10), (12, 12)])
def test_flips_keep_image_and_label_consistent(crop_size):
  ds = pipeline.train_dataset(_cases(), crop_size=crop_size, batch_size=4, seed=2,
                              scale_range=(1.0, 1.0), shard_index=0, shard_count=1)
  for batch in take_batches(ds, 5):
    np.testing.assert_array_equal(batch["image"][..., 0], _image_of(batch["label"]))


def test_rand_flip_flips_each_axis_half_the_time():
  image = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
  label = np.arange(4 * 5 * 6).reshape(4, 5, 6)
  flip = pipeline.RandFlip((0, 2))
  counts = np.zeros(3)
  trials = 400
  for seed in range(trials):
    out_image, out_label = flip(image, label, np.random.default_rng(seed))
    np.testing.assert_array_equal(out_image, out_label)
    flipped = [out_image[-1, 0, 0] < out_image[0, 0, 0], out_image[0, -1, 0] < out_image[0, 0, 0],
               out_image[0, 0, -1] < out_image[0, 0, 0]]
    counts += flipped
  assert counts[1] == 0
  assert 0.4 < counts[0] / trials < 0.6 and 0.4 < counts[2] / trials < 0.6


def test_pads_when_volume_is_smaller_than_crop():
  label = _random_label(3, values=(1, 4, 6))  # no background in the volume
  case = _case("small", label)
  crop_size = (24, 16, 20)  # larger along X and Z, smaller along Y
  ds = pipeline.train_dataset([case], crop_size=crop_size, batch_size=2, seed=0,
                              scale_range=(1.0, 1.0), flip_axes=(), shard_index=0, shard_count=1)
  for batch in take_batches(ds, 3):
    for image, out_label in zip(batch["image"][..., 0], batch["label"]):
      inside = out_label != 0
      assert inside.sum() == SHAPE[0] * crop_size[1] * SHAPE[2]
      np.testing.assert_array_equal(image[~inside], -1.0)
      # The whole volume along the padded axes lies inside the crop, as one block.
      xs, _, zs = np.nonzero(inside)
      x0, z0 = xs.min(), zs.min()
      block = out_label[x0:x0 + SHAPE[0], :, z0:z0 + SHAPE[2]]
      assert np.all(block != 0)
      assert any(np.array_equal(block, label[:, y:y + crop_size[1]])
                 for y in range(SHAPE[1] - crop_size[1] + 1))


def test_same_seed_same_batches_other_seed_other_batches():
  kwargs = dict(crop_size=(8, 8, 6), batch_size=2, shard_index=0, shard_count=1)
  a = take_batches(pipeline.train_dataset(_cases(), seed=7, **kwargs), 6)
  b = take_batches(pipeline.train_dataset(_cases(), seed=7, **kwargs), 6)
  c = take_batches(pipeline.train_dataset(_cases(), seed=8, **kwargs), 6)
  _assert_batches_equal(a, b)
  assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))


@pytest.mark.parametrize("output", ["crops", "params"])
def test_resume_from_iterator_state(output):
  ds = pipeline.train_dataset(_cases(3), crop_size=(8, 8), batch_size=2, seed=3,
                              shard_index=0, shard_count=1, output=output)
  it = iter(ds)
  for _ in range(5):  # past the first epoch of 3 cases
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  resumed = iter(ds)
  resumed.set_state(state)
  _assert_batches_equal([next(resumed) for _ in range(4)], expected)


def test_shards_are_disjoint_and_cover_all_cases():
  # Each case is filled with its own class, so a crop names the case it came from.
  cases = [_case(f"case_{k}", np.full(SHAPE, k, np.uint8)) for k in range(1, 6)]
  seen = []
  for index in range(2):
    ds = pipeline.train_dataset(cases, crop_size=(6, 6, 6), batch_size=1, seed=0,
                                shard_index=index, shard_count=2)
    seen.append({int(b["label"][0, 0, 0, 0]) for b in take_batches(ds, 12)})
  assert seen[0].isdisjoint(seen[1])
  assert seen[0] | seen[1] == {1, 2, 3, 4, 5}
  ids = [c.case_id for i in range(2) for c in pipeline.shard_cases(cases, i, 2)]
  assert sorted(ids) == sorted(c.case_id for c in cases)


def test_default_shard_is_the_whole_dataset_on_one_process():
  cases = [_case(f"case_{k}", np.full(SHAPE, k, np.uint8)) for k in range(1, 4)]
  ds = pipeline.train_dataset(cases, crop_size=(6, 6, 6), batch_size=1, seed=0)
  assert {int(b["label"][0, 0, 0, 0]) for b in take_batches(ds, 3)} == {1, 2, 3}


def test_invalid_arguments_raise():
  with pytest.raises(ValueError, match="no label"):
    pipeline.train_dataset([_case("x", None, np.zeros(SHAPE, np.float32))], crop_size=(4, 4, 4),
                           batch_size=1, seed=0, shard_index=0, shard_count=1)
  with pytest.raises(ValueError, match="has no cases"):
    pipeline.train_dataset(_cases(1), crop_size=(4, 4, 4), batch_size=1, seed=0,
                           shard_index=1, shard_count=2)
  with pytest.raises(ValueError, match="crop_size"):
    pipeline.train_dataset(_cases(1), crop_size=(4,), batch_size=1, seed=0)


def test_threads_and_workers_give_the_same_batches():
  # grain 0.2.18 workers read absl flags (grain issue 1355).
  flags.FLAGS.mark_as_parsed()
  kwargs = dict(crop_size=(8, 8, 6), batch_size=2, seed=5, shard_index=0, shard_count=1)
  serial = take_batches(pipeline.train_dataset(_cases(), num_threads=0, **kwargs), 5)
  threaded = take_batches(pipeline.train_dataset(_cases(), num_threads=3, **kwargs), 5)
  workers = take_batches(pipeline.train_dataset(_cases(), num_workers=2, num_threads=1, **kwargs), 5)
  _assert_batches_equal(serial, threaded)
  _assert_batches_equal(serial, workers)


def test_eval_volumes_yield_every_case_once():
  cases = _cases(3) + [_case("unlabelled", None, np.zeros(SHAPE, np.float32))]
  items = list(pipeline.eval_volumes(cases))
  assert [item["case_id"] for item in items] == [c.case_id for c in cases]
  for item, case in zip(items, cases):
    assert item["image"].shape == (*SHAPE, 1) and item["image"].dtype == np.float32
    assert np.shares_memory(item["image"], case.image)
    if case.label is None:
      assert "label" not in item
    else:
      assert item["label"].shape == SHAPE and item["label"].dtype == np.int32
      np.testing.assert_array_equal(item["label"], case.label)


def test_measure_rate_counts_batches_and_voxels():
  ds = pipeline.train_dataset(_cases(), crop_size=(8, 8, 6), batch_size=2, seed=0,
                              shard_index=0, shard_count=1)
  rate = pipeline.measure_rate(ds, 3)
  assert rate["num_batches"] == 3
  np.testing.assert_allclose(rate["samples_per_s"], 2 * rate["batches_per_s"])
  np.testing.assert_allclose(rate["mvoxels_per_s"], rate["samples_per_s"] * 8 * 8 * 6 / 1e6)


def _shifted(label, offset):
  """label moved by `offset` voxels along axis 0, zeros where it moved from."""
  out = np.zeros_like(label)
  out[offset:] = label[:-offset]
  return out


def test_precomputed_masks_are_cropped_and_flipped_in_register_with_the_label():
  # Each case's mask is its label shifted by 2 voxels along axis 0. Exact crops: in every
  # sample the mask is the label shifted by +2 (or by -2 where axis 0 was flipped).
  cases = _cases(3)
  masks = [_shifted(c.label, 2)[None] for c in cases]
  ds = pipeline.train_dataset(cases, crop_size=(10, 8, 6), batch_size=4, seed=3,
                              scale_range=(1.0, 1.0), masks=masks, shard_index=0,
                              shard_count=1)
  seen = set()
  for batch in take_batches(ds, 6):
    assert batch["mask"].shape == batch["label"].shape and batch["mask"].dtype == np.int32
    assert batch["has_mask"].all()
    for mask, label in zip(batch["mask"], batch["label"]):
      forward = np.array_equal(mask[2:], label[:-2])
      backward = np.array_equal(mask[:-2], label[2:])
      assert forward != backward   # exactly one: the shift survived crop and flip
      seen.add(forward)
  assert seen == {True, False}     # both orientations occurred


def test_precomputed_masks_follow_the_labels_scaling_and_are_optional_per_case():
  # A voxel-wise recoding of the label (2 <-> 3) survives any crop, scale and flip exactly.
  cases = _cases(2)
  recode = np.array([0, 1, 3, 2, 4, 5, 6, 7], np.uint8)
  masks = [recode[cases[0].label][None], np.zeros((0, *SHAPE), np.uint8)]
  ds = pipeline.train_dataset(cases, crop_size=(9, 9, 7), batch_size=4, seed=5,
                              scale_range=(0.7, 1.3), masks=masks, shard_index=0,
                              shard_count=1)
  plain = pipeline.train_dataset(cases, crop_size=(9, 9, 7), batch_size=4, seed=5,
                                 scale_range=(0.7, 1.3), shard_index=0, shard_count=1)
  flags = []
  for batch, same in zip(take_batches(ds, 5), take_batches(plain, 5)):
    # The image and label stream is the one without masks.
    np.testing.assert_array_equal(batch["label"], same["label"])
    for mask, label, has in zip(batch["mask"], batch["label"], batch["has_mask"]):
      if has:
        np.testing.assert_array_equal(mask, recode[label])
      else:
        assert not mask.any()
      flags.append(bool(has))
  assert flags.count(True) == flags.count(False) == 10   # each case half of the samples
  with pytest.raises(ValueError, match="one entry per case"):
    pipeline.train_dataset(cases, crop_size=(9, 9, 7), batch_size=2, seed=0,
                           masks=masks[:1], shard_index=0, shard_count=1)
