"""--show_config, and settings an experiment never reads refused before it runs."""
from __future__ import annotations

import pytest
from absl.testing import flagsaver

import experiments
from tests.conftest import launch
from wh_errmap.cv import commands
from wh_errmap.errors import UserError


def test_show_config_prints_the_overridden_config_and_runs_nothing(tmp_path):
  workdir = tmp_path / "run"
  result = launch("--experiment=predict", "--show_config", "--set=threshold=0.3",
                  f"--workdir={workdir}", cache=tmp_path / "cache")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert "threshold = 0.3  # error probability above which a voxel counts as wrong" in lines
  assert ("predictor.threshold = 0.5  # [not read by predict; set threshold] error "
          "probability above which a voxel counts as wrong") in lines
  assert any(line.startswith("train.seg3d.steps = 20000  # [not read by predict]")
             for line in lines)
  assert not workdir.exists()


def test_show_config_neither_runs_nor_enables_the_compilation_cache(monkeypatch, capsys):
  from wh_errmap import cli

  def refuse(*args):
    raise AssertionError(f"called with {args}")

  monkeypatch.setattr(cli, "enable_compilation_cache", refuse)
  monkeypatch.setattr(experiments.load("predict"), "run", refuse)
  with flagsaver.flagsaver(experiment="predict", show_config=True, set=["qc.batch=3"]):
    cli._main(["launch.py"])
  lines = capsys.readouterr().out.splitlines()
  assert any(line.startswith("qc.batch = 3  # pairs of one shape bucket") for line in lines)


def test_a_setting_the_experiment_never_reads_is_refused_naming_the_one_to_set():
  predict = experiments.load("predict")
  with pytest.raises(UserError, match=r"predictor\.threshold.*set threshold instead"):
    experiments.override(predict.get_config(), ["predictor.threshold=0.3"], predict)
  with pytest.raises(UserError, match=r"predict ignores train\.seg3d\.steps"):
    experiments.override(predict.get_config(), ["train.seg3d.steps=5"], predict)
  config = predict.get_config()
  assert experiments.override(config, ["threshold=0.3", "qc.batch=2"], predict) == [
      "threshold", "qc.batch"]
  assert config.threshold == 0.3 and config.predictor.threshold == 0.5


@pytest.mark.parametrize("name", experiments.names())
def test_declared_unread_keys_are_fields_of_the_experiments_config(name):
  experiment = experiments.load(name)
  config = experiment.get_config()
  for key, instead in getattr(experiment, "UNREAD", {}).items():
    assert _has(config, key), f"{name}: UNREAD names {key}, not in its config"
    if instead is not None:
      assert _has(config, instead), f"{name}: {key} -> {instead}, not in its config"
      experiments.override(config, [f"{instead}={config[instead]!r}"], experiment)


def _has(config, key: str) -> bool:
  try:
    config[key]   # a dotted key reaches into the groups
  except KeyError:
    return False
  return True


@pytest.mark.parametrize("name, fold_experiment", [("cv", "cv_fold"),
                                                   ("cv_small", "cv_fold_small")])
def test_a_cross_validation_passes_its_folds_only_settings_they_read(name, fold_experiment):
  """Each fold's process gets every field as a --set: none may be refused."""
  config = experiments.load(name).get_config()
  fold = experiments.load(fold_experiment)
  experiments.override(fold.get_config(),
                       commands.config_assignments(commands.fold_config(config, 1)), fold)
