"""A trained error-map predictor, from a run's workdir or from one exported model file.

Besides its weights, a predictor carries what quality control needs to judge a new case:
the run's preprocessing and model config, and a description of its training data
(`training_reference`): the range of each structure's volume, the distribution of
preprocessed intensities and the appearances over the training cases, and their modality
and raw intensity profiles. `qc.assess` flags a case outside them as out of distribution
instead of trusting the error map.

Shapes: the predictor runs on the crop of each case, whose size depends on the heart's
extent. Each crop is padded (edge values, as the model itself pads to a multiple of 8) to
a multiple of `shape_bucket` voxels per axis, so a folder of cases compiles one program
per bucket instead of one per case (on a GPU each compilation costs seconds).
"""
from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from wh_errmap.data.dataset import data_source
from wh_errmap.data.labels import MMWHS
from wh_errmap.data.structures import NUM_CLASSES
from wh_errmap.data.training_reference import read_reference
from wh_errmap.errors import UserError
from wh_errmap.models.factory import predictor_model
from wh_errmap.models.inference import bucket_shape, predict_error_map, predict_error_maps
from wh_errmap.models.voxresnet import VoxResNet
from wh_errmap.qc.model_file import load_model, save_model
from wh_errmap.train.checkpoints import restore_variables
from wh_errmap.utils.progress import console
from wh_errmap.utils.workdir import load_run_config

Progress = Callable[[str], None]


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

  def bucket_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
    """The shape a crop of `shape` is padded to: cases of one bucket can share a batch."""
    return bucket_shape(shape, self.shape_bucket)

  def error_maps(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]
                 ) -> list[np.ndarray]:
    """`error_map` of several cases of one bucket (`bucket_shape`), in one call of the
    predictor when there are several."""
    if len(images) == 1:
      return [self.error_map(images[0], masks[0])]
    return predict_error_maps(self.model, self.variables, [i[..., None] for i in images],
                              masks, NUM_CLASSES, shape_bucket=self.shape_bucket)

  def training_record(self) -> dict[str, Any]:
    """What a model file records of the training data: its source (`data_source`), the
    fold and the training cases (None when the predictor has no training reference)."""
    return {"data_source": data_source(self.config), "fold": self.fold,
            "training_cases": (self.reference or {}).get("case_ids")}

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
  variables, step = restore_variables(checkpoints, model, config.optim, total,
                                      (1, *crop, 1 + NUM_CLASSES), progress)
  if step is None:
    raise UserError(f"{checkpoints}: no trained predictor; train it with "
                    f"`launch.py --experiment=cv_fold --fold={fold} --workdir={workdir}`")
  predictor = Predictor(model, variables, config, str(Path(workdir).absolute()), fold, step, total,
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
