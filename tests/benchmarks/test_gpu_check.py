"""benchmarks/gpu_check.sh: its dry run (every phase on the CPU at a tiny size) ends with a
summary whose every section holds finite numbers; and the summary's arithmetic."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks import gpu_check_summary as summary
from tests.conftest import ROOT

PHASES = {"tests", "data", "benchmark", "cv_bfloat16", "cv_float32"}


def _finite(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value)


def test_dry_run_writes_every_section_with_finite_numbers(tmp_path):
  out = tmp_path / "out"
  env = dict(os.environ, OUT=str(out), GPU_CHECK_SCRATCH=str(tmp_path / "scratch"),
             PYTHON=sys.executable)
  result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
  files = sorted(p.name for p in out.iterdir())
  assert files == ["benchmark.json", "benchmark.md", "cv_details.json", "log.txt",
                   "summary.json", "summary.md"]   # few and flat: the device tool's limits
  s = json.loads((out / "summary.json").read_text())
  assert s["mode"] == "dry-run"
  assert {p["phase"]: p["status"] for p in s["phases"]} == dict.fromkeys(PHASES, "ok")

  assert s["tests"]["passed"] >= 1 and s["tests"]["failures"] == 0

  rows = {r["step"]: r for r in s["benchmark"]["rows"]}
  assert set(rows) == {"seg3d_train", "seg2d_train", "predictor_train", "inference", "qc",
                       "input"}
  for step, row in rows.items():
    assert _finite(row["ms"]) and row["ms"] > 0, step
  torch_ran = rows["seg3d_train"]["torch_ms"] is not None
  assert torch_ran or s["benchmark"]["reference"].startswith("skipped: torch is not installed")
  assert len(s["targets"]) == 5
  for target in s["targets"]:
    assert target["status"] in ("pass", "fail", "n/a"), target
    assert target["status"] == "n/a" or _finite(target["value"]), target
  assert _finite(s["targets"][-1]["value"])                          # QC latency, ms
  assert s["targets"][3]["status"] == "n/a"                          # no bf16 peak on a CPU

  for dtype in ("bfloat16", "float32"):
    run = s["cv"][dtype]
    for name in ("seg3d", "seg2d", "predictor"):
      model = run["models"][name]
      assert model["steps"] == 4 and model["steps_per_s"] > 0, (dtype, name)
      assert _finite(model["first_step_s"]) and _finite(model["final_loss"]), (dtype, name)
    assert _finite(run["segmentor_scoring_s"]) and _finite(run["evaluation_s"]), dtype
    quality = run["quality"]
    for key in ("seg3d_final_dsc", "seg2d_final_dsc", "err_dsc_auto", "err_dsc_gt",
                "mae_qi_acc"):
      assert _finite(quality[key]), (dtype, key)
    assert quality["masks"] == 11   # 1 test case of 5: 10 auto masks + GT
    for key in ("pcc_qi_acc", "pcc_qi_dsc"):   # undefined only when QI is constant
      assert _finite(quality[key]) or quality["qi_constant"], (dtype, key)

  projection = s["projection"]
  assert projection["steps_per_model"] == 20000 and projection["folds"] == 5
  assert _finite(projection["per_fold_s"]) and projection["per_fold_s"] > 0
  walls = [projection["wall_s_by_gpus"][n] for n in ("1", "2", "5")]
  assert walls[0] > walls[1] > walls[2] > 0

  md = (out / "summary.md").read_text()
  for heading in ("## Phases", "## Tests", "## Benchmark (paper size)", "Targets:",
                  "## Training throughput", "## Projected full 5-fold run", "## bf16 vs f32"):
    assert heading in md, heading
  assert md.strip() in result.stdout   # printed as well


def test_throughput_leaves_out_the_compiling_first_step():
  rows = [{"step": 1, "time_s": 30.0, "loss": 9.0}, {"step": 25, "time_s": 31.0, "loss": 5.0},
          {"step": 50, "time_s": 32.0, "loss": 4.0}, {"step": 300, "time_s": 42.0, "loss": 1.0}]
  out = summary.model_throughput(rows, batch=2)
  assert out["steps_per_s"] == pytest.approx(275 / 11)
  assert out["samples_per_s"] == pytest.approx(2 * 275 / 11)
  assert out["first_step_s"] == 30.0 and out["steps"] == 300 and out["final_loss"] == 1.0
  assert summary.model_throughput(rows[:1], batch=2) is None


def test_projection_of_the_full_run():
  model = {"steps_per_s": 10.0, "first_step_s": 20.0}
  run = {"models": dict.fromkeys(summary.MODELS, model), "segmentor_scoring_s": 30.0,
         "evaluation_s": 50.0}
  out = summary.projection(run, {"paper_steps": 20000, "num_folds": 5}, data_s=40.0)
  per_fold = 3 * (2000 + 20) + 80
  assert out["per_fold_s"] == pytest.approx(per_fold)
  assert out["wall_s_by_gpus"] == pytest.approx(
      {"1": 40 + 5 * per_fold, "2": 40 + 3 * per_fold, "5": 40 + per_fold})
  # A model the short run did not train: the benchmark's step time, without compilation.
  run["models"]["seg2d"] = None
  bench_rows = [{"config": "paper", "step": "seg2d_train", "ms": 50.0}]
  out = summary.projection(run, {"paper_steps": 20000, "num_folds": 5}, 40.0, bench_rows)
  assert out["per_model_s"]["seg2d"] == pytest.approx(1000.0)
  assert out["sources"] == {"seg3d": "cv_fold", "seg2d": "benchmark", "predictor": "cv_fold"}
  assert summary.projection(run, {"paper_steps": 20000, "num_folds": 5}, 40.0) is None


def test_targets_and_quality_statistics():
  bench = {"environment": {"dtype": "bfloat16", "device_kind": "NVIDIA H100 80GB HBM3"},
           "reference": "torch 2.11", "rows": [
               {"config": "paper", "step": "seg3d_train", "jax_over_torch": 1.5,
                "percent_peak": 20.0, "ms": 10.0},
               {"config": "paper", "step": "seg2d_train", "jax_over_torch": 1.2, "ms": 2.0},
               {"config": "paper", "step": "qc", "ms": 40.0}]}
  status = [t["status"] for t in summary.targets(bench)]
  # 3D ratio, 2D ratio, predictor (not measured), % peak of the 3D step, QC latency
  assert status == ["pass", "fail", "n/a", "fail", "pass"]

  records = [{"mask_type": t, "qi": qi, "true_acc": acc, "seg_dsc": dsc, "err_dsc": e}
             for t, qi, acc, dsc, e in [("3d-final", 0.9, 0.91, 0.8, 0.5),
                                         ("2d-final", 0.8, 0.79, 0.6, 0.7),
                                         ("gt", 1.0, 1.0, 1.0, 0.0)]]
  q = summary.quality(None, records)
  assert q["pcc_qi_acc"] > 0.99 and q["err_dsc_auto"] == pytest.approx(0.6)
  assert q["err_dsc_gt"] == 0.0 and q["mae_qi_acc"] == pytest.approx(0.02 / 3)
  flat = [dict(r, qi=1.0) for r in records]
  assert summary.quality(None, flat)["pcc_qi_acc"] is None   # constant QI: no PCC


def test_tests_past_the_deadline_are_skipped_with_their_report_written(tmp_path):
  (tmp_path / "test_two.py").write_text("def test_a():\n  pass\n\ndef test_b():\n  pass\n")
  env = dict(os.environ, GPU_CHECK_TESTS_DEADLINE="0")   # long past
  result = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
       "benchmarks.pytest_deadline", f"--junitxml={tmp_path / 'tests.xml'}",
       str(tmp_path / "test_two.py")], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=120)
  assert result.returncode == 0, result.stdout
  counts = summary.tests_summary(tmp_path, {"status": "ok", "seconds": 1})
  assert counts["tests"] == 2 and counts["skipped"] == 2 and counts["out_of_time"] == 2
