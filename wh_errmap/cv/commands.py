"""The command line of each fold's child process in a cross-validation (`experiments/cv.py`).

Every fold runs as `launch.py --experiment=cv_fold --fold=k` with the run's whole config
spelled out as `--set` flags, so a child computes with exactly the parent's settings
whatever fields the config has.
"""
from __future__ import annotations

import ast
import copy
import os
from typing import Any, Sequence

import ml_collections

from wh_errmap.errors import UserError
from wh_errmap.utils.config_docs import leaves

CV_BLOCK = "cv"


def fold_config(config: ml_collections.ConfigDict, fold: int | None = None,
                ) -> ml_collections.ConfigDict:
  """The cv_fold config inside a cv config: a copy without the `cv` block.

  With `fold`, the config of that fold's child: `fold` set and `overwrite` off (the parent
  has already moved an old run aside; a child must never do it while others run).
  """
  child = copy.deepcopy(config)
  if CV_BLOCK in child:
    del child[CV_BLOCK]
  if fold is not None:
    child.fold = fold
    if "overwrite" in child:
      child.overwrite = False
  return child


def config_assignments(config: ml_collections.ConfigDict) -> list[str]:
  """`FIELD=VALUE` for every leaf of `config`, VALUE as a Python literal (what
  `experiments.override` parses); a value that would not come back equal is refused."""
  assignments = []
  for name, value in leaves(config):
    text = repr(value)
    try:
      same = ast.literal_eval(text) == value
    except (ValueError, SyntaxError):
      same = False
    if not same:
      raise UserError(f"config field {name} = {text} cannot be passed to a fold's process "
                      f"as a Python literal; choose a plain value")
    assignments.append(f"{name}={text}")
  return assignments


def fold_command(launcher: Sequence[str], experiment: str, config: ml_collections.ConfigDict,
                 fold: int, workdir: str | os.PathLike) -> list[str]:
  """argv of the child that runs `fold`: `launcher --experiment=... --fold=k --workdir=W`
  and one `--set` per leaf of the fold's config, so the child computes with exactly the
  parent's settings whatever fields the config has."""
  return [*launcher, f"--experiment={experiment}", f"--fold={fold}", f"--workdir={workdir}",
          *(f"--set={a}" for a in config_assignments(fold_config(config, fold)))]


def selected_folds(folds: Any, num_folds: int) -> tuple[int, ...]:
  """cv.folds (None = all, an int, or a sequence of ints) as sorted fold indices."""
  if folds is None:
    return tuple(range(num_folds))
  chosen = (folds,) if isinstance(folds, int) else tuple(folds)
  if not chosen or any(not isinstance(k, int) or not 0 <= k < num_folds for k in chosen):
    raise UserError(f"cv.folds = {folds!r}: expected fold indices in 0..{num_folds - 1} "
                    f"(splits.num_folds = {num_folds}), or None for all")
  return tuple(sorted(set(chosen)))
