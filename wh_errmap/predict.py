"""Quality control of new (image, mask) pairs with the predictor of a trained run.

The run's `config.json` says how its cases were preprocessed and how its models are built,
so a new pair is preprocessed exactly as in training: reoriented, resampled, and cropped
around the mask being assessed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from wh_errmap.atomic import write_json
from wh_errmap.data import NUM_CLASSES, InvalidCaseError, load_case, save_nifti
from wh_errmap.data.dataset import preprocess_config
from wh_errmap.data.nifti_io import case_id_from_path
from wh_errmap.data.preprocess import preprocess_case, restore_to_original
from wh_errmap.errors import UserError
from wh_errmap.inference import error_probability
from wh_errmap.metrics import quality_indicator, soft_quality_indicator
from wh_errmap.models.voxresnet import VoxResNet
from wh_errmap.train.loop import restore_latest
from wh_errmap.train.sharding import make_mesh
from wh_errmap.train.stages import predictor_model
from wh_errmap.train.state import create_state, make_optimizer
from wh_errmap.workdir import load_run_config

def load_predictor(workdir: str | Path, fold: int) -> tuple[VoxResNet, Any, ml_collections.ConfigDict]:
  """(model, variables, run config) of the trained predictor of `fold` in a run."""
  config = load_run_config(workdir)
  checkpoints = Path(workdir) / f"fold{fold}" / "predictor" / "checkpoints"
  model = predictor_model(config)
  crop = tuple(config.input.crop_predictor)
  template = create_state(model, make_optimizer(config.optim, config.train.predictor.steps),
                          (1, *crop, 1 + NUM_CLASSES), jax.random.key(0),
                          make_mesh(jax.devices()[:1]))
  state, _, step = restore_latest(checkpoints, template)
  if step is None:
    raise UserError(f"{checkpoints}: no trained predictor; train it with "
                    f"`launch.py --experiment=cv_fold --fold={fold} --workdir={workdir}`")
  return model, {"params": state.params, "batch_stats": state.batch_stats}, config


def assess(image_path: str | Path, mask_path: str | Path, predictor: tuple[VoxResNet, Any],
           config: ml_collections.ConfigDict, output_dir: str | Path,
           threshold: float = 0.5) -> dict[str, Any]:
  """Predicts the error map of one mask; writes NIfTI maps on the image's grid and a JSON.

  Returns the per-case scores (also in `<case>_qc.json`).
  """
  case = load_case(image_path, mask_path, case_id=case_id_from_path(image_path))
  pre = preprocess_case(case, preprocess_config(config))
  model, variables = predictor
  prob = np.asarray(error_probability(model, variables, pre.image[..., None],
                                      pre.label.astype(np.int32), NUM_CLASSES))
  original = restore_to_original(prob, pre.properties, order=1)
  output_dir = Path(output_dir)
  affine = np.asarray(pre.properties["original_affine"])
  save_nifti(output_dir / f"{case.case_id}_error_prob.nii.gz", original.astype(np.float32), affine)
  save_nifti(output_dir / f"{case.case_id}_error.nii.gz", (original > threshold).astype(np.uint8),
             affine)
  result = {
      "case_id": case.case_id, "image": str(image_path), "mask": str(mask_path),
      "qi": float(quality_indicator(prob[None], threshold)[0]),
      "soft_qi": float(soft_quality_indicator(prob[None])[0]),
      "predicted_error_voxels": int((prob > threshold).sum()),
      "assessed_voxels": int(prob.size), "threshold": threshold,
  }
  write_json(output_dir / f"{case.case_id}_qc.json", result)
  return result


def pair_folder(image_dir: Path, mask_dir: Path) -> tuple[list[tuple[Path, Path]], list[str]]:
  """Pairs images and masks by case id (`X_image.nii.gz` / `X.nii.gz` with `X_label`,
  `X_mask` or `X` in the mask folder). Returns (pairs, problems)."""
  images = sorted(p for p in image_dir.iterdir() if p.name.endswith((".nii", ".nii.gz")))
  masks = {}
  for path in sorted(mask_dir.iterdir()):
    if path.name.endswith((".nii", ".nii.gz")):
      masks[case_id_from_path(path).removesuffix("_mask")] = path
  pairs, problems = [], []
  for image in images:
    if image_dir == mask_dir and image.name.split(".nii")[0].endswith(("_label", "_mask")):
      continue
    mask = masks.get(case_id_from_path(image))
    if mask is None or mask == image:
      problems.append(f"{image}: no mask for it in {mask_dir}")
    else:
      pairs.append((image, mask))
  return pairs, problems


def assess_many(pairs: list[tuple[Path, Path]], predictor, config, output_dir: Path,
                threshold: float, progress) -> tuple[list[dict], list[str]]:
  """Assesses every pair; a bad pair is reported and skipped, the others complete."""
  results, problems = [], []
  for i, (image, mask) in enumerate(pairs):
    try:
      result = assess(image, mask, predictor, config, output_dir, threshold)
    except InvalidCaseError as e:
      problems.append(str(e))
      progress(f"[predict] skipped ({i + 1}/{len(pairs)}): {e}")
      continue
    results.append(result)
    progress(f"[predict] {result['case_id']} ({i + 1}/{len(pairs)}): QI {result['qi']:.4f}")
  return results, problems
