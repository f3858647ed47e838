"""A dataset ready for training: data folder (or phantom), preprocessing cache and CV split.

Cache layout (root: `cache_dir`, by default $WH_ERRMAP_CACHE or ~/.cache/wh_errmap):

    xla/                             compiled programs (wh_errmap.cache)
    phantom-v{V}-n{N}-s{seed}[-x{scale}]/  generated phantom in the MMWHS layout (no data_dir)
    datasets/{name}-{hash}/          one folder per data folder (hash of its absolute path)
      splits.json                    the K-fold split, written once
      preprocessed/{case}-{key}.npz  one file per case; key = input files + preprocess config
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from wh_errmap.data.mmwhs import find_cases
from wh_errmap.data.nifti_io import InvalidCaseError
from wh_errmap.data.preprocess import PreprocessConfig, PreprocessedCase, preprocess_cached
from wh_errmap.data.splits import fold_cases, load_or_create_splits
from wh_errmap.errors import UserError
from wh_errmap.utils.cache import default_cache_dir
from wh_errmap.utils.progress import console

Progress = Callable[[str], None]
PHANTOM_VERSION = 1  # bump when the generator changes, so old caches are not reused
MAX_PHANTOM_SCALE = 8.0   # coarsest phantom voxels offered (x8: about 8-10 mm in-plane)


def check_phantom_scale(scale: float) -> float:
  """phantom_scale as a float, or a UserError naming the setting: the phantom's voxels are
  coarsened by 1 to MAX_PHANTOM_SCALE (finer than MMWHS-like scans is not offered)."""
  try:
    value = float(scale)
  except (TypeError, ValueError):
    value = math.nan
  if not 1.0 <= value <= MAX_PHANTOM_SCALE:   # NaN fails too
    raise UserError(f"phantom_scale must be a number from 1 to {MAX_PHANTOM_SCALE:g} "
                    f"(the phantom's voxel size is multiplied by it), got {scale!r}")
  return value


def phantom_dir(cache_dir: str | os.PathLike, num_cases: int, seed: int,
                progress: Progress = console, scale: float = 1.0) -> Path:
  """The phantom data folder in the cache, generated on first use; `scale` > 1 coarsens
  its voxels (check_phantom_scale)."""
  from wh_errmap.data.phantom import write_phantom  # only needed when no data_dir is given
  scale = check_phantom_scale(scale)
  suffix = "" if scale == 1.0 else f"-x{scale:g}"
  path = Path(cache_dir) / f"phantom-v{PHANTOM_VERSION}-n{num_cases}-s{seed}{suffix}"
  done = path / ".complete"
  if not done.exists():
    coarse = "" if scale == 1.0 else f", voxels {scale:g}x coarser"
    progress(f"generating the synthetic phantom ({num_cases} cases, seed {seed}{coarse}) "
             f"in {path}")
    start = time.perf_counter()
    write_phantom(path, num_cases=num_cases, seed=seed, progress=progress,
                  spacing_scale=scale)
    done.write_text(f"{num_cases} cases\n")
    progress(f"phantom ready in {time.perf_counter() - start:.1f} s")
  return path


@dataclasses.dataclass
class Dataset:
  data_dir: Path
  cache_dir: Path                       # this data folder's cache (splits.json lives here)
  cases: dict[str, PreprocessedCase]    # by case id, sorted
  folds: list[dict]                     # [{"train": [...], "test": [...]}, ...]
  preprocess: PreprocessConfig          # how the cases were preprocessed

  def fold(self, k: int) -> tuple[list[PreprocessedCase], list[PreprocessedCase]]:
    train, test = fold_cases(self.folds, k)
    return [self.cases[c] for c in train], [self.cases[c] for c in test]

  def whole_scans(self, cases: Sequence[PreprocessedCase]) -> list[PreprocessedCase]:
    """`cases` as whole resampled scans, uncropped (cached beside the cropped ones). Test
    cases are scored this way: no crop around their ground truth, which only a scorer
    has; each mask being assessed is cropped around itself (evaluation, predict)."""
    return [preprocess_cached(case.properties["image_path"], case.properties["label_path"],
                              self.cache_dir / "preprocessed", self.preprocess, case.case_id,
                              whole=True)[0] for case in cases]


def dataset_cache_dir(cache_dir: str | os.PathLike, data_dir: str | os.PathLike) -> Path:
  data_dir = Path(data_dir).resolve()
  digest = hashlib.sha1(str(data_dir).encode()).hexdigest()[:8]
  return Path(cache_dir) / "datasets" / f"{data_dir.name}-{digest}"


def prepare_dataset(data_dir: str | os.PathLike, cache_dir: str | os.PathLike,
                    modality: str = "mr",
                    preprocess: PreprocessConfig = PreprocessConfig(),
                    num_folds: int = 5, split_seed: int = 0,
                    progress: Progress = console) -> Dataset:
  """Finds the labelled cases, preprocesses them (or reads the cache) and loads the split."""
  found = find_cases(data_dir, modality=modality)
  for case_paths in found:
    if case_paths.label_path is None and "_train_" in case_paths.case_id:
      raise InvalidCaseError(case_paths.image_path, "training image without its label file")
  paths = [c for c in found if c.label_path is not None]
  if not paths:
    raise InvalidCaseError(data_dir, f"no labelled {modality} cases found")
  own_cache = dataset_cache_dir(cache_dir, data_dir)
  cases = {}
  start = time.perf_counter()
  for i, case_paths in enumerate(paths):
    case, hit = preprocess_cached(case_paths.image_path, case_paths.label_path,
                                  own_cache / "preprocessed", preprocess, case_paths.case_id)
    cases[case.case_id] = case
    if not hit:
      progress(f"preprocessed {case.case_id} ({i + 1}/{len(paths)}): "
               f"{'x'.join(map(str, case.image.shape))} at {preprocess.spacing[0]:g} mm")
  progress(f"{len(cases)} cases ready in {time.perf_counter() - start:.1f} s "
           f"(cache: {own_cache})")
  folds = load_or_create_splits(own_cache / "splits.json", list(cases), num_folds, split_seed)
  return Dataset(Path(data_dir), own_cache, cases, folds, preprocess)


def data_source(config: Mapping[str, Any]) -> str:
  """Where a run's cases come from, in words, from its config (a ConfigDict, or the dict of
  its config.json): the MMWHS folder, or the synthetic phantom."""
  if config["data_dir"]:
    return f"MMWHS {config['modality'].upper()} data in {config['data_dir']}"
  scale = float(config.get("phantom_scale", 1.0))   # absent from older runs' config.json
  coarse = "" if scale == 1.0 else f", voxels {scale:g}x coarser"
  return (f"the synthetic whole-heart phantom ({config['num_cases']} cases, seed "
          f"{config['seed']}{coarse}), not MMWHS data")


def dataset_from_config(config, progress: Progress = console) -> Dataset:
  """`prepare_dataset` driven by an experiment config (see experiments/base.py)."""
  cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
  data_dir = config.data_dir or phantom_dir(cache_dir, config.num_cases, config.seed, progress,
                                            config.phantom_scale)
  return prepare_dataset(data_dir, cache_dir, config.modality,
                         PreprocessConfig.from_config(config), config.splits.num_folds,
                         config.seed, progress)
