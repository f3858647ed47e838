"""Running the folds of a cross-validation as child processes, on device groups of one host.

`experiments/cv.py` drives it: every fold is one `launch.py --experiment=cv_fold` process
with the run's whole config spelled out as `--set` flags, its output in
`WORKDIR/logs/fold{k}.log`. This module plans which devices each child sees, starts the
children (several at once on a host with several GPUs), reports their progress on one line,
forwards SIGINT/SIGTERM to them, and collects how each one ended; a crash in one fold never
stops the others.

The parent process must not start a JAX backend itself (on a GPU, JAX takes most of the
memory at first use and the children would starve): devices are counted by a short probe
subprocess, and nothing here imports jax.
"""
from __future__ import annotations

import ast
import copy
import ctypes
import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import ml_collections

from wh_errmap.errors import UserError
from wh_errmap.progress import console
from wh_errmap.signals import CaughtSignals

Progress = Callable[[str], None]
CV_BLOCK = "cv"
TAIL_LINES = 15   # log lines shown for a failed fold

_PROBE = ("import json, jax; d = jax.local_devices(); print(json.dumps({"
          "'backend': jax.default_backend(), 'count': len(d), "
          "'version': str(getattr(d[0].client, 'platform_version', ''))}))")


# ---------------------------------------------------------------------------- fold configs

def fold_config(config: ml_collections.ConfigDict, fold: int | None = None,
                ) -> ml_collections.ConfigDict:
  """The cv_fold config inside a cv config: a copy without the `cv` block.

  With `fold`, the config of that fold's child: `fold` set and `overwrite` off (the parent
  has already moved an old run aside; a child must never do it while others run).
  """
  child = copy.deepcopy(config)
  if CV_BLOCK in child:
    del child[CV_BLOCK]
  if fold is not None:
    child.fold = fold
    if "overwrite" in child:
      child.overwrite = False
  return child


def _leaves(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[tuple[str, Any]]:
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def config_assignments(config: ml_collections.ConfigDict) -> list[str]:
  """`FIELD=VALUE` for every leaf of `config`, VALUE as a Python literal (what
  `experiments.override` parses); a value that would not come back equal is refused."""
  assignments = []
  for name, value in _leaves(config):
    text = repr(value)
    try:
      same = ast.literal_eval(text) == value
    except (ValueError, SyntaxError):
      same = False
    if not same:
      raise UserError(f"config field {name} = {text} cannot be passed to a fold's process "
                      f"as a Python literal; choose a plain value")
    assignments.append(f"{name}={text}")
  return assignments


def fold_command(launcher: Sequence[str], experiment: str, config: ml_collections.ConfigDict,
                 fold: int, workdir: str | os.PathLike) -> list[str]:
  """argv of the child that runs `fold`: `launcher --experiment=... --fold=k --workdir=W`
  and one `--set` per leaf of the fold's config, so the child computes with exactly the
  parent's settings whatever fields the config has."""
  return [*launcher, f"--experiment={experiment}", f"--fold={fold}", f"--workdir={workdir}",
          *(f"--set={a}" for a in config_assignments(fold_config(config, fold)))]


def selected_folds(folds: Any, num_folds: int) -> tuple[int, ...]:
  """cv.folds (None = all, an int, or a sequence of ints) as sorted fold indices."""
  if folds is None:
    return tuple(range(num_folds))
  chosen = (folds,) if isinstance(folds, int) else tuple(folds)
  if not chosen or any(not isinstance(k, int) or not 0 <= k < num_folds for k in chosen):
    raise UserError(f"cv.folds = {folds!r}: expected fold indices in 0..{num_folds - 1} "
                    f"(splits.num_folds = {num_folds}), or None for all")
  return tuple(sorted(set(chosen)))


# ---------------------------------------------------------------------------- devices

@dataclasses.dataclass(frozen=True)
class Devices:
  """The accelerators the children would see."""
  backend: str                # "cpu", "gpu" or "tpu"
  count: int                  # local devices
  visible_env: str | None     # variable that restricts a process to some of them, if any
  ids: tuple[str, ...] = ()   # values for visible_env, one per device


@dataclasses.dataclass(frozen=True)
class Slot:
  """One device group: a child runs with `env` added to its environment."""
  env: Mapping[str, str]
  label: str                  # for messages, e.g. "GPU 2,3" or "all CPU devices"
  devices: int = 1            # how many devices a child on this slot sees


def devices_from_probe(backend: str, count: int, version: str,
                       environ: Mapping[str, str]) -> Devices:
  """Devices from what the probe printed. GPU ids respect a CUDA_VISIBLE_DEVICES (or
  HIP_VISIBLE_DEVICES on ROCm) the user already set: groups are subsets of it."""
  if backend not in ("gpu", "cuda", "rocm"):
    return Devices(backend, count, None)
  rocm = backend == "rocm" or "rocm" in version.lower()
  variable = "HIP_VISIBLE_DEVICES" if rocm else "CUDA_VISIBLE_DEVICES"
  given = [d.strip() for d in environ.get(variable, "").split(",") if d.strip()]
  ids = tuple(given[:count]) if len(given) >= count else tuple(map(str, range(count)))
  return Devices("gpu", count, variable, ids)


def probe_devices(environ: Mapping[str, str] | None = None, timeout_s: float = 300) -> Devices:
  """Counts the devices a child would see, in a short subprocess (JAX_PLATFORMS and the
  visible-device variables are inherited), so this process starts no backend."""
  environ = dict(os.environ if environ is None else environ)
  # The probe exits at once; it need not reserve GPU memory meanwhile.
  probe_env = {**environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
  try:
    result = subprocess.run([sys.executable, "-c", _PROBE], env=probe_env, capture_output=True,
                            text=True, timeout=timeout_s)
  except subprocess.TimeoutExpired:
    raise UserError(f"counting the devices (python -c 'import jax; ...') took over "
                    f"{timeout_s:.0f} s") from None
  lines = result.stdout.strip().splitlines()
  if result.returncode != 0 or not lines:
    tail = " | ".join(result.stderr.strip().splitlines()[-3:])
    raise UserError(f"JAX could not start to count the devices (exit status "
                    f"{result.returncode}): {tail}")
  found = json.loads(lines[-1])
  return devices_from_probe(found["backend"], found["count"], found["version"], environ)


def device_slots(devices: Devices, num_folds: int, devices_per_fold: Any = "auto",
                 concurrent: Any = "auto") -> list[Slot]:
  """The device groups folds run on; as many folds run at once as there are groups.

  GPUs: groups of `devices_per_fold` devices ("auto": max(1, devices // num_folds)), at
  most `concurrent` of them ("auto": as many as fit, at most num_folds). CPU and TPU: one
  group with every device (folds one after another) unless `concurrent` forces more
  (CPU only: the processes then share the cores; a TPU's chips are not split here).
  """
  if concurrent != "auto" and (not isinstance(concurrent, int) or concurrent < 1):
    raise UserError(f"cv.concurrent = {concurrent!r}: expected 'auto' or a number >= 1")
  if devices.visible_env is None:
    if concurrent != "auto" and concurrent > 1 and devices.backend != "cpu":
      raise UserError(f"cv.concurrent = {concurrent}: folds cannot share the "
                      f"{devices.backend.upper()} devices of one host; use 'auto' (one fold "
                      f"at a time with all devices)")
    slots = 1 if concurrent == "auto" else concurrent
    label = f"all {devices.count} {devices.backend.upper()} device(s)"
    return [Slot({}, label, devices.count) for _ in range(slots)]
  if devices_per_fold == "auto":
    per_fold = max(1, devices.count // max(1, num_folds))
  elif isinstance(devices_per_fold, int) and 1 <= devices_per_fold <= devices.count:
    per_fold = devices_per_fold
  else:
    raise UserError(f"cv.devices_per_fold = {devices_per_fold!r}: expected 'auto' or a "
                    f"number in 1..{devices.count} (the GPUs this host shows)")
  slots = min(devices.count // per_fold, max(1, num_folds))
  if concurrent != "auto":
    slots = min(slots, concurrent)
  groups = [devices.ids[i * per_fold:(i + 1) * per_fold] for i in range(slots)]
  return [Slot({devices.visible_env: ",".join(g)}, f"GPU {','.join(g)}", len(g)) for g in groups]


def describe_slots(slots: Sequence[Slot], num_folds: int) -> str:
  """e.g. "2 at a time: GPU 0,1 | GPU 2,3" or "one after another on all 1 CPU device(s)"."""
  used = slots[:num_folds]
  if len(used) == 1:
    return f"one after another on {used[0].label}"
  if len({s.label for s in used}) == 1:
    return f"{len(used)} at a time, sharing {used[0].label}"
  return f"{len(used)} at a time: {' | '.join(s.label for s in used)}"


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


class FoldsInterrupted(UserError):
  """SIGINT/SIGTERM stopped the run after the running folds stopped; exit_code 128 + signal."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.exit_code = 128 + signum


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
  no fold starts after, and FoldsInterrupted is raised once they have all stopped.
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
    raise FoldsInterrupted(
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
