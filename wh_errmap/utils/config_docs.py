"""`launch.py --experiment=NAME --show_config`: the config, one field per line with its doc.

Every leaf prints as `dotted.key = value  # doc`, values as the Python literals that
`--set` takes. A field's doc is the comment its experiment modules write for it:

  - the comment at the end of its assignment (`c.qc.batch = 0  # ...`), continued by the
    comment lines right after it whose text is indented past the assignment;
  - else the comment lines directly above the assignment;
  - a key set inside a group assigned whole (`c.train.seg3d = ConfigDict({"steps": ...})
    # 3D crops`, or `ConfigDict(dict(...))`) has its own comment when its line has one,
    else the group's. An empty group (`ConfigDict()`) passes no doc on to its keys.

The modules read are the experiment's own and every module of its package that it uses
(quickstart: cv_fold_small, cv_fold, base), dependencies first; a later module's comment
for a key wins over an earlier one (cv_fold_small's steps over base's). Within one module
the first documented assignment of a key is its doc (base.apply_small_sizes does not
redefine what base.get_config documents), and run() is left out: what it assigns changes
copies of the config at run time. A field without a comment prints without a doc.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import sys
import tokenize
from types import ModuleType
from typing import Any, Iterator, Mapping

import ml_collections

# Tokens that are not code: a line holding only these (and a comment) is a comment line.
_LAYOUT_TOKENS = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                  tokenize.DEDENT, tokenize.ENDMARKER)


@dataclasses.dataclass
class ModuleDocs:
  """The docs one module's source gives: per key, and per group for the keys inside it."""
  fields: dict[str, str] = dataclasses.field(default_factory=dict)
  groups: dict[str, str] = dataclasses.field(default_factory=dict)


def leaves(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[tuple[str, Any]]:
  """(dotted key, value) of every field that is not a group, depth first in the config's
  own (sorted) order."""
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def experiment_modules(experiment: ModuleType) -> list[ModuleType]:
  """The experiment's module and the modules of its package that it uses, directly or
  through each other (as modules, or through a function or class taken from one),
  dependencies before the modules that use them."""
  package = experiment.__name__.rpartition(".")[0]
  ordered: list[ModuleType] = []
  seen: set[str] = set()

  def visit(module: ModuleType) -> None:
    seen.add(module.__name__)
    for value in list(vars(module).values()):
      used = value if isinstance(value, ModuleType) else sys.modules.get(
          getattr(value, "__module__", None) or "")
      if (used is not None and package and used.__name__.startswith(package + ".")
          and used.__name__ not in seen):
        visit(used)
    ordered.append(module)

  visit(experiment)
  return ordered


def module_docs(source: str) -> ModuleDocs:
  """The field docs of one experiments module's source (see the module docstring)."""
  comments, code_lines = _comments(source)
  docs = ModuleDocs()
  claimed: set[int] = set()   # continuation lines: never the comment above the next field
  for node, keys in _assignments(ast.parse(source)):
    entries = _entry_lines(node.value)
    own = [line for line in range(node.lineno, node.end_lineno + 1)
           if line in comments and line in code_lines and line not in entries]
    for line, key in entries.items():
      if line in comments and line in code_lines:
        for group in keys:
          docs.fields.setdefault(f"{group}.{key}", _text(comments, [line]))
    if own and own[-1] == node.end_lineno:
      continued = _continuation(comments, code_lines, node)
      claimed.update(continued)
      own += continued
    elif not own:
      own = _block_above(comments, code_lines, claimed, node.lineno)
    if own:
      for key in keys:
        docs.fields.setdefault(key, _text(comments, own))
        if _contents(node.value) is not None:
          docs.groups.setdefault(key, _text(comments, own))
  return docs


def describe_config(config: ml_collections.ConfigDict, experiment: ModuleType) -> str:
  """What --show_config prints: one `dotted.key = value  # doc` line per leaf of `config`
  (the doc omitted where the sources give none), docs from `experiment`'s modules."""
  docs = []
  for module in experiment_modules(experiment):
    try:
      docs.append(module_docs(inspect.getsource(module)))
    except (OSError, TypeError):   # no source (a module loaded from bytecode only)
      continue
  unread = getattr(experiment, "UNREAD", {})
  name = experiment.__name__.rpartition(".")[2]
  lines = []
  for key, value in leaves(config):
    doc = field_doc(key, docs)
    declared = declared_unread(unread, key)
    if declared is not None:   # refused by --set: say so before its doc
      instead = unread[declared]
      doc = (f"[not read by {name}" + (f"; set {instead}" if instead else "") + "]"
             + (f" {doc}" if doc else ""))
    lines.append(f"{key} = {value!r}" + (f"  # {doc}" if doc else ""))
  return "\n".join(lines)


def declared_unread(unread: Mapping[str, Any], key: str) -> str | None:
  """The entry of an experiment's UNREAD that covers `key` (the key itself or the nearest
  group above it), or None."""
  parts = key.split(".")
  return next((".".join(parts[:i]) for i in range(len(parts), 0, -1)
               if ".".join(parts[:i]) in unread), None)


def field_doc(key: str, docs: list[ModuleDocs]) -> str:
  """The doc of `key` from module docs ordered dependencies first: the last module that
  documents the key itself or a group above it (the nearest group) gives it; "" if none."""
  parts = key.split(".")
  groups = [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]
  for module in reversed(docs):
    if key in module.fields:
      return module.fields[key]
    for group in groups:
      if group in module.groups:
        return module.groups[group]
  return ""


def _comments(source: str) -> tuple[dict[int, tuple[int, str]], set[int]]:
  """{line: (column, text)} of the comments, and the lines that hold code (a string over
  several lines holds code on each)."""
  comments, code_lines = {}, set()
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type == tokenize.COMMENT:
      comments[token.start[0]] = (token.start[1], token.string)
    elif token.type not in _LAYOUT_TOKENS:
      code_lines.update(range(token.start[0], token.end[0] + 1))
  return comments, code_lines


def _assignments(tree: ast.Module) -> Iterator[tuple[ast.Assign | ast.AnnAssign, list[str]]]:
  """Assignments to config fields (`c.a.b = ...`, `c["a"] = ...`) with their dotted keys,
  in source order, outside any function named run."""
  found = []
  for statement in tree.body:
    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)) and statement.name == "run":
      continue
    for node in ast.walk(statement):
      targets = (node.targets if isinstance(node, ast.Assign) else
                 [node.target] if isinstance(node, ast.AnnAssign) and node.value else [])
      keys = [key for key in map(_key, targets) if key]
      if keys:
        found.append((node, keys))
  yield from sorted(found, key=lambda item: (item[0].lineno, item[0].col_offset))


def _key(target: ast.expr) -> str | None:
  """"a.b" for `c.a.b` or `c["a"].b` (any root name), None for anything else."""
  parts = []
  while not isinstance(target, ast.Name):
    if isinstance(target, ast.Attribute):
      parts.append(target.attr)
      target = target.value
    elif (isinstance(target, ast.Subscript) and isinstance(target.slice, ast.Constant)
          and isinstance(target.slice.value, str)):
      parts.append(target.slice.value)
      target = target.value
    else:
      return None
  return ".".join(reversed(parts)) or None


def _contents(value: ast.expr) -> ast.expr | None:
  """The initial contents of a group assigned whole: the dict literal or dict(...) call
  itself, or the first argument of a call (ConfigDict({...}), ConfigDict(dict(...)))."""
  if isinstance(value, ast.Dict) or _is_dict_call(value):
    return value
  if isinstance(value, ast.Call) and value.args:
    return value.args[0]
  return None


def _is_dict_call(value: ast.expr) -> bool:
  return (isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
          and value.func.id == "dict")


def _entry_lines(value: ast.expr) -> dict[int, str]:
  """{line: key} of the lines that hold exactly one key of a group's literal contents,
  after the assignment's first line (whose comment is the group's)."""
  contents = _contents(value)
  if isinstance(contents, ast.Dict):
    entries = [(k.value, k.lineno) for k in contents.keys
               if isinstance(k, ast.Constant) and isinstance(k.value, str)]
  elif contents is not None and _is_dict_call(contents):
    entries = [(k.arg, k.lineno) for k in contents.keywords if k.arg]
  else:
    return {}
  per_line: dict[int, list[str]] = {}
  for key, line in entries:
    per_line.setdefault(line, []).append(key)
  return {line: keys[0] for line, keys in per_line.items()
          if len(keys) == 1 and line != value.lineno}


def _continuation(comments: dict[int, tuple[int, str]], code_lines: set[int],
                  node: ast.stmt) -> list[int]:
  """The comment lines right after `node` that continue its trailing comment: their text
  starts to the right of where a comment about the next statement would."""
  lines, line = [], node.end_lineno + 1
  while line in comments and line not in code_lines:
    column, text = comments[line]
    indent = len(text) - len(text.lstrip("#").lstrip())
    if column + indent <= node.col_offset + 2:
      break
    lines.append(line)
    line += 1
  return lines


def _block_above(comments: dict[int, tuple[int, str]], code_lines: set[int],
                 claimed: set[int], first_line: int) -> list[int]:
  """The comment lines directly above `first_line` (none across a blank or code line)."""
  lines, line = [], first_line - 1
  while line in comments and line not in code_lines and line not in claimed:
    lines.insert(0, line)
    line -= 1
  return lines


def _text(comments: dict[int, tuple[int, str]], lines: list[int]) -> str:
  """The comments of `lines` as one line of text."""
  return " ".join(filter(None, (comments[line][1].lstrip("#").strip() for line in lines)))
