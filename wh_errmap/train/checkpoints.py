"""A model's checkpoints: the orbax manager, an integrity record per checkpoint, and a
restore that moves aside only what is shown to be damaged.

Every checkpoint folder gets `wh_errmap_manifest.json` once orbax has finished writing it:
the size and CRC-32 of each of its files. When a checkpoint does not restore, the record
tells damage (a file missing, shorter, longer or with other bytes) from everything else
(out of memory, another jax/orbax version, another device layout or model, a file system
that failed for a moment). Only damage moves the checkpoint aside, to
`<model>/corrupt_checkpoints/<step>` (never over an earlier one); anything else stops with
one line and leaves every checkpoint where it is. A checkpoint without a record (written
before records existed, or killed between orbax's rename and the record) counts as damaged
only for errors that themselves show damage: a missing file, or a read or decode error.
"""
from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from absl import logging

from wh_errmap.errors import UserError
from wh_errmap.train.state import create_state, make_optimizer
from wh_errmap.utils.atomic import write_json
from wh_errmap.utils.mesh import make_mesh
from wh_errmap.utils.progress import console

MANIFEST = "wh_errmap_manifest.json"
QUARANTINE = "corrupt_checkpoints"
# In QUARANTINE: the quarantined checkpoints a user chose to train past (--overwrite).
ACKNOWLEDGED = "acknowledged.json"
Progress = Callable[[str], None]

# Errors that show the files are damaged, for checkpoints without a record.
_DAMAGE_TYPES = (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, EOFError,
                 zlib.error)
_DAMAGE_WORDS = ("DATA_LOSS", "OUT_OF_RANGE: Error reading", "FAILED_PRECONDITION: Error reading",
                 "checksum", "corrupt", "truncated")
# Errors that are never damage, whatever else the message says.
_NOT_DAMAGE_TYPES = (MemoryError,)
_NOT_DAMAGE_WORDS = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory")


class CheckpointRestoreError(UserError):
  """A checkpoint could not be restored for a reason other than damage; nothing was moved."""


def checkpoint_manager(directory: Path, keep: int, read_only: bool = False,
                       ) -> ocp.CheckpointManager:
  """Orbax's manager of `directory` (items "state" and "data").

  A writing manager removes the temporary folders of saves that were killed
  (cleanup_tmp_directories); a read-only one changes nothing on disk.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else keep, save_interval_steps=0 if read_only else 1,
      create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only)
  # Orbax logs a warning whenever it opens a folder read-only: noise on a one-line error.
  verbosity = logging.get_verbosity()
  if read_only:
    logging.set_verbosity(logging.ERROR)
  try:
    return ocp.CheckpointManager(Path(directory).absolute(), item_names=("state", "data"),
                                 options=options)
  finally:
    logging.set_verbosity(verbosity)


def _files(step_dir: Path) -> dict[str, tuple[int, int]]:
  """{relative path: (size, crc32)} of every file of a checkpoint but its record."""
  out = {}
  for path in sorted(step_dir.rglob("*")):
    if path.is_file() and path.name != MANIFEST:
      crc = 0
      with path.open("rb") as f:
        while chunk := f.read(1 << 20):
          crc = zlib.crc32(chunk, crc)
      out[str(path.relative_to(step_dir))] = (path.stat().st_size, crc)
  return out


def write_manifest(step_dir: Path) -> None:
  """Records the size and CRC-32 of every file of a finished checkpoint (atomically)."""
  write_json(step_dir / MANIFEST, {name: list(v) for name, v in _files(step_dir).items()})


def check_manifest(step_dir: Path) -> str | None:
  """What is damaged in a checkpoint according to its record ("" when it matches); None
  when it has no readable record."""
  try:
    recorded = json.loads((step_dir / MANIFEST).read_text())
  except (OSError, ValueError):
    return None
  found = _files(step_dir)
  for name, (size, crc) in recorded.items():
    if name not in found:
      return f"{name} is missing"
    if found[name][0] != size:
      return f"{name} has {found[name][0]} bytes, {size} were written"
    if found[name][1] != crc:
      return f"{name} has other bytes than were written (CRC-32 differs)"
  return ""


def _chain(error: BaseException) -> list[BaseException]:
  chain, seen = [], set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    chain.append(error)
    error = error.__cause__ or error.__context__
  return chain


def shows_damage(error: BaseException) -> bool:
  """Whether a restore error shows damaged files (used without a record)."""
  chain = _chain(error)
  text = " ".join(str(e) for e in chain)
  if any(isinstance(e, _NOT_DAMAGE_TYPES) for e in chain) or any(
      w in text for w in _NOT_DAMAGE_WORDS):
    return False
  return any(isinstance(e, _DAMAGE_TYPES) for e in chain) or any(w in text for w in _DAMAGE_WORDS)


def _reason(error: BaseException) -> str:
  """The most telling line of an exception chain (the innermost message)."""
  for e in reversed(_chain(error)):
    text = str(e).strip()
    if text:
      return f"{type(e).__name__}: {text.splitlines()[0][:300]}"
  return type(error).__name__


def quarantine(directory: Path, step: int) -> Path:
  """Moves checkpoint `step` to <model>/corrupt_checkpoints/<step> (or <step>.2, .3, ...:
  an earlier quarantined copy is never replaced). Returns where it went."""
  root = directory.parent / QUARANTINE
  aside, n = root / str(step), 1
  while aside.exists():
    n += 1
    aside = root / f"{step}.{n}"
  if jax.process_index() == 0:   # the checkpoint folder is shared by all processes
    root.mkdir(parents=True, exist_ok=True)
    shutil.move(str(directory / str(step)), aside)
  return aside


def restore_latest(directory: str | Path, state: Any, progress: Progress = console, *,
                   read_only: bool = False, allow_restart: bool = False,
                   ) -> tuple[Any, dict | None, int | None]:
  """(state, iterator state, step) of the newest restorable checkpoint, or (state, None,
  None) when there is none.

  A damaged checkpoint (see the module doc) is reported through `progress` and moved aside
  (read_only: left in place), and the next older one is tried. Any other restore failure
  raises CheckpointRestoreError and moves nothing. When checkpoints existed but all were
  damaged (now, or quarantined earlier and not yet trained past), a UserError stops the run,
  since starting from step 0 would silently discard its training; allow_restart
  (--overwrite) starts afresh instead and records that choice in the quarantine folder.
  """
  directory = Path(directory)
  if not directory.exists():
    return state, None, None
  damaged = []
  with checkpoint_manager(directory, keep=1_000_000, read_only=read_only) as manager:
    steps = sorted(manager.all_steps(), reverse=True)
    for step in steps:
      step_dir = directory / str(step)
      problem = check_manifest(step_dir)
      if not problem:
        try:
          restored = manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(_abstract(state)), data=ocp.args.JsonRestore()))
          return restored.state, restored.data, step
        # Orbax and TensorStore raise many exception types; the record or the error
        # itself tells damage from the rest.
        except Exception as e:  # noqa: BLE001
          if problem == "" or not shows_damage(e):
            intact = "its files are as written; " if problem == "" else ""
            raise CheckpointRestoreError(
                f"cannot restore the checkpoint {step_dir} ({intact}{_reason(e)}). Nothing "
                f"was moved: this is not damage but, e.g., out of memory, another jax/orbax "
                f"version, or other model or device settings than those it was written "
                f"with. Fix the cause and run the same command again") from None
          problem = _reason(e)
      if read_only:
        progress(f"warning: checkpoint {step_dir} is damaged ({problem}); left in place, "
                 f"using the previous one")
      else:
        aside = quarantine(directory, step)
        progress(f"warning: checkpoint {step_dir} is damaged ({problem}); moved to {aside}, "
                 f"using the previous one")
        manager.reload()
      damaged.append(step)
  if read_only:
    if damaged:
      raise UserError(f"no checkpoint of {directory} can be restored: {len(damaged)} damaged "
                      f"one(s) ({', '.join(map(str, damaged))}), left in place; train the "
                      f"model again")
    return state, None, None
  lost = _unacknowledged(directory.parent / QUARANTINE)
  if lost and not allow_restart:
    raise UserError(f"no checkpoint of {directory} can be restored and {len(lost)} damaged "
                    f"one(s) ({', '.join(lost)}) are in {directory.parent / QUARANTINE}: "
                    f"starting from step 0 would discard that training. Run with "
                    f"--overwrite to train this model from scratch")
  if lost and jax.process_index() == 0:
    write_json(directory.parent / QUARANTINE / ACKNOWLEDGED, sorted(
        set(lost) | set(_acknowledged(directory.parent / QUARANTINE))))
  return state, None, None


def restore_variables(directory: str | Path, model: Any, optim: Any, num_steps: int,
                      input_shape: tuple[int, ...], progress: Progress = console,
                      ) -> tuple[dict[str, Any] | None, int | None]:
  """A trained model's variables {"params", "batch_stats"} and step from its newest
  restorable checkpoint, read-only (nothing in the run changes), on one device; (None, None)
  when it has none. optim, num_steps: the optimizer config and schedule it was trained with
  (the checkpoint holds the optimizer's state); input_shape: (N, *spatial, C) of its input."""
  template = create_state(model, make_optimizer(optim, num_steps), input_shape,
                          jax.random.key(0), make_mesh(jax.devices()[:1]))
  state, _, step = restore_latest(directory, template, progress, read_only=True)
  if step is None:
    return None, None
  return {"params": state.params, "batch_stats": state.batch_stats}, step


def _acknowledged(root: Path) -> list[str]:
  try:
    return list(json.loads((root / ACKNOWLEDGED).read_text()))
  except (OSError, ValueError):
    return []


def _unacknowledged(root: Path) -> list[str]:
  """Quarantined checkpoints (folder names) that no --overwrite run has trained past."""
  if not root.is_dir():
    return []
  done = set(_acknowledged(root))
  return sorted((p.name for p in root.iterdir() if p.is_dir() and p.name not in done),
                key=lambda name: [int(x) for x in name.split(".") if x.isdigit()], reverse=True)


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
