"""Catching SIGTERM/SIGINT for the length of a `with` block, in the main thread.

Long work (training, the folds of a cross-validation) turns these signals into a flag it
reads at safe points instead of dying in the middle of a write. Elsewhere than in the main
thread, Python cannot set handlers, and signals keep theirs.
"""
from __future__ import annotations

import signal
import threading
from typing import Any

from wh_errmap.errors import UserError


class Interrupted(UserError):
  """SIGTERM/SIGINT stopped long work at a safe point (a checkpoint saved, the folds
  stopped); the message says how to resume. exit_code is 128 + signal, as a shell reports
  a process killed by it."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.exit_code = 128 + signum


class CaughtSignals:
  """Base: installs `self._handle` for SIGNALS on entry, restores the handlers on exit.

  Subclasses define `_handle(signum, frame)`; `signum` holds the first signal caught.
  """
  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}

  def _handle(self, signum: int, frame: Any) -> None:
    raise NotImplementedError

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
