"""The training loop shared by the segmentors and the predictor.

Per model, under `workdir/<name>/`:
    checkpoints/<step>/   orbax checkpoints: train state + input-iterator state
    metrics.jsonl         one JSON object per logged step

A run started again with the same workdir resumes from the newest checkpoint (state and
data order) and continues to the same final step, with the same result as an uninterrupted
run; a finished run only restores.

Faults:
- Orbax writes each checkpoint into a temporary folder and renames it when complete, so a
  kill never leaves a half-written checkpoint under a step's name; the temporary folders of
  killed saves are removed at the next start. Each finished checkpoint gets an integrity
  record (train/checkpoints.py): a damaged one is reported, moved to
  `<model>/corrupt_checkpoints/`, and the next older one is used; a checkpoint that fails
  to restore for any other reason stops the run with one line and nothing is moved.
- SIGTERM or SIGINT (Ctrl-C) stop training at the next step boundary with a checkpoint, then
  raise Interrupted; a second signal stops at once.
- A non-finite loss (checked at every logged step) or non-finite parameters (checked before
  every checkpoint) raise TrainingDivergedError; no non-finite state is ever saved.
"""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import multihost
from jax.experimental import multihost_utils

from wh_errmap.errors import UserError, naming
from wh_errmap.train.checkpoints import checkpoint_manager, restore_latest, write_manifest
from wh_errmap.train.state import TrainState
from wh_errmap.train.steps import StepFn
from wh_errmap.utils.atomic import write_text
from wh_errmap.utils.mesh import batch_shardings, global_batch, replicated
from wh_errmap.utils.progress import console
from wh_errmap.utils.signals import CaughtSignals, Interrupted

Progress = Callable[[str], None]
MakeBatch = Callable[[Any, Any], Any]


class TrainingDivergedError(UserError):
  """The loss or the parameters became NaN or Inf."""


class _StopSignals(CaughtSignals):
  """Turns SIGTERM/SIGINT into a flag read at step boundaries (main thread only).

  A second signal while the flag is set restores the previous handlers and re-raises the
  signal, so a stuck save can still be interrupted.
  """

  def _handle(self, signum, frame):
    if self.signum is not None:
      self.__exit__()
      signal.raise_signal(signum)
      return
    self.signum = signum


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  return jax.tree.reduce(lambda a, b: a & b,
                         jax.tree.map(lambda x: jax.numpy.isfinite(x).all(), tree),
                         jax.numpy.bool_(True))


def _iterator_states(iterator: Any) -> dict[str, Any]:
  """Every process's input-iterator state, {"process_<i>": state}, for one checkpoint.

  Orbax writes a JSON item from the primary process only, while each process reads its
  own shard of the data: the states are gathered so that each process resumes its own.
  """
  local = iterator.get_state()
  if jax.process_count() == 1:
    return {"process_0": local}
  encoded = np.frombuffer(json.dumps(local).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.int32(encoded.size))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:encoded.size] = encoded
  gathered = multihost_utils.process_allgather(padded)
  return {f"process_{i}": json.loads(bytes(gathered[i][:sizes[i]]).decode())
          for i in range(jax.process_count())}


def _own_iterator_state(states: dict[str, Any]) -> Any:
  if jax.process_count() == 1 and not any(k.startswith("process_") for k in states):
    return states   # a single-process checkpoint written before states were gathered
  key = f"process_{jax.process_index()}"
  if key not in states:
    raise UserError(f"the checkpoint holds input states for {len(states)} process(es), not "
                    f"for process {jax.process_index()}: resume with the same process count")
  return states[key]


def _metric_step(line: str) -> int | None:
  """The step of one metrics.jsonl line; None for a line that is not a whole record (the
  partial last line of a write cut short by a full disk or a kill)."""
  try:
    record = json.loads(line)
  except ValueError:
    return None
  step = record.get("step") if isinstance(record, dict) else None
  return step if isinstance(step, int) else None


def _trim_metrics(path: Path, last_step: int, progress: Progress) -> None:
  """Keeps the records up to the checkpoint we resume from (later ones will be redone) and
  drops lines that are not whole records; the file is replaced atomically."""
  if not path.exists():
    return
  lines = path.read_text(errors="replace").splitlines()
  steps = [_metric_step(line) for line in lines]
  broken = sum(1 for line, step in zip(lines, steps) if line.strip() and step is None)
  if broken:
    progress(f"warning: {path}: dropped {broken} line(s) that are not whole records")
  write_text(path, "".join(line + "\n" for line, step in zip(lines, steps)
                           if step is not None and step <= last_step))


def _format_eta(seconds: float) -> str:
  minutes, secs = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _stop_requested(stop: _StopSignals) -> bool:
  """Whether any process got a stop signal. With several processes the flags are combined
  (an all-gather, so every process must call this at the same steps) so that all stop, and
  save, at the same step."""
  if jax.process_count() == 1:
    return stop.signum is not None
  flags = multihost_utils.process_allgather(np.int32(stop.signum or 0))
  if stop.signum is None and flags.max() > 0:
    stop.signum = int(flags.max())
  return bool(flags.max() > 0)


def _barrier(key: str, timeout_s: int = 3600) -> None:
  """Waits until every process reaches `key` (no-op with one process).

  Processes finish compiling a step at different times, and gloo gives up on the first
  collective inside the step if a peer is still compiling 30 s later. This barrier runs in
  the distributed coordination service, with its own long timeout, not in a collective:
  orbax's barrier does so when given the processes explicitly (without them it falls back
  to jax's sync_global_devices, a collective).
  """
  if jax.process_count() > 1:
    multihost.sync_global_processes(key, timeout=timeout_s,
                                    processes=set(range(jax.process_count())))


def compile_step(step_fn: StepFn, mesh: jax.sharding.Mesh, batch: Any, *, with_frozen: bool,
                 make_batch: MakeBatch | None = None) -> Callable:
  """The jitted step the loop runs: `(state, batch, base_rng, frozen, device_data) ->
  (state, metrics)`.

  The state is donated and replicated; the batch is laid out by `batch_shardings` (rows
  over 'data', volumes along X over 'space'); `batch` gives its structure and shapes. The
  step's randomness is `fold_in(base_rng, state.step)`, so it depends only on (seed, step)
  and a resumed run matches. frozen is None for steps without frozen models.

  make_batch: for batches made on the device, `(device_data, batch) -> batch`: the loop's
  batch is then what the input stream yields (e.g. the crop parameters of
  data.device_crops) and device_data the replicated arrays it draws from; the batch it
  makes is laid out like a host batch. None: batches come from the host, device_data is
  None.
  """
  def step_with_rng(state, batch, base_rng, frozen, device_data):
    if make_batch is not None:
      batch = make_batch(device_data, batch)
      batch = jax.lax.with_sharding_constraint(batch, batch_shardings(mesh, batch))
    rng = jax.random.fold_in(base_rng, state.step)
    return step_fn(state, batch, rng, frozen) if with_frozen else step_fn(state, batch, rng)

  return jax.jit(step_with_rng, donate_argnums=0,
                 in_shardings=(replicated(mesh), batch_shardings(mesh, batch), replicated(mesh),
                               replicated(mesh), replicated(mesh)),
                 out_shardings=(replicated(mesh), replicated(mesh)))


def train(name: str, workdir: str | Path, *, state: TrainState, step_fn: StepFn,
          dataset: Any, mesh: jax.sharding.Mesh, num_steps: int, seed: int,
          log_every: int = 50, checkpoint_every: int = 500, keep_checkpoints: int = 3,
          stop_at: int | None = None, frozen: Any = None, device_data: Any = None,
          make_batch: MakeBatch | None = None, allow_restart: bool = False,
          progress: Progress = console) -> TrainState:
  """Trains `state` to `num_steps`, resuming from `workdir/name/checkpoints` if present.

  dataset: a grain IterDataset of this process's batches (NumPy pytrees).
  step_fn: `(state, batch, rng) -> (state, metrics)`; metrics must hold "loss".
  frozen: a pytree passed to every step after rng and never updated (the predictor's
    frozen segmentors), replicated over the mesh; None for steps without it.
  stop_at: end this run after that step (with a checkpoint) although the schedule runs to
    num_steps; a later run resumes there.
  device_data, make_batch: batches made on the device (see compile_step): `dataset`
    yields what make_batch takes, device_data (NumPy or jax arrays) is replicated on the
    mesh once.
  allow_restart: start from step 0 when every existing checkpoint is damaged (--overwrite)
    instead of stopping (checkpoints.restore_latest).
  """
  if jax.process_index() != 0:   # one console for a multi-process run
    progress = lambda _: None  # noqa: E731
  model_dir = Path(workdir) / name
  checkpoints = model_dir / "checkpoints"
  checkpoints.mkdir(parents=True, exist_ok=True)
  # Orbax synchronises processes (a collective) only when it creates the folder itself; a
  # process that already sees the folder skips it, and the two processes deadlock.
  _barrier(f"wh_errmap {name} folders")
  metrics_path = model_dir / "metrics.jsonl"
  iterator: Iterator = iter(dataset)
  state, data_state, start = restore_latest(checkpoints, state, progress,
                                            allow_restart=allow_restart)
  if start is not None:
    iterator.set_state(_own_iterator_state(data_state))
    if jax.process_index() == 0:   # one writer of the shared metrics file
      _trim_metrics(metrics_path, start, progress)
    if start < num_steps:
      progress(f"[{name}] resuming from the checkpoint at step {start}/{num_steps}")
  start = start or 0
  if start >= num_steps:
    progress(f"[{name}] already trained ({start} steps): using its final checkpoint")
    return state

  base_rng = jax.random.key(seed)
  if frozen is not None:
    frozen = jax.device_put(frozen, replicated(mesh))
  if device_data is not None:
    device_data = jax.device_put(device_data, replicated(mesh))
  manager = checkpoint_manager(checkpoints, keep_checkpoints)
  last = num_steps if stop_at is None else min(stop_at, num_steps)
  layout = " x ".join(f"{n} {axis}" for axis, n in mesh.shape.items() if n > 1) or "1 device"
  progress(f"[{name}] training steps {start + 1}..{last} of {num_steps} on {mesh.size} "
           f"device(s) ({layout})")
  t_last, step_last, t_start = time.perf_counter(), start, time.perf_counter()

  def diverged(what: str, step: int) -> TrainingDivergedError:
    return TrainingDivergedError(
        f"model {name}: {what} at step {step}; training stopped. The last good checkpoint "
        f"is kept in {checkpoints} (try a lower optim.learning_rate)")

  def save(step: int) -> None:
    if not bool(_all_finite(state.params)):
      raise diverged("the parameters are not finite", step)
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(_iterator_states(iterator))))
    # The integrity record needs the finished files: saving waits for them (a checkpoint
    # every few hundred steps, of a few MB, makes this cheap).
    manager.wait_until_finished()
    _barrier(f"wh_errmap {name} checkpoint {step} written")
    if jax.process_index() == 0:
      write_manifest(checkpoints / str(step))

  try:
    with _StopSignals() as stop:
      batch = global_batch(mesh, next(iterator))
      compiled = compile_step(step_fn, mesh, batch, with_frozen=frozen is not None,
                              make_batch=make_batch)
      step_executable = compiled.lower(state, batch, base_rng, frozen, device_data).compile()
      _barrier(f"wh_errmap {name} step {start + 1} compiled")
      for step in range(start + 1, last + 1):
        if batch is None:
          batch = global_batch(mesh, next(iterator))
        state, metrics = step_executable(state, batch, base_rng, frozen, device_data)
        batch = None
        if step % log_every == 0 or step == last or step == start + 1:
          metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          if not np.isfinite(metrics["loss"]):
            raise diverged(f"the loss is {metrics['loss']}", step)
          now = time.perf_counter()
          rate = (step - step_last) / max(now - t_last, 1e-9)
          t_last, step_last = now, step
          record = {"step": step, **metrics, "steps_per_s": rate, "time_s": now - t_start}
          if jax.process_index() == 0:
            with naming(metrics_path), metrics_path.open("a") as f:
              f.write(json.dumps(record) + "\n")
          if step == start + 1:
            speed = f"first step incl. compilation {now - t_start:.1f} s"
          else:
            speed = f"{rate:.2f} steps/s  ETA {_format_eta((num_steps - step) / rate)}"
          progress(f"[{name}] step {step}/{num_steps}  loss {metrics['loss']:.4f}  {speed}")
        # Several processes must agree on stopping (an all-gather): only at logged steps.
        stopping = ((jax.process_count() == 1 or step % log_every == 0)
                    and _stop_requested(stop))
        if step % checkpoint_every == 0 or step == last or stopping:
          save(step)
        if stopping and step < last:
          manager.wait_until_finished()
          raise Interrupted(
              f"[{name}] stopped by {signal.Signals(stop.signum).name} after step "
              f"{step}/{num_steps}; a checkpoint is saved in {checkpoints}. Run the same "
              f"command again to resume", stop.signum)
      manager.wait_until_finished()
  finally:
    manager.close()
  return state
