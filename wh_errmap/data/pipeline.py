"""Input pipeline: random training crops (3D patches or 2D axial slices) and whole eval volumes.

Training samples come from a grain graph

  MapDataset.range(len(shard)).seed(s).shuffle().repeat().random_map(sample)
    -> to_iter_dataset(threads, bounded buffer) [-> mp_prefetch(workers)] -> batch(B)

so a stream is a pure function of (seed, shard, position): two datasets with the same seed
give identical batches, an iterator resumes exactly from `get_state()`, and the batches do
not depend on the number of workers (batching runs after the prefetch, in the main process).

Augmentations work on one sample and take an explicit `np.random.Generator`:
`RandAxialSlice` (2D only), `RandAffineCrop` (random crop + isotropic scaling + padding,
resampling only the crop-sized output) and `RandFlip`. Each splits into `draw` (the random
parameters, from the generator) and `apply` (the arrays, deterministic); calling it does both.
`train_dataset(..., output="params")` yields only the draws, so that the crops can be computed
on the device from volumes held there (`device_crops.crop_batch`).
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import grain
import jax
import numpy as np
from scipy import ndimage

from wh_errmap.data.volumes import IMAGE_PAD_VALUE, LABEL_PAD_VALUE, TrainingCase, training_volumes


class RandAxialSlice:
  """Picks one axial slice (last axis Z), uniformly over all slices.

  (X, Y, Z) image and label -> (X, Y) image and label (views, no copy).
  """

  def draw(self, depth: int, rng: np.random.Generator) -> int:
    """The slice z in [0, depth) of a volume with `depth` axial slices."""
    return int(rng.integers(depth))

  def apply(self, image: np.ndarray, label: np.ndarray,
            z: int) -> tuple[np.ndarray, np.ndarray]:
    return image[..., z], label[..., z]

  def __call__(self, image: np.ndarray, label: np.ndarray,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return self.apply(image, label, self.draw(image.shape[-1], rng))


class RandAffineCrop:
  """Random crop with random isotropic scaling, padded where the volume is too small.

  A scale factor s ~ U(scale_range) is drawn; output voxel i samples the input at
  o + i / s along each axis, so s > 1 enlarges the anatomy (a region of about crop / s
  input voxels fills the crop) and s < 1 shrinks it. The origin o is an integer drawn
  uniformly over the positions where the sampled region lies inside the volume; along an
  axis where the region is longer than the volume, o is drawn uniformly over the
  positions where the whole volume lies inside the region (random placement), and the
  rest is padded with IMAGE_PAD_VALUE / LABEL_PAD_VALUE.

  The image is resampled linearly, the label by nearest neighbour, so the label only
  takes values of the input (or LABEL_PAD_VALUE). Only the crop-sized output is computed.
  With s == 1 the output is an exact (padded) crop of the input.
  """

  def __init__(self, crop_size: Sequence[int], scale_range: tuple[float, float] = (1.0, 1.0)):
    lo, hi = scale_range
    if not 0 < lo <= hi:
      raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
    self.crop_size = tuple(int(c) for c in crop_size)
    self.scale_range = (float(lo), float(hi))

  def draw(self, shape: Sequence[int],
           rng: np.random.Generator) -> tuple[float, tuple[int, ...]]:
    """The scale s and the origin o (one int per axis) of a crop of a volume of `shape`."""
    if len(shape) != len(self.crop_size):
      raise ValueError(f"crop_size {self.crop_size} does not match a volume of shape {shape}")
    scale = rng.uniform(*self.scale_range)
    origin = []
    for dim, crop in zip(shape, self.crop_size):
      # Last origin at which the region [o, o + (crop - 1) / s] still ends inside the volume;
      # negative when the region is longer than the volume.
      last = dim - 1 - (crop - 1) / scale
      low, high = (0, int(np.floor(last))) if last >= 0 else (int(np.ceil(last)), 0)
      origin.append(int(rng.integers(low, high + 1)))
    return scale, tuple(origin)

  def apply(self, image: np.ndarray, label: np.ndarray, scale: float,
            origin: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """image (*S) float32, label (*S) integer -> image (*crop_size) float32, label (*crop_size)
    with label's dtype; len(S) == len(crop_size) == len(origin)."""
    if image.ndim != len(self.crop_size) or len(origin) != image.ndim:
      raise ValueError(f"crop_size {self.crop_size} and origin {tuple(origin)} do not match a "
                       f"volume of shape {image.shape}")
    # A 1-D matrix selects scipy's separable (diagonal) path, cheaper than a full affine.
    matrix = np.full(image.ndim, 1.0 / scale)
    image = ndimage.affine_transform(
        image, matrix, offset=origin, output_shape=self.crop_size, output=np.float32, order=1,
        mode="grid-constant", cval=IMAGE_PAD_VALUE, prefilter=False)
    label = ndimage.affine_transform(
        label, matrix, offset=origin, output_shape=self.crop_size, output=label.dtype, order=0,
        mode="grid-constant", cval=LABEL_PAD_VALUE, prefilter=False)
    return image, label

  def __call__(self, image: np.ndarray, label: np.ndarray,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return self.apply(image, label, *self.draw(image.shape, rng))


class RandFlip:
  """Flips image and label together along each of `axes`, each with probability 0.5."""

  def __init__(self, axes: Sequence[int]):
    self.axes = tuple(int(a) for a in axes)

  def draw(self, rng: np.random.Generator) -> np.ndarray:
    """(len(axes),) bool: whether to flip along each of `axes`."""
    return rng.random(len(self.axes)) < 0.5

  def apply(self, image: np.ndarray, label: np.ndarray,
            flips: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """image, label: arrays of equal shape -> the same shapes (views)."""
    axes = tuple(a for a, flip in zip(self.axes, flips) if flip)
    if axes:
      image, label = np.flip(image, axes), np.flip(label, axes)
    return image, label

  def __call__(self, image: np.ndarray, label: np.ndarray,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return self.apply(image, label, self.draw(rng))


class _TrainParams:
  """grain random map: index of a case in this shard -> the random parameters of one sample.

  A class (not a closure) so that grain can pickle it into worker processes; it carries only
  the shapes of this shard's cases (and, in _TrainSample, their arrays).
  """

  def __init__(self, shapes: Sequence[tuple[int, ...]], crop_size: Sequence[int],
               scale_range: tuple[float, float], flip_axes: Sequence[int],
               shard_index: int, shard_count: int):
    self.shapes = [tuple(shape) for shape in shapes]
    self.slice = RandAxialSlice() if len(crop_size) == 2 else None
    self.crop = RandAffineCrop(crop_size, scale_range)
    self.flip = RandFlip(flip_axes)
    self.shard_index, self.shard_count = shard_index, shard_count

  def draw(self, index: int, rng: np.random.Generator
           ) -> tuple[int | None, float, tuple[int, ...], np.ndarray]:
    """-> (axial slice z, None for 3D crops; scale; origin; flips along flip_axes).

    The one place that fixes the order of the draws: both outputs of train_dataset use it.
    """
    shape = self.shapes[index]
    z = None
    if self.slice is not None:
      z = self.slice.draw(shape[-1], rng)
      shape = shape[:-1]
    scale, origin = self.crop.draw(shape, rng)
    return z, scale, origin, self.flip.draw(rng)

  def __call__(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """-> {"case": () int32, index into all cases (not the shard); "scale": () float32;
    "origin": (d,) int32; "flip": (d,) bool, per crop axis; and for 2D crops "slice": () int32}.
    """
    z, scale, origin, flips = self.draw(index, rng)
    flip = np.zeros(len(self.crop.crop_size), bool)
    flip[list(self.flip.axes)] = flips
    # Shard i of n holds cases[i::n] (shard_cases).
    params = {"case": np.int32(self.shard_index + index * self.shard_count),
              "scale": np.float32(scale), "origin": np.asarray(origin, np.int32), "flip": flip}
    if z is not None:
      params["slice"] = np.int32(z)
    return params


class _TrainSample(_TrainParams):
  """grain random map: index of a case in this shard -> one augmented sample, on the host."""

  def __init__(self, volumes: Sequence[tuple[np.ndarray, np.ndarray]], crop_size: Sequence[int],
               scale_range: tuple[float, float], flip_axes: Sequence[int],
               masks: Sequence[np.ndarray] | None = None):
    super().__init__([image.shape for image, _ in volumes], crop_size, scale_range, flip_axes,
                     shard_index=0, shard_count=1)
    self.volumes = volumes
    self.masks = masks

  def __call__(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """-> {"image": (*crop_size, 1) float32, "label": (*crop_size) int32}, and with masks
    {"mask": (*crop_size) int32, one of the case's masks cropped and flipped as the label
    (zeros when it has none), "has_mask": () bool}."""
    z, scale, origin, flips = self.draw(index, rng)
    image, label = self.volumes[index]
    mask = None
    if self.masks is not None and len(self.masks[index]):
      # Drawn after the crop's parameters, so the image and label stream is the same with
      # or without masks.
      mask = self.masks[index][rng.integers(len(self.masks[index]))]
    if z is not None:
      image, label = self.slice.apply(image, label, z)
      mask = None if mask is None else mask[..., z]
    if mask is not None:   # the label's own resampling (nearest) and flips
      _, mask = self.crop.apply(image, mask, scale, origin)
      _, mask = self.flip.apply(image, mask, flips)
    image, label = self.crop.apply(image, label, scale, origin)
    image, label = self.flip.apply(image, label, flips)
    sample = {"image": np.ascontiguousarray(image[..., None]), "label": label.astype(np.int32)}
    if self.masks is not None:
      sample["mask"] = (np.zeros(label.shape, np.int32) if mask is None
                        else mask.astype(np.int32))
      sample["has_mask"] = np.bool_(mask is not None)
    return sample


def shard_cases(cases: Sequence[Any], shard_index: int, shard_count: int) -> list[Any]:
  """The cases of one shard: every shard_count-th case starting at shard_index.

  Shards are disjoint and together cover `cases`; their sizes differ by at most one.
  """
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index} of {shard_count}")
  return list(cases[shard_index::shard_count])


def train_dataset(cases: Sequence[TrainingCase], *, crop_size: Sequence[int],
                  batch_size: int, seed: int,
                  scale_range: tuple[float, float] = (0.9, 1.1),
                  flip_axes: Sequence[int] | None = None,
                  shard_index: int | None = None, shard_count: int | None = None,
                  num_workers: int = 0, num_threads: int = 4,
                  output: Literal["crops", "params"] = "crops",
                  masks: Sequence[np.ndarray] | None = None) -> grain.IterDataset:
  """An infinite stream of augmented training batches from this process's shard of `cases`.

  Each epoch visits every case of the shard once, in a shuffled order that changes per epoch;
  each visit draws one sample: a 3D crop when len(crop_size) == 3, or a random axial slice
  and a 2D crop of it when len(crop_size) == 2 (see RandAffineCrop for crop, scaling and
  padding), then random flips along `flip_axes` (axes of the crop; default all).

  Batches with output="crops": {"image": (batch_size, *crop_size, 1) float32, "label":
  (batch_size, *crop_size) int32}. With output="params", the same samples (same graph, seed and
  draws) as their random parameters, for `device_crops.crop_batch`, with d = len(crop_size):
  {"case": (batch_size,) int32 index into `cases` (all of them, not this shard), "scale":
  (batch_size,) float32, "origin": (batch_size, d) int32, "flip": (batch_size, d) bool, and for
  2D crops "slice": (batch_size,) int32 axial slice}; no resampling runs on the host then.
  batch_size is per process. shard_index / shard_count default to
  jax.process_index() / jax.process_count(). Shards get different augmentation streams.

  num_threads: threads computing samples in each process (the main one, or each of
  num_workers grain worker processes); scipy's resampling releases the GIL, so threads
  scale with cores. The read-ahead buffer holds 2 batches per process. num_workers > 0
  needs, with grain 0.2.18, parsed absl flags (run under absl.app.run, or call
  absl.flags.FLAGS.mark_as_parsed()); close such iterators (`it.close()`) after use.
  Batches do not depend on num_workers or num_threads.

  masks: per case of `cases`, a (K, X, Y, Z) array of K >= 0 other masks on the case's grid
  (precomputed segmentations): each sample then also carries one of them, drawn uniformly
  and cropped, resampled (nearest) and flipped exactly as the label ("mask", "has_mask";
  output="crops" only).
  """
  if len(crop_size) not in (2, 3):
    raise ValueError(f"crop_size must have 2 (axial slices) or 3 entries, got {crop_size}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if num_workers < 0 or num_threads < 0:
    raise ValueError(f"num_workers and num_threads must be >= 0, got {num_workers}, {num_threads}")
  flip_axes = tuple(range(len(crop_size))) if flip_axes is None else tuple(flip_axes)
  if any(not 0 <= a < len(crop_size) for a in flip_axes) or len(set(flip_axes)) < len(flip_axes):
    raise ValueError(f"flip_axes {flip_axes} are not distinct axes of a {len(crop_size)}D crop")
  if output not in ("crops", "params"):
    raise ValueError(f'output must be "crops" or "params", got {output!r}')
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  shard = shard_cases(cases, shard_index, shard_count)
  if not shard:
    raise ValueError(f"shard {shard_index} of {shard_count} has no cases ({len(cases)} in all)")
  volumes = training_volumes(shard)
  if masks is not None:
    if output != "crops" or len(masks) != len(cases):
      raise ValueError(f"masks need output='crops' and one entry per case ({len(cases)}), got "
                       f"output={output!r} and {len(masks)}")
    masks = shard_cases(masks, shard_index, shard_count)
    for case, m in zip(shard, masks):
      if len(m) and tuple(m.shape[1:]) != tuple(case.image.shape):
        raise ValueError(f"case {case.case_id}: masks {m.shape[1:]} do not match its image "
                         f"{case.image.shape}")

  # Mixing the shard into the seed decorrelates the augmentations of different hosts.
  shard_seed = int(np.random.SeedSequence([seed, shard_index]).generate_state(1)[0])
  if output == "crops":
    sample = _TrainSample(volumes, crop_size, scale_range, flip_axes, masks)
  else:
    sample = _TrainParams([image.shape for image, _ in volumes], crop_size, scale_range,
                          flip_axes, shard_index, shard_count)
  # grain's default read options (16 threads, 500 elements read ahead) buffer gigabytes of
  # crops while a slow training step runs; two batches ahead keep the accelerator fed.
  read_options = grain.ReadOptions(num_threads=num_threads,
                                   prefetch_buffer_size=max(2 * batch_size, num_threads))
  ds = (grain.MapDataset.range(len(volumes)).seed(shard_seed).shuffle().repeat()
        .random_map(sample).to_iter_dataset(read_options))
  if num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return ds.batch(batch_size, drop_remainder=True)


def eval_volumes(cases: Iterable[TrainingCase]) -> Iterator[dict[str, Any]]:
  """Whole preprocessed volumes, one case at a time, in the order of `cases`.

  Yields {"case_id": str, "image": (X, Y, Z, 1) float32, "label": (X, Y, Z) int32}; "label"
  is absent for unlabelled cases. The image is a view of the case's array; only the label
  of the current case is converted.
  """
  for case in cases:
    item = {"case_id": case.case_id, "image": np.asarray(case.image, np.float32)[..., None]}
    if case.label is not None:
      item["label"] = case.label.astype(np.int32)
    yield item


def measure_rate(dataset: Iterable[dict[str, np.ndarray]], num_batches: int) -> dict[str, float]:
  """Throughput of a batch stream over `num_batches` batches after one warm-up batch.

  Returns {"samples_per_s", "batches_per_s", "mvoxels_per_s", "seconds", "num_batches"};
  voxels count the image's spatial voxels (0 for a stream of crop parameters,
  `train_dataset(..., output="params")`, whose samples are counted by their case index).
  """
  if num_batches < 1:
    raise ValueError(f"num_batches must be positive, got {num_batches}")
  it = iter(dataset)
  try:
    next(it)  # Warm-up: worker start-up and first-touch costs are not throughput.
    samples = voxels = 0
    start = time.perf_counter()
    for _ in range(num_batches):
      batch = next(it)
      if "image" in batch:
        samples += batch["image"].shape[0]
        voxels += batch["image"].size // batch["image"].shape[-1]
      else:
        samples += batch["case"].shape[0]
    seconds = time.perf_counter() - start
  finally:
    if hasattr(it, "close"):
      it.close()
  return {"samples_per_s": samples / seconds, "batches_per_s": num_batches / seconds,
          "mvoxels_per_s": voxels / seconds / 1e6, "seconds": seconds,
          "num_batches": float(num_batches)}
