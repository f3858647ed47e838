"""Two processes (jax.distributed over gloo, 4 CPU devices each) train like one process.

The workers and the one-process reference run as subprocesses of
tests/train/multiprocess_training.py; see its docstring for what each trains.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp

from tests.conftest import ROOT, cpu_env
from tests.train.multiprocess_training import LOCAL_DEVICES, NUM_PROCESSES, NUM_STEPS

SCRIPT = "tests.train.multiprocess_training"
WORKER_TIMEOUT_S = 240


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(device_count: int) -> dict[str, str]:
  # os.environ carries the session's persistent compilation cache (JAX_* set in conftest).
  return cpu_env(device_count)


def _tail(path: Path, chars: int = 3000) -> str:
  return path.read_text(errors="replace")[-chars:] if path.exists() else "(no output)"


def _run_workers(workdir: Path, out: Path, logs: Path, timeout_s: float) -> None:
  """Runs the two worker processes to completion; fails with their output tails if either
  fails or they do not finish within timeout_s (then both are killed)."""
  port = _free_port()
  logs.mkdir(parents=True, exist_ok=True)
  procs, log_paths = [], []
  for i in range(NUM_PROCESSES):
    log_paths.append(logs / f"worker{i}.log")
    with log_paths[-1].open("w") as log:
      procs.append(subprocess.Popen(
          [sys.executable, "-m", SCRIPT, "worker", "--process_id", str(i), "--port", str(port),
           "--workdir", str(workdir), "--out", str(out)],
          cwd=ROOT, env=_env(LOCAL_DEVICES), stdout=log, stderr=subprocess.STDOUT))
  deadline = time.monotonic() + timeout_s
  # Poll both: when one fails, its peer would wait for it in a collective until the deadline.
  while time.monotonic() < deadline:
    codes = [proc.poll() for proc in procs]
    if all(code is not None for code in codes) or any(code for code in codes):
      break
    time.sleep(0.5)
  timed_out = [proc.poll() is None and time.monotonic() >= deadline for proc in procs]
  for proc in procs:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  report = "\n".join(f"--- worker {i} (exit {p.returncode}"
                     f"{', killed after timeout' if timed_out[i] else ''}):\n{_tail(log_paths[i])}"
                     for i, p in enumerate(procs))
  assert not any(timed_out), f"workers did not finish within {timeout_s} s\n{report}"
  # Missing gloo shows here: "could not form a 2-process jax job over gloo CPU collectives".
  assert all(p.returncode == 0 for p in procs), f"a worker failed\n{report}"


def _params(out: Path, process: int) -> dict[str, np.ndarray]:
  with np.load(out.with_suffix(f".process{process}.npz")) as f:
    return dict(f)


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
  assert a.keys() == b.keys()
  return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def _iterator_states(checkpoints: Path, step: int) -> dict:
  with ocp.CheckpointManager(checkpoints.absolute(), item_names=("state", "data")) as manager:
    return manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data


def test_two_processes_train_like_one(tmp_path):
  """At the default batch of 2 on a 2 x 4 mesh (each process's volume split over its 4
  devices): losses, parameters and batch statistics of a 2-process run match one process on
  the same global batches; the checkpoint keeps each process's input position; a second run on
  the finished workdir only restores."""
  workdir, out = tmp_path / "multi", tmp_path / "multi.json"
  _run_workers(workdir, out, tmp_path / "logs1", WORKER_TIMEOUT_S)
  reference = subprocess.run(
      [sys.executable, "-m", SCRIPT, "reference", "--workdir", str(tmp_path / "single"),
       "--out", str(tmp_path / "single.json")],
      cwd=ROOT, env=_env(NUM_PROCESSES * LOCAL_DEVICES), capture_output=True, text=True,
      timeout=WORKER_TIMEOUT_S)
  assert reference.returncode == 0, reference.stdout[-2000:] + reference.stderr[-3000:]

  multi = json.loads(out.read_text())
  single = json.loads((tmp_path / "single.json").read_text())
  assert multi["process_count"] == NUM_PROCESSES and single["process_count"] == 1
  steps = list(range(1, NUM_STEPS + 1))
  assert single["steps"] == steps
  # Each step is logged once, not once per process.
  assert multi["steps"] == steps, multi
  np.testing.assert_allclose(multi["losses"], single["losses"], rtol=1e-5)

  params = [_params(out, i) for i in range(NUM_PROCESSES)]
  # Both processes hold the same replica of the state.
  assert _max_diff(params[0], params[1]) == 0.0
  # A gradient not averaged over the processes, or batch statistics of one process's rows
  # only, would be far above this tolerance.
  diff = _max_diff(params[0], _params(tmp_path / "single.json", 0))
  assert diff < 1e-5, diff

  # The checkpoint (written by process 0) holds every process's input position: the same
  # as the reference's iterator over that process's shard. (The states are equal to each
  # other: a grain state is a position, the shard is in the dataset, and the processes
  # advance in lockstep.)
  states = _iterator_states(workdir / "seg" / "checkpoints", NUM_STEPS)
  assert sorted(states) == [f"process_{i}" for i in range(NUM_PROCESSES)], states
  reference_states = _iterator_states(tmp_path / "single" / "seg" / "checkpoints", NUM_STEPS)
  assert [states[f"process_{i}"] for i in range(NUM_PROCESSES)] == [
      reference_states["process_0"][f"shard_{i}"] for i in range(NUM_PROCESSES)]

  # The same command again: the run is finished, so the workers only restore.
  metrics = (workdir / "seg" / "metrics.jsonl").read_text()
  again = tmp_path / "again.json"
  _run_workers(workdir, again, tmp_path / "logs2", WORKER_TIMEOUT_S / 2)
  assert "already trained" in _tail(tmp_path / "logs2" / "worker0.log")
  assert (workdir / "seg" / "metrics.jsonl").read_text() == metrics
  assert sorted(p.name for p in (workdir / "seg" / "checkpoints").iterdir()) == [str(NUM_STEPS)]
  assert json.loads(again.read_text())["final_step"] == NUM_STEPS
  for i in range(NUM_PROCESSES):
    assert _max_diff(_params(again, i), params[0]) == 0.0
