"""The summary of benchmarks/gpu_check.sh: reads what its phases left in the scratch folder
and writes OUT/summary.md, OUT/summary.json and OUT/cv_details.json; prints summary.md.

  python benchmarks/gpu_check_summary.py --scratch DIR --out DIR

Standard library only, so it runs wherever the check ran, also after a phase failed.

Sections: the phases (status, seconds); the tests; the benchmark table (JAX beside PyTorch)
and its targets; the throughput of every model in the short cv_fold runs and the time of
their evaluation; the projected wall time of the full 5-fold run at the paper's settings;
bf16 vs f32 quality of the short runs.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # when run as a script
from benchmarks.gpu_check_markdown import DTYPES, GPU_COUNTS, MODELS, finite, markdown  # noqa: E402

TRAIN_STEPS = ("seg3d_train", "seg2d_train", "predictor_train")
TITLES = {"seg3d_train": "3D segmentor train step", "seg2d_train": "2D segmentor train step",
          "predictor_train": "predictor train step (+ masks)", "inference": "inference per case",
          "qc": "QC per case (error map + QI)", "input": "input stream (3D crops)"}
# Targets of the GPU work: JAX / PyTorch throughput of every training step, the 3D step's
# fraction of the bf16 dense peak, and the latency of QC of one case.
MIN_RATIO = 1.3
MIN_PEAK_FRACTION = 0.25
MAX_QC_SECONDS = 0.100


def _json(path: Path) -> Any:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def _jsonl(path: Path) -> list[dict[str, Any]]:
  try:
    lines = path.read_text().splitlines()
  except OSError:
    return []
  rows = []
  for line in lines:
    try:
      rows.append(json.loads(line))
    except ValueError:
      pass   # a line cut short by a stopped phase
  return rows


def tests_summary(scratch: Path, phase: dict[str, Any] | None) -> dict[str, Any]:
  """Counts from pytest's JUnit XML, and the phase's status."""
  status = phase["status"] if phase else "not run"
  try:
    root = ET.parse(scratch / "tests.xml").getroot()
  except (OSError, ET.ParseError):
    return {"status": status, "tests": None, "passed": None, "failures": None, "errors": None,
            "skipped": None, "out_of_time": None,
            "seconds": phase["seconds"] if phase else None, "failed_tests": []}
  suite = root if root.tag == "testsuite" else root.find("testsuite")
  counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
  cases = list(suite.iter("testcase"))
  failed = [f"{case.get('classname')}::{case.get('name')}" for case in cases
            if case.find("failure") is not None or case.find("error") is not None]
  # benchmarks/pytest_deadline.py skips what would start after the tests' time share.
  out_of_time = sum(1 for case in cases if case.find("skipped") is not None
                    and "share of the time" in case.find("skipped").get("message", ""))
  return {"status": status, **counts,
          "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
          "out_of_time": out_of_time, "seconds": float(suite.get("time", 0)),
          "failed_tests": failed}


def benchmark_summary(bench: dict[str, Any] | None) -> dict[str, Any]:
  """One row per benchmarked step of the "paper" config, JAX beside PyTorch."""
  if not bench:
    return {"environment": None, "rows": [], "reference": "not run"}
  reference = bench.get("reference") or {}
  torch_by_step = {(r["config"], r["step"]): r for r in reference.get("results", [])}
  rows = []
  for r in bench["results"]:
    seconds = finite(r["seconds_per_iter"])
    other = torch_by_step.get((r["config"], r["step"]))
    torch_seconds = finite(other["seconds_per_iter"]) if other else None
    fraction = finite(r.get("fraction_of_peak"))
    rows.append({
        "config": r["config"], "step": r["step"], "title": TITLES.get(r["step"], r["step"]),
        "batch": r["batch"], "ms": None if seconds is None else 1e3 * seconds,
        "samples_per_s": finite(r.get("samples_per_s")),
        "tflop_per_s": None if r.get("flops_per_s") is None else finite(r["flops_per_s"] / 1e12),
        "percent_peak": None if fraction is None else 100 * fraction,
        "memory_gb": None if r.get("footprint_bytes") is None else r["footprint_bytes"] / 1e9,
        "torch_ms": None if torch_seconds is None else 1e3 * torch_seconds,
        "jax_over_torch": (torch_seconds / seconds if torch_seconds and seconds else None),
        "input_bound": finite(r.get("input_bound")),
        "note": r.get("note", "")})
  if reference.get("timed_out_after_s"):
    note = f"stopped at its time limit ({reference['timed_out_after_s']:.0f} s)"
  elif reference:
    settings = reference.get("settings", {})
    note = (f"torch {reference.get('torch_version')} on {reference.get('device_name')}, amp "
            f"{settings.get('amp')}, compile {settings.get('compile')}, channels_last "
            f"{settings.get('channels_last')}")
  else:
    note = (bench.get("reference_note") or "not run").splitlines()[0]
  return {"environment": bench.get("environment"), "rows": rows, "reference": note}


def targets(bench: dict[str, Any]) -> list[dict[str, Any]]:
  """pass / fail / n/a for each target, with the measured value."""
  rows = {r["step"]: r for r in bench["rows"] if r["config"] == "paper"}
  env = bench["environment"] or {}
  out = []
  for step in TRAIN_STEPS:
    ratio = rows.get(step, {}).get("jax_over_torch")
    out.append({"target": f"{TITLES[step]}: JAX >= {MIN_RATIO}x PyTorch throughput",
                "value": ratio, "status": _status(ratio, lambda v: v >= MIN_RATIO),
                "note": "" if ratio is not None else f"no PyTorch time ({bench['reference']})"})
  percent = rows.get("seg3d_train", {}).get("percent_peak")
  bf16 = env.get("dtype") == "bfloat16"
  out.append({"target": f"3D segmentor train step: >= {100 * MIN_PEAK_FRACTION:.0f}% of the "
                        "bf16 dense peak",
              "value": percent if bf16 else None,
              "status": _status(percent if bf16 else None,
                                lambda v: v >= 100 * MIN_PEAK_FRACTION),
              "note": "" if bf16 and percent is not None else
              f"no bf16 peak for {env.get('device_kind')} in {env.get('dtype')}"})
  qc_ms = rows.get("qc", {}).get("ms")
  out.append({"target": f"QC of one case < {1e3 * MAX_QC_SECONDS:.0f} ms", "value": qc_ms,
              "status": _status(qc_ms, lambda v: v < 1e3 * MAX_QC_SECONDS),
              "note": "" if qc_ms is not None else "not measured"})
  return out


def _status(value: float | None, ok) -> str:
  return "n/a" if value is None else ("pass" if ok(value) else "fail")


def model_throughput(rows: list[dict[str, Any]], batch: int | None) -> dict[str, Any] | None:
  """Steady steps/s of one model from its metrics.jsonl rows.

  The first logged step includes compilation; the rate is taken from the second logged
  step to the last, or from the first when only two were logged.
  """
  rows = sorted(rows, key=lambda r: r["step"])
  if len(rows) < 2:
    return None
  first = rows[1] if len(rows) >= 3 else rows[0]
  last = rows[-1]
  seconds = last["time_s"] - first["time_s"]
  if seconds <= 0:
    return None
  steps_per_s = (last["step"] - first["step"]) / seconds
  return {"steps": last["step"], "steps_per_s": steps_per_s,
          "samples_per_s": None if batch is None else steps_per_s * batch,
          "first_step_s": rows[0]["time_s"], "train_s": last["time_s"],
          "final_loss": finite(last.get("loss"))}


def _mtime(path: Path) -> float | None:
  try:
    return path.stat().st_mtime
  except OSError:
    return None


def _between(start: Path, end: Path) -> float | None:
  """Seconds from the last write of `start` to that of `end` (None if either is missing)."""
  a, b = _mtime(start), _mtime(end)
  return None if a is None or b is None or b < a else b - a


def cv_summary(workdir: Path) -> dict[str, Any]:
  """Throughput, evaluation times and quality of one short cv_fold run (fold 0).

  In a cv_fold run the stages follow each other: seg3d, seg2d, segmentor scoring
  (segmentors.json), predictor, evaluation (records.json); so the time of the scoring is
  from seg2d's last metrics line to segmentors.json, and the evaluation's from the
  predictor's last metrics line to records.json (each with one final checkpoint write).
  """
  fold = workdir / "fold0"
  config = _json(workdir / "config.json") or {}
  train = config.get("train", {})
  models = {}
  for name in MODELS:
    batch = train.get(name, {}).get("batch_size")
    models[name] = model_throughput(_jsonl(fold / name / "metrics.jsonl"), batch)
  scoring_s = _between(fold / "seg2d" / "metrics.jsonl", fold / "segmentors.json")
  evaluation_s = _between(fold / "predictor" / "metrics.jsonl", fold / "records.json")
  return {"models": models, "segmentor_scoring_s": scoring_s, "evaluation_s": evaluation_s,
          "quality": quality(_json(fold / "segmentors.json"), _json(fold / "records.json"))}


def _pearson(x: list[float], y: list[float]) -> float | None:
  """Pearson r, or None when either side is constant (or fewer than 3 values)."""
  if len(x) < 3:
    return None
  mx, my = statistics.fmean(x), statistics.fmean(y)
  sxx = sum((a - mx) ** 2 for a in x)
  syy = sum((b - my) ** 2 for b in y)
  if sxx == 0 or syy == 0:
    return None
  return sum((a - mx) * (b - my) for a, b in zip(x, y)) / math.sqrt(sxx * syy)


def quality(segmentors: dict[str, Any] | None, records: list[dict] | None) -> dict[str, Any]:
  """Test Dice of the segmentors' final outputs, error-map Dice and QI statistics."""
  out: dict[str, Any] = {}
  if segmentors:
    for name in ("seg3d", "seg2d"):
      outputs = segmentors.get(name, {})
      out[f"{name}_final_dsc"] = finite(outputs.get("final", {}).get("dsc"))
      sides = [finite(v.get("dsc")) for k, v in outputs.items() if k != "final"]
      out[f"{name}_side_dsc_mean"] = (statistics.fmean(sides) if sides and None not in sides
                                      else None)
  if records:
    auto = [r for r in records if r["mask_type"] != "gt"]
    gt = [r for r in records if r["mask_type"] == "gt"]
    qi = [r["qi"] for r in records]
    out.update({
        "masks": len(records),
        "err_dsc_auto": finite(statistics.fmean(r["err_dsc"] for r in auto)) if auto else None,
        "err_dsc_gt": finite(statistics.fmean(r["err_dsc"] for r in gt)) if gt else None,
        "pcc_qi_acc": _pearson(qi, [r["true_acc"] for r in records]),
        "pcc_qi_dsc": _pearson(qi, [r["seg_dsc"] for r in records]),
        "mae_qi_acc": statistics.fmean(abs(r["qi"] - r["true_acc"]) for r in records),
        "qi_constant": len(set(qi)) == 1})
  return out


def projection(run: dict[str, Any], settings: dict[str, Any], data_s: float | None,
               bench_rows: list[dict[str, Any]] = ()) -> dict[str, Any] | None:
  """Projected wall time of the full cross-validation at the paper's settings from one
  short run: per fold, each model's paper_steps at its measured steps/s plus its first
  (compiling) step, the segmentor scoring and the evaluation; the data preparation once.

  A model the short run did not train far enough takes its step time from the benchmark
  (the step alone, without the input stream), without compilation; None when neither has it.
  """
  bench_ms = {r["step"].removesuffix("_train"): r["ms"] for r in bench_rows
              if r["config"] == "paper" and r["step"].endswith("_train") and r["ms"]}
  steps = settings["paper_steps"]
  per_model, sources = {}, {}
  for m in MODELS:
    measured = run["models"][m]
    if measured is not None:
      per_model[m] = steps / measured["steps_per_s"] + measured["first_step_s"]
      sources[m] = "cv_fold"
    elif m in bench_ms:
      per_model[m] = steps * bench_ms[m] / 1e3
      sources[m] = "benchmark"
    else:
      return None
  evaluation = (run["segmentor_scoring_s"] or 0.0) + (run["evaluation_s"] or 0.0)
  per_fold = sum(per_model.values()) + evaluation
  folds = settings["num_folds"]
  data = data_s or 0.0
  return {"steps_per_model": steps, "folds": folds, "per_model_s": per_model,
          "sources": sources, "evaluation_per_fold_s": evaluation, "per_fold_s": per_fold,
          "data_s": data, "wall_s_by_gpus": {str(n): data + math.ceil(folds / n) * per_fold
                                             for n in GPU_COUNTS},
          "evaluation_measured": run["evaluation_s"] is not None}


def input_bound_note(bench: dict[str, Any], cv: dict[str, Any]) -> str:
  """A note when the 3D models train about as fast as the input stream alone delivers."""
  stream = next((r for r in bench["rows"] if r["step"] == "input" and r["ms"]), None)
  run = cv.get("bfloat16", {}).get("models", {})
  if stream is None or not run:
    return ""
  batches_per_s = 1e3 / stream["ms"]
  slow = [m for m in ("seg3d", "predictor")
          if run.get(m) and run[m]["steps_per_s"] >= 0.8 * batches_per_s]
  if not slow:
    return ""
  return (f"{' and '.join(slow)} train at >= 80% of the rate the 3D input stream alone "
          f"delivers ({batches_per_s:.1f} batches/s): likely input-bound.")


def summarize(scratch: Path) -> dict[str, Any]:
  settings = _json(scratch / "settings.json") or {"mode": "unknown", "paper_steps": 20000,
                                                  "num_folds": 5}
  phases = _jsonl(scratch / "phases.jsonl")
  by_name = {p["phase"]: p for p in phases}
  bench = benchmark_summary(_json(scratch / "bench" / "benchmark.json"))
  cv = {dtype: cv_summary(scratch / f"cv_{dtype}") for dtype in DTYPES}
  data = by_name.get("data")
  return {"mode": settings["mode"], "settings": settings, "phases": phases,
          "tests": tests_summary(scratch, by_name.get("tests")), "benchmark": bench,
          "targets": targets(bench), "cv": cv, "input_bound": input_bound_note(bench, cv),
          "projection": projection(cv["bfloat16"], settings,
                                   data["seconds"] if data and data["status"] == "ok" else None,
                                   bench["rows"])}


def cv_details(scratch: Path) -> dict[str, Any]:
  """The raw files of the short runs: metrics of every model, segmentors.json, records."""
  details = {}
  for dtype in DTYPES:
    fold = scratch / f"cv_{dtype}" / "fold0"
    details[dtype] = {"metrics": {m: _jsonl(fold / m / "metrics.jsonl") for m in MODELS},
                      "segmentors": _json(fold / "segmentors.json"),
                      "records": _json(fold / "records.json")}
  return details


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--scratch", required=True, type=Path, help="gpu_check's scratch folder")
  parser.add_argument("--out", required=True, type=Path, help="where the summary goes")
  args = parser.parse_args()
  summary = summarize(args.scratch)
  args.out.mkdir(parents=True, exist_ok=True)
  text = markdown(summary)
  (args.out / "summary.md").write_text(text)
  (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
  (args.out / "cv_details.json").write_text(json.dumps(cv_details(args.scratch)) + "\n")
  print(text)


if __name__ == "__main__":
  main()
