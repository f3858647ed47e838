"""The paper's whole 5-fold cross-validation: every fold, then the report.

Each fold runs as its own process, `launch.py --experiment=cv_fold --fold=k` with this run's
settings, output in WORKDIR/logs/fold{k}.log. On a host with several GPUs the folds run at
the same time, one per group of GPUs (CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES); on the
CPU or a TPU one after another with every device. A failed fold does not stop the others:
the report is written from the folds that finished, the failed ones are named with the end
of their log, and the exit status is 1. Run the same command again to resume: finished
folds and stages are skipped. SIGINT/SIGTERM are passed on to the running folds, which save
a checkpoint; the command then exits with status 128 + signal.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import ml_collections

from . import base, cv_fold
from wh_errmap.cv import children, commands, devices
from wh_errmap.cv.run import open_run
from wh_errmap.errors import UserError
from wh_errmap.report.build import build_report
from wh_errmap.train.stages import model_layouts
from wh_errmap.utils.progress import console
from wh_errmap.utils.workdir import run_lock

# Each fold runs as its own process: launch.py beside a checkout, the installed module else.
LAUNCHER = ((sys.executable, str(Path(__file__).resolve().parents[1] / "launch.py"))
            if __package__ == "experiments" else (sys.executable, "-m", "wh_errmap.cli"))


def add_cv_block(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds the `cv` block (how the folds are run, not what they compute) to a cv_fold config."""
  # Not type-safe: "auto" may become a number, None a tuple.
  c.cv = ml_collections.ConfigDict(type_safe=False)
  c.cv.folds = None              # folds to run, e.g. (0, 2); None = all, 0..splits.num_folds-1
  c.cv.concurrent = "auto"       # most folds at once; "auto" = one per GPU group, 1 on CPU/TPU;
  #                                a number > 1 also runs folds side by side on the CPU
  c.cv.devices_per_fold = "auto"  # GPUs per fold; "auto" = max(1, GPUs // folds to run)
  c.cv.progress_every = 30.0     # seconds between the combined progress lines
  return c


def get_config() -> ml_collections.ConfigDict:
  return add_cv_block(cv_fold.get_config())


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  run_cv(config, workdir, fold_experiment="cv_fold")


def run_cv(config: ml_collections.ConfigDict, workdir: str, fold_experiment: str) -> None:
  """Runs the folds of config.cv.folds as `fold_experiment` processes, then the report."""
  start = time.monotonic()
  console(cv_fold.data_line(config))
  if jax.distributed.is_initialized():   # does not start a backend
    raise UserError(f"--experiment=cv runs the folds as processes of one host and cannot "
                    f"join a multi-process run; start `--experiment={fold_experiment} "
                    f"--fold=k --distributed ...` once per fold instead")
  cv_fold.check_stage(config.stage)
  cv = config.cv
  num_folds = config.splits.num_folds
  chosen = commands.selected_folds(cv.folds, num_folds)
  fold_config = commands.fold_config(config)
  slots = devices.device_slots(devices.probe_devices(), len(chosen), cv.devices_per_fold,
                               cv.concurrent)
  # Each fold's batches must fit the devices its process will see: one error here rather
  # than one per fold.
  model_layouts(fold_config, num_devices=min(s.devices for s in slots), num_processes=1)
  # Phantom, preprocessing cache and splits.json, made once before the children read them;
  # the settings every child records and checks, written here once, so children never race
  # on them.
  open_run(workdir, fold_config, base.get_config())
  with run_lock(Path(workdir) / "cv.lock"):   # one cv parent per workdir
    _run_and_report(config, workdir, fold_experiment, chosen, slots, start)


def _run_and_report(config: ml_collections.ConfigDict, workdir: str, fold_experiment: str,
                    chosen: tuple[int, ...], slots: list, start: float) -> None:
  cv, num_folds = config.cv, config.splits.num_folds
  to_run = {}
  for k in chosen:
    if config.stage == "all" and (Path(workdir) / f"fold{k}" / "records.json").exists():
      console(f"cv: fold{k} has its records (fold{k}/records.json): skipped")
    else:
      to_run[k] = commands.fold_command(LAUNCHER, fold_experiment, config, k, workdir)
  if to_run:
    console(f"cv: {len(to_run)} fold(s) to run, {devices.describe_slots(slots, len(to_run))}; "
            f"logs in {Path(workdir) / 'logs'}")
  results = children.run_folds(to_run, slots, Path(workdir) / "logs",
                               progress_every_s=cv.progress_every)

  failed = [r for r in results.values() if r.status != "done"]
  finished = [k for k in range(num_folds)
              if (Path(workdir) / f"fold{k}" / "records.json").exists()]
  if finished:
    report = build_report(workdir, num_folds=num_folds, threshold=config.predictor.threshold,
                          failure_dice=config.report.failure_dice)
    report_note = f"the report ({report}) covers fold(s) {', '.join(map(str, finished))}"
  else:
    report_note = "no fold has test records, so no report was written"
  console(f"cv: {len(to_run) - len(failed)} of {len(to_run)} fold(s) run, "
          f"{len(chosen) - len(to_run)} skipped, {len(failed)} failed, in "
          f"{(time.monotonic() - start) / 60:.1f} min; {report_note}")
  if failed:
    error = UserError(children.failure_message(failed, report_note))
    error.exit_code = 1
    raise error
