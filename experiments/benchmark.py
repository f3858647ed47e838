"""Throughput benchmark: `python launch.py --experiment=benchmark`.

Times, on every device JAX sees, the 3D and 2D segmentor training steps, the predictor's
training step (with the masks of both frozen segmentors made inside it), whole-volume
inference per case, the latency of quality control of one case (error map + QI of a mask)
and the grain input stream, for the paper-size config and the quick start's small one, and
the same steps of the PyTorch reference (benchmarks/) when torch is installed. Training
steps run on each model's training layout (mesh.space, per-device batches) and make their
crops on the device when training would (input.on_device). Writes workdir/benchmark.json
and workdir/benchmark.md, prints the table, and appends it to benchmark.docs when set (e.g.
docs/benchmarks.md).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import ml_collections

from . import base
from wh_errmap.errors import UserError
from wh_errmap.models.factory import compute_dtype
from wh_errmap.throughput import summary, torch_runner
from wh_errmap.throughput.timing import STEPS, Result, StepBench
from wh_errmap.utils import atomic
from wh_errmap.utils.progress import console

PRESETS = ("paper", "small")
MIN_REFERENCE_S = 30.0   # the PyTorch reference is not started with less time left
# Never read by run(): each step is timed for benchmark.warmup + benchmark.iters calls on
# synthetic data; nothing is trained, logged or checkpointed.
UNREAD = {"train.seg3d.steps": "benchmark.iters", "train.seg2d.steps": "benchmark.iters",
          "train.predictor.steps": "benchmark.iters", "train.log_every": None,
          "train.checkpoint_every": None, "train.keep_checkpoints": None, "data_dir": None}


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.benchmark = ml_collections.ConfigDict()
  c.benchmark.configs = PRESETS   # "paper": this config's sizes; "small": the quick start's
  # any of seg3d_train seg2d_train predictor_train inference qc input
  c.benchmark.steps = STEPS
  c.benchmark.warmup = 2          # untimed calls after compilation
  c.benchmark.iters = 5           # timed calls per step
  c.benchmark.reference = "auto"  # PyTorch reference: "auto" (when torch is installed), "off"
  c.benchmark.docs = ""           # append the table to this Markdown file ("" = don't)
  # Wall-clock limit of the whole benchmark in seconds (0 = none): steps not begun within it
  # are reported as skipped, and the PyTorch reference gets the time the JAX steps leave
  # (it is stopped there, keeping the steps it finished).
  c.benchmark.time_budget_s = 0.0
  return c


def preset(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """The config of one benchmarked size; model options (dtype, conv_impl, upsample, norm)
  follow the benchmark's own config, so `--set model.dtype=float32` applies to both."""
  if name not in PRESETS:
    raise UserError(f"benchmark.configs: unknown {name!r}; choose from {', '.join(PRESETS)}")
  sized = ml_collections.ConfigDict(config.to_dict())
  if name == "small":
    base.apply_small_sizes(sized)
  return sized


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  bench = config.benchmark
  unknown = set(bench.steps) - set(STEPS)
  if unknown:
    raise UserError(f"benchmark.steps: unknown {sorted(unknown)}; choose from {', '.join(STEPS)}")
  if bench.iters < 1 or bench.warmup < 0:
    raise UserError(f"benchmark.iters must be >= 1 and warmup >= 0, got {bench.iters}, "
                    f"{bench.warmup}")
  if bench.reference not in ("auto", "off"):
    raise UserError(f"benchmark.reference must be 'auto' or 'off', got {bench.reference!r}")
  configs = {name: preset(config, name) for name in bench.configs}
  start = time.monotonic()

  def time_left() -> float:
    return (bench.time_budget_s - (time.monotonic() - start) if bench.time_budget_s > 0
            else math.inf)

  dtype = compute_dtype(config.model.dtype)
  env = summary.environment(dtype.name)
  console(f"benchmark on {env['device_count']} x {env['device_kind']} ({env['backend']}), "
          f"compute dtype {dtype.name}, {bench.warmup} warm-up + {bench.iters} timed calls")
  results = []
  for name, sized in configs.items():
    timer = StepBench(name, sized, bench.warmup, bench.iters)
    for step in bench.steps:
      if time_left() <= 0:
        result = Result(name, step, 0, 0, math.nan, note="skipped: time budget spent")
      else:
        result = timer.run(step)
      results.append(result)
      console(f"  {name:6s} {step:16s} {result.seconds_per_iter * 1e3:9.1f} ms/step  "
              f"{result.samples_per_s:8.2f} samples/s {result.note}")

  torch_results, reference_note = None, ""
  if bench.reference == "off":
    reference_note = "off (benchmark.reference)"
  elif not torch_runner.available():
    reference_note = "skipped: torch is not installed (pip install -r benchmarks/requirements.txt)"
  elif time_left() < MIN_REFERENCE_S:
    reference_note = f"skipped: {max(time_left(), 0):.0f} s of the time budget left"
  else:
    console("PyTorch reference (benchmarks/torch_reference.py) on the same configs ...")
    try:
      torch_results = torch_runner.run(configs, bench.steps, warmup=bench.warmup,
                                    iters=bench.iters, bf16=dtype.name == "bfloat16",
                                    timeout_s=min(time_left(), 3600))
    except RuntimeError as e:
      reference_note = f"failed: {e}"
  if reference_note:
    console(f"PyTorch reference {reference_note}")

  section = summary.markdown(env, results, torch_results, reference_note)
  out = Path(workdir)
  atomic.write_json(out / "benchmark.json",
                    {"environment": env, "results": [r.to_json() for r in results],
                     "reference": torch_results, "reference_note": reference_note})
  atomic.write_text(out / "benchmark.md", section)
  console("\n" + section)
  if bench.docs:
    docs = Path(bench.docs)
    previous = docs.read_text() if docs.exists() else "# Benchmarks\n\n"
    atomic.write_text(docs, previous.rstrip("\n") + "\n\n" + section)
    console(f"appended to {docs}")
  console(f"wrote {out / 'benchmark.json'} and {out / 'benchmark.md'}")
