"""Training stages of a fold, built from an experiment config: the segmentors (3D, 2D) and
the error-map predictor."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import ml_collections

from wh_errmap.data import NUM_CLASSES
from wh_errmap.data.pipeline import train_dataset
from wh_errmap.data.preprocess import PreprocessedCase
from wh_errmap.models.voxresnet import VoxResNet
from wh_errmap.train import loop
from wh_errmap.train.sharding import make_mesh
from wh_errmap.train.state import create_state, make_model, make_optimizer
from wh_errmap.train.steps import make_predictor_step, make_segmentor_step
from wh_errmap.progress import console

SEGMENTORS = {"seg3d": 3, "seg2d": 2}   # model name -> spatial dims


def per_process_batch(global_batch: int) -> int:
  if global_batch % jax.process_count():
    raise ValueError(f"batch {global_batch} does not split over {jax.process_count()} processes")
  return global_batch // jax.process_count()


def segmentor_model(config: ml_collections.ConfigDict, name: str) -> VoxResNet:
  return make_model(config.model, SEGMENTORS[name], NUM_CLASSES)


def train_segmentor(config: ml_collections.ConfigDict, name: str,
                    train_cases: Sequence[PreprocessedCase], workdir: str | Path,
                    progress: Callable[[str], None] = console,
                    ) -> tuple[VoxResNet, dict[str, Any]]:
  """Trains (or resumes, or just restores) segmentor `name` ("seg3d" or "seg2d").

  Returns the model and its variables {"params", "batch_stats"}.
  """
  spatial_dims = SEGMENTORS[name]
  model = segmentor_model(config, name)
  crop = tuple(config.input.crop_3d if spatial_dims == 3 else config.input.crop_2d)
  schedule = config.train[name]
  batch = schedule.batch_size
  mesh = make_mesh()
  tx = make_optimizer(config.optim, schedule.steps)
  rng = jax.random.key(config.seed)
  state = create_state(model, tx, (batch, *crop, 1), jax.random.fold_in(rng, spatial_dims), mesh)
  dataset = train_dataset(train_cases, crop_size=crop, batch_size=per_process_batch(batch),
                          seed=config.seed + spatial_dims, scale_range=config.input.scale_range,
                          num_workers=config.input.num_workers)
  state = loop.train(name, workdir, state=state, step_fn=make_segmentor_step(model, config.loss),
                     dataset=dataset, mesh=mesh, num_steps=schedule.steps, seed=config.seed,
                     log_every=config.train.log_every,
                     checkpoint_every=config.train.checkpoint_every,
                     keep_checkpoints=config.train.keep_checkpoints, progress=progress)
  return model, {"params": state.params, "batch_stats": state.batch_stats}


def predictor_model(config: ml_collections.ConfigDict) -> VoxResNet:
  """The error-map predictor: a 3D VoxResNet from image + one-hot mask to one error logit."""
  return make_model(config.model, 3, 1)


def train_predictor(config: ml_collections.ConfigDict,
                    segmentors: dict[str, tuple[VoxResNet, dict[str, Any]]],
                    train_cases: Sequence[PreprocessedCase], workdir: str | Path,
                    progress: Callable[[str], None] = console,
                    ) -> tuple[VoxResNet, dict[str, Any]]:
  """Trains (or resumes, or restores) the error-map predictor on masks that the frozen
  segmentors generate inside its step from the training crops."""
  model = predictor_model(config)
  crop = tuple(config.input.crop_predictor)
  schedule = config.train.predictor
  mesh = make_mesh()
  tx = make_optimizer(config.optim, schedule.steps)
  rng = jax.random.fold_in(jax.random.key(config.seed), 1000)
  state = create_state(model, tx, (schedule.batch_size, *crop, 1 + NUM_CLASSES), rng, mesh)
  dataset = train_dataset(train_cases, crop_size=crop,
                          batch_size=per_process_batch(schedule.batch_size),
                          seed=config.seed + 1000, scale_range=config.input.scale_range,
                          num_workers=config.input.num_workers)
  step = make_predictor_step(model, segmentors["seg3d"][0], segmentors["seg2d"][0], config.loss,
                             config.predictor.gt_probability, NUM_CLASSES)
  frozen = {name: variables for name, (_, variables) in segmentors.items()}
  state = loop.train("predictor", workdir, state=state, step_fn=step, dataset=dataset, mesh=mesh,
                     num_steps=schedule.steps, seed=config.seed + 1000,
                     log_every=config.train.log_every,
                     checkpoint_every=config.train.checkpoint_every,
                     keep_checkpoints=config.train.keep_checkpoints, frozen=frozen,
                     progress=progress)
  return model, {"params": state.params, "batch_stats": state.batch_stats}
