"""Same seed and config, same records: training the segmentors and the predictor and
evaluating a fold twice gives byte-identical records on the CPU."""
from __future__ import annotations

import types

import jax

from tests.train.tiny import tiny_cases, tiny_config, train_tiny, train_tiny_predictor
from wh_errmap.evaluation import evaluate_fold
from wh_errmap.train.sharding import make_mesh
from wh_errmap.train.state import make_model


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
                                 properties={"image_path": "-", "label_path": "-"})
           for c in tiny_cases(2)]
  evaluate_fold(segmentors, predictor, cases, 0, workdir / "fold0", nifti="none",
                progress=lambda _: None)
  return (workdir / "fold0" / "records.json").read_text()


def test_same_seed_same_records(tmp_path):
  first = train_and_evaluate(tmp_path / "a")
  second = train_and_evaluate(tmp_path / "b")
  assert '"qi"' in first and first.count('"mask_type"') == 22   # 2 cases x 11 masks
  assert first == second
