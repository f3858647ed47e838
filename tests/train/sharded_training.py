"""Run as a script with 8 simulated CPU devices: trains the same tiny segmentor on 1 device
and on 8, and prints the largest parameter and loss differences as JSON."""
import json
import sys
import tempfile

import jax
import numpy as np
from absl import flags

from tests.train.tiny import train_tiny
from wh_errmap.train.sharding import make_mesh


def main():
  flags.FLAGS.mark_as_parsed()
  assert len(jax.devices()) == 8, jax.devices()
  results = {}
  for n in (1, 8):
    with tempfile.TemporaryDirectory() as workdir:
      # SGD, not Adam: Adam's update is invariant to the gradient's scale, so it would hide
      # a gradient summed instead of averaged over devices.
      state = train_tiny(workdir, make_mesh(jax.devices()[:n]), num_steps=3, batch_size=8,
                         optimizer="sgd")
      with open(f"{workdir}/seg/metrics.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f]
      results[n] = (jax.device_get(state.params), jax.device_get(state.batch_stats), losses)
  param_diff = max(float(np.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(results[1][0]), jax.tree.leaves(results[8][0])))
  stats_diff = max(float(np.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(results[1][1]), jax.tree.leaves(results[8][1])))
  param_change = max(float(np.abs(a).max()) for a in jax.tree.leaves(results[1][0]))
  json.dump({"param_diff": param_diff, "stats_diff": stats_diff, "param_scale": param_change,
             "losses_1": results[1][2], "losses_8": results[8][2]}, sys.stdout)


if __name__ == "__main__":
  main()
