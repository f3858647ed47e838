"""A trained error-map predictor, from a run's workdir or from one exported model file.

Besides its weights, a predictor carries what quality control needs to judge a new case:
the run's preprocessing and model config, and a description of its training data
(`training_reference`): the range of each structure's volume and the distribution of
preprocessed intensities over the training cases. `qc.assess` flags a case outside them
as out of distribution instead of trusting the error map.

Shapes: the predictor runs on the crop of each case, whose size depends on the heart's
extent. Each crop is padded (edge values, as the model itself pads to a multiple of 8) to
a multiple of `shape_bucket` voxels per axis, so a folder of cases compiles one program
per bucket instead of one per case (on a GPU each compilation costs seconds).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from wh_errmap.atomic import write_json
from wh_errmap.data import NUM_CLASSES, STRUCTURES, PreprocessedCase
from wh_errmap.data.preprocess import valid_region
from wh_errmap.errors import UserError
from wh_errmap.inference import predict_error_map
from wh_errmap.labels import MMWHS
from wh_errmap.model_file import load_model, save_model
from wh_errmap.models.voxresnet import VoxResNet
from wh_errmap.progress import console
from wh_errmap.train.checkpoints import restore_latest
from wh_errmap.train.sharding import make_mesh
from wh_errmap.train.stages import predictor_model
from wh_errmap.train.state import create_state, make_optimizer
from wh_errmap.workdir import load_run_config

Progress = Callable[[str], None]
REFERENCE_FILE = "training_reference.json"   # in WORKDIR/fold{k}/predictor/
INTENSITY_BINS = 16                          # histogram of preprocessed intensities, [-1, 1]


@dataclasses.dataclass(frozen=True)
class Predictor:
  """A trained error-map predictor and where it came from."""
  model: VoxResNet
  variables: Any                       # {"params": ..., "batch_stats": ...}
  config: ml_collections.ConfigDict    # the run's config: preprocessing and model
  source: str                          # the run's workdir or the model file, absolute
  fold: int
  step: int                            # training step of the restored checkpoint
  total_steps: int                     # the run's config.train.predictor.steps
  reference: dict | None = None        # training_reference(), None when unknown
  model_sha256: str | None = None      # the model file's checksum, when loaded from one
  shape_bucket: int = 16
  calibration: dict | None = None      # calibration.Calibration.to_dict(), from `calibrate`

  def error_map(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(X, Y, Z) float32 error probability of a preprocessed (X, Y, Z) float32 image and
    its (X, Y, Z) integer mask (classes 0..7), computed on the padded bucket shape."""
    return predict_error_map(self.model, self.variables, image[..., None], mask, NUM_CLASSES,
                             shape_bucket=self.shape_bucket)

  @property
  def finished(self) -> bool:
    """Whether the checkpoint is the end of the training schedule."""
    return self.step >= self.total_steps

  @property
  def provenance(self) -> dict[str, Any]:
    """What every result records about the predictor that made it."""
    where = ({"workdir": self.source} if self.model_sha256 is None else
             {"model_file": self.source, "model_sha256": self.model_sha256})
    return {**where, "fold": self.fold, "checkpoint_step": self.step,
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
                        config, str(Path(workdir).absolute()), fold, step, total,
                        reference=read_reference(Path(workdir) / f"fold{fold}" / "predictor"))
  if not predictor.finished:
    if not allow_partial:
      raise UserError(f"{checkpoints}: the predictor of fold {fold} is trained for {step} of "
                      f"{total} steps (training not finished). Finish it with `launch.py "
                      f"--experiment=cv_fold --fold={fold} --workdir={workdir}`, or use it as "
                      f"it is with --set=allow_partial=True")
    progress(f"warning: PARTLY TRAINED predictor: fold {fold} at step {step} of {total} "
             f"(allow_partial); its error maps and QIs are not those of the finished run")
  return predictor


def load_predictor_file(path: str | Path) -> Predictor:
  """The predictor in a model file written by `export_predictor` (errors: one line)."""
  stored = load_model(path)
  config = ml_collections.ConfigDict(stored.config)
  try:
    model = predictor_model(config)
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    raise UserError(f"{path}: the model file's config does not describe a predictor "
                    f"({type(e).__name__}: {e})") from None
  provenance = stored.provenance
  return Predictor(model, stored.variables, config, str(Path(path).absolute()), stored.fold,
                   int(provenance.get("checkpoint_step", 0)),
                   int(provenance.get("total_steps", 0)),
                   reference=stored.training.get("reference"), model_sha256=stored.sha256,
                   calibration=stored.training.get("calibration"))


def export_predictor(predictor: Predictor, path: str | Path, training: dict[str, Any]) -> Path:
  """Writes `predictor` as one model file: weights, config, label convention, the training
  data's description (with its reference statistics and any calibration), fold and
  provenance."""
  from wh_errmap import __version__
  variables = jax.tree.map(np.asarray, jax.device_get(predictor.variables))
  provenance = {**predictor.provenance, "wh_errmap_version": __version__,
                "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
  training = {**training, "reference": predictor.reference}
  if predictor.calibration is not None:
    training["calibration"] = predictor.calibration
  return save_model(path, variables, predictor.config.to_dict(), MMWHS.to_json(), training,
                    predictor.fold, provenance)


# ---------------------------------------------------------------- training reference

def intensity_histogram(image: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """Normalised histogram of preprocessed intensities ([-1, 1]) over the valid voxels."""
  counts, _ = np.histogram(image[valid], bins=INTENSITY_BINS, range=(-1.0, 1.0))
  return counts / max(1, counts.sum())


def histogram_distance(a: Sequence[float], b: Sequence[float]) -> float:
  """Total variation distance between two normalised histograms: 0 (same) to 1 (disjoint)."""
  return float(0.5 * np.abs(np.asarray(a) - np.asarray(b)).sum())


def training_reference(cases: Sequence[PreprocessedCase]) -> dict[str, Any]:
  """What out-of-distribution checks compare a new case with, from the training cases:

    volume_ml: {structure: [min, max]} of the labels' structure volumes;
    intensity_histogram: the pooled histogram of preprocessed intensities in the crops;
    intensity_distance_max: the largest distance of a training case's histogram from it;
    real_fraction_min: the smallest share of real (not padded) voxels in a training crop.
  """
  if not cases:
    raise ValueError("training_reference needs at least one case")
  volumes, histograms, fractions = {s: [] for s in STRUCTURES}, [], []
  for case in cases:
    ml = float(np.prod(case.properties["spacing"])) / 1000.0
    counts = np.bincount(case.label.ravel(), minlength=NUM_CLASSES)
    for c, name in enumerate(STRUCTURES, start=1):
      volumes[name].append(float(counts[c]) * ml)
    valid = valid_region(case.properties)
    histograms.append(intensity_histogram(case.image, valid))
    fractions.append(float(valid.mean()))
  pooled = np.mean(histograms, axis=0)
  return {
      "cases": len(cases), "case_ids": [case.case_id for case in cases],
      "volume_ml": {s: [min(v), max(v)] for s, v in volumes.items()},
      "intensity_histogram": pooled.tolist(),
      "intensity_distance_max": max(histogram_distance(h, pooled) for h in histograms),
      "real_fraction_min": min(fractions),
  }


def write_reference(predictor_dir: str | Path, cases: Sequence[PreprocessedCase]) -> Path:
  """Writes the training reference of a fold's predictor beside its checkpoints."""
  path = Path(predictor_dir) / REFERENCE_FILE
  write_json(path, training_reference(cases))
  return path


def read_reference(predictor_dir: str | Path) -> dict | None:
  """The fold's training reference, None when the run has none (made before it existed)."""
  path = Path(predictor_dir) / REFERENCE_FILE
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise UserError(f"{path} is unreadable ({e}); remove it to assess without "
                    f"out-of-distribution checks, or rerun the fold") from None
