"""Workdir safety: a recorded config is enforced, unwritable places and full disks are clear
errors, and outputs never exist half-written under their final name."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import base, cv_fold_small
from wh_errmap import atomic
from wh_errmap.errors import UserError, storage_error_message
from wh_errmap.workdir import check_writable, config_differences, record_config

ROOT = Path(__file__).resolve().parents[1]


def test_a_different_config_is_refused_and_volatile_fields_are_not(tmp_path):
  config = cv_fold_small.get_config()
  record_config(tmp_path, config)
  recorded = (tmp_path / "config.json").read_text()
  for field, value in (("fold", 3), ("stage", "evaluate"), ("train.log_every", 7)):
    other = cv_fold_small.get_config()
    other.update_from_flattened_dict({field: value})
    record_config(tmp_path, other)   # another fold or stage of the same run: fine
  assert (tmp_path / "config.json").read_text() == recorded
  for field, value in (("optim.learning_rate", 0.1), ("train.seg3d.steps", 7),
                       ("seed", 5), ("data_dir", "/elsewhere"), ("model.width1", 4)):
    other = cv_fold_small.get_config()
    other.update_from_flattened_dict({field: value})
    with pytest.raises(UserError, match=rf"{field} \(recorded .*, now .*\).*--overwrite"):
      record_config(tmp_path, other)
  assert (tmp_path / "config.json").read_text() == recorded


def test_overwrite_moves_the_old_run_aside(tmp_path):
  workdir = tmp_path / "run"
  record_config(workdir, cv_fold_small.get_config())
  (workdir / "fold0").mkdir()
  other = cv_fold_small.get_config()
  other.seed, other.overwrite = 9, True
  messages = []
  record_config(workdir, other, progress=messages.append)
  aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
  assert len(aside) == 1 and (aside[0] / "fold0").is_dir()
  assert json.loads((aside[0] / "config.json").read_text())["seed"] == 0
  assert json.loads((workdir / "config.json").read_text())["seed"] == 9
  assert not (workdir / "fold0").exists() and str(aside[0]) in messages[0]


def test_differences_ignore_json_tuple_list_changes():
  stored = json.loads(json.dumps({"input": {"crop_3d": (1, 2, 3)}, "fold": 0}))
  assert config_differences(stored, {"input": {"crop_3d": [1, 2, 3]}, "fold": 4}) == []
  assert config_differences(stored, {"input": {"crop_3d": [1, 2, 4]}}) == ["input.crop_3d"]


def test_unwritable_workdir_is_one_line_and_status_2(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  with pytest.raises(UserError, match="cannot write to the workdir"):
    check_writable(blocker / "run")
  result = subprocess.run(
      [sys.executable, "launch.py", "--experiment=cv_fold_small", f"--workdir={blocker}/run",
       f"--cache_dir={tmp_path / 'cache'}"], cwd=ROOT, capture_output=True, text=True,
      timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: cannot write to the workdir")
  assert f"{blocker}/run" in lines[0]


def test_storage_errors_are_found_inside_library_exceptions():
  full = OSError(errno.ENOSPC, "No space left on device", "/runs/x/checkpoints/100/state")
  try:
    try:
      raise full
    except OSError as e:
      raise RuntimeError("async checkpoint save failed") from e
  except RuntimeError as wrapped:
    message = storage_error_message(wrapped)
  assert message.startswith("the disk is full writing /runs/x/checkpoints/100/state")
  assert "resume" in message
  assert storage_error_message(ValueError("unrelated")) is None
  assert storage_error_message(OSError(errno.ENOENT, "missing", "f")) is None


def test_a_failed_write_leaves_neither_output_nor_temporary_file(tmp_path):
  target = tmp_path / "records.json"
  with pytest.raises(OSError):
    with atomic.atomic_path(target) as tmp:
      tmp.write_text('{"half": ')
      raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
  assert list(tmp_path.iterdir()) == []


def test_a_run_recorded_before_a_field_existed_is_not_refused(tmp_path):
  """A config.json without a field added later (here mesh and input.on_device) matches a
  command that leaves the field at its default, and not one that changes it; a recorded
  field the code no longer has is ignored."""
  config = cv_fold_small.get_config()
  recorded = json.loads(config.to_json())
  del recorded["mesh"], recorded["input"]["on_device"]
  recorded["input"]["batch_size"] = 2   # a field the code has dropped
  (tmp_path / "config.json").write_text(json.dumps(recorded))
  record_config(tmp_path, config, defaults=base.get_config())
  changed = cv_fold_small.get_config()
  changed.input.on_device = True
  with pytest.raises(UserError, match="input.on_device"):
    record_config(tmp_path, changed, defaults=base.get_config())
