"""A tiny segmentor training setup shared by the training tests (CPU-sized)."""
from __future__ import annotations

import types

import jax
import ml_collections
import numpy as np

from experiments import base
from wh_errmap.data.pipeline import train_dataset
from wh_errmap.train import loop
from wh_errmap.train.state import create_state, make_model, make_optimizer
from wh_errmap.train.steps import make_segmentor_step


def tiny_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.model.width1, c.model.width2, c.model.num_voxres = 4, 8, 1
  c.optim.warmup_steps = 2
  c.optim.learning_rate = 1e-2
  return c


def tiny_cases(num: int = 4, shape=(20, 18, 14)) -> list:
  rng = np.random.default_rng(0)
  cases = []
  for i in range(num):
    label = np.zeros(shape, np.uint8)
    label[4:12, 5:13, 3:10] = 1 + i % 7
    label[10:16, 2:8, 6:12] = 3
    image = (label * 0.2 + rng.normal(0, 0.1, shape)).astype(np.float32)
    cases.append(types.SimpleNamespace(case_id=f"c{i}", image=image, label=label))
  return cases


def train_tiny(workdir, mesh, num_steps: int, batch_size: int = 8, crop=(16, 16, 12),
               spatial_dims: int = 3, seed: int = 0, checkpoint_every: int = 2,
               optimizer: str = "adam", stop_at: int | None = None):
  """Trains a tiny segmentor with the real loop; returns the final state."""
  config = tiny_config()
  config.optim.name = optimizer
  if optimizer == "sgd":
    config.optim.learning_rate = 0.1
  model = make_model(config.model, spatial_dims, 8)
  tx = make_optimizer(config.optim, num_steps)
  state = create_state(model, tx, (batch_size, *crop, 1), jax.random.key(seed), mesh)
  dataset = train_dataset(tiny_cases(), crop_size=crop, batch_size=batch_size, seed=seed,
                          shard_index=0, shard_count=1)
  return loop.train("seg", workdir, state=state, step_fn=make_segmentor_step(model, config.loss),
                    dataset=dataset, mesh=mesh, num_steps=num_steps, seed=seed, log_every=1,
                    checkpoint_every=checkpoint_every, stop_at=stop_at, progress=lambda _: None)
