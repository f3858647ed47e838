"""The Markdown of gpu_check's summary (`gpu_check_summary.summarize`): phases, tests, the
benchmark table and its targets, the short runs' throughput and quality, the projection.

Standard library only, like the summary itself.
"""
from __future__ import annotations

import math
from typing import Any

MODELS = ("seg3d", "seg2d", "predictor")
DTYPES = ("bfloat16", "float32")
GPU_COUNTS = (1, 2, 5)


def finite(value: Any) -> float | None:
  """A finite float, or None for anything else (missing, NaN, infinite, not a number)."""
  return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _f(value: Any, digits: int = 1, scale: float = 1.0) -> str:
  value = finite(value)
  return "-" if value is None else f"{value / scale:.{digits}f}"


def _duration(seconds: float | None) -> str:
  if seconds is None:
    return "-"
  hours, rest = divmod(int(round(seconds)), 3600)
  return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


def markdown(summary: dict[str, Any]) -> str:
  env = summary["benchmark"]["environment"] or {}
  lines = [f"# gpu_check ({summary['mode']})", ""]
  if env:
    lines.append(f"{env.get('device_count')} x {env.get('device_kind')} ({env.get('backend')}), "
                 f"jax {env.get('jax')}, Python {env.get('python')}, commit "
                 f"{env.get('commit')}, {env.get('date')}; benchmark compute dtype "
                 f"{env.get('dtype')}.")
  if summary["mode"] == "dry-run":
    lines.append("Dry run: the CPU at tiny sizes; the numbers only exercise the check.")
  lines += ["", "## Phases", "", "| phase | status | seconds | note |", "|---|---|---|---|"]
  lines += [f"| {p['phase']} | {p['status']} | {p['seconds']} | {p['note']} |"
            for p in summary["phases"]]
  t = summary["tests"]
  lines += ["", "## Tests", ""]
  if t["tests"] is None:
    lines.append(f"No test report ({t['status']}).")
  else:
    lines.append(f"{t['passed']} passed, {t['failures']} failed, {t['errors']} errors, "
                 f"{t['skipped']} skipped ({t['out_of_time']} for lack of time) of "
                 f"{t['tests']} in {t['seconds']:.1f} s ({t['status']}); -x stops at the "
                 f"first failure.")
    lines += [f"- failed: {name}" for name in t["failed_tests"]]

  b = summary["benchmark"]
  lines += ["", "## Benchmark (paper size)", "", f"PyTorch reference: {b['reference']}.", "",
            "| step | batch | ms/step | samples/s | TFLOP/s | % peak | memory GB | input-bound "
            "| PyTorch ms | JAX / PyTorch |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in b["rows"]:
    note = f" ({r['note']})" if r["note"] else ""
    lines.append(f"| {r['title']}{note} | {r['batch']} | {_f(r['ms'])} | "
                 f"{_f(r['samples_per_s'], 2)} | {_f(r['tflop_per_s'], 2)} | "
                 f"{_f(r['percent_peak'])} | {_f(r['memory_gb'], 2)} | "
                 f"{_f(r['input_bound'], 2)} | {_f(r['torch_ms'])} | "
                 f"{_f(r['jax_over_torch'], 2)} |")
  lines += ["", "input-bound: the step's samples/s over those of the input stream that feeds "
            "it (above 1 the step waits for its input).", "", "Targets:", ""]
  for target in summary["targets"]:
    note = f" ({target['note']})" if target["note"] else ""
    lines.append(f"- **{target['status']}** {target['target']}: {_f(target['value'], 2)}{note}")

  lines += ["", "## Training throughput (short cv_fold, fold 0)", "",
            "| dtype | model | steps | steps/s | samples/s | first step incl. compile s | "
            "final loss |", "|---|---|---|---|---|---|---|"]
  for dtype, run in summary["cv"].items():
    for name in MODELS:
      m = run["models"][name]
      if m is None:
        lines.append(f"| {dtype} | {name} | - | - | - | - | - |")
      else:
        lines.append(f"| {dtype} | {name} | {m['steps']} | {_f(m['steps_per_s'], 2)} | "
                     f"{_f(m['samples_per_s'], 1)} | {_f(m['first_step_s'])} | "
                     f"{_f(m['final_loss'], 4)} |")
  lines.append("")
  for dtype, run in summary["cv"].items():
    lines.append(f"- {dtype}: segmentor scoring {_f(run['segmentor_scoring_s'])} s, evaluation "
                 f"of the test masks {_f(run['evaluation_s'])} s (incl. compilation).")
  if summary.get("input_bound"):
    lines.append(f"- {summary['input_bound']}")

  lines += ["", "## Projected full 5-fold run at the paper's settings", ""]
  p = summary["projection"]
  if p is None:
    lines.append("Not available: a model has no throughput in the bf16 run or the benchmark.")
  else:
    from_bench = [m for m, source in p["sources"].items() if source == "benchmark"]
    lines += [f"From the bf16 run: {p['steps_per_model']} steps per model per fold at the "
              f"measured steps/s, plus each model's compilation and the evaluation "
              f"({_f(p['evaluation_per_fold_s'])} s per fold"
              f"{'' if p['evaluation_measured'] else ', not measured: left out'}), data "
              f"preparation once ({_f(p['data_s'])} s)."
              + (f" {', '.join(from_bench)}: the benchmark's step time instead (the short run "
                 f"did not train it), without input stream or compilation." if from_bench
                 else ""), "",
              "| per fold | " + " | ".join(f"{n} GPU(s), folds in parallel" if n > 1
                                          else "1 GPU, folds in sequence" for n in GPU_COUNTS)
              + " |", "|---" * (1 + len(GPU_COUNTS)) + "|",
              f"| {_duration(p['per_fold_s'])} | " + " | ".join(
                  _duration(p["wall_s_by_gpus"][str(n)]) for n in GPU_COUNTS) + " |", "",
              "Folds in parallel assume the host's CPUs feed one input stream per GPU."]

  lines += ["", "## bf16 vs f32 (short run: quality after a few hundred steps per model)", "",
            "| | 3D final Dice | 2D final Dice | error-map DSC (auto) | error-map DSC (GT) | "
            "PCC(QI, Acc) | PCC(QI, DSC) | MAE(QI, Acc) | masks |",
            "|---|---|---|---|---|---|---|---|---|"]
  for dtype, run in summary["cv"].items():
    q = run["quality"]
    lines.append(f"| {dtype} | {_f(q.get('seg3d_final_dsc'), 3)} | "
                 f"{_f(q.get('seg2d_final_dsc'), 3)} | {_f(q.get('err_dsc_auto'), 3)} | "
                 f"{_f(q.get('err_dsc_gt'), 3)} | {_f(q.get('pcc_qi_acc'), 3)} | "
                 f"{_f(q.get('pcc_qi_dsc'), 3)} | {_f(q.get('mae_qi_acc'), 4)} | "
                 f"{q.get('masks', '-')} |")
  if any(run["quality"].get("qi_constant") for run in summary["cv"].values()):
    lines.append("\nA run whose QI is the same for every mask has no PCC ('-').")
  return "\n".join(lines) + "\n"
