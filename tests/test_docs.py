"""The README and docs/ against the code: experiments, flags, `--set` keys, links, layout.

What a user copies from the documentation must run: every experiment named exists (and every
experiment is listed), every flag shown is defined, every `--set` key in a command is a field
of that command's experiment that it does not refuse as unread, every relative link points at
a file, and the layout names every module.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from absl import flags

import experiments
from wh_errmap import cli
from wh_errmap.utils.config_docs import declared_unread

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 300
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
SET_KEY = re.compile(r"--set[= ]['\"]?([A-Za-z_][\w.]*)=")
EXPERIMENT = re.compile(r"--experiment=(\w+)")
FLAG = re.compile(r"(?<![\w-])--([a-z][a-z_]*)")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
COMMAND = re.compile(r"(launch\.py|wh-errmap)\b")


def _text(path: Path) -> str:
  return path.read_text(encoding="utf-8")


def _commands(path: Path) -> list[str]:
  """The launch.py / wh-errmap command lines of a file's code blocks, continuation lines
  joined."""
  commands = []
  for block in FENCE.findall(_text(path)):
    for line in block.replace("\\\n", " ").splitlines():
      if COMMAND.search(line):
        commands.append(line)
  return commands


def _has_field(config, key: str) -> bool:
  node = config
  for name in key.split("."):
    if not hasattr(node, "keys") or name not in node:
      return False
    node = node[name]
  return True


def test_the_readme_is_at_most_300_lines():
  lines = len(_text(ROOT / "README.md").splitlines())
  assert lines <= README_MAX_LINES, f"README.md has {lines} lines"


def test_every_experiment_named_exists_and_every_experiment_is_listed():
  known = set(experiments.names())
  named = {(path.name, name) for path in DOCS for name in EXPERIMENT.findall(_text(path))
           if not name.isupper()}   # NAME, X: placeholders
  assert named, "no --experiment= found in the docs"
  unknown = sorted((f, n) for f, n in named if n not in known)
  assert not unknown, f"experiments named in the docs that do not exist: {unknown}"
  usage = _text(ROOT / "docs" / "usage.md")
  table_text = usage[usage.index("| experiment | what it does |"):]
  table_text = table_text[:table_text.index("\n\n")]
  table = set(re.findall(r"^\| `(\w+)`", table_text, re.M))
  assert table == known, (f"docs/usage.md's experiment table: missing {sorted(known - table)}, "
                          f"unknown {sorted(table - known)}")


def test_every_set_key_in_a_command_is_a_field_of_its_experiment():
  checked = 0
  for path in DOCS:
    for command in _commands(path):
      names = EXPERIMENT.findall(command)
      experiment = names[0] if names else "quickstart"
      if experiment.isupper():   # --experiment=NAME: a placeholder
        continue
      module = experiments.load(experiment)
      config = module.get_config()
      for key in SET_KEY.findall(command):
        assert _has_field(config, key), (
            f"{path.name}: `--set {key}=...` is no field of {experiment}: {command.strip()}")
        assert declared_unread(getattr(module, "UNREAD", {}), key) is None, (
            f"{path.name}: {experiment} refuses `--set {key}=...`: {command.strip()}")
        checked += 1
  assert checked >= 10, f"only {checked} --set keys found in the docs' commands"


def test_every_set_key_mentioned_in_prose_is_a_field_somewhere():
  configs = [experiments.load(name).get_config() for name in experiments.names()]
  for path in DOCS:
    prose = FENCE.sub("", _text(path))
    for key in SET_KEY.findall(prose):
      assert any(_has_field(c, key) for c in configs), (
          f"{path.name}: `--set={key}=...` is a field of no experiment")


def test_every_flag_in_a_command_is_defined():
  defined = set(flags.FLAGS) | {"help", "helpfull"}
  assert "experiment" in defined and cli.main   # the flags are cli's
  for path in DOCS:
    for command in _commands(path):
      # only what follows launch.py / wh-errmap, up to the shell's next command
      words = command[COMMAND.search(command).end():].split(";")[0]
      unknown = sorted(set(FLAG.findall(words)) - defined)
      assert not unknown, f"{path.name}: undefined flag(s) {unknown} in: {command.strip()}"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_relative_link_points_at_a_file(path):
  for target in LINK.findall(_text(path)):
    if "://" in target or target.startswith("mailto:"):
      continue
    assert (path.parent / target).exists(), f"{path.name}: link to missing {target}"


def test_the_layout_names_every_module():
  usage = _text(ROOT / "docs" / "usage.md")
  layout = usage[usage.index("## Layout"):]
  modules = {p.stem for p in (ROOT / "wh_errmap").rglob("*.py") if p.stem != "__init__"}
  modules |= {p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__"}
  missing = sorted(m for m in modules if not re.search(rf"\b{m}\b", layout))
  assert not missing, f"docs/usage.md's layout does not name: {missing}"
