"""The benchmark experiment at a tiny size: every step is timed and reported, JAX beside a
PyTorch reference when one is given, and nothing here depends on torch being installed."""
from __future__ import annotations

import json
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import benchmark as benchmark_experiment
from wh_errmap.errors import UserError
from wh_errmap.throughput import summary, torch_runner
from wh_errmap.throughput.timing import Result, peak_flops


def tiny_benchmark_config():
  c = benchmark_experiment.get_config()
  c.model.width1, c.model.width2, c.model.num_voxres = 4, 8, 1
  c.model.conv_impl = "xla"   # 2-3x faster to compile than the CPU's matmul form
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
  assert set(rows) == {"seg3d_train", "seg2d_train", "predictor_train", "inference", "qc",
                       "input"}
  for step in ("seg3d_train", "seg2d_train", "predictor_train", "inference", "qc"):
    row = rows[step]
    assert row["seconds_per_iter"] > 0 and np.isfinite(row["seconds_per_iter"])
    assert row["flops_per_iter"] > 0, step          # from XLA's cost analysis
    assert row["footprint_bytes"] > 0, step         # from XLA's memory analysis
    assert row["samples_per_s"] == pytest.approx(row["batch"] / row["seconds_per_iter"])
  assert rows["seg2d_train"]["batch"] == 4
  assert rows["seg2d_train"]["voxels_per_sample"] == 16 * 16
  assert rows["inference"]["voxels_per_sample"] == 24 * 24 * 16
  assert rows["qc"]["voxels_per_sample"] == 24 * 24 * 16 and rows["qc"]["batch"] == 1
  # The predictor step also runs both segmentors: more work than the 3D step alone; QC runs
  # the predictor alone on the volume that inference also segments twice.
  assert rows["predictor_train"]["flops_per_iter"] > rows["seg3d_train"]["flops_per_iter"]
  assert rows["qc"]["flops_per_iter"] < rows["inference"]["flops_per_iter"]
  assert payload["reference"] is None and payload["reference_note"].startswith("off")
  assert payload["environment"]["backend"] == jax.default_backend()
  for step in ("seg3d_train", "seg2d_train", "predictor_train"):
    # The stream that feeds the step is measured beside it (host crops on the CPU).
    assert rows[step]["input_samples_per_s"] > 0, step
    assert rows[step]["input_bound"] == pytest.approx(
        rows[step]["samples_per_s"] / rows[step]["input_samples_per_s"])

  md = (tmp_path / "run" / "benchmark.md").read_text()
  assert md.count("\n| paper |") == 6
  text = docs.read_text()
  assert text.startswith("# Benchmarks\n\nearlier results\n") and md.strip() in text


def test_training_steps_with_crops_made_on_the_device(tmp_path):
  """input.on_device=True: the timed steps make their crops from volumes on the device
  (more work than a ready batch) and are compared with the parameter stream's rate."""
  config = tiny_benchmark_config()
  config.benchmark.steps = ("seg3d_train", "seg2d_train", "input")
  config.input.on_device = True
  benchmark_experiment.run(config, str(tmp_path / "run"))
  rows = {r["step"]: r for r in json.loads((tmp_path / "run" / "benchmark.json").read_text())
          ["results"]}
  for step in ("seg3d_train", "seg2d_train"):
    assert "crops on device" in rows[step]["note"]
    assert rows[step]["input_samples_per_s"] > 0 and rows[step]["flops_per_iter"] > 0
  assert "crops on device" in rows["input"]["note"]
  assert np.isfinite(rows["input"]["seconds_per_iter"])


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
                    footprint_bytes=3 * 10**9, peak_flops=4e12, input_samples_per_s=2.0)]
  reference = {"torch_version": "2.x", "device_name": "cpu", "num_threads": 2,
               "settings": {"amp": "none", "compile": False, "channels_last": False},
               "results": [{"config": "paper", "step": "seg3d_train", "seconds_per_iter": 1.0}]}
  md = summary.markdown(summary.environment("float32"), results, reference)
  row = next(line for line in md.splitlines() if line.startswith("| paper"))
  cells = [c.strip() for c in row.strip("|").split("|")]
  # ms/step, samples/s, TFLOP/s, % peak, memory, input-bound (the step takes 4 samples/s,
  # its input gives 2), PyTorch ms, ratio (PyTorch takes 2x longer)
  assert cells[3] == "500.0" and cells[4] == "4.00" and cells[7] == "2.00"
  assert cells[8] == "50.0" and cells[9] == "3.00" and cells[10] == "**yes** (2.00)"
  assert cells[11] == "1000.0" and cells[12] == "2.00"


def test_time_budget_skips_the_steps_it_has_no_time_for(tmp_path):
  config = tiny_benchmark_config()
  config.benchmark.steps = ("seg2d_train", "qc")
  config.benchmark.time_budget_s = 1e-9   # spent before the first step
  benchmark_experiment.run(config, str(tmp_path))
  payload = json.loads((tmp_path / "benchmark.json").read_text())
  assert [r["note"] for r in payload["results"]] == ["skipped: time budget spent"] * 2
  assert all(np.isnan(r["seconds_per_iter"]) for r in payload["results"])
  assert payload["reference"] is None and payload["reference_note"]   # off here anyway
  assert (tmp_path / "benchmark.md").read_text().count("skipped: time budget spent") == 2


def _fake_reference(tmp_path, monkeypatch, body: str) -> None:
  script = tmp_path / "fake_reference.py"
  script.write_text(textwrap.dedent(body))
  monkeypatch.setattr(torch_runner, "SCRIPT", script)


def test_reference_stopped_at_its_time_limit_keeps_the_finished_steps(tmp_path, monkeypatch):
  _fake_reference(tmp_path, monkeypatch, """
      import sys, time
      print("[torch cpu] paper seg3d_train: 0.2500 s/iter", file=sys.stderr, flush=True)
      time.sleep(60)
      """)
  config = tiny_benchmark_config()
  out = torch_runner.run({"paper": config}, ("seg3d_train", "seg2d_train"), warmup=1, iters=1,
                      bf16=False, timeout_s=3)
  assert out["timed_out_after_s"] == 3
  assert out["results"] == [{"config": "paper", "step": "seg3d_train", "seconds_per_iter": 0.25}]
  results = [Result("paper", "seg3d_train", 2, 1000, 0.125),
             Result("paper", "seg2d_train", 16, 1000, 0.1)]
  md = summary.markdown(summary.environment("float32"), results, out)
  assert "stopped at its time limit (3 s)" in md
  rows = [line for line in md.splitlines() if line.startswith("| paper")]
  assert rows[0].rstrip().endswith("| 250.0 | 2.00 |") and rows[1].rstrip().endswith("| - | - |")


def test_reference_failing_or_stopped_before_a_step_is_an_error(tmp_path, monkeypatch):
  _fake_reference(tmp_path, monkeypatch, "import time; time.sleep(60)\n")
  config = tiny_benchmark_config()
  with pytest.raises(RuntimeError, match="time limit"):
    torch_runner.run({"paper": config}, ("seg3d_train",), warmup=1, iters=1, bf16=False,
                  timeout_s=1)
  _fake_reference(tmp_path, monkeypatch, "import sys; print('no GPU'); sys.exit(3)\n")
  with pytest.raises(RuntimeError, match="exit 3"):
    torch_runner.run({"paper": config}, ("seg3d_train",), warmup=1, iters=1, bf16=False)
