"""Exact resume, learning and on-device crops of the training loop (its 8-device
equivalence: tests/train/test_sharding.py)."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from tests.train.tiny import tiny_cases, tiny_config, train_tiny
from wh_errmap.models.factory import make_model
from wh_errmap.train import loop
from wh_errmap.train.stages import training_input
from wh_errmap.train.state import create_state, make_optimizer
from wh_errmap.train.steps import make_segmentor_step
from wh_errmap.utils.mesh import make_mesh



def test_resume_gives_the_same_parameters(tmp_path):
  mesh = make_mesh(jax.devices()[:1])
  straight = train_tiny(tmp_path / "a", mesh, num_steps=6, batch_size=2)
  stopped = train_tiny(tmp_path / "b", mesh, num_steps=6, batch_size=2, stop_at=3)
  assert int(stopped.step) == 3   # a checkpoint at step 2 and the stop at 3
  resumed = train_tiny(tmp_path / "b", mesh, num_steps=6, batch_size=2)
  for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(a, b)
  steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "seg" / "metrics.jsonl")
           .read_text().splitlines()]
  assert steps == [1, 2, 3, 4, 5, 6]
  # A finished run only restores.
  again = train_tiny(tmp_path / "b", mesh, num_steps=6, batch_size=2)
  assert int(again.step) == 6


def test_training_reduces_the_loss(tmp_path):
  """12 Adam steps (fixed seeds) take the loss of the last 4 batches to at most 3/4 of the
  first step's. Without learning the loss stays near its start on every batch: a zeroed
  gradient gave 15.0-16.8 on these batches against 15.65 at step 1, a sign-flipped one
  climbed past 100, the real one reached 7.3-10.6 (mean 8.9)."""
  train_tiny(tmp_path, make_mesh(jax.devices()[:1]), num_steps=12, batch_size=2, seed=0,
             checkpoint_every=100, log_every=1)
  losses = np.array([json.loads(line)["loss"] for line in (tmp_path / "seg" / "metrics.jsonl")
                     .read_text().splitlines()])
  assert losses.shape == (12,) and np.isfinite(losses).all(), losses
  assert losses[-4:].mean() < 0.75 * losses[0], losses


@pytest.mark.parametrize("spatial_dims", [3, 2])
def test_crops_made_on_the_device_train_like_host_crops(tmp_path, spatial_dims):
  """input.on_device: the loop gets crop parameters and makes the crops inside the step;
  without scaling those crops are the host's exactly, so training is the same; a stopped
  device-path run resumes to the same parameters."""
  config = tiny_config()
  config.input.scale_range = (1.0, 1.0)
  # SGD: Adam's normalised update turns rounding noise in a gradient that should be zero
  # (a bias before batch norm) into a full step, hiding whether the crops matched.
  config.optim.name, config.optim.learning_rate = "sgd", 0.1
  crop = (16, 16, 12) if spatial_dims == 3 else (16, 16)
  model = make_model(config.model, spatial_dims, 8)
  mesh = make_mesh(jax.devices()[:1])
  cases = tiny_cases()

  def run(on_device, workdir, stop_at=None):
    config.input.on_device = on_device
    feed = training_input(config, cases, crop, batch_size=2, seed=0)
    assert ("make_batch" in feed) == on_device
    state = create_state(model, make_optimizer(config.optim, 4), (2, *crop, 1),
                         jax.random.key(0), mesh)
    state = loop.train("seg", workdir, state=state, step_fn=make_segmentor_step(model, config.loss),
                       mesh=mesh, num_steps=4, seed=0, log_every=1, checkpoint_every=2,
                       stop_at=stop_at, progress=lambda _: None, **feed)
    losses = [json.loads(line)["loss"]
              for line in (workdir / "seg" / "metrics.jsonl").read_text().splitlines()]
    return state, losses

  host, host_losses = run(False, tmp_path / "host")
  device, device_losses = run(True, tmp_path / "device")
  np.testing.assert_allclose(device_losses, host_losses, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(host.params), jax.tree.leaves(device.params)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  run(True, tmp_path / "resumed", stop_at=3)
  resumed, _ = run(True, tmp_path / "resumed")
  for a, b in zip(jax.tree.leaves(device.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(a, b)
