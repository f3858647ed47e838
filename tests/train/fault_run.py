"""Run as a script: trains the tiny segmentor with the real loop, like `launch.py` would,
slowed down so that a test can kill or signal it mid-run; then saves the final parameters.

    python -m tests.train.fault_run WORKDIR NUM_STEPS [STEP_SECONDS]

FAULT_KILL=WHERE:STEP in the environment makes the run SIGKILL itself at checkpoint STEP:
WHERE "save" right after orbax's save() returns (its files still being written in the
background), "record" after orbax finished but before the integrity record is written.
FAULT_DISK_FULL_AT=STEP makes the metrics file's writes fail from STEP on as on a full
disk: half a line is written, then OSError(ENOSPC) (for machines where a test cannot mount
a small file system).

Exit status and stderr follow launch.py: a UserError prints `error: ...` and exits with its
exit_code (2, or 128 + signal for an interrupted run).
"""
import errno
import json
import os
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import flags

from tests.train.tiny import train_tiny
from wh_errmap.cli import exit_on_storage_error
from wh_errmap.errors import UserError
from wh_errmap.train import loop
from wh_errmap.utils.mesh import make_mesh


def _kill_at(where: str, at_step: int) -> None:
  """Patches the checkpoint code so that this process SIGKILLs itself at `at_step`."""
  if where == "save":
    original = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
      result = original(self, step, *args, **kwargs)
      if step == at_step:
        os.kill(os.getpid(), signal.SIGKILL)
      return result
    ocp.CheckpointManager.save = save
  elif where == "record":
    original_record = loop.write_manifest

    def write_manifest(step_dir):
      if int(Path(step_dir).name) == at_step:
        os.kill(os.getpid(), signal.SIGKILL)
      original_record(step_dir)
    loop.write_manifest = write_manifest
  else:
    raise ValueError(f"FAULT_KILL: unknown place {where!r}")


def _disk_full_from(at_step: int) -> None:
  """Patches Path.open so that appends to metrics.jsonl from `at_step` on write half a
  line and raise ENOSPC."""
  original_open = Path.open

  class FullFile:
    def __init__(self, f):
      self.f = f

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self.f.close()

    def write(self, text):
      if json.loads(text)["step"] >= at_step:
        self.f.write(text[: len(text) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.f.name))
      return self.f.write(text)

  def open_(self, mode="r", *args, **kwargs):
    f = original_open(self, mode, *args, **kwargs)
    return FullFile(f) if self.name == "metrics.jsonl" and "a" in mode else f
  Path.open = open_


def main():
  flags.FLAGS.mark_as_parsed()
  if os.environ.get("FAULT_DISK_FULL_AT"):
    _disk_full_from(int(os.environ["FAULT_DISK_FULL_AT"]))
  if os.environ.get("FAULT_KILL"):
    where, at_step = os.environ["FAULT_KILL"].split(":")
    _kill_at(where, int(at_step))
  workdir, num_steps = Path(sys.argv[1]), int(sys.argv[2])
  step_seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0

  def progress(message):
    print(message, flush=True)
    time.sleep(step_seconds)   # log_every=1: once per step

  try:
    state = train_tiny(workdir, make_mesh(jax.devices()[:1]), num_steps=num_steps,
                       batch_size=2, checkpoint_every=1, progress=progress)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(getattr(e, "exit_code", 2))
  except Exception as e:  # noqa: BLE001 -- a full disk etc., as launch.py reports it
    # launch.py's own ending: the line stays last whatever orbax's writer threads print
    # after it (seen: their tracebacks after a plain print).
    exit_on_storage_error(e)
    raise
  leaves = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]
  np.savez(workdir / "final_params.npz", *leaves)
  print("done", flush=True)


if __name__ == "__main__":
  main()
