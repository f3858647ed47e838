"""Same seed and config, same results: training the segmentors and the predictor and
evaluating a fold twice gives byte-identical records on the CPU, in one process and in two
separate launch.py processes (one compiling everything, one reading XLA's cache)."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import types
from pathlib import Path

import jax

from tests.conftest import TINY_FOLD, launch
from tests.train.tiny import tiny_cases, tiny_config, train_tiny, train_tiny_predictor
from wh_errmap.cv.evaluate import evaluate_fold
from wh_errmap.data.preprocess import PreprocessConfig
from wh_errmap.models.factory import make_model
from wh_errmap.utils.mesh import make_mesh


def train_and_evaluate(workdir) -> str:
  mesh = make_mesh(jax.devices()[:1])
  config = tiny_config()
  segmentors = {}
  for name, dims, crop in (("seg3d", 3, (16, 16, 12)), ("seg2d", 2, (16, 16))):
    state = train_tiny(workdir / name, mesh, num_steps=3, batch_size=2, crop=crop,
                       spatial_dims=dims)
    segmentors[name] = (make_model(config.model, dims, 8),
                        {"params": state.params, "batch_stats": state.batch_stats})
  predictor_state = train_tiny_predictor(workdir / "predictor", mesh, num_steps=2,
                                         segmentors=segmentors, batch_size=2)
  predictor = (make_model(config.model, 3, 1), {"params": predictor_state.params,
                                                "batch_stats": predictor_state.batch_stats})
  cases = [types.SimpleNamespace(case_id=c.case_id, image=c.image, label=c.label,
                                 properties={"image_path": "-", "label_path": "-",
                                             "spacing": [2.0] * 3, "crop_start": [0] * 3})
           for c in tiny_cases(2)]
  evaluate_fold(segmentors, predictor, cases, 0, workdir / "fold0", nifti="none",
                progress=lambda _: None,
                preprocess=PreprocessConfig(crop_size=(16, 16, 12), margin_mm=2.0))
  return (workdir / "fold0" / "records.json").read_text()


def test_same_seed_same_records(tmp_path):
  first = train_and_evaluate(tmp_path / "a")
  second = train_and_evaluate(tmp_path / "b")
  assert '"qi"' in first and first.count('"mask_type"') == 22   # 2 cases x 11 masks
  assert first == second


def fold_outputs(fold_dir: Path) -> dict[str, bytes]:
  """What a fold computed, by path: scores, records, calibration, the losses of every
  logged step (timings left out) and the NIfTI predictions' decompressed bytes (a gzip
  header holds the time of writing)."""
  outputs = {name: (fold_dir / name).read_bytes()
             for name in ("segmentors.json", "records.json", "calibration.json")}
  for model in ("seg3d", "seg2d", "predictor"):
    lines = (fold_dir / model / "metrics.jsonl").read_text().splitlines()
    outputs[f"{model}/metrics.jsonl"] = json.dumps(
        [{k: v for k, v in json.loads(line).items() if k not in ("steps_per_s", "time_s")}
         for line in lines]).encode()
  for path in sorted((fold_dir / "predictions").rglob("*.nii.gz")):
    outputs[str(path.relative_to(fold_dir))] = gzip.decompress(path.read_bytes())
  return outputs


def test_two_processes_cold_and_warm_compilation_cache_same_outputs(tmp_path):
  """A tiny fold (cv_fold_small: cv_fold.run at CPU sizes) through launch.py twice, with
  one cache root. The first process finds it empty: it generates the phantom,
  preprocesses it and compiles every program. The second compiles nothing, reading every
  program from XLA's persistent cache, and preprocesses a copy of the phantom in another
  folder again. Both must write the same records, losses and NIfTI predictions, to the
  byte.

  One root for both: jax puts the cache's own path into its keys (through the GPU
  autotuning folder it derives from it), so a copy of the programs elsewhere is cold.
  """
  cache, data = tmp_path / "cache", tmp_path / "data"
  args = ("--experiment=cv_fold_small", *TINY_FOLD)
  cold = launch(f"--workdir={tmp_path / 'cold'}", *args, cache=cache)
  assert cold.returncode == 0, cold.stderr[-3000:]
  assert "generating the synthetic phantom" in cold.stdout
  programs = set(os.listdir(cache / "xla"))
  shutil.copytree(next(cache.glob("phantom-*")), data)
  warm = launch(f"--workdir={tmp_path / 'warm'}", f"--data_dir={data}", *args, cache=cache)
  assert warm.returncode == 0, warm.stderr[-3000:]
  assert "preprocessed mr_train_1001" in warm.stdout
  assert set(os.listdir(cache / "xla")) == programs   # nothing compiled again
  first = fold_outputs(tmp_path / "cold" / "fold0")
  second = fold_outputs(tmp_path / "warm" / "fold0")
  assert sum(name.endswith(".nii.gz") for name in first) == 2 * 3 * 3   # cases x masks x maps
  assert first.keys() == second.keys()
  different = [name for name in first if first[name] != second[name]]
  assert not different, different
