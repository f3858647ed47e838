"""Errors caused by the user's input, settings or machine: `launch.py` prints them as one
line and exits with status 2 instead of showing a traceback."""
from __future__ import annotations

import contextlib
import errno
import os
import re
from typing import Iterator

# OSErrors that mean the storage cannot take or give the data, whoever raised them:
# (what happened, what to do). Space and read-only errors only arise when writing; a
# permission error may come from reading (another user's 0600 file) as well as writing.
_SPACE = ("free space or choose another --workdir / --cache_dir, then run the same command "
          "to resume")
_ACCESS = ("check the permissions of that file and its folders, or choose another --workdir "
           "/ --cache_dir")
STORAGE_ERRNOS = {
    errno.ENOSPC: ("the disk is full writing", _SPACE),
    errno.EDQUOT: ("the disk quota is exceeded writing", _SPACE),
    errno.EROFS: ("the file system is read-only: cannot write", _SPACE),
    errno.EACCES: ("permission denied reading or writing", _ACCESS),
    errno.EPERM: ("permission denied reading or writing", _ACCESS),
    errno.ENOTDIR: ("a part of the path is a file, not a folder:", _ACCESS),
}


# TensorStore (under orbax) reports OS errors inside its own messages, e.g. `Error writing
# local file "PATH": ... No space left on device [os_error_code='28']`.
_TENSORSTORE_ERRNO = re.compile(r"\[os_error_code='(\d+)'\]")
_TENSORSTORE_FILE = re.compile(r'local file "([^"]+)"')


class UserError(Exception):
  """A problem the user can fix (bad file, bad flag, inconsistent workdir)."""


def _causes(error: BaseException):
  """The exception and what caused it: `raise ... from` links, and an implicit context
  only when the outer message repeats the inner one (a library wrapping the error it
  caught), never an unrelated exception that merely happened while handling another."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    if error.__cause__ is not None:
      error = error.__cause__
    elif (error.__context__ is not None and not error.__suppress_context__
          and str(error.__context__) and str(error.__context__) in str(error)):
      error = error.__context__
    else:
      error = None


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
  """Writes to an open file fail without a file name (`f.write` on a full disk raises a bare
  OSError(ENOSPC)): inside this block such an error gets `path` as its file name, so that
  the one line the user sees says which file, hence which disk."""
  try:
    yield
  except OSError as e:
    if e.filename is not None or e.errno is None:
      raise
    raise type(e)(e.errno, e.strerror, os.fspath(path)) from e


def storage_error_message(error: BaseException) -> str | None:
  """One line for a full disk, a read-only file system or a permission problem that caused
  `error` (checkpoint libraries wrap the OSError in their own exceptions); None otherwise.
  The file is named when the error or a cause of it names one; otherwise the line says "a
  file" (a library's write to an open file)."""
  best = None   # (errno, file name or None, text): the first that names its file wins
  for cause in _causes(error):
    if isinstance(cause, OSError):
      code, filename, strerror = cause.errno, cause.filename, cause.strerror
    else:
      match = _TENSORSTORE_ERRNO.search(str(cause))
      if match is None:
        continue
      code = int(match.group(1))
      where = _TENSORSTORE_FILE.search(str(cause))
      filename, strerror = (where.group(1) if where else None), os.strerror(code)
    if code in STORAGE_ERRNOS and (best is None or best[1] is None):
      best = (code, filename, strerror)
  if best is None:
    return None
  code, filename, strerror = best
  what, advice = STORAGE_ERRNOS[code]
  if filename:
    what = f"{what} {filename}"
  elif what.endswith(("write", "writing")):
    what = f"{what} a file"
  return f"{what.rstrip(':')} ({strerror}); {advice}"
