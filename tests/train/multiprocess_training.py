"""Two-process data-parallel training of the tiny segmentor, and its one-process reference.

Run from the repository root as a script (see tests/train/test_multiprocess.py):

  worker:     python -m tests.train.multiprocess_training worker --process_id I --port P \
                  --workdir W --out OUT.json
              (XLA_FLAGS=--xla_force_host_platform_device_count=4, one command per process)
  reference:  python -m tests.train.multiprocess_training reference --workdir W --out OUT.json
              (XLA_FLAGS=--xla_force_host_platform_device_count=8)

Both train the tiny 3D segmentor for NUM_STEPS SGD steps with the real `loop.train` at the
default batch, GLOBAL_BATCH = 2 rows, on an 8-device 2 x 4 (data x space) mesh: each row (a
process's volume) split along X over that process's 4 devices, as the SLURM example of
docs/operations.md lays out a batch of 2 on 2 hosts. The two workers form one
jax.distributed job over gloo CPU collectives; each reads its own shard of `tiny_cases()`
(the pipeline's default shard_index / shard_count: process index / count) and contributes
half of each global batch. The reference runs in one process and builds each global batch
as the concatenation, in process order, of the batches the two workers read.

Outputs: OUT.json (written by process 0) holds the per-step losses from
`W/seg/metrics.jsonl`; every process writes its replica of the final parameters and
batch statistics to `OUT.process<i>.npz` (leaves in tree order, keys "<group>.<index>").
SGD, not Adam: Adam's update is invariant to the gradient's scale, so it would hide a
gradient summed instead of averaged over devices or processes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import flags

from tests.train.tiny import tiny_cases, tiny_config
from wh_errmap.data.pipeline import train_dataset
from wh_errmap.models.factory import make_model
from wh_errmap.train import loop
from wh_errmap.train.sharding import plan_layout
from wh_errmap.train.state import create_state, make_optimizer
from wh_errmap.train.steps import make_segmentor_step

NUM_STEPS = 3
GLOBAL_BATCH = 2
NUM_PROCESSES = 2
LOCAL_DEVICES = 4
SPACE = 4                     # devices per volume: the mesh is 2 x 4
CROP = (32, 16, 12)           # X long enough to split over 4 devices (sharding.check_split)
CASE_SHAPE = (40, 18, 14)
SEED = 0


class ConcatenatedShards:
  """An iterable whose batches concatenate, along the rows, one batch of each dataset.

  Its iterator supports `get_state()` / `set_state()` as `loop.train` checkpoints it: the
  state is {"shard_<i>": state of the i-th dataset's iterator}.
  """

  def __init__(self, datasets: list[Any]):
    self.datasets = datasets

  def __iter__(self) -> "_ConcatenatedIterator":
    return _ConcatenatedIterator([iter(d) for d in self.datasets])


class _ConcatenatedIterator:
  """The iterator of ConcatenatedShards."""

  def __init__(self, iterators: list[Any]):
    self.iterators = iterators

  def __iter__(self) -> "_ConcatenatedIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batches = [next(it) for it in self.iterators]
    return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}

  def get_state(self) -> dict[str, Any]:
    return {f"shard_{i}": it.get_state() for i, it in enumerate(self.iterators)}

  def set_state(self, state: dict[str, Any]) -> None:
    for i, it in enumerate(self.iterators):
      it.set_state(state[f"shard_{i}"])


def _train(workdir: Path, dataset: Any) -> Any:
  """Trains the tiny segmentor with `dataset` on all devices; returns the final state."""
  config = tiny_config()
  config.optim.name = "sgd"
  config.optim.learning_rate = 0.1
  layout = plan_layout(GLOBAL_BATCH, "auto", num_devices=jax.device_count(),
                       num_processes=jax.process_count())
  assert (layout.data, layout.space) == (GLOBAL_BATCH, SPACE), layout
  mesh = layout.mesh()
  assert mesh.size == NUM_PROCESSES * LOCAL_DEVICES, mesh
  model = make_model(config.model, 3, 8, SPACE)
  tx = make_optimizer(config.optim, NUM_STEPS)
  state = create_state(model, tx, (GLOBAL_BATCH, *CROP, 1), jax.random.key(SEED), mesh)
  return loop.train("seg", workdir, state=state, step_fn=make_segmentor_step(model, config.loss),
                    dataset=dataset, mesh=mesh, num_steps=NUM_STEPS, seed=SEED, log_every=1,
                    checkpoint_every=100, progress=lambda message: print(message, flush=True))


def _local_replica(tree: Any) -> list[np.ndarray]:
  """This process's copy of every leaf of a replicated pytree, in tree order."""
  leaves = []
  for leaf in jax.tree.leaves(tree):
    # Over two processes a replicated array is not fully addressable: fetch a local replica.
    assert leaf.is_fully_replicated, leaf.sharding
    leaves.append(np.asarray(leaf.addressable_data(0)))
  return leaves


def _write_outputs(workdir: Path, out: Path, state: Any) -> None:
  """OUT.json (process 0 only) and OUT.process<i>.npz (every process); see the module doc."""
  arrays = {}
  for group in ("params", "batch_stats"):
    for i, leaf in enumerate(_local_replica(getattr(state, group))):
      arrays[f"{group}.{i:03d}"] = leaf
  index = jax.process_index()
  np.savez(out.with_suffix(f".process{index}.npz"), **arrays)
  if index == 0:
    records = [json.loads(line) for line in
               (workdir / "seg" / "metrics.jsonl").read_text().splitlines() if line]
    out.write_text(json.dumps({"steps": [r["step"] for r in records],
                               "losses": [r["loss"] for r in records],
                               "final_step": int(np.asarray(state.step.addressable_data(0))),
                               "process_count": jax.process_count()}))


def worker(process_id: int, port: int, workdir: Path, out: Path) -> None:
  """One of the two processes of the distributed run."""
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=NUM_PROCESSES, process_id=process_id)
    jax.devices()  # Creates the CPU backend and its gloo collectives.
  except Exception as e:  # noqa: BLE001 -- report any set-up failure in one clear line
    raise SystemExit(f"process {process_id}: could not form a 2-process jax job over gloo CPU "
                     f"collectives (127.0.0.1:{port}): {type(e).__name__}: {e}") from e
  assert jax.process_count() == NUM_PROCESSES and jax.process_index() == process_id
  assert jax.local_device_count() == LOCAL_DEVICES, jax.local_devices()
  assert jax.device_count() == NUM_PROCESSES * LOCAL_DEVICES, jax.devices()
  # grain 0.2.18 reads absl flags; this script does not run under absl.app.run.
  flags.FLAGS.mark_as_parsed()

  # Default shard_index / shard_count: this process's shard.
  dataset = train_dataset(tiny_cases(shape=CASE_SHAPE), crop_size=CROP,
                          batch_size=GLOBAL_BATCH // NUM_PROCESSES, seed=SEED)
  state = _train(workdir, dataset)
  _write_outputs(workdir, out, state)


def reference(workdir: Path, out: Path) -> None:
  """The same training in one process, on the global batches the workers assemble."""
  assert jax.process_count() == 1
  assert jax.device_count() == NUM_PROCESSES * LOCAL_DEVICES, jax.devices()
  flags.FLAGS.mark_as_parsed()

  dataset = ConcatenatedShards([
      train_dataset(tiny_cases(shape=CASE_SHAPE), crop_size=CROP,
                    batch_size=GLOBAL_BATCH // NUM_PROCESSES, seed=SEED, shard_index=i,
                    shard_count=NUM_PROCESSES)
      for i in range(NUM_PROCESSES)])
  state = _train(workdir, dataset)
  _write_outputs(workdir, out, state)


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("mode", choices=("worker", "reference"))
  parser.add_argument("--process_id", type=int)
  parser.add_argument("--port", type=int)
  parser.add_argument("--workdir", type=Path, required=True)
  parser.add_argument("--out", type=Path, required=True)
  args = parser.parse_args(argv)
  if args.mode == "worker":
    if args.process_id is None or args.port is None:
      parser.error("worker needs --process_id and --port")
    worker(args.process_id, args.port, args.workdir, args.out)
  else:
    reference(args.workdir, args.out)


if __name__ == "__main__":
  main(sys.argv[1:])
