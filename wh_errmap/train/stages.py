"""Training stages of a fold, built from an experiment config: the segmentors (3D, 2D) and
the error-map predictor. Each stage returns the trained variables; the models that use them
are built for the mesh they run on (`models.factory`)."""
from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from wh_errmap.data.device_crops import crop_batch, stack_volumes, use_device_data
from wh_errmap.data.pipeline import train_dataset
from wh_errmap.data.preprocess import PreprocessConfig, PreprocessedCase
from wh_errmap.data.structures import NUM_CLASSES
from wh_errmap.errors import UserError
from wh_errmap.models.factory import SEGMENTORS, predictor_model, segmentor_model
from wh_errmap.train import loop
from wh_errmap.train.checkpoints import restore_variables
from wh_errmap.train.losses import batch_dice
from wh_errmap.train.masks import MaskSources, case_masks, predictor_mask_sources
from wh_errmap.train.precomputed import training_masks
from wh_errmap.train.sharding import Layout, model_layout
from wh_errmap.train.state import create_state, make_optimizer
from wh_errmap.train.steps import make_predictor_step, make_segmentor_step
from wh_errmap.utils.progress import console

MODELS = (*SEGMENTORS, "predictor")   # the models of a fold, in training order
Variables = dict[str, Any]   # {"params": ..., "batch_stats": ...}


def training_input(config: ml_collections.ConfigDict, cases: Sequence[PreprocessedCase],
                    crop: tuple[int, ...], batch_size: int, seed: int,
                    masks: Sequence[Any] | None = None) -> dict[str, Any]:
  """The keyword arguments of loop.train that feed it: dataset, and for crops made on the
  device (use_device_data) device_data and make_batch.

  Both paths draw the same cases, crops, flips and scales from the same grain stream; the
  device path receives only those parameters and resamples inside the jitted step.
  masks: precomputed masks per case (`train_dataset`); they are cropped on the host.
  """
  setting = config.input.get("on_device", False)
  if not isinstance(setting, bool) and setting != "auto":
    raise UserError(f"input.on_device must be 'auto', True or False, got {setting!r}")
  if masks is not None and setting is True:
    raise UserError("input.on_device=True cannot carry precomputed masks "
                    "(predictor.mask_sources.precomputed): use 'auto' or False")
  on_device = masks is None and use_device_data(setting, cases)
  dataset = train_dataset(cases, crop_size=crop, batch_size=batch_size, seed=seed,
                          scale_range=config.input.scale_range,
                          num_workers=config.input.num_workers,
                          output="params" if on_device else "crops", masks=masks)
  if not on_device:
    return {"dataset": dataset}
  return {"dataset": dataset, "device_data": stack_volumes(cases),
          "make_batch": functools.partial(crop_batch, crop_size=crop)}


SEGMENTOR_MASKS = ("crop", "case")


def segmentor_masks_per_case(config: ml_collections.ConfigDict, sources: MaskSources) -> bool:
  """Whether the predictor's segmentor masks are made once per whole training case
  (predictor.segmentor_masks = "case") rather than inside each step from its crop ("crop").
  UserError for another value, or for "case" together with settings it cannot honour."""
  where = config.predictor.get("segmentor_masks", "crop")
  if where not in SEGMENTOR_MASKS:
    raise UserError(f"predictor.segmentor_masks must be one of {', '.join(SEGMENTOR_MASKS)}, "
                    f"got {where!r}")
  if where == "crop" or sources.segmentors == 0:
    return False
  if sources.precomputed > 0:
    raise UserError("predictor.segmentor_masks='case' cannot be combined with precomputed "
                    "masks (predictor.mask_sources.precomputed > 0): use 'crop'")
  return True


def model_layouts(config: ml_collections.ConfigDict, **devices: Any) -> dict[str, Layout]:
  """The batch layout of every model of a fold ({"seg3d", "seg2d", "predictor"}), checked
  against the devices (UserError naming the setting) before any data or training work.
  devices: num_devices / num_processes of `model_layout` (default: this run's).
  The predictor's mask settings are checked here too."""
  segmentor_masks_per_case(config, predictor_mask_sources(config))
  return {name: model_layout(config, name, **devices) for name in MODELS}


def _loop_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The keyword arguments of loop.train that every model takes from the config."""
  return {"log_every": config.train.log_every,
          "checkpoint_every": config.train.checkpoint_every,
          "keep_checkpoints": config.train.keep_checkpoints,
          "allow_restart": config.get("overwrite", False)}


def train_segmentor(config: ml_collections.ConfigDict, name: str,
                    train_cases: Sequence[PreprocessedCase], workdir: str | Path,
                    layout: Layout, progress: Callable[[str], None] = console) -> Variables:
  """Trains (or resumes, or just restores) segmentor `name` ("seg3d" or "seg2d") with the
  batch `layout` (`model_layouts`). Returns its variables {"params", "batch_stats"}."""
  spatial_dims = SEGMENTORS[name]
  model = segmentor_model(config, name, layout.space)
  crop = tuple(config.input.crop_3d if spatial_dims == 3 else config.input.crop_2d)
  schedule = config.train[name]
  mesh = layout.mesh()
  tx = make_optimizer(config.optim, schedule.steps, layout.lr_factor,
                      schedule.get("learning_rate", 0.0))
  rng = jax.random.key(config.seed)
  state = create_state(model, tx, (layout.batch, *crop, 1),
                       jax.random.fold_in(rng, spatial_dims), mesh)
  feed = training_input(config, train_cases, crop, layout.per_process,
                        config.seed + spatial_dims)
  state = loop.train(name, workdir, state=state, step_fn=make_segmentor_step(
                         model, config.loss, batch_dice(config, name)),
                     mesh=mesh, num_steps=schedule.steps, seed=config.seed,
                     progress=progress, **_loop_settings(config), **feed)
  return {"params": state.params, "batch_stats": state.batch_stats}


def restore_segmentors(config: ml_collections.ConfigDict, fold_dir: str | Path,
                       progress: Callable[[str], None] = console) -> dict[str, Variables]:
  """The trained segmentors' variables of a fold, read-only from their newest checkpoints;
  UserError naming the model when one has none."""
  out = {}
  for name, dims in SEGMENTORS.items():
    crop = tuple(config.input.crop_3d if dims == 3 else config.input.crop_2d)
    checkpoints = Path(fold_dir) / name / "checkpoints"
    variables, _ = restore_variables(checkpoints, segmentor_model(config, name), config.optim,
                                     config.train[name].steps, (1, *crop, 1), progress)
    if variables is None:
      raise UserError(f"{checkpoints}: no trained {name}")
    out[name] = variables
  return out


def reference_masks(config: ml_collections.ConfigDict, segmentors: Mapping[str, Variables],
                    cases: Sequence[PreprocessedCase]) -> dict[str, list[np.ndarray]]:
  """The 10 auto masks of each (training) case by the segmentors' variables, on its own
  grid, one device (`train.masks.case_masks`): the predictor's "case" masks, and masks of
  every quality for the training reference's appearances
  (`data.training_reference.training_reference`)."""
  masks = case_masks(*[(segmentor_model(config, name), segmentors[name])
                       for name in SEGMENTORS], [case.image for case in cases])
  return {case.case_id: list(m) for case, m in zip(cases, masks)}


def train_predictor(config: ml_collections.ConfigDict, segmentors: Mapping[str, Variables],
                    train_cases: Sequence[PreprocessedCase], workdir: str | Path,
                    layout: Layout, preprocess: PreprocessConfig,
                    progress: Callable[[str], None] = console) -> Variables:
  """Trains (or resumes, or restores) the error-map predictor with the batch `layout`, on
  masks that the frozen segmentors (their variables by name) generate inside its step from
  the training crops. preprocess: how the cases were preprocessed, for precomputed masks.
  Returns its variables {"params", "batch_stats"}."""
  model = predictor_model(config, layout.space)
  crop = tuple(config.input.crop_predictor)
  schedule = config.train.predictor
  mesh = layout.mesh()
  tx = make_optimizer(config.optim, schedule.steps, layout.lr_factor,
                      schedule.get("learning_rate", 0.0))
  rng = jax.random.fold_in(jax.random.key(config.seed), 1000)
  state = create_state(model, tx, (layout.batch, *crop, 1 + NUM_CLASSES), rng, mesh)
  sources = predictor_mask_sources(config)
  masks = None
  if sources.precomputed > 0:   # the fold's training cases only: never a test case's mask
    masks, line = training_masks(config.predictor.mask_dirs, config.predictor.mask_labels,
                                 train_cases, preprocess)
    progress(line)
  if segmentor_masks_per_case(config, sources):
    # Made once from each whole training case, as test masks are made from whole scans,
    # then carried through the crops like precomputed masks: the step runs no segmentor.
    start = time.perf_counter()
    masks = [np.stack(m) for m in reference_masks(config, segmentors, train_cases).values()]
    sources = dataclasses.replace(sources, segmentors=0.0, precomputed=sources.segmentors)
    progress(f"[predictor] the segmentors' {sum(len(m) for m in masks)} masks of the "
             f"{len(train_cases)} whole training cases made in "
             f"{time.perf_counter() - start:.1f} s")
  feed = training_input(config, train_cases, crop, layout.per_process, config.seed + 1000,
                        masks)
  # The frozen segmentors run inside the predictor's step, on its mesh: their convolutions
  # take the form that partitions over its 'space' axis (same parameters either way).
  seg3d, seg2d = (segmentor_model(config, name, layout.space) for name in SEGMENTORS)
  step = make_predictor_step(model, seg3d, seg2d, config.loss,
                             config.predictor.gt_probability, NUM_CLASSES, sources)
  state = loop.train("predictor", workdir, state=state, step_fn=step, mesh=mesh,
                     num_steps=schedule.steps, seed=config.seed + 1000,
                     frozen={name: segmentors[name] for name in SEGMENTORS},
                     progress=progress, **_loop_settings(config), **feed)
  return {"params": state.params, "batch_stats": state.batch_stats}
