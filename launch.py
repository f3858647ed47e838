"""Entry point: `python launch.py --experiment=NAME [--fold=k] [--set=field=value ...]`.

Each experiment lives in experiments/NAME.py (get_config + run). Flags below override the
config field of the same name; `--set` reaches any field, e.g. `--set=train.seg3d.batch_size=4`.
"""
import os
import sys

from absl import app, flags, logging

import experiments
from wh_errmap.cache import enable_compilation_cache
from wh_errmap.errors import UserError, storage_error_message

_EXPERIMENT = flags.DEFINE_string(
    "experiment", "quickstart", f"One of: {', '.join(experiments.names())}.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Where a run writes its outputs.")
_SET = flags.DEFINE_multi_string("set", [], "Config override FIELD=VALUE (repeatable).")
_DISTRIBUTED = flags.DEFINE_boolean(
    "distributed", False, "Join the other processes of a multi-process run "
    "(jax.distributed; SLURM and Open MPI are detected, else give the three flags below).")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
# Shortcuts for the most used config fields; None leaves the experiment's default.
_FIELDS = {
    "fold": flags.DEFINE_integer("fold", None, "Cross-validation fold."),
    "data_dir": flags.DEFINE_string("data_dir", None, "MMWHS data folder (default: phantom)."),
    "cache_dir": flags.DEFINE_string("cache_dir", None, "Cache folder for phantom/preprocessing."),
    "num_cases": flags.DEFINE_integer("num_cases", None, "Number of phantom cases."),
    "seed": flags.DEFINE_integer("seed", None, "Random seed."),
    "image": flags.DEFINE_string("image", None, "predict: image file or folder."),
    "mask": flags.DEFINE_string("mask", None, "predict: mask file or folder."),
    "overwrite": flags.DEFINE_boolean(
        "overwrite", None, "Move aside a workdir recorded with other settings and start afresh, "
        "or train a model whose checkpoints are all damaged from scratch; predict: replace "
        "existing results."),
}


def main(argv):
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
    experiments.override(config, [f"{name}={flag.value!r}" for name, flag in _FIELDS.items()
                                  if flag.value is not None])
    experiments.override(config, _SET.value)
    enable_compilation_cache(config.get("cache_dir"))
    experiment.run(config, _WORKDIR.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(getattr(e, "exit_code", 2))
  except Exception as e:  # noqa: BLE001  (anything else keeps its traceback)
    message = storage_error_message(e)
    if message is None:
      raise
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # A save that failed leaves orbax's writer threads behind, and at interpreter exit they
    # print tracebacks after this line: leave at once (every output is written atomically).
    os._exit(2)


if __name__ == "__main__":
  app.run(main)
