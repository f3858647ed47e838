"""Restoring checkpoints: only damage moves a checkpoint aside, anything else stops the run
with every checkpoint in place, and training never silently starts again from step 0."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.train.tiny import tiny_config, train_tiny
from wh_errmap.errors import UserError
from wh_errmap.models.factory import make_model
from wh_errmap.train.checkpoints import (MANIFEST, CheckpointRestoreError, restore_latest,
                                         shows_damage)
from wh_errmap.train.state import create_state, make_optimizer
from wh_errmap.utils.mesh import make_mesh

MESH = make_mesh(jax.devices()[:1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
  """A tiny run stopped at step 4 of 6 with checkpoints 2, 3 and 4."""
  workdir = tmp_path_factory.mktemp("run")
  train_tiny(workdir, MESH, num_steps=6, batch_size=2, stop_at=4, checkpoint_every=1)
  return workdir


def copy_run(trained: Path, tmp_path: Path) -> Path:
  shutil.copytree(trained, tmp_path / "run")
  return tmp_path / "run"


def truncate_largest(step_dir: Path) -> None:
  victim = max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])


def other_model_state():
  """A state whose parameters have other shapes than the trained run's (width 6, not 4)."""
  config = tiny_config()
  config.model.width1 = 6
  model = make_model(config.model, 3, 8)
  return create_state(model, make_optimizer(config.optim, 6), (2, 16, 16, 12, 1),
                      jax.random.key(0), MESH)


def listing(run: Path) -> list[str]:
  return sorted(str(p.relative_to(run)) for p in run.rglob("*"))


def test_every_finished_checkpoint_has_an_integrity_record(trained):
  for step in ("2", "3", "4"):
    record = json.loads((trained / "seg" / "checkpoints" / step / MANIFEST).read_text())
    assert any(name.startswith("state/") for name in record)
    size, _ = record["_CHECKPOINT_METADATA"]
    assert size == (trained / "seg" / "checkpoints" / step / "_CHECKPOINT_METADATA").stat().st_size


@pytest.mark.parametrize("record", [True, False])
def test_a_failure_that_is_not_damage_stops_and_moves_nothing(trained, tmp_path, record):
  """Restoring into other shapes (as after a change of model or layout) fails the same way
  for intact checkpoints with or without a record: one line, nothing moved."""
  run = copy_run(trained, tmp_path)
  if not record:
    for manifest in run.rglob(MANIFEST):
      manifest.unlink()
  before = listing(run)
  with pytest.raises(CheckpointRestoreError, match="Nothing was moved") as info:
    restore_latest(run / "seg" / "checkpoints", other_model_state(), lambda _: None)
  assert str(run / "seg" / "checkpoints" / "4") in str(info.value)
  assert ("files are as written" in str(info.value)) == record
  assert "\n" not in str(info.value)
  assert listing(run) == before


def test_a_checkpoint_without_record_is_moved_only_for_an_error_that_shows_damage(trained,
                                                                                   tmp_path):
  run = copy_run(trained, tmp_path)
  for manifest in run.rglob(MANIFEST):
    manifest.unlink()
  truncate_largest(run / "seg" / "checkpoints" / "4")
  messages = []
  template = create_state(make_model(tiny_config().model, 3, 8),
                          make_optimizer(tiny_config().optim, 6), (2, 16, 16, 12, 1),
                          jax.random.key(0), MESH)
  _, _, step = restore_latest(run / "seg" / "checkpoints", template, messages.append)
  assert step == 3 and (run / "seg" / "corrupt_checkpoints" / "4").is_dir()
  assert "is damaged" in messages[0]


def test_damage_classification_of_restore_errors():
  def chained(outer, inner):
    try:
      raise inner
    except BaseException as e:
      try:
        raise outer from e
      except BaseException as wrapped:
        return wrapped
  assert shows_damage(FileNotFoundError("metadata not found"))
  assert shows_damage(chained(Exception("reading array"),
                              ValueError("OUT_OF_RANGE: Error reading \"params\"")))
  assert not shows_damage(chained(Exception("reading array"),
                                  ValueError("RESOURCE_EXHAUSTED: Error reading: out of memory")))
  assert not shows_damage(MemoryError())
  assert not shows_damage(ValueError("Requested shape: (5,) is not compatible with (4,)"))
  assert not shows_damage(OSError(5, "Input/output error"))   # a file system hiccup


def test_quarantine_never_replaces_an_earlier_copy_and_read_only_moves_nothing(trained,
                                                                               tmp_path):
  run = copy_run(trained, tmp_path)
  earlier = run / "seg" / "corrupt_checkpoints" / "4"
  earlier.mkdir(parents=True)
  (earlier / "kept.txt").write_text("an earlier quarantined copy")
  truncate_largest(run / "seg" / "checkpoints" / "4")
  before = listing(run)
  template = create_state(make_model(tiny_config().model, 3, 8),
                          make_optimizer(tiny_config().optim, 6), (2, 16, 16, 12, 1),
                          jax.random.key(0), MESH)
  messages = []
  _, _, step = restore_latest(run / "seg" / "checkpoints", template, messages.append,
                              read_only=True)
  assert step == 3 and listing(run) == before and "left in place" in messages[0]
  _, _, step = restore_latest(run / "seg" / "checkpoints", template, lambda _: None)
  assert step == 3
  assert (earlier / "kept.txt").read_text() == "an earlier quarantined copy"
  assert (run / "seg" / "corrupt_checkpoints" / "4.2" / MANIFEST).is_file()


def test_training_never_restarts_from_scratch_while_checkpoints_existed(trained, tmp_path):
  run = copy_run(trained, tmp_path)
  for step in ("2", "3", "4"):
    truncate_largest(run / "seg" / "checkpoints" / step)
  for attempt in range(2):   # also once the damaged ones are out of the checkpoint folder
    with pytest.raises(UserError, match=r"3 damaged one\(s\) \(4, 3, 2\).*--overwrite"):
      train_tiny(run, MESH, num_steps=6, batch_size=2, checkpoint_every=1)
  messages = []
  state = train_tiny(run, MESH, num_steps=6, batch_size=2, checkpoint_every=1,
                     progress=messages.append, allow_restart=True)
  assert int(state.step) == 6 and "[seg] training steps 1..6 of 6 on 1 device(s) (1 device)" in messages
  assert sorted(p.name for p in (run / "seg" / "corrupt_checkpoints").iterdir()
                if p.is_dir()) == ["2", "3", "4"]
  # Trained past them once: an interrupted fresh run resumes without asking again.
  (run / "seg" / "metrics.jsonl").unlink()
  for step_dir in (run / "seg" / "checkpoints").iterdir():
    shutil.rmtree(step_dir)
  assert int(train_tiny(run, MESH, num_steps=6, batch_size=2, checkpoint_every=1).step) == 6


def test_a_partial_last_metrics_line_is_dropped_on_resume(trained, tmp_path):
  """A write cut short (full disk, kill) leaves half a JSON line: the resume drops it and
  rewrites the file instead of crashing."""
  run = copy_run(trained, tmp_path)
  metrics = run / "seg" / "metrics.jsonl"
  metrics.write_text(metrics.read_text() + '{"step": 5, "loss": 1.2')
  messages = []
  train_tiny(run, MESH, num_steps=6, batch_size=2, checkpoint_every=1, progress=messages.append)
  steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
  assert steps == [1, 2, 3, 4, 5, 6]
  assert any("dropped 1 line(s)" in m for m in messages)
  np.testing.assert_array_less(0, [json.loads(line)["loss"]
                                   for line in metrics.read_text().splitlines()])
