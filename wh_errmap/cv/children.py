"""Running the folds of a cross-validation as child processes, on device groups of one host.

`experiments/cv.py` drives it (the commands: `cv.commands`; the device groups:
`cv.devices`). This module starts the children (several at once on a host with several
GPUs), each with its output in `WORKDIR/logs/fold{k}.log`, reports their progress on one
line, forwards SIGINT/SIGTERM to them, and collects how each one ended; a crash in one fold
never stops the others. Nothing here imports jax (see `cv.devices`).
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

from wh_errmap.cv.devices import Slot
from wh_errmap.utils.progress import console
from wh_errmap.utils.signals import CaughtSignals, Interrupted

Progress = Callable[[str], None]
TAIL_LINES = 15   # log lines shown for a failed fold


# ---------------------------------------------------------------------------- progress

_TAGGED = re.compile(r"^\[([\w-]+)\] (.*)$")
_STEP = re.compile(r"\bstep (\d+/\d+)")
_COUNT = re.compile(r"^[^(]*\((\d+/\d+)\)")


def fold_progress(log_text: str) -> str:
  """Where a fold is, from its log: the newest `[model] ...` line, with its `step i/n` (or
  `(i/n)` for the evaluation) when it has one, e.g. "seg3d 1200/20000"; "starting" before."""
  for line in reversed(log_text.splitlines()):
    tagged = _TAGGED.match(line.strip())
    if tagged:
      model, rest = tagged.groups()
      count = _STEP.search(rest) or _COUNT.match(rest)
      return f"{model} {count.group(1)}" if count else model
  return "starting"


def progress_line(states: Mapping[int, str]) -> str:
  """e.g. `cv: fold0 seg3d 1200/20000 | fold1 done | fold2 waiting`."""
  return "cv: " + " | ".join(f"fold{k} {state}" for k, state in sorted(states.items()))


def _read_from(path: Path, offset: int, max_bytes: int = 64 * 1024) -> str:
  """The text of `path` after `offset` (at most its last `max_bytes`)."""
  try:
    with path.open("rb") as f:
      size = f.seek(0, os.SEEK_END)
      f.seek(max(offset, size - max_bytes))
      return f.read().decode(errors="replace")
  except OSError:
    return ""


def _minutes(seconds: float) -> str:
  return f"{seconds / 60:.1f} min"


# ---------------------------------------------------------------------------- running

@dataclasses.dataclass
class FoldResult:
  fold: int
  status: str            # "done", "failed" or "interrupted" (stopped by a forwarded signal)
  returncode: int
  wall_s: float
  log: Path
  tail: str = ""         # the last lines this run wrote to the log (failed folds)

  def how(self) -> str:
    """How the process ended, in words."""
    if self.returncode < 0:
      name = signal.Signals(-self.returncode).name
      hint = " (out of memory?)" if -self.returncode == signal.SIGKILL else ""
      return f"killed by {name}{hint}"
    return f"exit status {self.returncode}"


class _ForwardedSignals(CaughtSignals):
  """Counts SIGINT/SIGTERM while folds run, instead of dying (in the main thread; elsewhere
  signals keep their handlers)."""
  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self):
    super().__init__()
    self.count = 0

  def _handle(self, signum, frame):
    self.signum = self.signum or signum
    self.count += 1


_PRCTL = ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def _stop_with_parent() -> None:
  """In the child before exec: SIGTERM when the parent dies (Linux), so a killed parent
  leaves no fold running unattended (it saves a checkpoint and exits)."""
  if _PRCTL is not None:
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclasses.dataclass
class _Child:
  fold: int
  process: subprocess.Popen
  slot: int
  start: float
  log: Path
  offset: int     # where this run's output starts in the log


def _start(fold: int, command: Sequence[str], slot: Slot, slot_index: int,
           log: Path) -> _Child:
  env = {**os.environ, **slot.env, "PYTHONUNBUFFERED": "1"}
  with log.open("ab") as out:
    settings = "".join(f"{k}={v} " for k, v in slot.env.items())
    out.write(f"\n=== cv: fold {fold} started {time.strftime('%Y-%m-%d %H:%M:%S')} on "
              f"{slot.label}: {settings}{shlex.join(command)}\n".encode())
    out.flush()
    offset = out.tell()
    # Its own session: a Ctrl-C in the terminal reaches only the parent, which forwards it
    # once (a second signal would make the child stop without a checkpoint).
    process = subprocess.Popen(list(command), stdin=subprocess.DEVNULL, stdout=out,
                               stderr=subprocess.STDOUT, env=env, start_new_session=True,
                               preexec_fn=_stop_with_parent)
  return _Child(fold, process, slot_index, time.monotonic(), log, offset)


def run_folds(commands: Mapping[int, Sequence[str]], slots: Sequence[Slot], log_dir: Path,
              progress_every_s: float = 30.0, progress: Progress = console,
              poll_s: float = 0.5) -> dict[int, FoldResult]:
  """Runs each fold's command, as many at once as there are slots, each with its slot's env.

  Output goes to `log_dir/fold{k}.log` (appended). Prints a start and a finish line per fold
  and `progress_line` whenever a fold starts or ends and every `progress_every_s` seconds.
  A failed fold (any exit status but 0, or killed) is recorded and the others go on.
  SIGINT/SIGTERM are forwarded to the running folds (a second one too: they stop at once),
  no fold starts after, and Interrupted is raised once they have all stopped.
  Returns the result of every fold.
  """
  log_dir.mkdir(parents=True, exist_ok=True)
  waiting = list(commands)
  free = list(range(len(slots)))
  running: dict[int, _Child] = {}
  results: dict[int, FoldResult] = {}
  forwarded, last_line = 0, -float("inf")
  with _ForwardedSignals() as stop:
    try:
      while running or (waiting and stop.signum is None):
        changed = False
        if stop.count > forwarded:
          for child in running.values():
            child.process.send_signal(stop.signum)
          if not forwarded:
            progress(f"cv: {signal.Signals(stop.signum).name}: stopping the running folds "
                     f"(they save a checkpoint; again to stop at once)")
          forwarded = stop.count
        while waiting and free and stop.signum is None:
          fold, slot = waiting.pop(0), free.pop(0)
          log = log_dir / f"fold{fold}.log"
          running[fold] = _start(fold, commands[fold], slots[slot], slot, log)
          progress(f"cv: fold{fold} started on {slots[slot].label} (log: {log})")
          changed = True
        for fold, child in list(running.items()):
          returncode = child.process.poll()
          if returncode is None:
            continue
          del running[fold]
          free.append(child.slot)
          results[fold] = _finished(child, returncode, stop.signum, progress)
          changed = True
        now = time.monotonic()
        if changed or now - last_line >= progress_every_s:
          states = {k: "waiting" for k in waiting}
          states.update({k: _state_word(r) for k, r in results.items()})
          states.update({k: fold_progress(_read_from(c.log, c.offset))
                         for k, c in running.items()})
          progress(progress_line(states))
          last_line = now
        if running or waiting:
          time.sleep(poll_s)
    finally:
      for child in running.values():   # only after an error in this loop itself
        child.process.terminate()
      for child in running.values():
        child.process.wait()
  if stop.signum is not None:
    stopped = ", ".join(str(k) for k, r in sorted(results.items()) if r.status != "done")
    unstarted = f", fold(s) {', '.join(map(str, waiting))} not started" if waiting else ""
    raise Interrupted(
        f"interrupted by {signal.Signals(stop.signum).name}: fold(s) {stopped or 'none'} "
        f"stopped (a fold in training saves a checkpoint first){unstarted}; run the same "
        f"command again to resume", stop.signum)
  return results


def _finished(child: _Child, returncode: int, signum: int | None,
              progress: Progress) -> FoldResult:
  wall = time.monotonic() - child.start
  if returncode == 0:
    progress(f"cv: fold{child.fold} done in {_minutes(wall)}")
    return FoldResult(child.fold, "done", 0, wall, child.log)
  status = "interrupted" if signum is not None else "failed"
  lines = _read_from(child.log, child.offset).rstrip().splitlines()
  result = FoldResult(child.fold, status, returncode, wall, child.log,
                      "\n".join(lines[-TAIL_LINES:]))
  progress(f"cv: fold{child.fold} {status.upper()} after {_minutes(wall)} ({result.how()}; "
           f"log: {child.log})")
  return result


def _state_word(result: FoldResult) -> str:
  return {"done": "done", "failed": "FAILED", "interrupted": "stopped"}[result.status]


def failure_message(failed: Sequence[FoldResult], report: str) -> str:
  """The error for folds that did not finish: which, how, their log's tail and where it is."""
  names = ", ".join(str(r.fold) for r in failed)
  parts = [f"{len(failed)} fold(s) failed: {names}; {report}. Fix the cause and run the same "
           f"command again: finished folds and stages are not redone"]
  for r in failed:
    tail = "\n".join(f"    {line}" for line in r.tail.splitlines())
    parts.append(f"fold {r.fold} ({r.how()} after {_minutes(r.wall_s)}), last lines of "
                 f"{r.log}:\n{tail}")
  return "\n".join(parts)
