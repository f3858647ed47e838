"""Run as a script: trains the tiny segmentor with the real loop, like `launch.py` would,
slowed down so that a test can kill or signal it mid-run; then saves the final parameters.

    python -m tests.train.fault_run WORKDIR NUM_STEPS [STEP_SECONDS]

Exit status and stderr follow launch.py: a UserError prints `error: ...` and exits with its
exit_code (2, or 128 + signal for an interrupted run).
"""
import sys
import time
from pathlib import Path

import jax
import numpy as np
from absl import flags

from tests.train.tiny import train_tiny
from wh_errmap.errors import UserError
from wh_errmap.train.sharding import make_mesh


def main():
  flags.FLAGS.mark_as_parsed()
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
  leaves = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]
  np.savez(workdir / "final_params.npz", *leaves)
  print("done", flush=True)


if __name__ == "__main__":
  main()
