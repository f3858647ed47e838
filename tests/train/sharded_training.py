"""Run as a script with 8 simulated CPU devices, `training` or `inference`: trains the same
tiny segmentor, and the same tiny predictor (with its on-the-fly masks), at the default batch
of 2 on one device, on a 2 x 4 (data x space) mesh and on a 1 x 8 mesh; or runs whole-volume
inference and a fold's evaluation on one device and split over 4 and 8 (scans of any shape).
Prints the largest differences against one device as JSON."""
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import jax
import numpy as np
from absl import flags

from tests.train.tiny import (tiny_config, tiny_predictor_state, tiny_segmentors, train_tiny,
                              train_tiny_predictor)
from wh_errmap.cv.evaluate import evaluate_fold
from wh_errmap.data.preprocess import PreprocessConfig
from wh_errmap.models.factory import make_model
from wh_errmap.models.inference import (inference_mesh, predict_error_map,
                                        segment_volume_with_uncertainty)
from wh_errmap.utils.mesh import make_mesh

BATCH = 2                    # the default batch (3D segmentor, predictor)
MESHES = ((1, 1), (2, 4), (1, 8))   # (data, space)
# X long enough to split over 8 devices (sharding.MIN_SPLIT_VOXELS); the rest tiny.
CROP, CASE_SHAPE = (64, 16, 12), (72, 18, 14)


def compare(train_fn, initial=None) -> dict:
  """Differences of each mesh's training against one device's; with the `initial` params,
  also the largest parameter change of that one-device training ("update")."""
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
  update = None if initial is None else max_diff(reference[0], initial)
  return {name: {"param_diff": max_diff(reference[0], params), "update": update,
                 "stats_diff": max_diff(reference[1], stats),
                 "losses": losses, "losses_1": reference[2]}
          for name, (params, stats, losses) in results.items()}


def compare_inference() -> dict:
  """Whole-volume inference of the tiny segmentors and an untrained predictor, and the
  evaluation of a fold's whole scan, split over 4 and 8 devices (inference_mesh) against
  one device: largest differences. The scans' shapes divide by neither (X = 70: 17.5 per
  device on 4) and one is shorter than a device's share (X = 13 on 8)."""
  config = tiny_config()
  rng = np.random.default_rng(0)
  segmentors = tiny_segmentors()
  predictor = make_model(config.model, 3, 1)
  predictor_variables = jax.jit(lambda key: predictor.init(
      key, np.zeros((1, 8, 8, 8, 9), np.float32), train=False))(jax.random.key(3))
  out = {}
  for space, shape in ((4, (70, 19, 13)), (8, (70, 19, 13)), (8, (13, 11, 9))):
    mesh = inference_mesh(space)
    assert dict(mesh.shape) == {"data": 1, "space": space}, mesh.shape
    volume = rng.normal(size=(*shape, 1)).astype(np.float32)
    result = {}
    for name, (_, variables) in segmentors.items():
      dims = 3 if name == "seg3d" else 2
      single = segment_volume_with_uncertainty(make_model(config.model, dims, 8), variables,
                                               volume)
      split = segment_volume_with_uncertainty(make_model(config.model, dims, 8, space),
                                              variables, volume, mesh)
      assert all(split[k][0].shape == split[k][1].shape == shape for k in split)
      result[name] = {"label_mismatch": max(float((single[k][0] != split[k][0]).mean())
                                            for k in single),
                      "uncertainty_diff": max(float(np.abs(single[k][1] - split[k][1]).max())
                                              for k in single)}
    mask = single["final"][0]
    split_prob = predict_error_map(make_model(config.model, 3, 1, space), predictor_variables,
                                   volume, mask, 8, mesh, shape_bucket=16)
    assert split_prob.shape == shape
    result["predictor"] = {"prob_diff": float(np.abs(
        predict_error_map(predictor, predictor_variables, volume, mask, 8, shape_bucket=16)
        - split_prob).max())}
    out[f"{space}:{'x'.join(map(str, shape))}"] = result
  out["evaluate"] = compare_evaluation(segmentors, (predictor, predictor_variables))
  return out


def compare_evaluation(segmentors: dict, predictor: tuple) -> dict:
  """The records of one whole scan of X = 70 scored on one device and split over 4 (what
  cv_fold does with mesh.space=4): largest difference of any score."""
  config = tiny_config()
  rng = np.random.default_rng(1)
  image = rng.uniform(-1, 1, (70, 36, 28)).astype(np.float32)
  label = np.zeros(image.shape, np.uint8)
  label[20:40, 8:20, 6:16] = 3
  label[40:52, 10:24, 8:20] = 1
  case = types.SimpleNamespace(case_id="c", image=image, label=label, properties={
      "image_path": "-", "label_path": "-", "spacing": [2.0] * 3, "crop_start": [0] * 3})
  preprocess = PreprocessConfig(crop_size=(16, 16, 12), margin_mm=2.0)
  records = {}
  for space in (1, 4):
    mesh = inference_mesh(space)
    models = {name: (make_model(config.model, 3 if name == "seg3d" else 2, 8, space), v)
              for name, (_, v) in segmentors.items()}
    with tempfile.TemporaryDirectory() as directory:
      records[space] = evaluate_fold(models, (make_model(config.model, 3, 1, space),
                                              predictor[1]), [case], 0, Path(directory),
                                     nifti="none", progress=lambda _: None, mesh=mesh,
                                     preprocess=preprocess)
  fields = [k for k, v in records[1][0].items() if isinstance(v, float)]
  return {"records": len(records[4]), "score_diff": max(
      float(np.nanmax(np.abs([a[k] - b[k] for a, b in zip(records[1], records[4])])))
      for k in fields)}


def run_on_8_devices(part: str) -> dict:
  """This script's `part` in a subprocess with 8 simulated CPU devices: its JSON."""
  # Imported here, for the calling test only: the script itself needs none of conftest.
  from tests.conftest import ROOT, cpu_env
  result = subprocess.run([sys.executable, "-m", "tests.train.sharded_training", part],
                          cwd=ROOT, env=cpu_env(8), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def main(part: str):
  flags.FLAGS.mark_as_parsed()
  assert len(jax.devices()) == 8, jax.devices()
  if part == "inference":
    json.dump(compare_inference(), sys.stdout)
    return
  # SGD, not Adam: Adam's update is invariant to the gradient's scale, so it would hide
  # a gradient summed instead of averaged over devices.
  segmentor = compare(lambda workdir, mesh: train_tiny(
      workdir, mesh, num_steps=3, batch_size=BATCH, optimizer="sgd", crop=CROP,
      case_shape=CASE_SHAPE))
  segmentors = tiny_segmentors()
  predictor = compare(lambda workdir, mesh: train_tiny_predictor(
      workdir, mesh, num_steps=3, segmentors=segmentors, batch_size=BATCH, optimizer="sgd",
      crop=CROP, case_shape=CASE_SHAPE),
      initial=jax.device_get(tiny_predictor_state(make_mesh(jax.devices()[:1]), 3, BATCH, "sgd",
                                                  CROP).params))
  json.dump({"segmentor": segmentor, "predictor": predictor}, sys.stdout)


if __name__ == "__main__":
  main(sys.argv[1])
