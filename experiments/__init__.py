"""Experiments: one module each, with `get_config()` and `run(config, workdir)`.

A module may also declare `UNREAD = {KEY: INSTEAD}`: config keys (a field, or a group for
everything under it) that its run() never reads, each with the field to set instead, or
None. `override` refuses them, so `--set=predictor.threshold=0.3` for predict (which reads
the top-level `threshold`) is an error rather than a setting that silently does nothing.
"""
from __future__ import annotations

import ast
import importlib
import pkgutil
from types import ModuleType
from typing import Iterable

import ml_collections

from wh_errmap.errors import UserError
from wh_errmap.utils.config_docs import declared_unread


def names() -> list[str]:
  return sorted(m.name for m in pkgutil.iter_modules(__path__)
                if not m.name.startswith("_") and m.name != "base")


def load(name: str) -> ModuleType:
  if name not in names():
    raise UserError(f"unknown experiment {name!r}; choose one of: {', '.join(names())}")
  return importlib.import_module(f"{__name__}.{name}")


def override(config: ml_collections.ConfigDict, assignments: Iterable[str],
             experiment: ModuleType | None = None) -> list[str]:
  """Applies `field.sub=value` strings; values are Python literals, or else strings.

  Returns the keys set, in order. A key that `experiment` declares in its UNREAD (itself,
  or a group above it) is refused with a UserError naming the field to set instead.
  """
  keys = []
  for assignment in assignments:
    key, sep, text = assignment.partition("=")
    if not sep:
      raise UserError(f"--set {assignment!r}: expected FIELD=VALUE")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *parents, leaf = key.split(".")
    node = config
    try:
      for name in parents:
        node = node[name]
      if leaf not in node:
        raise KeyError(leaf)
      node[leaf] = value
    except KeyError:
      raise UserError(f"--set {assignment!r}: the config has no field {key!r}") from None
    except TypeError as e:
      raise UserError(f"--set {assignment!r}: {e}") from None
    if experiment is not None:   # after the checks above: a misspelt key is named as such
      _refuse_unread(experiment, key, text)
    keys.append(key)
  return keys


def _refuse_unread(experiment: ModuleType, key: str, text: str) -> None:
  unread = getattr(experiment, "UNREAD", {})
  declared = declared_unread(unread, key)
  if declared is None:
    return
  name = experiment.__name__.rpartition(".")[2]
  instead = unread[declared]
  if instead is not None:
    raise UserError(f"--set {key}={text}: experiment {name} never reads {key}; set {instead} "
                    f"instead (--set={instead}={text})")
  under = "" if declared == key else f" (it reads nothing under {declared})"
  raise UserError(f"--set {key}={text}: experiment {name} ignores {key}{under}, so the setting "
                  f"would have no effect")
