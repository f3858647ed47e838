"""Input pipeline: random training crops (3D patches or 2D axial slices) and whole eval volumes.

Training samples come from a grain graph

  MapDataset.range(len(shard)).seed(s).shuffle().repeat().random_map(sample)
    -> to_iter_dataset(threads, bounded buffer) [-> mp_prefetch(workers)] -> batch(B)

so a stream is a pure function of (seed, shard, position): two datasets with the same seed
give identical batches, an iterator resumes exactly from `get_state()`, and the batches do
not depend on the number of workers (batching runs after the prefetch, in the main process).

Augmentations work on one sample and take an explicit `np.random.Generator`:
`RandAxialSlice` (2D only), `RandAffineCrop` (random crop + isotropic scaling + padding,
resampling only the crop-sized output) and `RandFlip`.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import grain
import jax
import numpy as np
from scipy import ndimage

# Intensity of the background after preprocessing; padding uses it so padded voxels look
# like air rather than tissue.
IMAGE_PAD_VALUE = -1.0
LABEL_PAD_VALUE = 0


class PreprocessedCase(Protocol):
  """What the pipeline reads from a case: (X, Y, Z) float32 image in [-1, 1] and an
  (X, Y, Z) uint8 label with classes 0..7 (None for unlabelled cases)."""
  case_id: str
  image: np.ndarray
  label: np.ndarray | None


class RandAxialSlice:
  """Picks one axial slice (last axis Z), uniformly over all slices.

  (X, Y, Z) image and label -> (X, Y) image and label (views, no copy).
  """

  def __call__(self, image: np.ndarray, label: np.ndarray,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    z = int(rng.integers(image.shape[-1]))
    return image[..., z], label[..., z]


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

  def __call__(self, image: np.ndarray, label: np.ndarray,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """image (*S) float32, label (*S) integer -> image (*crop_size) float32, label (*crop_size)
    with label's dtype; len(S) == len(crop_size)."""
    if image.ndim != len(self.crop_size):
      raise ValueError(f"crop_size {self.crop_size} does not match a volume of shape {image.shape}")
    scale = rng.uniform(*self.scale_range)
    origin = []
    for dim, crop in zip(image.shape, self.crop_size):
      # Last origin at which the region [o, o + (crop - 1) / s] still ends inside the volume;
      # negative when the region is longer than the volume.
      last = dim - 1 - (crop - 1) / scale
      low, high = (0, int(np.floor(last))) if last >= 0 else (int(np.ceil(last)), 0)
      origin.append(int(rng.integers(low, high + 1)))
    # A 1-D matrix selects scipy's separable (diagonal) path, cheaper than a full affine.
    matrix = np.full(image.ndim, 1.0 / scale)
    image = ndimage.affine_transform(
        image, matrix, offset=origin, output_shape=self.crop_size, output=np.float32, order=1,
        mode="grid-constant", cval=IMAGE_PAD_VALUE, prefilter=False)
    label = ndimage.affine_transform(
        label, matrix, offset=origin, output_shape=self.crop_size, output=label.dtype, order=0,
        mode="grid-constant", cval=LABEL_PAD_VALUE, prefilter=False)
    return image, label


class RandFlip:
  """Flips image and label together along each of `axes`, each with probability 0.5."""

  def __init__(self, axes: Sequence[int]):
    self.axes = tuple(int(a) for a in axes)

  def __call__(self, image: np.ndarray, label: np.ndarray,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """image, label: arrays of equal shape -> the same shapes (views)."""
    flips = rng.random(len(self.axes)) < 0.5
    axes = tuple(a for a, flip in zip(self.axes, flips) if flip)
    if axes:
      image, label = np.flip(image, axes), np.flip(label, axes)
    return image, label


class _TrainSample:
  """grain random map: case index -> one augmented sample.

  A class (not a closure) so that grain can pickle it into worker processes; it carries
  only the arrays of this shard's cases.
  """

  def __init__(self, volumes: Sequence[tuple[np.ndarray, np.ndarray]], crop_size: Sequence[int],
               scale_range: tuple[float, float], flip_axes: Sequence[int]):
    self.volumes = volumes
    self.slice = RandAxialSlice() if len(crop_size) == 2 else None
    self.crop = RandAffineCrop(crop_size, scale_range)
    self.flip = RandFlip(flip_axes)

  def __call__(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """-> {"image": (*crop_size, 1) float32, "label": (*crop_size) int32}."""
    image, label = self.volumes[index]
    if self.slice is not None:
      image, label = self.slice(image, label, rng)
    image, label = self.crop(image, label, rng)
    image, label = self.flip(image, label, rng)
    return {"image": np.ascontiguousarray(image[..., None]),
            "label": label.astype(np.int32)}


def shard_cases(cases: Sequence[Any], shard_index: int, shard_count: int) -> list[Any]:
  """The cases of one shard: every shard_count-th case starting at shard_index.

  Shards are disjoint and together cover `cases`; their sizes differ by at most one.
  """
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index} of {shard_count}")
  return list(cases[shard_index::shard_count])


def train_dataset(cases: Sequence[PreprocessedCase], *, crop_size: Sequence[int],
                  batch_size: int, seed: int,
                  scale_range: tuple[float, float] = (0.9, 1.1),
                  flip_axes: Sequence[int] | None = None,
                  shard_index: int | None = None, shard_count: int | None = None,
                  num_workers: int = 0, num_threads: int = 4) -> grain.IterDataset:
  """An infinite stream of augmented training batches from this process's shard of `cases`.

  Each epoch visits every case of the shard once, in a shuffled order that changes per epoch;
  each visit draws one sample: a 3D crop when len(crop_size) == 3, or a random axial slice
  and a 2D crop of it when len(crop_size) == 2 (see RandAffineCrop for crop, scaling and
  padding), then random flips along `flip_axes` (axes of the crop; default all).

  Batches: {"image": (batch_size, *crop_size, 1) float32, "label": (batch_size, *crop_size)
  int32}; batch_size is per process. shard_index / shard_count default to
  jax.process_index() / jax.process_count(). Shards get different augmentation streams.

  num_threads: threads computing samples in each process (the main one, or each of
  num_workers grain worker processes); scipy's resampling releases the GIL, so threads
  scale with cores. The read-ahead buffer holds 2 batches per process. num_workers > 0
  needs, with grain 0.2.18, parsed absl flags (run under absl.app.run, or call
  absl.flags.FLAGS.mark_as_parsed()); close such iterators (`it.close()`) after use.
  Batches do not depend on num_workers or num_threads.
  """
  if len(crop_size) not in (2, 3):
    raise ValueError(f"crop_size must have 2 (axial slices) or 3 entries, got {crop_size}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if num_workers < 0 or num_threads < 0:
    raise ValueError(f"num_workers and num_threads must be >= 0, got {num_workers}, {num_threads}")
  flip_axes = tuple(range(len(crop_size))) if flip_axes is None else tuple(flip_axes)
  if any(not 0 <= a < len(crop_size) for a in flip_axes):
    raise ValueError(f"flip_axes {flip_axes} are not axes of a {len(crop_size)}D crop")
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  shard = shard_cases(cases, shard_index, shard_count)
  if not shard:
    raise ValueError(f"shard {shard_index} of {shard_count} has no cases ({len(cases)} in all)")
  volumes = []
  for case in shard:
    if case.label is None:
      raise ValueError(f"case {case.case_id} has no label; training needs labels")
    if case.image.ndim != 3 or case.label.shape != case.image.shape:
      raise ValueError(f"case {case.case_id}: image {case.image.shape} and label "
                       f"{case.label.shape} must be equal (X, Y, Z) shapes")
    volumes.append((np.asarray(case.image, np.float32), np.asarray(case.label)))

  # Mixing the shard into the seed decorrelates the augmentations of different hosts.
  shard_seed = int(np.random.SeedSequence([seed, shard_index]).generate_state(1)[0])
  sample = _TrainSample(volumes, crop_size, scale_range, flip_axes)
  # grain's default read options (16 threads, 500 elements read ahead) buffer gigabytes of
  # crops while a slow training step runs; two batches ahead keep the accelerator fed.
  read_options = grain.ReadOptions(num_threads=num_threads,
                                   prefetch_buffer_size=max(2 * batch_size, num_threads))
  ds = (grain.MapDataset.range(len(volumes)).seed(shard_seed).shuffle().repeat()
        .random_map(sample).to_iter_dataset(read_options))
  if num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return ds.batch(batch_size, drop_remainder=True)


def eval_volumes(cases: Iterable[PreprocessedCase]) -> Iterator[dict[str, Any]]:
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
  voxels count the image's spatial voxels.
  """
  if num_batches < 1:
    raise ValueError(f"num_batches must be positive, got {num_batches}")
  it = iter(dataset)
  try:
    next(it)  # Warm-up: worker start-up and first-touch costs are not throughput.
    samples = voxels = 0
    start = time.perf_counter()
    for _ in range(num_batches):
      image = next(it)["image"]
      samples += image.shape[0]
      voxels += image.size // image.shape[-1]
    seconds = time.perf_counter() - start
  finally:
    if hasattr(it, "close"):
      it.close()
  return {"samples_per_s": samples / seconds, "batches_per_s": num_batches / seconds,
          "mvoxels_per_s": voxels / seconds / 1e6, "seconds": seconds,
          "num_batches": float(num_batches)}
