"""Throughput of QC on a cohort: `python launch.py --experiment=qc_bench`.

For each cohort size in qc_bench.pairs and each process count in qc_bench.processes, assesses
that many synthetic phantom pairs at the phantom's size (about 260 x 260 x 120 voxels at
1 mm) with `predict`, as that many processes pinned to equal shares of the CPU cores (shards
merged with qc_merge), and reports pairs/s, seconds per pair by phase (read, resample,
infer, write), and the peak resident memory of the largest process. Compilation is
included: every measurement starts with an empty compilation cache. The predictor:
--model=FILE, or by default the quick start's size with untrained weights (qc.bench). Writes
WORKDIR/qc_bench.json and WORKDIR/qc_bench.md; qc_bench.docs appends the table to a
Markdown file (e.g. docs/benchmarks.md).
"""
from __future__ import annotations

import datetime
import json
import platform
import shutil
from pathlib import Path

import ml_collections

from . import base, predict
from wh_errmap.data.phantom import write_phantom
from wh_errmap.errors import UserError
from wh_errmap.qc import bench
from wh_errmap.utils.cache import default_cache_dir
from wh_errmap.utils.progress import console

# Never read by run(): each measurement runs predict on its own synthetic cohort with fixed
# flags (wh_errmap/qc/bench.py), so predict's inputs, outputs and settings here are not
# passed on; the predictor is --model or an untrained one, so nothing is trained.
UNREAD = dict.fromkeys(("image", "mask", "labels", "output_dir", "shard", "figures",
                        "allow_partial", "threshold", "qc", "fold", "overwrite", "train",
                        "optim", "loss", "mesh", "predictor"))


def get_config() -> ml_collections.ConfigDict:
  c = predict.get_config()
  base.apply_small_sizes(c)   # the untrained predictor's size: the quick start's
  c.qc_bench = ml_collections.ConfigDict()
  c.qc_bench.pairs = (20, 200, 1000)   # cohort sizes
  c.qc_bench.processes = (1, 2)        # process counts, each measured at every size
  c.qc_bench.distinct = 10             # distinct phantom cases the pairs link to
  c.qc_bench.keep_outputs = False      # keep each measurement's output folder
  c.qc_bench.docs = ""                 # append the table to this Markdown file ("" = don't)
  return c


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  work = Path(workdir)
  work.mkdir(parents=True, exist_ok=True)
  sizes, counts = list(config.qc_bench.pairs), list(config.qc_bench.processes)
  if not sizes or min(sizes) < 1 or not counts or min(counts) < 1:
    raise UserError("qc_bench.pairs and qc_bench.processes need positive numbers")
  cache = Path(config.cache_dir or default_cache_dir())
  distinct = int(config.qc_bench.distinct)
  phantom = cache / f"qc_bench-phantom-n{distinct}-s{config.seed}"
  if not (phantom / "done").exists():
    console(f"[qc_bench] writing {distinct} phantom cases to {phantom}")
    write_phantom(phantom, num_cases=distinct, seed=config.seed)
    (phantom / "done").write_text("")
  cases = [(phantom / f"mr_train_{1001 + i}_image.nii.gz",
            phantom / f"mr_train_{1001 + i}_label.nii.gz") for i in range(distinct)]
  model_file = Path(config.model_file) if config.model_file else work / "untrained-small.whqc"
  if not config.model_file and not model_file.exists():
    console(f"[qc_bench] an untrained predictor of the quick start's size: {model_file}")
    bench.untrained_model_file(model_file, config, cases, config.seed)
  results = []
  for size in sizes:
    images, masks = bench.make_cohort(work / f"cohort-{size}", cases, size)
    for processes in counts:
      out = work / f"out-{size}-{processes}"
      console(f"[qc_bench] {size} pairs, {processes} process(es) ...")
      result = bench.measure(images, masks, model_file, out, processes)
      results.append(result)
      console(f"[qc_bench] {bench.describe(result)}")
      if not config.qc_bench.keep_outputs:
        shutil.rmtree(out, ignore_errors=True)
  cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines()
              if line.startswith("model name")), platform.machine())
  title = (f"QC of a cohort, {datetime.date.today().isoformat()}: {len(bench.core_shares(1)[0])} "
           f"CPU cores ({cpu}), predictor {model_file.name}, phantom pairs at 1 mm")
  table = bench.markdown(results, title)
  (work / "qc_bench.json").write_text(json.dumps(results, indent=1))
  (work / "qc_bench.md").write_text(table)
  print(table, flush=True)
  if config.qc_bench.docs:
    with open(config.qc_bench.docs, "a") as f:
      f.write("\n" + table)


def _cpuinfo() -> str:
  try:
    return Path("/proc/cpuinfo").read_text()
  except OSError:
    return ""
