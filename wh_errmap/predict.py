"""Quality control of new (image, mask) pairs with the predictor of a trained run.

The run's `config.json` says how its cases were preprocessed and how its models are built,
so a new pair is preprocessed exactly as in training: reoriented, resampled, and cropped
around the mask being assessed.

Predict only reads the run: its checkpoints are restored read-only (a damaged one is
reported, left where it is, and the previous one is used). A pair's outputs are named
after the image and the mask, `<image case>__<mask name>_...`, so two masks of one scan
never share a file. The pair's `_qc.json`, written after its maps, is its result; maps
without it are leftovers of an interrupted assessment. An existing result is only
replaced with `overwrite`; without it the same assessment (same file contents, run, fold,
checkpoint and threshold) is reused, and any other is an error for that pair.
"""
from __future__ import annotations

import collections
import dataclasses
import datetime
import hashlib
import json
from collections.abc import Callable
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
from wh_errmap.progress import console
from wh_errmap.train.checkpoints import restore_latest
from wh_errmap.train.sharding import make_mesh
from wh_errmap.train.stages import predictor_model
from wh_errmap.train.state import create_state, make_optimizer
from wh_errmap.workdir import load_run_config

Progress = Callable[[str], None]
# What makes two assessments of a pair the same, with the words that name a difference.
_IDENTITY = {"image_sha256": "image file contents", "mask_sha256": "mask file contents",
             "threshold": "threshold", "predictor": "predictor (run, fold or checkpoint)"}


@dataclasses.dataclass(frozen=True)
class Predictor:
  """A run's trained error-map predictor and where it came from."""
  model: VoxResNet
  variables: Any                       # {"params": ..., "batch_stats": ...}
  config: ml_collections.ConfigDict    # the run's config: preprocessing and model
  workdir: str                         # the run, as an absolute path
  fold: int
  step: int                            # training step of the restored checkpoint
  total_steps: int                     # the run's config.train.predictor.steps

  def error_map(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(X, Y, Z) float32 error probability of a preprocessed (X, Y, Z) float32 image and
    its (X, Y, Z) integer mask (classes 0..7)."""
    return np.asarray(error_probability(self.model, self.variables, image[..., None],
                                        mask.astype(np.int32), NUM_CLASSES))

  @property
  def finished(self) -> bool:
    """Whether the checkpoint is the end of the training schedule."""
    return self.step >= self.total_steps

  @property
  def provenance(self) -> dict[str, Any]:
    """What every result records about the predictor that made it."""
    return {"workdir": self.workdir, "fold": self.fold, "checkpoint_step": self.step,
            "total_steps": self.total_steps}


def load_predictor(workdir: str | Path, fold: int, allow_partial: bool = False,
                   progress: Progress = console) -> Predictor:
  """The trained predictor of `fold` in a run, restored without changing the run's files.

  A predictor whose newest readable checkpoint is before the end of its training schedule
  is refused (UserError) unless allow_partial, and then announced through `progress`.
  """
  config = load_run_config(workdir)
  checkpoints = Path(workdir) / f"fold{fold}" / "predictor" / "checkpoints"
  model = predictor_model(config)
  crop = tuple(config.input.crop_predictor)
  total = int(config.train.predictor.steps)
  template = create_state(model, make_optimizer(config.optim, total),
                          (1, *crop, 1 + NUM_CLASSES), jax.random.key(0),
                          make_mesh(jax.devices()[:1]))
  state, _, step = restore_latest(checkpoints, template, progress, read_only=True)
  if step is None:
    raise UserError(f"{checkpoints}: no trained predictor; train it with "
                    f"`launch.py --experiment=cv_fold --fold={fold} --workdir={workdir}`")
  predictor = Predictor(model, {"params": state.params, "batch_stats": state.batch_stats},
                        config, str(Path(workdir).absolute()), fold, step, total)
  if not predictor.finished:
    if not allow_partial:
      raise UserError(f"{checkpoints}: the predictor of fold {fold} is trained for {step} of "
                      f"{total} steps (training not finished). Finish it with `launch.py "
                      f"--experiment=cv_fold --fold={fold} --workdir={workdir}`, or use it as "
                      f"it is with --set=allow_partial=True")
    progress(f"warning: PARTLY TRAINED predictor: fold {fold} at step {step} of {total} "
             f"(allow_partial); its error maps and QIs are not those of the finished run")
  return predictor


def pair_name(image_path: str | Path, mask_path: str | Path) -> str:
  """`<image case>__<mask file name without .nii/.nii.gz>`: how a pair's outputs begin."""
  return f"{case_id_from_path(image_path)}__{_stem(Path(mask_path))}"


def assess(image_path: str | Path, mask_path: str | Path, predictor: Predictor,
           output_dir: str | Path, threshold: float = 0.5,
           overwrite: bool = False) -> tuple[dict[str, Any], bool]:
  """Predicts the error map of one mask; writes NIfTI maps on the image's grid and a JSON.

  Writes `<pair>_error_prob.nii.gz` (float32), `<pair>_error.nii.gz` (uint8, probability
  above `threshold`) and then `<pair>_qc.json` (scores, inputs, predictor), with
  pair = pair_name(image_path, mask_path). On a failure the maps written are removed.

  Returns (result, reused): reused when `<pair>_qc.json` already held this very assessment
  (nothing is recomputed). Raises UserError when it holds another one and not overwrite.
  """
  image_path, mask_path, output_dir = Path(image_path), Path(mask_path), Path(output_dir)
  name = pair_name(image_path, mask_path)
  maps = [output_dir / f"{name}_error_prob.nii.gz", output_dir / f"{name}_error.nii.gz"]
  report = output_dir / f"{name}_qc.json"
  identity = {"image_sha256": _sha256(image_path), "mask_sha256": _sha256(mask_path),
              "threshold": threshold, "predictor": predictor.provenance}
  if report.exists() and not overwrite:
    previous = _same_assessment(report, identity, name)
    if all(path.exists() for path in maps):
      return previous, True
  case = load_case(image_path, mask_path, case_id=case_id_from_path(image_path))
  pre = preprocess_case(case, preprocess_config(predictor.config))
  prob = predictor.error_map(pre.image, pre.label)
  original = restore_to_original(prob, pre.properties, order=1).astype(np.float32)
  affine = np.asarray(pre.properties["original_affine"])
  result = {
      "pair": name, "case_id": case.case_id,
      "image": str(image_path.absolute()), "mask": str(mask_path.absolute()), **identity,
      "qi": float(quality_indicator(prob[None], threshold)[0]),
      "soft_qi": float(soft_quality_indicator(prob[None])[0]),
      "predicted_error_voxels": int((prob > threshold).sum()),
      "assessed_voxels": int(prob.size),
  }
  try:
    report.unlink(missing_ok=True)   # an old result must not describe the new maps
    save_nifti(maps[0], original, affine)
    save_nifti(maps[1], (original > threshold).astype(np.uint8), affine)
    write_json(report, result)
  except BaseException:
    for path in maps:
      path.unlink(missing_ok=True)
    raise
  return result, False


def pair_folder(image_dir: Path, mask_dir: Path) -> tuple[list[tuple[Path, Path]], list[str]]:
  """Pairs each image of `image_dir` (`X_image` or `X`, .nii or .nii.gz) with its mask in
  `mask_dir` (`X_label`, `X_mask` or `X`). Returns (pairs, problems).

  Nothing is guessed: an image without a mask, an image with several (`X_label` and
  `X_mask`, or `X.nii` and `X.nii.gz`), and two images of one case are problems naming the
  files. When both folders are one, `X_label` / `X_mask` files, and `X` beside `X_image`,
  are masks, not images.
  """
  masks = collections.defaultdict(list)
  for path in _niftis(mask_dir):
    masks[_stem(path)].append(path)
  images = _niftis(image_dir)
  if image_dir.resolve() == mask_dir.resolve():
    images = [p for p in images if not _stem(p).endswith(("_label", "_mask"))]
    tagged = {_stem(p).removesuffix("_image") for p in images if _stem(p).endswith("_image")}
    images = [p for p in images if _stem(p).endswith("_image") or _stem(p) not in tagged]
  by_case = collections.defaultdict(list)
  for image in images:
    by_case[case_id_from_path(image)].append(image)
  pairs, problems = [], []
  for case, found in sorted(by_case.items()):
    if len(found) > 1:
      problems.append(f"{' and '.join(map(str, found))} are images of the same case {case}: "
                      f"keep one of them in {image_dir}")
      continue
    image = found[0]
    candidates = [m for tag in ("_label", "_mask", "") for m in masks[case + tag] if m != image]
    if not candidates:
      problems.append(f"{image}: no mask for it in {mask_dir} (looked for {case}_label, "
                      f"{case}_mask and {case})")
    elif len(candidates) > 1:
      problems.append(f"{image}: ambiguous mask, {' and '.join(map(str, candidates))} both "
                      f"match; keep one of them in {mask_dir}")
    else:
      pairs.append((image, candidates[0]))
  return pairs, problems


def assess_many(pairs: list[tuple[Path, Path]], predictor: Predictor, output_dir: Path,
                threshold: float, overwrite: bool = False, progress: Progress = console,
                ) -> tuple[list[dict], list[str], list[str]]:
  """Assesses every pair. Any failure of a pair (a bad file, an existing other result, out
  of memory, ...) is reported and the pair skipped; the others complete. KeyboardInterrupt
  and SystemExit stop the batch.

  Returns (results, names of the pairs whose result was reused, problems).
  """
  results, reused, problems = [], [], []
  for i, (image, mask) in enumerate(pairs):
    where = f"({i + 1}/{len(pairs)})"
    try:
      result, was_done = assess(image, mask, predictor, output_dir, threshold, overwrite)
    except Exception as e:  # noqa: BLE001  (one bad pair must not stop the batch)
      problems.append(_describe(e, image, mask))
      progress(f"[predict] skipped {where}: {problems[-1]}")
      continue
    results.append(result)
    if was_done:
      reused.append(result["pair"])
    state = "already assessed, kept" if was_done else "assessed"
    progress(f"[predict] {result['pair']} {where}: QI {result['qi']:.4f} ({state})")
  return results, reused, problems


def write_summary(output_dir: Path, payload: dict[str, Any]) -> Path:
  """Writes a folder run's summary to a new `summary-<date>-<time>[-n].json`: summaries
  of earlier runs are never replaced."""
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  path, n = output_dir / f"summary-{stamp}.json", 1
  while True:
    try:
      path.touch(exist_ok=False)   # claims the name: a run beside this one takes the next
    except FileExistsError:
      n += 1
      path = output_dir / f"summary-{stamp}-{n}.json"
      continue
    write_json(path, payload)
    return path


def _same_assessment(report: Path, identity: dict[str, Any], name: str) -> dict[str, Any]:
  """The result in `report` if it is the assessment `identity` describes; else UserError."""
  try:
    previous = json.loads(report.read_text())
  except (OSError, ValueError) as e:
    raise UserError(f"{report} is unreadable ({e}); it is kept: use --overwrite to replace "
                    f"it") from None
  differs = [words for key, words in _IDENTITY.items() if previous.get(key) != identity[key]]
  if differs:
    raise UserError(f"{report} already holds a result for {name} with another "
                    f"{', '.join(differs)}; it is kept: use --overwrite to replace it, or "
                    f"another --set=output_dir")
  return previous


def _describe(error: Exception, image: Path, mask: Path) -> str:
  """One line naming the pair and what went wrong."""
  text = " ".join(str(error).split())
  if isinstance(error, UserError):
    return text if str(image) in text or str(mask) in text else f"{image} with {mask}: {text}"
  what = f"{type(error).__name__}: {text}" if text else type(error).__name__
  if isinstance(error, MemoryError):
    what = f"out of memory ({what})"
  return f"{image} with {mask}: {what}"


def _niftis(folder: Path) -> list[Path]:
  """The NIfTI files of a folder; hidden ones are temporary files of writers."""
  return sorted(p for p in folder.iterdir()
                if p.name.endswith((".nii", ".nii.gz")) and not p.name.startswith("."))


def _stem(path: Path) -> str:
  name = path.name
  return name[:-len(".nii.gz")] if name.endswith(".nii.gz") else name.removesuffix(".nii")


def _sha256(path: Path) -> str:
  digest = hashlib.sha256()
  try:
    with open(path, "rb") as f:
      while chunk := f.read(1 << 20):
        digest.update(chunk)
  except OSError as e:
    raise InvalidCaseError(path, f"cannot be read ({e.strerror or e})") from None
  return digest.hexdigest()
