"""The defaults that make a run follow the paper's protocol, and saying what data it uses."""
from __future__ import annotations

import pytest

from experiments import cv_fold, cv_fold_small, quickstart


@pytest.mark.parametrize("experiment", [cv_fold, cv_fold_small, quickstart])
def test_the_predictor_trains_on_automatic_masks_only_by_default(experiment):
  # Eq. 3 of the paper averages the loss over the m automatic masks of each training scan.
  assert experiment.get_config().predictor.gt_probability == 0.0


def test_the_first_line_names_the_data():
  config = cv_fold.get_config()
  assert "synthetic whole-heart phantom" in cv_fold.data_line(config)
  assert "--data_dir" in cv_fold.data_line(config)
  config.data_dir = "/data/mmwhs"
  assert cv_fold.data_line(config) == "data: MMWHS MR cases in /data/mmwhs"


def test_report_and_table1_name_the_data_source(tmp_path):
  from tests.report.test_report import make_run
  from wh_errmap.report import build_report
  from wh_errmap.workdir import record_config
  make_run(tmp_path)
  record_config(tmp_path, cv_fold.get_config())
  build_report(tmp_path, num_folds=5)
  for name in ("report.md", "table1.md"):
    head = (tmp_path / "report" / name).read_text().splitlines()[:4]
    assert any("synthetic whole-heart phantom (20 cases, seed 0), not MMWHS" in line
               for line in head), (name, head)
  config = cv_fold.get_config()
  config.data_dir = "/data/mmwhs"
  record_config(tmp_path / "real", config)
  make_run(tmp_path / "real")
  build_report(tmp_path / "real", num_folds=5)
  assert (tmp_path / "real" / "report" / "table1.md").read_text().startswith(
      "Table 1 on MMWHS MR data in `/data/mmwhs`.")
