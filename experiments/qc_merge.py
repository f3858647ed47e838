"""One table of a cohort assessed in shards (`predict --shard=i/n`).

  python launch.py --experiment=qc_merge --results=QC_OUT
  python launch.py --experiment=qc_merge --results=OUT_0,OUT_1,OUT_2 --set=output_dir=ALL

Reads every pair result (`<pair>_qc.json`) and shard manifest (`shard-i-of-n.json`) of the
folders and writes one `qc.tsv`, `summary.json`, `index.html` (linking each pair's files
where they are) and the label files into output_dir (default: the only --results folder).
Refuses results made with another predictor, threshold, verdict settings or label
convention, two different results for one pair, and missing or unfinished shards (naming
them; --set=partial=True merges what there is and lists what is missing).
"""
from __future__ import annotations

import ml_collections

from wh_errmap.errors import UserError
from wh_errmap.qc.merge import merge
from wh_errmap.qc.verdict import VERDICTS
from wh_errmap.utils.progress import console


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.results = ""       # --results: predict's output folder(s), comma-separated
  c.output_dir = ""    # "" = the only --results folder
  c.figures = True     # index.html and the label files
  c.partial = False    # merge although shards are missing (they are listed in summary.json)
  return c


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  del workdir   # the table goes beside the results, or to output_dir
  folders = [f.strip() for f in str(config.results).split(",") if f.strip()]
  if not folders:
    raise UserError("qc_merge needs --results=FOLDER[,FOLDER...]: predict's output folders")
  summary = merge(folders, config.output_dir or None, config.figures, config.partial)
  counts = ", ".join(f"{summary['verdicts'][v]} {v}" for v in VERDICTS
                     if summary["verdicts"][v])
  shards = f" from {len(summary['shards'])} shard(s)" if summary["shards"] else ""
  console(f"merged {summary['pairs']} pairs{shards}: {counts}; table "
          f"{summary['files']['tsv']}"
          + (f", gallery {summary['files']['html']}" if "html" in summary["files"] else "")
          + (f"; MISSING: {'; '.join(summary['missing'])}" if summary["missing"] else ""))
