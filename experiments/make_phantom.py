"""Writes the synthetic whole-heart phantom in the MMWHS layout into --data_dir.

The phantom's file names are those of the real MMWHS data, so --data_dir must be new, empty
or hold only the phantom's earlier output; any other folder is refused (write_phantom).
"""
from __future__ import annotations

import time

import ml_collections

from . import base
from wh_errmap.data.dataset import check_phantom_scale
from wh_errmap.data.phantom import write_phantom
from wh_errmap.errors import UserError

# Never read by run(): it writes num_cases MR phantom cases into data_dir, nothing else, and
# refuses a folder it did not write whatever --overwrite says.
UNREAD = {**dict.fromkeys(base.TRAINING_GROUPS), "predictor": None, "preprocess": None,
          "splits": None, "report": None, "modality": None, "fold": None, "overwrite": None}


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.data_dir = ""   # required: where to write the cases
  return c


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  del workdir  # the phantom goes to data_dir
  if not config.data_dir:
    raise UserError("make_phantom needs --data_dir: the folder to write the cases to")
  start = time.perf_counter()
  write_phantom(config.data_dir, num_cases=config.num_cases, seed=config.seed,
                spacing_scale=check_phantom_scale(config.phantom_scale))
  print(f"wrote {config.num_cases} cases to {config.data_dir} "
        f"in {time.perf_counter() - start:.1f} s", flush=True)
