"""The benchmark experiment at a tiny size: every step is timed and reported, JAX beside a
PyTorch reference when one is given, and nothing here depends on torch being installed."""
from __future__ import annotations

import json
import types

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import benchmark as benchmark_experiment
from wh_errmap.benchmark import Result, peak_flops, table
from wh_errmap.errors import UserError


def tiny_benchmark_config():
  c = benchmark_experiment.get_config()
  c.model.width1, c.model.width2, c.model.num_voxres = 4, 8, 1
  c.preprocess.crop_size = (24, 24, 16)
  c.input.crop_3d = c.input.crop_predictor = (16, 16, 16)
  c.input.crop_2d = (16, 16)
  c.train.seg2d.batch_size = 4
  c.benchmark.configs = ("paper",)   # "paper" takes this config's (here tiny) sizes
  c.benchmark.warmup, c.benchmark.iters = 1, 2
  c.benchmark.reference = "off"
  return c


def test_benchmark_times_every_step_and_writes_table(tmp_path):
  config = tiny_benchmark_config()
  docs = tmp_path / "docs" / "benchmarks.md"
  docs.parent.mkdir()
  docs.write_text("# Benchmarks\n\nearlier results\n")
  config.benchmark.docs = str(docs)
  benchmark_experiment.run(config, str(tmp_path / "run"))

  payload = json.loads((tmp_path / "run" / "benchmark.json").read_text())
  rows = {r["step"]: r for r in payload["results"]}
  assert set(rows) == {"seg3d_train", "seg2d_train", "predictor_train", "inference", "input"}
  for step in ("seg3d_train", "seg2d_train", "predictor_train", "inference"):
    row = rows[step]
    assert row["seconds_per_iter"] > 0 and np.isfinite(row["seconds_per_iter"])
    assert row["flops_per_iter"] > 0, step          # from XLA's cost analysis
    assert row["footprint_bytes"] > 0, step         # from XLA's memory analysis
    assert row["samples_per_s"] == pytest.approx(row["batch"] / row["seconds_per_iter"])
  assert rows["seg2d_train"]["batch"] == 4
  assert rows["seg2d_train"]["voxels_per_sample"] == 16 * 16
  assert rows["inference"]["voxels_per_sample"] == 24 * 24 * 16
  # The predictor step also runs both segmentors: more work than the 3D step alone.
  assert rows["predictor_train"]["flops_per_iter"] > rows["seg3d_train"]["flops_per_iter"]
  assert payload["environment"]["backend"] == "cpu"

  md = (tmp_path / "run" / "benchmark.md").read_text()
  assert md.count("\n| paper |") == 5
  text = docs.read_text()
  assert text.startswith("# Benchmarks\n\nearlier results\n") and md.strip() in text


def test_bad_benchmark_settings_are_user_errors(tmp_path):
  config = tiny_benchmark_config()
  config.benchmark.steps = ("seg3d_train", "warp_drive")
  with pytest.raises(UserError, match="warp_drive"):
    benchmark_experiment.run(config, str(tmp_path))
  config = tiny_benchmark_config()
  config.benchmark.configs = ("huge",)
  with pytest.raises(UserError, match="huge"):
    benchmark_experiment.run(config, str(tmp_path))


def test_small_preset_has_the_quick_start_sizes():
  from experiments import cv_fold_small
  small = benchmark_experiment.preset(benchmark_experiment.get_config(), "small")
  quick = cv_fold_small.get_config()
  for field in ("model", "input", "preprocess"):
    assert small[field].to_dict() == quick[field].to_dict(), field
  for name in ("seg3d", "seg2d", "predictor"):
    assert small.train[name].batch_size == quick.train[name].batch_size


def test_peak_flops_by_device_kind():
  def device(kind):
    return types.SimpleNamespace(device_kind=kind)
  assert peak_flops(device("NVIDIA H100 80GB HBM3"), jnp.bfloat16) == pytest.approx(989.4e12)
  assert peak_flops(device("NVIDIA H100 PCIe"), jnp.bfloat16) == pytest.approx(756e12)
  assert peak_flops(device("NVIDIA H200"), jnp.float32) == pytest.approx(494.7e12)
  assert peak_flops(device("NVIDIA A100-SXM4-80GB"), jnp.bfloat16) == pytest.approx(312e12)
  assert peak_flops(device("cpu"), jnp.float32) is None


def test_table_shows_pytorch_ratio():
  results = [Result("paper", "seg3d_train", 2, 1000, 0.5, flops_per_iter=1e12,
                    footprint_bytes=3 * 10**9, peak_flops=4e12)]
  reference = {"torch_version": "2.x", "device_name": "cpu", "num_threads": 2,
               "settings": {"amp": "none", "compile": False, "channels_last": False},
               "results": [{"config": "paper", "step": "seg3d_train", "seconds_per_iter": 1.0}]}
  md = table.markdown(table.environment("float32"), results, reference)
  row = next(line for line in md.splitlines() if line.startswith("| paper"))
  cells = [c.strip() for c in row.strip("|").split("|")]
  # ms/step, samples/s, TFLOP/s, % peak, memory, PyTorch ms, ratio (PyTorch takes 2x longer)
  assert cells[3] == "500.0" and cells[4] == "4.00" and cells[7] == "2.00"
  assert cells[8] == "50.0" and cells[9] == "3.00" and cells[10] == "1000.0"
  assert cells[11] == "2.00"
