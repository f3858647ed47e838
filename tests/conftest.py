"""Shared fixtures: tiny NIfTI cases written on the fly."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from absl import flags

from wh_errmap.cache import enable_compilation_cache
from wh_errmap.data.nifti_io import MMWHS_CODES

# grain reads absl flags inside its workers; tests run without absl.app.run.
flags.FLAGS.mark_as_parsed()
# Tests build the same tiny programs many times over (every create_state compiles the same
# initialisers); a cache fresh for each session compiles each of them once. The environment
# variables hand the same cache to the tests' subprocesses (jax reads JAX_* at import).
_XLA_CACHE = enable_compilation_cache(tempfile.mkdtemp(prefix="wh_errmap_tests_"))
os.environ.update(JAX_COMPILATION_CACHE_DIR=str(_XLA_CACHE),
                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def blob_label(shape=(24, 20, 16), codes=True) -> np.ndarray:
  """A label volume with all 7 structures as boxes side by side (MMWHS codes or 1..7)."""
  label = np.zeros(shape, np.int16)
  x, y, z = shape
  for i in range(7):
    x0 = 2 + i * (x - 4) // 7
    label[x0:x0 + max(1, (x - 4) // 7), y // 4:3 * y // 4, z // 4:3 * z // 4] = (
        MMWHS_CODES[i] if codes else i + 1)
  return label


def take_batches(dataset, n: int) -> list:
  """The first n batches of a grain dataset; the iterator is closed after."""
  it = iter(dataset)
  try:
    return [next(it) for _ in range(n)]
  finally:
    it.close()


def write_nifti(path: Path, data: np.ndarray, affine=None) -> Path:
  nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
  return path


@pytest.fixture
def tiny_case(tmp_path):
  """(image_path, label_path) of a small valid case with an LPS-like oblique header."""
  affine = np.array([[-1.2, 0, 0, 30], [0, 0, 1.5, -10], [0, -1.1, 0, 5], [0, 0, 0, 1.0]])
  label = blob_label()
  rng = np.random.default_rng(0)
  image = (100 + 50 * (label > 0) + rng.normal(0, 5, label.shape)).astype(np.int16)
  return (write_nifti(tmp_path / "mr_train_1001_image.nii.gz", image, affine),
          write_nifti(tmp_path / "mr_train_1001_label.nii.gz", label, affine))
