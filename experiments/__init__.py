"""Experiments: one module each, with `get_config()` and `run(config, workdir)`."""
from __future__ import annotations

import ast
import importlib
import pkgutil
from types import ModuleType
from typing import Iterable

import ml_collections

from wh_errmap.errors import UserError


def names() -> list[str]:
  return sorted(m.name for m in pkgutil.iter_modules(__path__)
                if not m.name.startswith("_") and m.name != "base")


def load(name: str) -> ModuleType:
  if name not in names():
    raise UserError(f"unknown experiment {name!r}; choose one of: {', '.join(names())}")
  return importlib.import_module(f"{__name__}.{name}")


def override(config: ml_collections.ConfigDict, assignments: Iterable[str]) -> None:
  """Applies `field.sub=value` strings; values are Python literals, or else strings."""
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
