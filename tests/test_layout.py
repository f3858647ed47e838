"""The package's shape: every import runs down the floors of the architecture, no import
circle, nothing left flat at the top, no module name with two meanings. And the throughput
benchmark imports where nibabel, grain and scipy are missing (the GPU machines' image)."""
from __future__ import annotations

import ast
import collections
import subprocess
import sys

from tests.conftest import ROOT

PACKAGE = ROOT / "wh_errmap"
# Each subpackage's floor: a module imports only from lower floors and its own subpackage.
FLOORS = {"errors": -1, "utils": 0, "metrics": 0, "data": 1, "models": 2, "train": 3, "cv": 4,
          "report": 5, "qc": 5, "throughput": 5, "cli": 6}


def _modules() -> dict[str, list[str]]:
  """{dotted module: [wh_errmap modules it imports]} for every module of the package."""
  graph = {}
  for path in PACKAGE.rglob("*.py"):
    parts = path.relative_to(ROOT).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    imported = []
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        imported.append(node.module)
        imported += [f"{node.module}.{alias.name}" for alias in node.names]
      elif isinstance(node, ast.Import):
        imported += [alias.name for alias in node.names]
    graph[name] = imported
  return {name: sorted({m for m in imported if m in graph and m != name})
          for name, imported in graph.items()}


def _floor(module: str) -> tuple[str, int]:
  wing = module.split(".")[1] if "." in module else module
  return wing, FLOORS[wing]


def test_every_import_runs_down_the_floors():
  upward = []
  for module, imported in _modules().items():
    if module == "wh_errmap":
      continue
    wing, floor = _floor(module)
    for other in imported:
      if other == "wh_errmap":
        continue
      other_wing, other_floor = _floor(other)
      if other_wing != wing and other_floor >= floor:
        upward.append(f"{module} -> {other}")
  assert upward == []


def test_no_import_circle():
  graph = {m: [i for i in imported if not (PACKAGE / f"{i.replace('.', '/')[10:]}").is_dir()]
           for m, imported in _modules().items()}   # package faces (__init__) left out
  state: dict[str, int] = {}
  circles = []

  def visit(module, path):
    state[module] = 1
    for other in graph[module]:
      if state.get(other) == 1:
        circles.append(path[path.index(other):] + [other])
      elif other not in state:
        visit(other, path + [other])
    state[module] = 2

  for module in graph:
    if module not in state:
      visit(module, [module])
  assert circles == []


def test_nothing_flat_and_no_name_used_twice():
  flat = sorted(p.name for p in PACKAGE.glob("*.py"))
  assert flat == ["__init__.py", "cli.py", "errors.py"]
  names = collections.Counter(p.name for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")
  assert [name for name, count in names.items() if count > 1] == []


def test_the_throughput_benchmark_imports_without_nibabel_grain_or_scipy():
  code = ("import sys\n"
          "class Missing:\n"
          "  def find_spec(self, name, path=None, target=None):\n"
          "    if name.split('.')[0] in ('nibabel', 'grain', 'scipy'):\n"
          "      raise ImportError(name)\n"
          "sys.meta_path.insert(0, Missing())\n"
          "import wh_errmap.throughput.timing, wh_errmap.throughput.summary\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]


def test_the_longest_first_list_names_test_files_that_exist():
  """conftest's scheduling list: a renamed file would silently lose its place."""
  from tests.conftest import LONGEST_FIRST
  missing = [path for path in LONGEST_FIRST if not (ROOT / path).is_file()]
  assert not missing and len(set(LONGEST_FIRST)) == len(LONGEST_FIRST), missing
