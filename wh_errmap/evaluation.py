"""Scoring trained models on the test cases of a fold."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from wh_errmap.data import NUM_CLASSES, STRUCTURES
from wh_errmap.data.preprocess import PreprocessedCase
from wh_errmap.inference import segment_volume
from wh_errmap.metrics import segmentation_scores
from wh_errmap.models.voxresnet import OUTPUT_NAMES, VoxResNet


def write_json(path: Path, payload: Any) -> None:
  """Atomic JSON write: a crash never leaves a truncated file under `path`."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
  with os.fdopen(fd, "w") as f:
    json.dump(payload, f, indent=1)
  os.replace(tmp, path)


def score_segmentors(segmentors: Mapping[str, tuple[VoxResNet, Any]],
                     test_cases: Sequence[PreprocessedCase], path: Path) -> str:
  """Mean foreground Dice of every output of every segmentor on the test cases.

  Writes {model: {output: {"dsc": mean, "dsc_per_case": [...], "dsc_per_structure": {...}}}}
  to `path` and returns a printable table.
  """
  results: dict[str, dict[str, Any]] = {}
  for name, (model, variables) in segmentors.items():
    per_output: dict[str, list] = {output: [] for output in OUTPUT_NAMES}
    per_class: dict[str, list] = {output: [] for output in OUTPUT_NAMES}
    for case in test_cases:
      masks = segment_volume(model, variables, case.image[..., None])
      for output in OUTPUT_NAMES:
        scores = segmentation_scores(masks[output][None], case.label[None], NUM_CLASSES)
        per_output[output].append(float(scores["dsc"][0]))
        per_class[output].append(np.asarray(scores["dsc_per_class"][0]))
    results[name] = {
        output: {"dsc": float(np.mean(per_output[output])),
                 "dsc_per_case": dict(zip([c.case_id for c in test_cases], per_output[output])),
                 "dsc_per_structure": dict(zip(STRUCTURES, np.nanmean(
                     np.stack(per_class[output]), axis=0).tolist()))}
        for output in OUTPUT_NAMES}
  write_json(path, results)
  header = f"{'test Dice':<10}" + "".join(f"{o:>8}" for o in OUTPUT_NAMES)
  rows = [header] + [f"{name:<10}" + "".join(f"{results[name][o]['dsc']:8.3f}"
                                              for o in OUTPUT_NAMES) for name in results]
  return "\n".join(rows + [f"(mean foreground Dice over {len(test_cases)} test cases; {path})"])
