"""Errors caused by the user's input, settings or machine: `launch.py` prints them as one
line and exits with status 2 instead of showing a traceback."""
from __future__ import annotations

import errno

# OSErrors that mean "this location cannot take the output", whoever raised them.
STORAGE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                  errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                  errno.EROFS: "the file system is read-only",
                  errno.ENOTDIR: "a part of the path is a file, not a folder"}


class UserError(Exception):
  """A problem the user can fix (bad file, bad flag, inconsistent workdir)."""


def storage_error_message(error: BaseException) -> str | None:
  """One line for a full disk or an unwritable location anywhere in the exception's chain
  (checkpoint libraries wrap the OSError in their own exceptions); None for other errors."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
      where = f" writing {error.filename}" if error.filename else ""
      return (f"{STORAGE_ERRNOS[error.errno]}{where} ({error.strerror}); free space or choose "
              f"another --workdir / --cache_dir, then run the same command to resume")
    error = error.__cause__ or error.__context__
  return None
