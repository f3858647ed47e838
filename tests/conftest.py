"""Shared fixtures: tiny NIfTI cases written on the fly; a session cache outside $HOME."""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def _session_cache() -> Path:
  """A temporary cache root for the whole test session, removed when it ends.

  pytest imports this file as `conftest` and the tests import it again as `tests.conftest`;
  both (and any subprocess that imports it) must get the same folder.
  """
  if "WH_ERRMAP_TESTS_CACHE" not in os.environ:
    folder = tempfile.mkdtemp(prefix="wh_errmap_tests_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ["WH_ERRMAP_TESTS_CACHE"] = folder
  return Path(os.environ["WH_ERRMAP_TESTS_CACHE"])


# Set before anything reads it, and inherited by every subprocess (launch.py included): no
# test writes the phantom, preprocessed cases or compiled programs into the user's real
# cache (~/.cache/wh_errmap or a WH_ERRMAP_CACHE of their own).
SESSION_CACHE = _session_cache()
os.environ["WH_ERRMAP_CACHE"] = str(SESSION_CACHE)
# The tests' shapes are tiny, so compiling is most of their time: XLA's CPU backend (LLVM)
# compiles about 40% faster without its optimisations, and the programs compute the same
# (the HLO passes, sharding included, run as before). Inherited by subprocesses; tests that
# add flags of their own append them (xla_flags).
_FAST_COMPILE = "--xla_backend_optimization_level=0"
if _FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()


def cpu_env(devices: int | None = None, **extra: str) -> dict[str, str]:
  """The session's environment for a subprocess on the CPU, with `devices` simulated CPU
  devices added to its XLA_FLAGS (the fast compile kept) and `extra` variables set."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
  if devices is not None:
    env["XLA_FLAGS"] = (f"{env.get('XLA_FLAGS', '')} "
                        f"--xla_force_host_platform_device_count={devices}").strip()
  return env

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

from wh_errmap.data.structures import MMWHS_CODES  # noqa: E402
from wh_errmap.utils.cache import enable_compilation_cache  # noqa: E402

# grain reads absl flags inside its workers; tests run without absl.app.run.
flags.FLAGS.mark_as_parsed()
# Tests build the same tiny programs many times over (every create_state compiles the same
# initialisers); a cache fresh for each session compiles each of them once. The environment
# variables hand the same cache to the tests' subprocesses (jax reads JAX_* at import);
# launch.py sets <$WH_ERRMAP_CACHE>/xla itself, which is this same folder.
_XLA_CACHE = enable_compilation_cache()
os.environ.update(JAX_COMPILATION_CACHE_DIR=str(_XLA_CACHE),
                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


ROOT = Path(__file__).resolve().parents[1]

# A fold of the phantom small enough for an end-to-end launch.py run in a test: 4 cases
# (2 folds: 2 training, 2 test cases) with voxels 3x coarser (about 85 x 85 x 40, written,
# restored and read back in a tenth of the full scans' time) at 8 mm, every case padded to
# 24^3 (one compiled inference program per model), widths 4/8, XLA's convolution (see
# tests/train/tiny.py), 2 steps per model, NIfTI for 3d/2d-final + GT.
TINY_FOLD = ("--num_cases=4", "--set=phantom_scale=3", "--set=model.conv_impl='xla'",
             "--set=splits.num_folds=2", "--set=model.width1=4",
             "--set=model.width2=8", "--set=model.num_voxres=1",
             "--set=preprocess.spacing=(8.0,8.0,8.0)", "--set=preprocess.crop_size=(24,24,24)",
             "--set=preprocess.margin_mm=8.0", "--set=input.crop_3d=(16,16,8)",
             "--set=input.crop_2d=(16,16)", "--set=input.crop_predictor=(16,16,8)",
             "--set=train.seg3d.steps=2", "--set=train.seg2d.steps=2",
             "--set=train.predictor.steps=2", "--set=train.seg2d.batch_size=2",
             "--set=train.log_every=1", "--set=train.checkpoint_every=2",
             "--set=optim.warmup_steps=1", "--set=nifti='final'")


def launch(*args: str, cache: Path | None = None,
           timeout: float = 600) -> subprocess.CompletedProcess:
  """`python launch.py *args` in the repository root on the CPU, output captured.

  cache: its WH_ERRMAP_CACHE; by default the session's, which it inherits.
  """
  env = cpu_env() if cache is None else cpu_env(WH_ERRMAP_CACHE=str(cache))
  return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """One run for the whole session: a tiny predictor of fold 0 trained one step, the run's
  config.json and the training reference of predict's checks (tests/train/tiny.py,
  tiny_qc_run). Tests read it; a test that changes it works on a copy."""
  from tests.train.tiny import tiny_qc_run
  run = tmp_path_factory.mktemp("tiny_run")
  tiny_qc_run(run, tmp_path_factory.mktemp("tiny_run_cases"))
  return run


# The suite's longest files, longest first (seconds of test time on a 2-core machine, last
# measured over the whole suite). Run first, so that `-n 2 --dist loadfile` does not end on
# one worker with a long file left while the other has nothing to do; the other files keep
# their order after them.
LONGEST_FIRST = (
    "tests/train/test_sharding.py",           # 170
    "tests/benchmarks/test_gpu_check.py",     # 163
    "tests/train/test_faults.py",             # 154
    "tests/test_quickstart.py",               # 130
    "tests/train/test_training.py",           # 120
    "tests/models/test_inference.py",         # 110
    "tests/models/test_voxresnet.py",         # 90
    "tests/cv/test_cv.py",                    # 87
    "tests/qc/test_assessment.py",            # 85
    "tests/test_launch.py",                   # 80
    "tests/qc/test_cohort.py",                # 79
    "tests/throughput/test_throughput.py",    # 72
    "tests/qc/test_folder.py",                # 59
    "tests/train/test_masks.py",              # 53
    "tests/train/test_multiprocess.py",       # 48
    "tests/train/test_case_masks.py",         # 46
)


def pytest_configure(config):
  # pytest-xdist otherwise orders the files by their number of tests (many quick ones first).
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
  rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
