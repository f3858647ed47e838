"""The default main job (`python launch.py`): a small but complete run on the phantom.

For now: generate the phantom, preprocess it and print the dataset summary; the
training and evaluation stages join as they are built.
"""
from __future__ import annotations

import ml_collections

from experiments import prepare_data


def get_config() -> ml_collections.ConfigDict:
  return prepare_data.get_config()


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  prepare_data.run(config, workdir)
