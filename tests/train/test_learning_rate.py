"""The peak learning rate each model trains at: optim.learning_rate, or the model's own
train.<model>.learning_rate when it is above 0, times the per-device batch factor."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import base, cv_fold_small
from wh_errmap.train import stages
from wh_errmap.train.state import make_optimizer


def _peak(own: float, factor: float = 1.0) -> float:
  """The rate of plain SGD after its 1-step warm-up, read off the update of a unit gradient."""
  optim = base.get_config().optim
  optim.name, optim.schedule, optim.warmup_steps = "sgd", "constant", 1
  optim.learning_rate = 2e-3
  tx = make_optimizer(optim, 10, factor, own)
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)
  for _ in range(2):   # step 0 is the warm-up's 0; step 1 runs at the peak
    updates, state = tx.update({"w": jnp.ones(3)}, state, params)
  return float(-updates["w"][0])


@pytest.mark.parametrize("own,factor,expected", [
    (0.0, 1.0, 2e-3), (0.0, 2.0, 4e-3), (6e-3, 1.0, 6e-3), (6e-3, 0.5, 3e-3), (1e-9, 1.0, 1e-9)])
def test_a_model_rate_above_0_replaces_the_global_one(own, factor, expected):
  assert _peak(own, factor) == pytest.approx(expected, rel=1e-6)


def test_a_negative_rate_is_refused():
  with pytest.raises(ValueError, match="learning rate"):
    _peak(-1e-3)


@pytest.mark.parametrize("name", ["seg3d", "seg2d", "predictor"])
def test_each_model_is_built_with_its_own_rate(name, monkeypatch, tmp_path):
  # The stage hands train.<name>.learning_rate to the optimizer (stopped right after).
  config = cv_fold_small.get_config()
  for model in ("seg3d", "seg2d", "predictor"):
    config.train[model].learning_rate = {"seg3d": 1e-3, "seg2d": 2e-3, "predictor": 5e-3}[model]
  seen = []

  class Built(Exception):
    pass

  def record(optim, steps, factor=1.0, learning_rate=0.0):
    seen.append(learning_rate)
    raise Built

  monkeypatch.setattr(stages, "make_optimizer", record)
  layout = stages.model_layouts(config)[name]
  with pytest.raises(Built):
    if name == "predictor":
      stages.train_predictor(config, {}, [], tmp_path, layout, None)
    else:
      stages.train_segmentor(config, name, [], tmp_path, layout)
  np.testing.assert_allclose(seen, [config.train[name].learning_rate])
