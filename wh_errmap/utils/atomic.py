"""Atomic file writes: a crash never leaves a truncated file under the final name, and a
group of files that belong together is removed whole when writing it fails."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

from wh_errmap.errors import naming


def _umask() -> int:
  """The process's umask, read without changing it where Linux allows (/proc), else by
  setting and restoring it."""
  try:
    for line in Path("/proc/self/status").read_text().splitlines():
      if line.startswith("Umask:"):
        return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def _fsync_folder(folder: Path) -> None:
  """Makes a rename in `folder` durable; a no-op where folders cannot be opened."""
  try:
    fd = os.open(folder, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
  """Yields a temporary path beside `path`; renames it to `path` if the block succeeds.

  suffix: the temporary file's ending, for writers that pick the format by name
  (".nii.gz", ".png"). On an exception the temporary file is removed. Before the rename the
  file gets the permissions a plainly created file would have (0666 less the umask;
  mkstemp's are 0600, which would hide shared caches and runs from colleagues) and is
  flushed to disk; after it, the folder is, so that a power cut cannot leave an empty or
  missing file under the final name.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
  os.close(fd)
  try:
    with naming(path):   # a full disk inside the block: the error names the file
      yield Path(tmp)
      os.chmod(tmp, 0o666 & ~_umask())
      with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_folder(path.parent)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
  with atomic_path(path) as tmp:
    tmp.write_text(text)


def write_json(path: str | os.PathLike, payload: Any) -> None:
  write_text(path, json.dumps(payload, indent=1))


@contextlib.contextmanager
def removed_on_failure(paths: Mapping[Any, str | os.PathLike]) -> Iterator[None]:
  """Removes every file in `paths` (read when the block fails: files added inside it count)
  if the block raises, then re-raises: outputs that belong together are written whole or
  not at all, as one result."""
  try:
    yield
  except BaseException:
    for path in paths.values():
      Path(path).unlink(missing_ok=True)
    raise
