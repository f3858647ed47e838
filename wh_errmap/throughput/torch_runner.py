"""The PyTorch reference (benchmarks/torch_reference.py), run in a subprocess.

A separate process keeps the two frameworks from competing for GPU memory (JAX reserves
most of it up front) and keeps torch out of this package's dependencies.
"""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import ml_collections

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "torch_reference.py"
TORCH_STEPS = ("seg3d_train", "seg2d_train", "predictor_train", "inference")
# The line the reference prints to stderr after each step it has timed.
_STEP_DONE = re.compile(r"^\[torch (\S+)\] (\S+) (\S+): ([0-9.eE+-]+) s/iter$", re.MULTILINE)


def available() -> bool:
  """Whether the reference can run: torch installed and the script present."""
  return SCRIPT.exists() and importlib.util.find_spec("torch") is not None


def spec_entry(name: str, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The reference's description of one benchmark config (same widths, crops, batches)."""
  return {"name": name, "width1": config.model.width1, "width2": config.model.width2,
          "num_voxres": config.model.num_voxres, "num_classes": 8,
          "crop_3d": list(config.input.crop_3d), "crop_2d": list(config.input.crop_2d),
          "crop_predictor": list(config.input.crop_predictor),
          "batch_3d": config.train.seg3d.batch_size, "batch_2d": config.train.seg2d.batch_size,
          "batch_predictor": config.train.predictor.batch_size,
          "volume": list(config.preprocess.crop_size)}


def finished_steps(output: str) -> list[dict[str, Any]]:
  """The steps that the reference's console output reports as timed: [{"config", "step",
  "seconds_per_iter"}] (what is left of a run stopped at its time limit)."""
  return [{"config": config, "step": step, "seconds_per_iter": float(seconds)}
          for _, config, step, seconds in _STEP_DONE.findall(output)]


def run(configs: Mapping[str, ml_collections.ConfigDict], steps: Sequence[str], *,
        warmup: int, iters: int, bf16: bool, timeout_s: float = 3600) -> dict[str, Any]:
  """Runs the reference on the same configs and steps; returns its JSON output.

  bf16: use bf16 autocast (on GPU, where the JAX model computes in bf16 too).
  timeout_s: the reference is stopped after this many seconds; the result then holds the
    steps it finished ("results" with config, step, seconds_per_iter only) and
    "timed_out_after_s".
  Raises RuntimeError with the reference's output if it fails, or if it times out before
  finishing a step.
  """
  spec = {"configs": [spec_entry(name, config) for name, config in configs.items()],
          "steps": [s for s in steps if s in TORCH_STEPS], "warmup": warmup, "iters": iters,
          "device": "auto", "amp": "bf16" if bf16 else "none", "compile": "auto",
          "channels_last": "auto"}
  with tempfile.TemporaryDirectory() as tmp:
    spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
    log_path = Path(tmp) / "log.txt"
    spec_path.write_text(json.dumps(spec))
    # Output to a file, not a pipe: torch.compile's worker processes may hold the pipe
    # open after the reference itself is stopped.
    with log_path.open("w") as log:
      proc = subprocess.Popen([sys.executable, str(SCRIPT), "--spec", str(spec_path),
                               "--out", str(out_path)], stdout=log, stderr=subprocess.STDOUT)
      try:
        returncode = proc.wait(timeout=timeout_s)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        returncode = None
    output = log_path.read_text(errors="replace")
    if returncode is None:
      finished = finished_steps(output)
      if not finished:
        raise RuntimeError(f"PyTorch reference stopped at its time limit ({timeout_s:.0f} s) "
                           f"before finishing a step:\n{output[-4000:]}")
      return {"framework": "pytorch", "timed_out_after_s": timeout_s, "results": finished}
    if returncode != 0 or not out_path.exists():
      raise RuntimeError(f"PyTorch reference failed (exit {returncode}):\n{output[-4000:]}")
    return json.loads(out_path.read_text())
