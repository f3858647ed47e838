"""Starting a run in its workdir: the steps every training experiment takes, in order."""
from __future__ import annotations

import os

import ml_collections

from wh_errmap.data.dataset import Dataset, dataset_from_config
from wh_errmap.utils.workdir import check_config, check_writable, record_config


def open_run(workdir: str | os.PathLike, config: ml_collections.ConfigDict,
             defaults: ml_collections.ConfigDict) -> Dataset:
  """Checks `config` against the workdir's recorded settings and that the workdir can be
  written, finds and preprocesses the data, then records the settings; returns the dataset.

  The settings are recorded only once the data is found and valid, so that a first command
  with a mistyped --data_dir locks nothing in; a mismatch with the record is refused
  (UserError) before any data work. defaults: the experiments' base config (fields a
  recorded config predates; utils.workdir.config_differences).
  """
  check_config(workdir, config, defaults=defaults)
  check_writable(workdir)
  dataset = dataset_from_config(config)
  record_config(workdir, config, defaults=defaults)
  return dataset
