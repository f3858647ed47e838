"""A tiny segmentor training setup shared by the training tests (CPU-sized)."""
from __future__ import annotations

import types

import jax
import ml_collections
import nibabel as nib
import numpy as np
from scipy import ndimage

from experiments import base
from wh_errmap.data.nifti_io import load_case
from wh_errmap.data.phantom import make_phantom_case
from wh_errmap.data.pipeline import train_dataset
from wh_errmap.data.preprocess import PreprocessConfig, preprocess_case
from wh_errmap.data.training_reference import write_reference
from wh_errmap.models.factory import make_model
from wh_errmap.train import loop
from wh_errmap.train.state import create_state, make_optimizer
from wh_errmap.train.steps import make_predictor_step, make_segmentor_step


def tiny_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.model.width1, c.model.width2, c.model.num_voxres = 4, 8, 1
  # Fixtures are sized on this model (the full-disk test's 1 MB file system holds two of its
  # checkpoints); the upsampling forms themselves are tested in tests/models.
  c.model.upsample = "linear"
  # XLA's convolution compiles 2-3x faster on the CPU than the matmul form that "auto"
  # picks there for 3D (a tiny 3D training step: 10.8 -> 4.2 s); the two forms are equal
  # with their gradients (tests/models/test_voxresnet.py), and the tests' shapes are tiny.
  c.model.conv_impl = "xla"
  # QC of whole phantom scans (the session's tiny run) at 4 mm in a 60 x 60 x 45 crop: an
  # eighth of the paper's 2 mm voxels, the same code.
  c.preprocess.spacing, c.preprocess.crop_size = (4.0, 4.0, 4.0), (60, 60, 45)
  c.preprocess.margin_mm = 8.0
  c.optim.warmup_steps = 2
  c.optim.learning_rate = 1e-2
  return c


def tiny_cases(num: int = 4, shape=(20, 18, 14)) -> list:
  rng = np.random.default_rng(0)
  cases = []
  for i in range(num):
    label = np.zeros(shape, np.uint8)
    label[4:12, 5:13, 3:10] = 1 + i % 7
    label[10:16, 2:8, 6:12] = 3
    image = (label * 0.2 + rng.normal(0, 0.1, shape)).astype(np.float32)
    cases.append(types.SimpleNamespace(case_id=f"c{i}", image=image, label=label))
  return cases


def train_tiny(workdir, mesh, num_steps: int, batch_size: int = 8, crop=(16, 16, 12),
               spatial_dims: int = 3, seed: int = 0, checkpoint_every: int = 2,
               optimizer: str = "adam", stop_at: int | None = None,
               progress=lambda _: None, step_fn_wrapper=None, log_every: int = 1,
               case_shape=(20, 18, 14), allow_restart: bool = False):
  """Trains a tiny segmentor with the real loop; returns the final state."""
  config = tiny_config()
  config.optim.name = optimizer
  if optimizer == "sgd":
    config.optim.learning_rate = 0.1
  model = make_model(config.model, spatial_dims, 8, mesh.shape["space"])
  tx = make_optimizer(config.optim, num_steps)
  state = create_state(model, tx, (batch_size, *crop, 1), jax.random.key(seed), mesh)
  dataset = train_dataset(tiny_cases(shape=case_shape), crop_size=crop, batch_size=batch_size,
                          seed=seed, shard_index=0, shard_count=1)
  step_fn = make_segmentor_step(model, config.loss)
  if step_fn_wrapper is not None:
    step_fn = step_fn_wrapper(step_fn)
  return loop.train("seg", workdir, state=state, step_fn=step_fn, dataset=dataset, mesh=mesh,
                    num_steps=num_steps, seed=seed, log_every=log_every,
                    checkpoint_every=checkpoint_every, stop_at=stop_at, progress=progress,
                    allow_restart=allow_restart)


def tiny_segmentors(seed: int = 0) -> dict:
  """Randomly initialised tiny 3D and 2D segmentors: {"seg3d": (model, variables), ...}."""
  config = tiny_config()
  out = {}
  for name, dims in (("seg3d", 3), ("seg2d", 2)):
    model = make_model(config.model, dims, 8)
    shape = (1, 16, 16, 12, 1) if dims == 3 else (1, 16, 16, 1)
    variables = jax.jit(lambda rng, model=model, shape=shape: model.init(
        rng, jax.numpy.zeros(shape), train=False))(jax.random.key(seed + dims))
    out[name] = (model, variables)
  return out


def tiny_predictor_state(mesh, num_steps: int, batch_size: int = 8, optimizer: str = "adam",
                         crop=(16, 16, 12)):
  """The untrained state that train_tiny_predictor starts from."""
  config = tiny_config()
  config.optim.name = optimizer
  if optimizer == "sgd":
    config.optim.learning_rate = 0.1
  model = make_model(config.model, 3, 1, mesh.shape["space"])
  return create_state(model, make_optimizer(config.optim, num_steps), (batch_size, *crop, 9),
                      jax.random.key(1), mesh)


def train_tiny_predictor(workdir, mesh, num_steps: int, segmentors: dict, batch_size: int = 8,
                         optimizer: str = "adam", crop=(16, 16, 12), case_shape=(20, 18, 14)):
  """Trains a tiny predictor with the real loop and on-the-fly masks; returns the state."""
  config = tiny_config()   # the model and loss; the optimizer is tiny_predictor_state's
  space = mesh.shape["space"]
  model = make_model(config.model, 3, 1, space)
  state = tiny_predictor_state(mesh, num_steps, batch_size, optimizer, crop)
  dataset = train_dataset(tiny_cases(shape=case_shape), crop_size=crop, batch_size=batch_size,
                          seed=0, shard_index=0, shard_count=1)
  # The frozen segmentors in the convolution form of this mesh (same parameters).
  seg3d, seg2d = (make_model(config.model, dims, 8, space) for dims in (3, 2))
  step = make_predictor_step(model, seg3d, seg2d, config.loss, gt_probability=0.2,
                             num_classes=8)
  frozen = {name: variables for name, (_, variables) in segmentors.items()}
  return loop.train("predictor", workdir, state=state, step_fn=step, dataset=dataset, mesh=mesh,
                    num_steps=num_steps, seed=0, log_every=1, checkpoint_every=100,
                    frozen=frozen, progress=lambda _: None)


def tiny_predictor_run(run) -> ml_collections.ConfigDict:
  """Makes `run` a run with its config.json and a tiny predictor for fold 0 trained for the
  one step of its schedule; returns the recorded config."""
  from wh_errmap.utils.mesh import make_mesh
  from wh_errmap.utils.workdir import record_config
  config = tiny_config()
  config.train.predictor.steps = 1
  record_config(run, config)
  train_tiny_predictor(run / "fold0", make_mesh(jax.devices()[:1]), num_steps=1,
                       segmentors=tiny_segmentors(), batch_size=2)
  return config


def poorer(label: np.ndarray, grow: bool) -> np.ndarray:
  """Every structure of `label` dilated (over the background) or eroded by one voxel."""
  if grow:
    return np.where(label == 0, ndimage.grey_dilation(label, size=3), label)
  kept = np.zeros_like(label)
  for c in np.unique(label[label > 0]):
    kept[ndimage.binary_erosion(label == c)] = c
  return kept


def tiny_qc_run(run, scratch) -> ml_collections.ConfigDict:
  """`tiny_predictor_run` plus the training reference of predict's out-of-distribution
  checks, from three phantom cases (written to `scratch`) with their labels and poorer
  masks (each structure eroded, or dilated, by one voxel: what segmentors' masks do)."""
  config = tiny_predictor_run(run)
  cases = []
  for index in (2, 3, 4):
    image, label, affine = make_phantom_case(seed=5, index=index, spacing_scale=2.0)
    paths = [scratch / f"c{index}_{kind}.nii.gz" for kind in ("image", "label")]
    for path, data in zip(paths, (image, label)):
      nib.save(nib.Nifti1Image(data, affine), str(path))
    cases.append(preprocess_case(load_case(*paths), PreprocessConfig.from_config(config)))
  masks = {case.case_id: [poorer(case.label, grow) for grow in (False, True)] for case in cases}
  write_reference(run / "fold0" / "predictor", cases, masks, modality=config.modality)
  return config
