"""Throughput of cohort QC: N synthetic phantom pairs through `predict` in P processes.

The pairs are links to a few phantom cases at the phantom's own size (about 260 x 260 x 120
voxels at 1 mm), so a cohort of 1000 takes no more disk than its distinct cases; every pair
is still read, hashed, resampled, assessed and written in full. The predictor is a model
file, by default one of the quick start's size with initialised (untrained) weights and a
training reference from the phantom cases: its timing is that of a trained one, its verdicts
are meaningless. Each measurement starts with an empty compilation cache (compilation is
included), runs `launch.py --experiment=predict` as P processes, each pinned to its share of
the CPU cores (P > 1: one shard each, then `qc_merge`), and records the wall-clock time,
each process's peak resident memory and the seconds per pair of each phase.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from wh_errmap.data.nifti_io import load_case
from wh_errmap.data.preprocess import PreprocessConfig, preprocess_case
from wh_errmap.data.structures import NUM_CLASSES
from wh_errmap.data.training_reference import training_reference
from wh_errmap.models.factory import predictor_model
from wh_errmap.qc.cohort import PHASES
from wh_errmap.qc.predictor import Predictor, export_predictor
LAUNCH = Path(__file__).resolve().parents[2] / "launch.py"
# argv: cores, command...: pins itself to the cores, then runs the command in its place.
_PIN = ("import os, sys; os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(',')}); "
        "os.execv(sys.argv[2], sys.argv[2:])")


def make_cohort(folder: Path, cases: Sequence[tuple[Path, Path]], count: int) -> tuple[Path, Path]:
  """`folder`/images/c{k}_image.nii.gz and masks/c{k}_label.nii.gz for k < count: links to
  case k mod len(cases) (hard links, else symbolic ones). Returns (images, masks)."""
  images, masks = folder / "images", folder / "masks"
  for sub in (images, masks):
    shutil.rmtree(sub, ignore_errors=True)
    sub.mkdir(parents=True)
  for k in range(count):
    image, label = cases[k % len(cases)]
    for source, target in ((image, images / f"c{k:05d}_image.nii.gz"),
                           (label, masks / f"c{k:05d}_label.nii.gz")):
      try:
        os.link(source, target)
      except OSError:
        os.symlink(Path(source).absolute(), target)
  return images, masks


def untrained_model_file(path: Path, config: ml_collections.ConfigDict,
                         cases: Sequence[tuple[Path, Path]], seed: int = 0) -> Path:
  """A model file of `config`'s predictor with initialised weights and the training
  reference of `cases` (their labels as masks, so every check of predict runs)."""
  model = predictor_model(config)
  crop = tuple(config.input.crop_predictor)
  # Jitted: eagerly, init compiles each of its operations on its own.
  variables = jax.jit(lambda key: model.init(key, jnp.zeros((1, *crop, 1 + NUM_CLASSES)),
                                             train=False))(jax.random.key(seed))
  preprocess = PreprocessConfig.from_config(config)
  preprocessed = [preprocess_case(load_case(image, label), preprocess) for image, label in cases]
  reference = training_reference(preprocessed, {c.case_id: [] for c in preprocessed},
                                 modality=config.modality)
  predictor = Predictor(model, variables, config, str(path), 0, 0, 0, reference=reference)
  return export_predictor(predictor, path, {"data_source": "untrained (throughput only)",
                                            "fold": 0, "training_cases": None})


def core_shares(processes: int) -> list[set[int]]:
  """The CPU cores this process may use, split into `processes` shares (shared round robin
  when there are more processes than cores)."""
  cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
  if not cores:
    return [set() for _ in range(processes)]
  if processes > len(cores):
    return [{cores[i % len(cores)]} for i in range(processes)]
  size = len(cores) // processes
  return [set(cores[i * size:(i + 1) * size]) for i in range(processes)]


def _run_all(commands: Sequence[list[str]], shares: Sequence[set[int]], env: dict[str, str],
             logs: Path) -> list[dict[str, Any]]:
  """Runs the commands at once, each pinned to its share; waits for all. Returns each one's
  exit status, peak resident memory and the tail of its output."""
  running = []
  for i, (command, share) in enumerate(zip(commands, shares)):
    log = open(logs / f"process{i}.log", "w")
    if share:   # the child pins itself, then becomes the command (no fork of this process)
      command = [sys.executable, "-c", _PIN, ",".join(map(str, sorted(share))), *command]
    running.append((subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT),
                    log, logs / f"process{i}.log"))
  outcome = []
  for process, log, path in running:
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    outcome.append({"returncode": process.returncode,
                    "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9,   # Linux: kilobytes
                    "tail": path.read_text()[-1500:]})
  return outcome


def measure(images: Path, masks: Path, model_file: Path, out: Path, processes: int,
            extra: Sequence[str] = ()) -> dict[str, Any]:
  """One measurement: every pair of images/masks assessed by `processes` processes into `out`
  (emptied first) with a fresh compilation cache, then (processes > 1) merged."""
  shutil.rmtree(out, ignore_errors=True)
  out.mkdir(parents=True)
  with tempfile.TemporaryDirectory(prefix="qc_bench_cache_") as cache:
    base = [sys.executable, str(LAUNCH), "--experiment=predict", f"--image={images}",
            f"--mask={masks}", f"--model={model_file}", f"--set=output_dir={out}",
            f"--cache_dir={cache}", "--set=figures=False", *extra]
    commands = [base + ([f"--shard={i}/{processes}"] if processes > 1 else [])
                for i in range(processes)]
    env = dict(os.environ)
    start = time.perf_counter()
    outcome = _run_all(commands, core_shares(processes), env, out)
    if processes > 1 and all(o["returncode"] == 0 for o in outcome):
      merge = subprocess.run([sys.executable, str(LAUNCH), "--experiment=qc_merge",
                              f"--results={out}", "--set=figures=False"], env=env,
                             capture_output=True, text=True)
      outcome.append({"returncode": merge.returncode, "peak_rss_gb": None,
                      "tail": (merge.stdout + merge.stderr)[-1500:]})
    wall = time.perf_counter() - start
  failed = [o for o in outcome if o["returncode"] != 0]
  if failed:
    raise RuntimeError(f"a process of the measurement failed:\n{failed[0]['tail']}")
  timings = [_timing(path) for path in sorted(out.glob("shard-*-of-*.json"))
             or sorted(out.glob("summary-*.json"))]
  assessed = sum(t["assessed"] for t in timings)
  phases = {p: sum(t["seconds_per_pair"][p] * t["assessed"] for t in timings) / max(1, assessed)
            for p in PHASES}
  rows = len((out / "qc.tsv").read_text().splitlines()) - 1
  return {"processes": processes, "pairs": rows, "wall_s": wall,
          "pairs_per_s": rows / wall, "seconds_per_pair": wall / max(1, rows),
          "phase_seconds_per_pair": phases,
          "peak_rss_gb": max(o["peak_rss_gb"] for o in outcome if o["peak_rss_gb"] is not None)}


def _timing(path: Path) -> dict[str, Any]:
  return json.loads(path.read_text())["timing"]


def markdown(results: Sequence[dict[str, Any]], title: str) -> str:
  """The measurements as a Markdown table."""
  lines = [f"### {title}", "",
           "| pairs | processes | wall s | pairs/s | s per pair | "
           + " | ".join(f"{p} s/pair" for p in PHASES) + " | peak RSS GB (largest process) |",
           "|" + "---:|" * (6 + len(PHASES))]
  for r in results:
    lines.append(f"| {r['pairs']} | {r['processes']} | {r['wall_s']:.1f} | "
                 f"{r['pairs_per_s']:.3f} | {r['seconds_per_pair']:.2f} | "
                 + " | ".join(f"{r['phase_seconds_per_pair'][p]:.2f}" for p in PHASES)
                 + f" | {r['peak_rss_gb']:.2f} |")
  return "\n".join(lines) + "\n"


def describe(result: dict[str, Any]) -> str:
  return (f"{result['pairs']} pairs, {result['processes']} process(es): "
          f"{result['wall_s']:.1f} s, {result['seconds_per_pair']:.2f} s per pair, peak RSS "
          f"{result['peak_rss_gb']:.2f} GB")

