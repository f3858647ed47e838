"""Data-parallel equivalence (1 vs 8 devices) and exact resume of the training loop."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from tests.train.tiny import train_tiny
from wh_errmap.train.sharding import make_mesh

ROOT = Path(__file__).resolve().parents[2]


def test_eight_devices_match_one_device():
  """Segmentor and predictor steps: 8 simulated devices give the 1-device result."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", "tests.train.sharded_training"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  for name in ("segmentor", "predictor"):
    np.testing.assert_allclose(out[name]["losses_8"], out[name]["losses_1"], rtol=1e-5)
    # An extra pmean or a missing one would scale the update by 8: far above this tolerance.
    assert out[name]["param_diff"] < 1e-4, (name, out[name])
    assert out[name]["stats_diff"] < 1e-4, (name, out[name])


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
  train_tiny(tmp_path, make_mesh(jax.devices()[:1]), num_steps=12, batch_size=2,
             checkpoint_every=100)
  losses = [json.loads(line)["loss"] for line in (tmp_path / "seg" / "metrics.jsonl")
            .read_text().splitlines()]
  assert np.mean(losses[-3:]) < losses[0]
