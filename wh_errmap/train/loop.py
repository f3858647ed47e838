"""The training loop shared by the segmentors and the predictor.

Per model, under `workdir/<name>/`:
    checkpoints/<step>/   orbax checkpoints: train state + input-iterator state
    metrics.jsonl         one JSON object per logged step

A run started again with the same workdir resumes from the newest checkpoint (state and
data order) and continues to the same final step; a finished run only restores.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

from wh_errmap.errors import UserError
from wh_errmap.train.sharding import data_sharded, global_batch, replicated
from wh_errmap.train.state import TrainState
from wh_errmap.train.steps import StepFn
from wh_errmap.progress import console

Progress = Callable[[str], None]


class TrainingDivergedError(UserError):
  """The loss became NaN or Inf."""


def _checkpoint_manager(directory: Path, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      directory.absolute(), item_names=("state", "data"),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def restore_latest(directory: str | Path, state: TrainState,
                   ) -> tuple[TrainState, dict | None, int | None]:
  """(state, iterator state, step) of the newest checkpoint, or (state, None, None)."""
  directory = Path(directory)
  if not directory.exists():
    return state, None, None
  with _checkpoint_manager(directory, keep=1_000_000) as manager:
    step = manager.latest_step()
    if step is None:
      return state, None, None
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(state)), data=ocp.args.JsonRestore()))
  return restored.state, restored.data, step


def _trim_metrics(path: Path, last_step: int) -> None:
  """Drops records logged after the checkpoint we resume from (they will be redone)."""
  if path.exists():
    kept = [line for line in path.read_text().splitlines()
            if line and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


def _format_eta(seconds: float) -> str:
  minutes, secs = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def compile_step(step_fn: StepFn, mesh: jax.sharding.Mesh, *, with_frozen: bool) -> Callable:
  """The jitted step the loop runs: `(state, batch, base_rng, frozen) -> (state, metrics)`.

  The state is donated and replicated, the batch split over the mesh's 'data' axis. The
  step's randomness is `fold_in(base_rng, state.step)`, so it depends only on (seed, step)
  and a resumed run matches. frozen is None for steps without frozen models.
  """
  def step_with_rng(state, batch, base_rng, frozen):
    rng = jax.random.fold_in(base_rng, state.step)
    return step_fn(state, batch, rng, frozen) if with_frozen else step_fn(state, batch, rng)

  return jax.jit(step_with_rng, donate_argnums=0,
                 in_shardings=(replicated(mesh), data_sharded(mesh), replicated(mesh),
                               replicated(mesh)),
                 out_shardings=(replicated(mesh), replicated(mesh)))


def train(name: str, workdir: str | Path, *, state: TrainState, step_fn: StepFn,
          dataset: Any, mesh: jax.sharding.Mesh, num_steps: int, seed: int,
          log_every: int = 50, checkpoint_every: int = 500, keep_checkpoints: int = 3,
          stop_at: int | None = None, frozen: Any = None,
          progress: Progress = console) -> TrainState:
  """Trains `state` to `num_steps`, resuming from `workdir/name/checkpoints` if present.

  dataset: a grain IterDataset of this process's batches (NumPy pytrees).
  step_fn: `(state, batch, rng) -> (state, metrics)`; metrics must hold "loss".
  frozen: a pytree passed to every step after rng and never updated (the predictor's
    frozen segmentors), replicated over the mesh; None for steps without it.
  stop_at: end this run after that step (with a checkpoint) although the schedule runs to
    num_steps; a later run resumes there.
  """
  model_dir = Path(workdir) / name
  model_dir.mkdir(parents=True, exist_ok=True)
  metrics_path = model_dir / "metrics.jsonl"
  iterator: Iterator = iter(dataset)
  state, data_state, start = restore_latest(model_dir / "checkpoints", state)
  if start is not None:
    iterator.set_state(data_state)
    _trim_metrics(metrics_path, start)
    if start < num_steps:
      progress(f"[{name}] resuming from the checkpoint at step {start}/{num_steps}")
  start = start or 0
  if start >= num_steps:
    progress(f"[{name}] already trained ({start} steps): using its final checkpoint")
    return state

  base_rng = jax.random.key(seed)
  compiled = compile_step(step_fn, mesh, with_frozen=frozen is not None)
  if frozen is not None:
    frozen = jax.device_put(frozen, replicated(mesh))
  manager = _checkpoint_manager(model_dir / "checkpoints", keep_checkpoints)
  last = num_steps if stop_at is None else min(stop_at, num_steps)
  progress(f"[{name}] training steps {start + 1}..{last} of {num_steps} on {mesh.size} device(s)")
  t_last, step_last, t_start = time.perf_counter(), start, time.perf_counter()
  try:
    for step in range(start + 1, last + 1):
      state, metrics = compiled(state, global_batch(mesh, next(iterator)), base_rng, frozen)
      if step % log_every == 0 or step == last or step == start + 1:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not np.isfinite(metrics["loss"]):
          raise TrainingDivergedError(
              f"[{name}] loss is {metrics['loss']} at step {step}; the last good checkpoint "
              f"is kept in {model_dir / 'checkpoints'}")
        now = time.perf_counter()
        rate = (step - step_last) / max(now - t_last, 1e-9)
        t_last, step_last = now, step
        record = {"step": step, **metrics, "steps_per_s": rate, "time_s": now - t_start}
        with metrics_path.open("a") as f:
          f.write(json.dumps(record) + "\n")
        if step == start + 1:
          speed = f"first step incl. compilation {now - t_start:.1f} s"
        else:
          speed = f"{rate:.2f} steps/s  ETA {_format_eta((num_steps - step) / rate)}"
        progress(f"[{name}] step {step}/{num_steps}  loss {metrics['loss']:.4f}  {speed}")
      if step % checkpoint_every == 0 or step == last:
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(iterator.get_state())))
    manager.wait_until_finished()
  finally:
    manager.close()
  return state
