"""A run's workdir: its recorded config, and checks that it can be written.

`WORKDIR/config.json` records the settings a run was made with. Every later command on the
same workdir (another stage, the next fold, a resume after a crash) must use the same
settings, or checkpoints trained one way would silently be continued another way; only the
fields in VOLATILE_FIELDS (which fold or stage to run, logging, output choices) may differ.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import ml_collections

from wh_errmap.errors import UserError
from wh_errmap.utils.atomic import write_json
from wh_errmap.utils.progress import console

CONFIG_FILE = "config.json"
# Fields that select what a command does, not what a run computes.
VOLATILE_FIELDS = frozenset({
    "fold", "stage", "nifti", "cache_dir", "overwrite", "input.num_workers", "mesh.space",
    "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "report.failure_dice"})
# Below this much free space a full run (checkpoints, NIfTI outputs) may not fit.
LOW_DISK_BYTES = 2 * 1024**3


def _flatten(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flatten(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def config_differences(stored: dict[str, Any], current: dict[str, Any],
                       defaults: dict[str, Any] | None = None) -> list[str]:
  """Dotted names of the non-volatile fields whose values differ (or exist in one only).

  defaults: the code's base config. A field missing from `stored` counts as having its
  default there (a run from before the field existed computed what the default computes),
  and a stored field the code no longer has is ignored (nothing reads it any more).
  """
  old, new = dict(_flatten(stored)), dict(_flatten(current))
  if defaults is not None:
    known = dict(_flatten(defaults))
    old = {key: value for key, value in old.items() if key in known or key in new}
    for key, value in known.items():
      old.setdefault(key, value)
  # JSON turns tuples into lists; compare through JSON on both sides.
  return sorted(key for key in set(old) | set(new)
                if key not in VOLATILE_FIELDS
                and json.dumps(old.get(key)) != json.dumps(new.get(key)))


def check_writable(workdir: str | os.PathLike, progress: Callable[[str], None] = console) -> Path:
  """Creates `workdir` and writes a probe file in it; a clear UserError if it cannot.

  Warns when the disk holding it has less than LOW_DISK_BYTES free.
  """
  path = Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
      pass
  except OSError as e:
    raise UserError(f"cannot write to the workdir {path}: {e.strerror or e}") from None
  free = shutil.disk_usage(path).free
  if free < LOW_DISK_BYTES:
    progress(f"warning: only {free / 1024**3:.1f} GB free on the disk of {path}; "
             f"checkpoints and outputs may not fit")
  return path


def check_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict,
                 defaults: ml_collections.ConfigDict | None = None) -> list[str]:
  """Compares `config` with the workdir's recorded one, changing nothing on disk.

  Returns the differing fields (empty when nothing is recorded yet or all agree, or when
  they differ and config.overwrite asks to start afresh); raises UserError when they differ
  without config.overwrite. defaults: the base config (see config_differences).
  """
  path = Path(workdir) / CONFIG_FILE
  if not path.exists():
    return []
  current = json.loads(config.to_json())
  try:
    stored = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise UserError(f"{path} is unreadable ({e}); move it away or use a new --workdir") from None
  changed = config_differences(stored, current,
                               None if defaults is None else json.loads(defaults.to_json()))
  if changed and not config.get("overwrite", False):
    shown = ", ".join(f"{k} (recorded {_value(stored, k)}, now {_value(current, k)})"
                      for k in changed[:6])
    more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
    raise UserError(f"{path}: this workdir was made with other settings: {shown}{more}. "
                    f"Use a new --workdir, the recorded settings, or --overwrite to move "
                    f"the old run aside and start afresh")
  return changed


def record_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict,
                  progress: Callable[[str], None] = console,
                  defaults: ml_collections.ConfigDict | None = None) -> None:
  """Writes the run's config once; refuses a config that differs from the recorded one.

  Call it once the run's inputs are found and valid (check_config can refuse other
  settings before that), so that a failed first command does not lock in its settings.
  defaults: the base config, for fields a recorded config predates (config_differences).
  With config.overwrite, a workdir recorded with other settings is moved aside to
  `<workdir>.replaced-<time>` (nothing is deleted) and the run starts afresh.
  """
  path = Path(workdir) / CONFIG_FILE
  changed = check_config(workdir, config, defaults)
  if path.exists() and not changed:
    return
  if changed:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    aside = Path(workdir).absolute().with_name(f"{Path(workdir).absolute().name}.replaced-{stamp}")
    shutil.move(str(Path(workdir)), aside)
    progress(f"--overwrite: moved the previous run (settings differed: "
             f"{', '.join(changed[:6])}) to {aside}")
  check_writable(workdir, progress)
  write_json(path, json.loads(config.to_json()))


def _value(tree: dict[str, Any], key: str) -> str:
  node: Any = tree
  for part in key.split("."):
    if not isinstance(node, dict) or part not in node:
      return "unset"
    node = node[part]
  return json.dumps(node)


def load_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  path = Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise UserError(f"{path} not found: --workdir must be a run made by "
                    f"`launch.py --experiment=cv_fold` (or cv_fold_small)")
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except (OSError, json.JSONDecodeError) as e:
    raise UserError(f"{path} is unreadable: {e}") from None


@contextlib.contextmanager
def run_lock(path: str | os.PathLike, progress: Callable[[str], None] = console,
             ) -> Iterator[None]:
  """Holds an exclusive lock on `path` (e.g. WORKDIR/fold0.lock) for the block.

  A second run asking for the same lock stops with one line naming the holder (host, pid,
  start time, command) instead of writing into the same checkpoints. The lock is a POSIX
  record lock (fcntl.lockf, which NFS supports): the kernel releases it when its process
  dies, however it dies, so a lock left by a dead run is simply taken over. On a file
  system without locks, a warning is printed and the run goes on unlocked.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
  try:
    try:
      fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno in (errno.EACCES, errno.EAGAIN):
        raise UserError(f"{path.parent} is in use by another run ({_holder(path)}); wait for it "
                        f"to end or stop it, then run this command again (a lock held by a "
                        f"run that died is released with it)") from None
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        raise
      progress(f"warning: {path.parent}: the file system does not support locks; make sure "
               f"no other run uses this workdir")
    else:
      holder = {"host": socket.gethostname(), "pid": os.getpid(),
                "since": datetime.datetime.now().isoformat(timespec="seconds"),
                "command": " ".join(sys.argv)[:500]}
      os.ftruncate(fd, 0)
      os.pwrite(fd, json.dumps(holder).encode(), 0)
    yield
  finally:
    os.close(fd)   # releases the lock


def _holder(path: Path) -> str:
  try:
    holder = json.loads(path.read_text())
    return (f"host {holder['host']}, pid {holder['pid']}, since {holder['since']}: "
            f"{holder['command']}")
  except (OSError, ValueError, KeyError, TypeError):
    return "holder unknown"
