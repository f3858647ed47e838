"""Workdir safety: a recorded config is enforced, unwritable places and full disks are clear
errors, and outputs never exist half-written under their final name."""
from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import base, cv_fold_small
from tests.conftest import ROOT, blob_label, cpu_env, write_nifti
from wh_errmap import errors
from wh_errmap.errors import UserError, storage_error_message
from wh_errmap.utils import atomic
from wh_errmap.utils.workdir import check_writable, config_differences, record_config, run_lock


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
      timeout=300, env=cpu_env())
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


def test_a_write_to_an_open_file_is_named_or_said_to_be_a_file(tmp_path):
  bare = OSError(errno.ENOSPC, "No space left on device")   # f.write on a full disk
  assert storage_error_message(bare) == (
      "the disk is full writing a file (No space left on device); " + errors._SPACE)
  notdir = storage_error_message(NotADirectoryError(errno.ENOTDIR, "Not a directory"))
  assert notdir.startswith("a part of the path is a file, not a folder (Not a directory)")
  try:   # a cause further down that names its file wins over a bare one above it
    try:
      raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/m.jsonl")
    except OSError as e:
      raise OSError(errno.ENOSPC, "No space left on device") from e
  except OSError as outer:
    assert storage_error_message(outer).startswith("the disk is full writing /runs/x/m.jsonl (")
  with pytest.raises(OSError) as raised, errors.naming(tmp_path / "m.jsonl"):
    raise bare
  assert raised.value.filename == str(tmp_path / "m.jsonl") and raised.value.errno == errno.ENOSPC
  assert raised.value.__cause__ is bare
  named = PermissionError(errno.EACCES, "Permission denied", "/c/x")
  with pytest.raises(PermissionError) as raised, errors.naming(tmp_path / "other"):
    raise named
  assert raised.value is named   # a name it has is kept

  def full(*args):   # the atomic writer's write fails as a full disk's would
    raise OSError(errno.ENOSPC, "No space left on device")

  with pytest.raises(OSError) as raised:
    with atomic.atomic_path(tmp_path / "out.json") as tmp:
      full(tmp)
  assert raised.value.filename == str(tmp_path / "out.json")
  assert list(tmp_path.iterdir()) == []   # nothing half-written left behind


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


HOLD_LOCK = """
import sys, time
from wh_errmap.utils.workdir import run_lock
with run_lock(sys.argv[1]):
  print("held", flush=True)
  time.sleep(120)
"""


def hold_lock(path):
  proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path)], cwd=ROOT,
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_a_second_run_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken(tmp_path):
  lock = tmp_path / "run" / "fold0.lock"
  holder = hold_lock(lock)
  try:
    with pytest.raises(UserError) as error:
      with run_lock(lock):
        pass
    message = str(error.value)
    assert f"pid {holder.pid}" in message and socket.gethostname() in message
    assert str(tmp_path / "run") in message and "\n" not in message
  finally:
    holder.kill()   # SIGKILL: no cleanup code runs, the lock file stays
    holder.wait()
  assert lock.exists()
  with run_lock(lock):
    assert json.loads(lock.read_text())["pid"] == os.getpid()


def small_data(folder):
  """Five tiny valid cases."""
  folder.mkdir()
  label = blob_label()
  image = (np.full(label.shape, 100.0) + 50 * (label > 0)).astype(np.float32)
  for i in range(1, 6):
    write_nifti(folder / f"mr_train_100{i}_image.nii.gz", image)
    write_nifti(folder / f"mr_train_100{i}_label.nii.gz", label)
  return folder


def launch_fold(workdir, data, cache, *extra):
  return subprocess.run(
      [sys.executable, "launch.py", "--experiment=cv_fold_small", f"--workdir={workdir}",
       f"--data_dir={data}", f"--cache_dir={cache}", *extra], cwd=ROOT, capture_output=True,
      text=True, timeout=300, env=cpu_env())


def test_a_double_launch_of_a_fold_is_one_line_naming_the_holder(tmp_path):
  data = small_data(tmp_path / "data")
  holder = hold_lock(tmp_path / "run" / "fold0.lock")
  try:
    result = launch_fold(tmp_path / "run", data, tmp_path / "cache")
  finally:
    holder.kill()
    holder.wait()
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "is in use by another run" in lines[0]
  assert f"pid {holder.pid}" in lines[0]
  assert not (tmp_path / "run" / "fold0").exists()   # nothing of the fold was touched


def test_a_failed_first_run_records_no_settings(tmp_path):
  """A mistyped --data_dir fails before the settings are recorded, so the corrected
  command (another data_dir) is not refused as 'other settings'."""
  first = launch_fold(tmp_path / "run", tmp_path / "typo", tmp_path / "cache")
  assert first.returncode == 2 and "typo" in first.stderr, first.stderr[-2000:]
  assert not (tmp_path / "run" / "config.json").exists()
  second = launch_fold(tmp_path / "run", tmp_path / "another_typo", tmp_path / "cache")
  assert second.returncode == 2 and "another_typo" in second.stderr
  assert "other settings" not in second.stderr
  # Other settings than a recorded run's are still refused before any data work.
  record_config(tmp_path / "run", cv_fold_small.get_config())
  third = launch_fold(tmp_path / "run", tmp_path / "typo", tmp_path / "cache")
  assert third.returncode == 2 and "other settings" in third.stderr and "data_dir" in third.stderr


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_outputs_get_the_permissions_the_umask_gives(tmp_path, mask, mode):
  """mkstemp makes 0600 files: shared caches and runs were unreadable to colleagues."""
  old = os.umask(mask)
  try:
    atomic.write_text(tmp_path / "records.json", "{}")
  finally:
    os.umask(old)
  assert (tmp_path / "records.json").stat().st_mode & 0o777 == mode


def test_files_written_as_one_result_are_all_removed_when_the_block_fails(tmp_path):
  paths = {"first": tmp_path / "first.txt"}
  with pytest.raises(RuntimeError, match="boom"):
    with atomic.removed_on_failure(paths):
      atomic.write_text(paths["first"], "x")
      paths["second"] = tmp_path / "second.txt"   # added inside the block: removed too
      atomic.write_text(paths["second"], "y")
      paths["third"] = tmp_path / "never-written.txt"
      raise RuntimeError("boom")
  assert list(tmp_path.iterdir()) == []
  with atomic.removed_on_failure(paths):   # a block that succeeds keeps its files
    atomic.write_text(paths["first"], "x")
  assert [p.name for p in tmp_path.iterdir()] == ["first.txt"]


def test_an_atomic_write_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path,
                                                                                monkeypatch):
  events = []
  real_fsync, real_replace = os.fsync, os.replace

  def fsync(fd):
    events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}")))
    real_fsync(fd)

  def replace(src, dst):
    events.append(("replace", Path(dst).name))
    real_replace(src, dst)

  monkeypatch.setattr(os, "fsync", fsync)
  monkeypatch.setattr(os, "replace", replace)
  atomic.write_text(tmp_path / "records.json", "{}")
  assert events == [("fsync", False), ("replace", "records.json"), ("fsync", True)]


def test_a_storage_problem_is_named_only_when_it_caused_the_error():
  full = OSError(errno.ENOSPC, "No space left on device", "/runs/x/records.json")
  try:   # an unrelated error raised while a disk error was being handled
    try:
      raise full
    except OSError:
      raise KeyError("mask_type")
  except KeyError as unrelated:
    assert storage_error_message(unrelated) is None
  try:   # a library wrapping the error it caught, without `from`, but quoting it
    try:
      raise full
    except OSError as e:
      raise RuntimeError(f"save failed: {e}")
  except RuntimeError as wrapped:
    assert storage_error_message(wrapped).startswith("the disk is full writing /runs/x/")
  tensorstore = ValueError('RESOURCE_EXHAUSTED: Error writing local file "/runs/x/ck/3/a": '
                           "Failed to write 8 bytes: No space left on device "
                           "[os_error_code='28']")
  assert storage_error_message(tensorstore).startswith("the disk is full writing /runs/x/ck/3/a")
  denied = storage_error_message(PermissionError(errno.EACCES, "Permission denied", "/c/x.npz"))
  assert denied.startswith("permission denied reading or writing /c/x.npz")
  assert "permissions" in denied and "writing /c" not in denied.replace("or writing", "")
