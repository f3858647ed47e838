"""Run as a script with 8 simulated CPU devices: trains the same tiny segmentor, and the same
tiny predictor (with its on-the-fly masks), on 1 device and on 8, and prints the largest
parameter and loss differences as JSON."""
import json
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
from absl import flags

from tests.train.tiny import tiny_segmentors, train_tiny, train_tiny_predictor
from wh_errmap.train.sharding import make_mesh


def compare(train_fn) -> dict:
  results = {}
  for n in (1, 8):
    with tempfile.TemporaryDirectory() as workdir:
      state = train_fn(workdir, make_mesh(jax.devices()[:n]))
      with open(next(Path(workdir).glob("*/metrics.jsonl"))) as f:
        losses = [json.loads(line)["loss"] for line in f]
      results[n] = (jax.device_get(state.params), jax.device_get(state.batch_stats), losses)

  def max_diff(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  return {"param_diff": max_diff(results[1][0], results[8][0]),
          "stats_diff": max_diff(results[1][1], results[8][1]),
          "losses_1": results[1][2], "losses_8": results[8][2]}


def main():
  flags.FLAGS.mark_as_parsed()
  assert len(jax.devices()) == 8, jax.devices()
  # SGD, not Adam: Adam's update is invariant to the gradient's scale, so it would hide
  # a gradient summed instead of averaged over devices.
  segmentor = compare(lambda workdir, mesh: train_tiny(workdir, mesh, num_steps=3, batch_size=8,
                                                       optimizer="sgd"))
  segmentors = tiny_segmentors()
  predictor = compare(lambda workdir, mesh: train_tiny_predictor(
      workdir, mesh, num_steps=3, segmentors=segmentors, batch_size=8, optimizer="sgd"))
  json.dump({"segmentor": segmentor, "predictor": predictor}, sys.stdout)


if __name__ == "__main__":
  main()
