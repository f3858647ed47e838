"""One table of a cohort assessed in shards: the shards' manifests and their merge.

A shard run (`predict --shard=i/n`) writes, besides its pairs' files, `shard-i-of-n.json`:
the pairs it was given, the ones it assessed, its problems, the predictor and settings, and
its timing. `merge` reads the results (`<pair>_qc.json`) of one or several output folders
and writes one `qc.tsv`, `summary.json` and gallery. It refuses results made with another
predictor, threshold, verdict settings or label convention (naming the difference and two
files that show it), two different results for one pair, and shards that are missing or
unfinished (unless partial), naming them.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wh_errmap.errors import UserError
from wh_errmap.qc.folder import IDENTITY, folder_results, write_folder_report
from wh_errmap.qc.verdict import VERDICTS
from wh_errmap.utils.atomic import write_json

# The keys of a result that must agree across a merged table (IDENTITY less the inputs).
SHARED = {k: v for k, v in IDENTITY.items() if k not in ("image_sha256", "mask_sha256")}
SUMMARY_FILE = "summary.json"
_MANIFEST = re.compile(r"^shard-(\d+)-of-(\d+)\.json$")


def manifest_name(index: int, count: int) -> str:
  return f"shard-{index}-of-{count}.json"


def shared_settings(identity: dict[str, Any]) -> dict[str, Any]:
  """The SHARED part of a result or manifest; a model file is named by its checksum, not by
  where it lies (shards on other machines see it under other paths)."""
  shared = {k: identity.get(k) for k in SHARED}
  predictor = dict(shared.get("predictor") or {})
  if predictor.get("model_sha256"):
    predictor.pop("model_file", None)
  shared["predictor"] = predictor
  return shared


def write_manifest(output_dir: Path, index: int, count: int, pairs: Sequence[str],
                   identity: dict[str, Any], rows: Sequence[dict], problems: Sequence[str],
                   timing: dict[str, Any], inputs: dict[str, str]) -> Path:
  """Writes shard `index` of `count`'s manifest (atomically) at the end of its run."""
  path = Path(output_dir) / manifest_name(index, count)
  write_json(path, {"shard": index, "of": count, "inputs": inputs, **identity,
                    "pairs": list(pairs), "assessed": [r["pair"] for r in rows],
                    "problems": list(problems), "timing": timing})
  return path


def _read_manifests(folders: Sequence[Path]) -> list[tuple[Path, dict[str, Any]]]:
  found = []
  for folder in folders:
    for path in sorted(folder.glob("shard-*-of-*.json")):
      if not _MANIFEST.match(path.name):
        continue
      try:
        manifest = json.loads(path.read_text())
      except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable shard manifest ({e})") from None
      found.append((path, manifest))
  return found


def _check_same(items: Sequence[tuple[Path, dict[str, Any]]]) -> None:
  """UserError naming the first setting in which two of `items` differ."""
  first: dict[str, tuple[Path, Any]] = {}
  for path, item in items:
    shared = shared_settings(item)
    for key, words in SHARED.items():
      if key not in first:
        first[key] = (path, shared[key])
      elif shared[key] != first[key][1]:
        raise UserError(
            f"cannot merge results made with another {words}: {first[key][0]} has "
            f"{json.dumps(first[key][1], sort_keys=True)}, {path} has "
            f"{json.dumps(shared[key], sort_keys=True)}; assess them again with one setting")


def _check_shards(manifests: Sequence[tuple[Path, dict[str, Any]]],
                  results: dict[str, tuple[Path, dict]]) -> list[str]:
  """What is missing from the shards the manifests describe (one line each)."""
  counts = {m["of"] for _, m in manifests}
  if len(counts) > 1:
    raise UserError(f"cannot merge shards of different splits: "
                    f"{', '.join(str(p) for p, _ in manifests)} split into "
                    f"{' and '.join(map(str, sorted(counts)))} shards")
  missing = []
  if not counts:
    return missing
  count = counts.pop()
  seen = {m["shard"] for _, m in manifests}
  for index in range(count):
    if index not in seen:
      missing.append(f"shard {index}/{count}: no {manifest_name(index, count)} (not run, or "
                     f"not finished)")
  for path, manifest in manifests:
    lost = [p for p in manifest.get("pairs", []) if p not in results
            and not any(p in problem for problem in manifest.get("problems", []))]
    if lost:
      missing.append(f"{path}: {len(lost)} of its pairs have no result ({', '.join(lost[:3])}"
                     f"{', ...' if len(lost) > 3 else ''})")
  return missing


def merge(folders: Sequence[str | Path], output_dir: str | Path | None = None,
          figures: bool = True, partial: bool = False) -> dict[str, Any]:
  """Merges the results of `folders` into `output_dir` (default: the only folder):
  `qc.tsv`, `summary.json` and, with figures, `index.html` and the label files. Returns the
  summary. Raises UserError on a refusal (see the module docstring)."""
  folders = [Path(f) for f in folders]
  for folder in folders:
    if not folder.is_dir():
      raise UserError(f"{folder}: not a folder of results")
  if output_dir is None:
    if len(folders) != 1:
      raise UserError("merging several folders needs --set=output_dir=... for the table")
    output_dir = folders[0]
  output_dir = Path(output_dir)
  results: dict[str, tuple[Path, dict]] = {}
  for folder in folders:
    for result in folder_results(folder):
      name = result["pair"]
      if name in results:
        other_folder, other = results[name]
        if other != result:
          raise UserError(f"{name} has two different results: in {other_folder} and in "
                          f"{folder}; keep one of them")
        continue
      results[name] = (folder, result)
  manifests = _read_manifests(folders)
  _check_same([(f / f"{r['pair']}_qc.json", r) for f, r in results.values()] + manifests)
  missing = _check_shards(manifests, results)
  if missing and not partial:
    raise UserError("the shards are incomplete: " + "; ".join(missing)
                    + ". Run the missing shards (the same command resumes), or merge what "
                      "there is with --set=partial=True")
  if not results:
    raise UserError(f"no results (*_qc.json) in {', '.join(map(str, folders))}")
  ordered = [results[name] for name in sorted(results)]
  output_dir.mkdir(parents=True, exist_ok=True)
  report = write_folder_report(output_dir, figures, ordered)
  first = manifests[0][1] if manifests else ordered[0][1]
  summary = {
      "merged_from": [str(f.absolute()) for f in folders],
      "pairs": len(ordered),
      "verdicts": {v: sum(r["verdict"] == v for _, r in ordered) for v in VERDICTS},
      **{k: first.get(k) for k in SHARED},
      "shards": [{"manifest": str(p), "shard": m["shard"], "of": m["of"],
                  "pairs": len(m.get("pairs", [])), "timing": m.get("timing")}
                 for p, m in manifests],
      "problems": [q for _, m in manifests for q in m.get("problems", [])],
      "missing": missing,
      "cases": [{"pair": r["pair"], "verdict": r["verdict"],
                 "mean_predicted_dice": r.get("mean_predicted_dice"), "qi": r.get("qi")}
                for _, r in ordered],
      "files": {k: str(v) for k, v in report.items()}}
  write_json(output_dir / SUMMARY_FILE, summary)
  return summary
