"""The benchmark's environment header and its Markdown table, JAX beside PyTorch."""
from __future__ import annotations

import datetime
import platform
import subprocess
from pathlib import Path
from typing import Any, Sequence

import jax

from wh_errmap.throughput.timing import Result

STEP_TITLES = {"seg3d_train": "3D segmentor train step", "seg2d_train": "2D segmentor train step",
               "predictor_train": "predictor train step (+ masks)",
               "inference": "inference per case",
               "qc": "QC per case (error map + QI of one mask)",
               "input": "input stream (3D crops)"}


def commit() -> str:
  """The repository's commit, with "-dirty" for uncommitted changes; "unknown" outside git."""
  try:
    return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                          text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def environment(dtype: str) -> dict[str, Any]:
  device = jax.devices()[0]
  return {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
          "backend": jax.default_backend(), "device_kind": device.device_kind,
          "device_count": jax.device_count(), "process_count": jax.process_count(),
          "host_cpu": platform.processor() or platform.machine(), "jax": jax.__version__,
          "python": platform.python_version(), "commit": commit(), "dtype": dtype}


def _fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
  if value is None or value != value:   # None or NaN
    return "-"
  return f"{value / scale:.{digits}f}"


def _input_bound(ratio: float | None) -> str:
  if ratio is None:
    return "-"
  return f"**yes** ({ratio:.2f})" if ratio > 1 else f"no ({ratio:.2f})"


def _reference_index(reference: dict[str, Any] | None) -> dict[tuple[str, str], dict]:
  if not reference:
    return {}
  return {(r["config"], r["step"]): r for r in reference.get("results", [])}


def markdown(env: dict[str, Any], results: Sequence[Result],
             reference: dict[str, Any] | None, reference_note: str = "") -> str:
  """A dated section: environment, then one row per config and step.

  "JAX / PyTorch" is the ratio of throughputs: above 1 means JAX is faster.
  reference_note: why there is no PyTorch column (shown when reference is None).
  """
  lines = [f"### {env['date']}: {env['device_count']} x {env['device_kind']} "
           f"({env['backend']}), {env['dtype']}",
           "",
           f"jax {env['jax']}, Python {env['python']}, commit {env['commit']}, "
           f"{env['process_count']} process(es), host {env['host_cpu']}."]
  if reference and reference.get("timed_out_after_s"):
    lines.append(f"PyTorch reference: stopped at its time limit "
                 f"({reference['timed_out_after_s']:.0f} s); the steps it finished are shown.")
  elif reference:
    settings = reference.get("settings", {})
    lines.append(f"PyTorch reference: torch {reference.get('torch_version')} on "
                 f"{reference.get('device_name')} ({reference.get('num_threads')} threads), "
                 f"amp {settings.get('amp')}, compile {settings.get('compile')}, "
                 f"channels_last {settings.get('channels_last')}.")
  elif reference_note:
    lines.append(f"PyTorch reference: {reference_note.splitlines()[0]}.")
  lines += ["",
            "| config | step | batch | ms/step | samples/s | Mvoxel/s | GFLOP/step | TFLOP/s "
            "| % peak | memory GB | input-bound | PyTorch ms/step | JAX / PyTorch |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  ref = _reference_index(reference)
  for r in results:
    other = ref.get((r.config, r.step))
    torch_ms = other["seconds_per_iter"] * 1e3 if other else None
    ratio = other["seconds_per_iter"] / r.seconds_per_iter if other else None
    fraction = r.fraction_of_peak
    memory = r.footprint_bytes
    lines.append(
        f"| {r.config} | {STEP_TITLES.get(r.step, r.step)}{' (' + r.note + ')' if r.note else ''}"
        f" | {r.batch} | {_fmt(r.seconds_per_iter * 1e3)} | {_fmt(r.samples_per_s, digits=2)}"
        f" | {_fmt(r.mvoxels_per_s)} | {_fmt(r.flops_per_iter, 1e9)}"
        f" | {_fmt(r.flops_per_s, 1e12, 2)}"
        f" | {_fmt(None if fraction is None else 100 * fraction)}"
        f" | {_fmt(memory, 1e9, 2)} | {_input_bound(r.input_bound)}"
        f" | {_fmt(torch_ms)} | {_fmt(ratio, digits=2)} |")
  lines += ["",
            "ms/step: wall time per step after warm-up (one sync at the end, as in training); "
            "memory: the compiled step's arguments + outputs + temporaries per device (XLA "
            "memory analysis); % peak: achieved FLOP/s (XLA cost analysis) over the device's "
            "dense peak for the compute dtype; input-bound: the step's samples/s over those of "
            "the input stream that feeds it in training (host crops, or crop parameters when "
            "the crops are made on the device): above 1 the step waits for its input; JAX / "
            "PyTorch above 1: JAX is faster; QC: latency of one case (a preprocessed volume "
            "and mask from the host, its QI back).", ""]
  return "\n".join(lines)
