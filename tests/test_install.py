"""`pip install .` into a fresh virtual environment: the package, its experiments (as
wh_errmap.experiments, never a top-level `experiments`) and the `wh-errmap` command, used
from a folder outside the checkout."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from tests.qc.test_assessment import phantom, run_dir  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]
# What `pip install .` reads; copied so that the build's build/ and *.egg-info stay out of
# the checkout (and a stale build/ there cannot leak old files into the install).
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "wh_errmap", "experiments")


class Installed:
  """A virtual environment with wh_errmap installed, and a folder outside the checkout."""

  def __init__(self, venv: Path, outside: Path):
    self.venv, self.outside = venv, outside
    self.env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    self.env["JAX_PLATFORMS"] = "cpu"

  def run(self, program: str, *args: str) -> subprocess.CompletedProcess:
    """`program` of the environment's bin/ (python, wh-errmap) run in the outside folder."""
    return subprocess.run([str(self.venv / "bin" / program), *args], cwd=self.outside,
                          env=self.env, capture_output=True, text=True, timeout=300)

  def python(self, code: str) -> subprocess.CompletedProcess:
    return self.run("python", "-c", code)


def _can_build_wheels() -> bool:
  """Whether this environment's setuptools can build a wheel without downloading anything."""
  # Read from its metadata: importing setuptools here can clash with a distutils that an
  # earlier test imported (setuptools' distutils hack asserts).
  try:
    text = importlib.metadata.version("setuptools")
  except importlib.metadata.PackageNotFoundError:
    return False
  version = tuple(int(part) for part in text.split(".")[:2] if part.isdigit())
  # pyproject.toml asks for >= 77 (SPDX licence strings).
  return version >= (77, 0)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
  """pip install of a copy of the checkout into a venv that sees this interpreter's
  packages (jax and the rest are not downloaded again; --no-deps)."""
  if importlib.util.find_spec("venv") is None or importlib.util.find_spec("pip") is None:
    pytest.skip("this Python has no venv or pip")
  base = tmp_path_factory.mktemp("install")
  source = base / "source"
  source.mkdir()
  for name in SOURCES:
    if (ROOT / name).is_dir():
      shutil.copytree(ROOT / name, source / name,
                      ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
      shutil.copy2(ROOT / name, source / name)
  venv = base / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                  str(venv)], check=True, capture_output=True)
  # From inside a venv, --system-site-packages reaches the base interpreter's packages, not
  # this environment's: a .pth file adds this environment's (after the new venv's own).
  paths = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE
                                    else [])
  purelib = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import sysconfig; print(sysconfig.get_path('purelib'))"],
                           check=True, capture_output=True, text=True).stdout.strip()
  Path(purelib, "_outer_environment.pth").write_text("\n".join(paths) + "\n")
  # A setuptools here that builds this project by itself (>= 77) saves
  # a download; otherwise pip fetches one into an isolated build environment.
  isolation = ["--no-build-isolation"] if _can_build_wheels() else []
  result = subprocess.run(
      [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--ignore-installed",
       "--disable-pip-version-check", "--no-input", *isolation, str(source)],
      cwd=base, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  outside = base / "elsewhere"
  outside.mkdir()
  return Installed(venv, outside)


def test_every_module_is_installed_as_wh_errmap(installed):
  result = installed.python("import pathlib, wh_errmap; print(pathlib.Path(wh_errmap.__file__)"
                            ".parent)")
  assert result.returncode == 0, result.stderr
  package = Path(result.stdout.strip())
  assert package.is_relative_to(installed.venv), package  # not the checkout's
  got = {str(p.relative_to(package)) for p in package.rglob("*.py")}
  want = ({str(p.relative_to(ROOT / "wh_errmap")) for p in (ROOT / "wh_errmap").rglob("*.py")}
          | {f"experiments/{p.name}" for p in (ROOT / "experiments").glob("*.py")})
  # A subpackage missing from pyproject.toml's list would be missing here.
  assert sorted(want - got) == []
  assert not (package.parent / "experiments").exists()


def test_the_experiments_import_as_wh_errmap_experiments_only(installed):
  result = installed.python(
      "import wh_errmap.experiments as e\n"
      "for name in e.names(): e.load(name)\n"
      "import wh_errmap.experiments.predict\n"
      "print(' '.join(e.names()))")
  assert result.returncode == 0, result.stderr
  assert "predict" in result.stdout.split() and "prepare_data" in result.stdout.split()
  result = installed.python("import experiments")
  assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr, result.stderr


def test_the_version_is_the_package_version(installed):
  result = installed.python("import importlib.metadata, wh_errmap; "
                            "print(wh_errmap.__version__, importlib.metadata.version('wh-errmap'))")
  assert result.returncode == 0, result.stderr
  ours, installed_version = result.stdout.split()
  assert ours == installed_version


def test_the_command_has_the_flags_of_launch_py(installed):
  result = installed.run("wh-errmap", "--help")  # absl exits with status 1 after help
  assert "Traceback" not in result.stderr, result.stderr
  for flag in ("--experiment", "--workdir", "--set", "--model", "--labels", "--image"):
    assert flag in result.stdout, result.stdout
  assert "wh-errmap --experiment=NAME" in result.stdout  # the usage line


@pytest.mark.parametrize("command", [("wh-errmap",), ("python", "-m", "wh_errmap.cli")])
def test_the_command_reports_a_bad_experiment_in_one_line(installed, command):
  result = installed.run(*command, "--experiment=nonexistent")
  assert result.returncode == 2, result.stdout + result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  assert "nonexistent" in lines[0] and "prepare_data" in lines[0] and "predict" in lines[0]


def test_the_installed_command_runs_predict_with_a_model_file_alone(  # noqa: F811
    installed, run_dir, phantom, tmp_path):  # noqa: F811
  """The acceptance path: an exported model file, then `wh-errmap --experiment=predict
  --model=FILE` of the installed package, far from the run and the checkout."""
  import json

  import nibabel as nib

  from experiments import export_model
  model = tmp_path / "heart.whqc"
  config = export_model.get_config()
  config.output = str(model)
  export_model.run(config, str(run_dir))
  image, label, affine = phantom
  nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "p_image.nii.gz"))
  nib.save(nib.Nifti1Image(label, affine), str(tmp_path / "p_label.nii.gz"))
  out = tmp_path / "qc"
  result = installed.run("wh-errmap", "--experiment=predict", f"--model={model}",
                         f"--image={tmp_path / 'p_image.nii.gz'}",
                         f"--mask={tmp_path / 'p_label.nii.gz'}", f"--set=output_dir={out}")
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads((out / "p__p_label_qc.json").read_text())
  assert report["predictor"]["model_file"] == str(model)
  assert report["verdict"] in ("ok", "review", "fail", "out_of_distribution")
  assert (out / "qc.tsv").read_text().count("\n") == 2 and (out / "index.html").exists()
  assert report["verdict"] in result.stdout.strip().splitlines()[-1]
