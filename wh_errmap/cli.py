"""Command line: `wh-errmap --experiment=NAME [--fold=k] [--set=field=value ...]`.

From a checkout the same command is `python launch.py ...`. Each experiment is a module of
the experiments package (get_config + run). Flags below override the config field of the
same name; `--set` reaches any field, e.g. `--set=train.seg3d.batch_size=4`. `--show_config`
prints the config so set, one field per line with its doc, and runs nothing
(wh_errmap/utils/config_docs.py). A field the experiment declares it never reads is refused
(UNREAD, experiments/__init__.py); one it happens not to read gets a warning when the run
ends (wh_errmap/utils/config_reads.py).
"""
import os
import sys
import time

from absl import app, flags, logging

# `import ... as`: `from wh_errmap import experiments` would hide which module is missing.
try:  # installed: the experiments are packaged as wh_errmap.experiments
  import wh_errmap.experiments as experiments
except ModuleNotFoundError as e:
  if e.name != "wh_errmap.experiments":
    raise
  import experiments  # a checkout: experiments/ sits beside wh_errmap/
from wh_errmap.errors import UserError, storage_error_message
from wh_errmap.utils.cache import enable_compilation_cache
from wh_errmap.utils.config_docs import describe_config
from wh_errmap.utils.config_reads import warn_unread

_EXPERIMENT = flags.DEFINE_string(
    "experiment", "quickstart", f"One of: {', '.join(experiments.names())}.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Where a run writes its outputs.")
_SET = flags.DEFINE_multi_string("set", [], "Config override FIELD=VALUE (repeatable).")
_SHOW_CONFIG = flags.DEFINE_boolean(
    "show_config", False, "Print the experiment's config after --set and the field flags "
    "(--fold, --image, ...), one field per line with its doc, and exit without running it.")
_DISTRIBUTED = flags.DEFINE_boolean(
    "distributed", False, "Join the other processes of a multi-process run "
    "(jax.distributed; SLURM and Open MPI are detected, else give the three flags below).")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
# Shortcuts for the most used config fields; None leaves the experiment's default (and an
# experiment without that field never hears of it).
_FIELDS = {
    "fold": flags.DEFINE_integer("fold", None, "Cross-validation fold."),
    "data_dir": flags.DEFINE_string("data_dir", None, "MMWHS data folder (default: phantom)."),
    "cache_dir": flags.DEFINE_string("cache_dir", None, "Cache folder for phantom/preprocessing."),
    "num_cases": flags.DEFINE_integer("num_cases", None, "Number of phantom cases."),
    "seed": flags.DEFINE_integer("seed", None, "Random seed."),
    "image": flags.DEFINE_string("image", None, "predict: image file or folder."),
    "mask": flags.DEFINE_string("mask", None, "predict: mask file or folder."),
    "model_file": flags.DEFINE_string(  # --model; the field `model` holds the network settings
        "model", None, "predict: a model file written by --experiment=export_model "
        "(instead of --workdir's run)."),
    "labels": flags.DEFINE_string(
        "labels", None, "predict: the masks' label convention: mmwhs, totalsegmentator, a "
        "dataset.json, or 1:RV,2:Myo,..."),
    "allow_modality": flags.DEFINE_boolean(
        "allow_modality", None, "predict: assess scans that look like another modality than "
        "the model's training scans (e.g. CT given to an MR model), with a warning, instead "
        "of marking them out_of_distribution."),
    "shard": flags.DEFINE_string(
        "shard", None, "predict: assess shard i of n of a folder's pairs (i/n, i = 0..n-1, "
        "e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)."),
    "results": flags.DEFINE_string(
        "results", None, "qc_merge: predict's output folder(s) to merge, comma-separated."),
    "overwrite": flags.DEFINE_boolean(
        "overwrite", None, "Move aside a workdir recorded with other settings and start afresh, "
        "or train a model whose checkpoints are all damaged from scratch; predict: replace "
        "existing results."),
}


def _main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  if _DISTRIBUTED.value:
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU-only processes
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  try:
    experiment = experiments.load(_EXPERIMENT.value)
    config = experiment.get_config()
    overridden = experiments.override(
        config, [f"{name}={flag.value!r}" for name, flag in _FIELDS.items()
                 if flag.value is not None], experiment)
    overridden += experiments.override(config, _SET.value, experiment)
    if _SHOW_CONFIG.value:
      print(describe_config(config, experiment), flush=True)
      return
    # The compilation cache reads cache_dir on the run's behalf: it counts as read.
    with warn_unread(config, overridden, _EXPERIMENT.value) as config:
      enable_compilation_cache(config.get("cache_dir"))
      experiment.run(config, _WORKDIR.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(getattr(e, "exit_code", 2))
  except Exception as e:  # noqa: BLE001  (anything else keeps its traceback)
    exit_on_storage_error(e)
    raise


def exit_on_storage_error(error: BaseException) -> None:
  """A full disk, a read-only or missing folder (storage_error_message): one error line,
  kept last (_last_line), and exit status 2 at once. Returns for any other error.

  Leaving at once is safe (every output is written atomically) and needed: at interpreter
  exit the writer threads of a failed orbax save would print more tracebacks."""
  message = storage_error_message(error)
  if message is None:
    return
  sys.stdout.flush()
  _last_line(f"error: {message}")
  os._exit(2)


def _last_line(line: str) -> None:
  """Writes `line` to stderr as its last line, whatever other threads print.

  The writer threads of a failed orbax save print tracebacks at any moment, also while this
  line is written (seen under load: the line landed inside one). Standard error's file
  descriptor is first pointed at /dev/null, so that nothing written after this reaches the
  terminal, and the line starts on a line of its own in case a traceback was cut short."""
  terminal = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  # A write another thread began before the switch still goes to the terminal, and when the
  # reader is a full pipe (a parent process under load) it ends only once the reader has
  # read on: wait for such writes before writing the line (seen: a traceback's piece after it).
  time.sleep(0.2)
  os.write(terminal, f"\n{line}\n".encode())


def main() -> None:
  """The `wh-errmap` console script and launch.py: parses the flags, runs the experiment."""
  # absl's --help shows the flags of the script it was started as (sys.argv[0]) and its
  # docstring, and the flags are defined here, not in that script.
  for flag in flags.FLAGS.get_flags_for_module(__name__):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  script = sys.modules["__main__"]
  if not script.__doc__:
    script.__doc__ = __doc__
  app.run(_main)


if __name__ == "__main__":  # python -m wh_errmap.cli
  main()
