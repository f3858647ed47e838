"""Run as a script with 8 simulated CPU devices: trains the same tiny segmentor, and the same
tiny predictor (with its on-the-fly masks), at the paper's batch of 2 on one device, on a
2 x 4 (data x space) mesh and on a 1 x 8 mesh, runs whole-volume inference on one device and
split over 8, and prints the largest differences against one device as JSON."""
import json
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
from absl import flags

from tests.train.tiny import tiny_config, tiny_segmentors, train_tiny, train_tiny_predictor
from wh_errmap.models.factory import make_model
from wh_errmap.models.inference import (inference_mesh, predict_error_map,
                                        segment_volume_with_uncertainty)
from wh_errmap.utils.mesh import make_mesh

BATCH = 2                    # the paper's batch (3D segmentor, predictor)
MESHES = ((1, 1), (2, 4), (1, 8))   # (data, space)
# X long enough to split over 8 devices (sharding.MIN_SPLIT_VOXELS); the rest tiny.
CROP, CASE_SHAPE = (64, 16, 12), (72, 18, 14)


def compare(train_fn) -> dict:
  results = {}
  for data, space in MESHES:
    with tempfile.TemporaryDirectory() as workdir:
      mesh = make_mesh(jax.devices()[:data * space], space)
      state = train_fn(workdir, mesh)
      with open(next(Path(workdir).glob("*/metrics.jsonl"))) as f:
        losses = [json.loads(line)["loss"] for line in f]
      results[f"{data}x{space}"] = (jax.device_get(state.params),
                                    jax.device_get(state.batch_stats), losses)

  def max_diff(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  reference = results.pop("1x1")
  return {name: {"param_diff": max_diff(reference[0], params),
                 "stats_diff": max_diff(reference[1], stats),
                 "losses": losses, "losses_1": reference[2]}
          for name, (params, stats, losses) in results.items()}


def compare_inference() -> dict:
  """Whole-volume inference of the tiny segmentors and an untrained predictor split over
  8 devices (inference_mesh("auto")) against one device: largest differences."""
  config = tiny_config()
  volume = np.random.default_rng(0).normal(size=(*CASE_SHAPE, 1)).astype(np.float32)
  mesh = inference_mesh("auto", CASE_SHAPE[0])
  assert dict(mesh.shape) == {"data": 1, "space": 8}, mesh.shape
  out = {}
  for name, (_, variables) in tiny_segmentors().items():
    dims = 3 if name == "seg3d" else 2
    single = segment_volume_with_uncertainty(make_model(config.model, dims, 8), variables, volume)
    split = segment_volume_with_uncertainty(make_model(config.model, dims, 8, 8), variables,
                                            volume, mesh)
    out[name] = {"label_mismatch": max(float((single[k][0] != split[k][0]).mean())
                                       for k in single),
                 "uncertainty_diff": max(float(np.abs(single[k][1] - split[k][1]).max())
                                         for k in single)}
  predictor = make_model(config.model, 3, 1)
  variables = predictor.init(jax.random.key(3), np.zeros((1, 8, 8, 8, 9), np.float32),
                             train=False)
  mask = single["final"][0]
  out["predictor"] = {"prob_diff": float(np.abs(
      predict_error_map(predictor, variables, volume, mask, 8)
      - predict_error_map(make_model(config.model, 3, 1, 8), variables, volume, mask, 8,
                          mesh)).max())}
  return out


def main():
  flags.FLAGS.mark_as_parsed()
  assert len(jax.devices()) == 8, jax.devices()
  # SGD, not Adam: Adam's update is invariant to the gradient's scale, so it would hide
  # a gradient summed instead of averaged over devices.
  segmentor = compare(lambda workdir, mesh: train_tiny(
      workdir, mesh, num_steps=3, batch_size=BATCH, optimizer="sgd", crop=CROP,
      case_shape=CASE_SHAPE))
  segmentors = tiny_segmentors()
  predictor = compare(lambda workdir, mesh: train_tiny_predictor(
      workdir, mesh, num_steps=3, segmentors=segmentors, batch_size=BATCH, optimizer="sgd",
      crop=CROP, case_shape=CASE_SHAPE))
  json.dump({"segmentor": segmentor, "predictor": predictor, "inference": compare_inference()},
            sys.stdout)


if __name__ == "__main__":
  main()
