"""Faults during training: SIGKILL, SIGTERM/SIGINT, a corrupt checkpoint, divergence.

The kill and signal tests run tests/train/fault_run.py in a subprocess and compare its
final parameters, bit for bit, with an uninterrupted run of the same command.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import ROOT, cpu_env
from tests.train.tiny import train_tiny
from wh_errmap.train.checkpoints import MANIFEST
from wh_errmap.train.loop import TrainingDivergedError
from wh_errmap.utils.mesh import make_mesh

NUM_STEPS = 8
STEP_SECONDS = 0.4


def fault_run(workdir: Path, step_seconds: float = STEP_SECONDS, kill: str = "",
              disk_full_at: str = "") -> subprocess.Popen:
  """The tiny training run of fault_run.py; kill="save:3" etc. (FAULT_KILL, see there)."""
  return subprocess.Popen(
      [sys.executable, "-m", "tests.train.fault_run", str(workdir), str(NUM_STEPS),
       str(step_seconds)], cwd=ROOT,
      env=cpu_env(FAULT_KILL=kill, FAULT_DISK_FULL_AT=disk_full_at),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@contextlib.contextmanager
def small_filesystem(path: Path, size: str):
  """A tmpfs of `size` mounted at `path` for the block; None where mounting is not allowed."""
  path.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                           capture_output=True).returncode == 0 if shutil.which("mount") else False
  try:
    yield path if mounted else None
  finally:
    if mounted:
      subprocess.run(["umount", "-l", str(path)], check=False)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
  out, err = proc.communicate(timeout=300)
  return proc.returncode, out, err


def wait_for_checkpoint(workdir: Path, step: int, proc: subprocess.Popen) -> None:
  """Blocks until checkpoint `step` is complete (orbax renames it when finished)."""
  deadline = time.monotonic() + 240
  while not (workdir / "seg" / "checkpoints" / str(step)).is_dir():
    if proc.poll() is not None:
      raise AssertionError(f"run ended early: {proc.communicate()[1][-2000:]}")
    if time.monotonic() > deadline:
      proc.kill()
      raise AssertionError("no checkpoint within 240 s")
    time.sleep(0.05)


def final_params(workdir: Path) -> list[np.ndarray]:
  with np.load(workdir / "final_params.npz") as f:
    return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[np.ndarray]:
  workdir = tmp_path_factory.mktemp("straight")
  code, _, err = finish(fault_run(workdir, step_seconds=0.0))
  assert code == 0, err[-2000:]
  return final_params(workdir)


def assert_same(params: list[np.ndarray], reference: list[np.ndarray]) -> None:
  assert len(params) == len(reference)
  for a, b in zip(params, reference):
    np.testing.assert_array_equal(a, b)


def test_sigkill_then_same_command_gives_the_same_parameters(tmp_path, uninterrupted):
  proc = fault_run(tmp_path)
  wait_for_checkpoint(tmp_path, 2, proc)
  # A moment during a step, a log line or a checkpoint being written (seeded, so a failure
  # can be rerun; the kills inside a checkpoint write are tested deterministically below).
  time.sleep(random.Random(0).uniform(0.0, 3 * STEP_SECONDS))
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert not (tmp_path / "final_params.npz").exists()
  code, out, err = finish(fault_run(tmp_path, step_seconds=0.0))
  assert code == 0, err[-2000:]
  assert "resuming from the checkpoint at step" in out
  assert_same(final_params(tmp_path), uninterrupted)


@pytest.mark.parametrize("where", ["save", "record"])
def test_sigkill_inside_a_checkpoint_write(tmp_path, uninterrupted, where):
  """Killed while checkpoint 4's files are being written ("save": orbax's temporary folder
  is left behind) or after orbax finished but before its integrity record ("record"):
  the same command removes the temporary folder, resumes from the newest whole checkpoint
  and ends with the uninterrupted run's parameters."""
  code, _, err = finish(fault_run(tmp_path, step_seconds=0.0, kill=f"{where}:4"))
  assert code == -signal.SIGKILL, err[-2000:]
  checkpoints = tmp_path / "seg" / "checkpoints"
  leftovers = [p.name for p in checkpoints.iterdir() if "orbax-checkpoint-tmp" in p.name]
  if where == "save":
    assert leftovers and not (checkpoints / "4").exists(), sorted(os.listdir(checkpoints))
  else:
    assert (checkpoints / "4").is_dir() and not (checkpoints / "4" / MANIFEST).exists()
  code, out, err = finish(fault_run(tmp_path, step_seconds=0.0))
  assert code == 0, err[-2000:]
  resumed = 4 if where == "record" else 3
  assert f"resuming from the checkpoint at step {resumed}/" in out, out
  assert not [p for p in checkpoints.iterdir() if "orbax-checkpoint-tmp" in p.name]
  assert not (tmp_path / "seg" / "corrupt_checkpoints").exists()
  assert_same(final_params(tmp_path), uninterrupted)


def test_a_full_disk_is_one_error_line_and_loses_no_checkpoint(tmp_path, uninterrupted):
  """Training on a file system that fills up (a 1 MB tmpfs: two of the tiny run's
  checkpoints fit, the third does not; where mounting is not allowed, the metrics file's
  writes fail instead): the run ends with one error line naming the file, exit status 2;
  after freeing space the same command resumes to the uninterrupted run's parameters."""
  with small_filesystem(tmp_path / "small", "1m") as small:
    workdir = (small or tmp_path) / "run"
    proc = fault_run(workdir, step_seconds=0.0, disk_full_at="" if small else "3")
    code, _, err = finish(proc)
    assert code == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    # The file is named when the failing write says which (ours, tensorstore's); orbax's
    # metadata writes to an open file fail without a name: "a file" (never a dangling word).
    assert last.startswith((f"error: the disk is full writing {workdir}",
                            "error: the disk is full writing a file (")), err[-3000:]
    assert "free space" in last and "resume" in last
    shutil.copytree(workdir, tmp_path / "freed", symlinks=True)   # "space freed"
  code, out, err = finish(fault_run(tmp_path / "freed", step_seconds=0.0))
  assert code == 0, err[-2000:]
  assert "resuming from the checkpoint at step 2/" in out, out
  assert_same(final_params(tmp_path / "freed"), uninterrupted)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_says_how_to_resume(tmp_path, uninterrupted, sig):
  proc = fault_run(tmp_path)
  wait_for_checkpoint(tmp_path, 2, proc)
  proc.send_signal(sig)
  code, _, err = finish(proc)
  assert code == 128 + sig, err[-2000:]
  lines = err.strip().splitlines()
  assert lines[-1].startswith("error: [seg] stopped by " + signal.Signals(sig).name), lines
  assert "Run the same command again to resume" in lines[-1]
  stopped_at = int(lines[-1].split("after step ")[1].split("/")[0])
  assert 2 <= stopped_at < NUM_STEPS
  assert (tmp_path / "seg" / "checkpoints" / str(stopped_at)).is_dir()
  code, out, err = finish(fault_run(tmp_path, step_seconds=0.0))
  assert code == 0, err[-2000:]
  assert f"resuming from the checkpoint at step {stopped_at}/" in out
  assert_same(final_params(tmp_path), uninterrupted)


def test_corrupt_newest_checkpoint_is_reported_and_skipped(tmp_path):
  mesh = make_mesh(jax.devices()[:1])
  straight = train_tiny(tmp_path / "a", mesh, num_steps=6, batch_size=2)
  train_tiny(tmp_path / "b", mesh, num_steps=6, batch_size=2, stop_at=4, checkpoint_every=1)
  newest = tmp_path / "b" / "seg" / "checkpoints" / "4"
  victim = max((p for p in (newest / "state").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])   # truncated
  messages = []
  resumed = train_tiny(tmp_path / "b", mesh, num_steps=6, batch_size=2, checkpoint_every=1,
                       progress=messages.append)
  warning = next(m for m in messages if m.startswith("warning: checkpoint"))
  assert str(newest) in warning and "is damaged" in warning and "bytes" in warning
  assert "[seg] resuming from the checkpoint at step 3/6" in messages
  assert (tmp_path / "b" / "seg" / "corrupt_checkpoints" / "4").is_dir()
  for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(a, b)


def poison_after(step: int):
  """Wraps a step so that the parameters it returns are NaN from `step` (1-based) on."""
  def wrap(step_fn):
    def poisoned(state, batch, rng):
      new_state, metrics = step_fn(state, batch, rng)
      factor = jnp.where(state.step + 1 >= step, jnp.nan, 1.0)
      return new_state.replace(params=jax.tree.map(lambda p: p * factor, new_state.params)), metrics
    return poisoned
  return wrap


def test_nan_parameters_are_never_checkpointed(tmp_path):
  """The loss is only checked at logged steps; the parameters before every checkpoint."""
  with pytest.raises(TrainingDivergedError, match="model seg: the parameters are not finite "
                                                   "at step 3") as info:
    train_tiny(tmp_path, make_mesh(jax.devices()[:1]), num_steps=8, batch_size=2,
               checkpoint_every=1, log_every=100, step_fn_wrapper=poison_after(3))
  assert str(tmp_path / "seg" / "checkpoints") in str(info.value)
  steps = sorted(int(p.name) for p in (tmp_path / "seg" / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert steps[-1] == 2


def test_nan_loss_stops_at_the_logged_step(tmp_path):
  with pytest.raises(TrainingDivergedError, match="model seg: the loss is nan at step 4"):
    train_tiny(tmp_path, make_mesh(jax.devices()[:1]), num_steps=8, batch_size=2,
               checkpoint_every=100, log_every=1, step_fn_wrapper=poison_after(3))


def test_iterator_state_of_old_and_new_checkpoints():
  from wh_errmap.train.loop import _own_iterator_state
  assert _own_iterator_state({"next_index": 4}) == {"next_index": 4}   # before per-process
  assert _own_iterator_state({"process_0": {"next_index": 5}}) == {"next_index": 5}
