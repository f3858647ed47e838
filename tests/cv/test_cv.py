"""--experiment=cv: device groups, child commands, progress, failures, signals, resume.

The scheduler is tested with fake folds (short Python scripts); one end-to-end run trains
and evaluates 2 folds (of splits.num_folds = 2, not the paper's 5, to keep CI short) at
tiny sizes through launch.py, with one fold made to fail, then resumes it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import ml_collections
import numpy as np
import pytest

import experiments
from experiments import cv, cv_small
from tests.conftest import ROOT, blob_label, cpu_env, write_nifti
from wh_errmap.cv import children, commands, devices
from wh_errmap.errors import UserError
from wh_errmap.utils.signals import Interrupted



# ---------------------------------------------------------------------------- device groups

def gpus(count, environ=None, version="cuda 12.8"):
  return devices.devices_from_probe("gpu", count, version, environ or {})


def test_eight_gpus_five_folds_run_at_once_on_one_gpu_each():
  slots = devices.device_slots(gpus(8), num_folds=5)
  assert [dict(s.env) for s in slots] == [{"CUDA_VISIBLE_DEVICES": str(i)} for i in range(5)]


def test_two_gpus_five_folds_run_two_at_a_time():
  slots = devices.device_slots(gpus(2), num_folds=5)
  assert [dict(s.env) for s in slots] == [{"CUDA_VISIBLE_DEVICES": "0"},
                                          {"CUDA_VISIBLE_DEVICES": "1"}]
  assert devices.describe_slots(slots, 5) == "2 at a time: GPU 0 | GPU 1"


def test_groups_are_subsets_of_the_users_visible_devices():
  visible = gpus(4, {"CUDA_VISIBLE_DEVICES": "3,5,GPU-abc,7"})
  slots = devices.device_slots(visible, num_folds=2)
  assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["3,5", "GPU-abc,7"]
  slots = devices.device_slots(visible, num_folds=5, devices_per_fold=2, concurrent=1)
  assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["3,5"]
  rocm = devices.devices_from_probe("gpu", 2, "rocm 6.2", {"HIP_VISIBLE_DEVICES": "1,0"})
  assert [dict(s.env) for s in devices.device_slots(rocm, 5)] == [
      {"HIP_VISIBLE_DEVICES": "1"}, {"HIP_VISIBLE_DEVICES": "0"}]


def test_cpu_and_tpu_run_folds_one_after_another_unless_forced():
  cpu = devices.devices_from_probe("cpu", 8, "", {"CUDA_VISIBLE_DEVICES": "0"})
  assert [dict(s.env) for s in devices.device_slots(cpu, 5)] == [{}]
  assert len(devices.device_slots(cpu, 5, concurrent=2)) == 2
  tpu = devices.devices_from_probe("tpu", 4, "", {})
  assert [dict(s.env) for s in devices.device_slots(tpu, 5)] == [{}]
  with pytest.raises(UserError, match="cv.concurrent"):
    devices.device_slots(tpu, 5, concurrent=2)
  with pytest.raises(UserError, match="devices_per_fold"):
    devices.device_slots(gpus(2), 5, devices_per_fold=3)


def test_probe_counts_devices_without_starting_a_backend_here():
  # A fresh interpreter with everything the cv parent imports: the probe must not start one.
  code = ("import experiments.cv; from wh_errmap.cv import devices; from jax._src import xla_bridge;"
          "d = devices.probe_devices(); print(d.backend, d.count, "
          "xla_bridge.backends_are_initialized())")
  env = cpu_env(3)
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == ["cpu", "3", "False"]


# ---------------------------------------------------------------------------- child commands

def child_config(command: list[str]) -> ml_collections.ConfigDict:
  """The config launch.py builds from `command` (flag shortcuts first, then --set)."""
  args = dict(a[2:].split("=", 1) for a in command if a.startswith("--") and
              not a.startswith("--set="))
  config = experiments.load(args["experiment"]).get_config()
  experiments.override(config, [f"fold={args['fold']}"])
  experiments.override(config, [a[len("--set="):] for a in command if a.startswith("--set=")])
  return config


@pytest.mark.parametrize("module", [cv, cv_small])
def test_child_config_equals_the_parents_fold_config(module):
  config = module.get_config()
  config.cv.folds = (1, 3)
  config.overwrite = True
  config.data_dir = "/data/with space/MMWHS"
  config.preprocess.spacing = (1.5, 1.5, 2.0)
  config.optim.learning_rate = 3.3e-4
  config.stage = "predictor"
  experiment = "cv_fold_small" if module is cv_small else "cv_fold"
  command = commands.fold_command(["python", "launch.py"], experiment, config, 3, "runs/x")
  assert command[:5] == ["python", "launch.py", f"--experiment={experiment}", "--fold=3",
                         "--workdir=runs/x"]
  expected = commands.fold_config(config).to_dict()
  expected.update(fold=3, overwrite=False)   # the parent moved an old run aside already
  assert child_config(command).to_dict() == expected
  assert not any(a.startswith("--set=cv.") for a in command)


def test_every_leaf_is_passed_whatever_fields_the_config_has():
  config = cv.get_config()
  config.mesh = ml_collections.ConfigDict({"data": -1, "axes": ("data", "space"), "note": None,
                                          "scale": 0.5})
  sets = [a for a in commands.fold_command(["l"], "cv_fold", config, 0, "w")
          if a.startswith("--set=")]
  assert {"--set=mesh.data=-1", "--set=mesh.axes=('data', 'space')",
          "--set=mesh.note=None"} <= set(sets)
  config.mesh.scale = float("inf")
  with pytest.raises(UserError, match="mesh.scale"):
    commands.fold_command(["l"], "cv_fold", config, 0, "w")


def test_selected_folds():
  assert commands.selected_folds(None, 5) == (0, 1, 2, 3, 4)
  assert commands.selected_folds((3, 1, 3), 5) == (1, 3)
  assert commands.selected_folds(2, 5) == (2,)
  with pytest.raises(UserError, match="cv.folds"):
    commands.selected_folds((0, 5), 5)


# ---------------------------------------------------------------------------- progress

def test_progress_is_the_newest_tagged_line_of_each_fold():
  log = ("fold 0: 16 training and 4 test cases\n"
         "[seg3d] training steps 1..20000 of 20000 on 1 device(s)\n"
         "[seg3d] step 1150/20000  loss 0.4  1.2 steps/s\n"
         "[seg3d] step 1200/20000  loss 0.3  1.2 steps/s  ETA 4:21:00\n")
  assert children.fold_progress(log) == "seg3d 1200/20000"
  assert children.fold_progress(log + "[seg2d] training steps 1..20000 of 20000\n") == "seg2d"
  assert children.fold_progress("[predictor] resuming from the checkpoint at step 300/20000\n") \
      == "predictor 300/20000"
  assert children.fold_progress("[evaluate] mr_train_1003 (2/4): 3d-final Dice 0.8\n") \
      == "evaluate 2/4"
  assert children.fold_progress("preprocessed mr_train_1001 (1/20)\n") == "starting"
  line = children.progress_line({4: "FAILED", 0: "seg3d 1200/20000", 2: "done",
                              1: "predictor 300/20000", 3: "waiting"})
  assert line == ("cv: fold0 seg3d 1200/20000 | fold1 predictor 300/20000 | fold2 done | "
                  "fold3 waiting | fold4 FAILED")


# ---------------------------------------------------------------------------- scheduling

def fake_fold(code: str) -> list[str]:
  return [sys.executable, "-c", "import os, signal, sys, time, pathlib\n" + code]


def meet(me: str, other: str) -> str:
  """Code for a fake fold that waits until `other` runs too (exit 9 if it never does)."""
  return (f"pathlib.Path({me!r}).touch()\n"
          f"for _ in range(600):\n"
          f"  if pathlib.Path({other!r}).exists(): break\n"
          f"  time.sleep(0.1)\n"
          f"else: sys.exit(9)\n")


def test_a_failed_fold_does_not_stop_the_others(tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  fold_commands = {
      0: fake_fold(meet(a, b) + "print('[seg3d] step 5/10 on', os.environ['SLOT'])"),
      1: fake_fold(meet(b, a) + "print('slot', os.environ['SLOT']); print('boom: bad thing');"
                   "sys.exit(3)"),
      2: fake_fold("print('[predictor] step 1/2'); os.kill(os.getpid(), signal.SIGKILL)"),
      3: fake_fold("print('[evaluate] c1 (1/1): fine')")}
  slots = [devices.Slot({"SLOT": "x"}, "x"), devices.Slot({"SLOT": "y"}, "y")]
  lines = []
  results = children.run_folds(fold_commands, slots, tmp_path / "logs", progress=lines.append,
                            poll_s=0.05)
  assert {k: r.status for k, r in results.items()} == {0: "done", 1: "failed", 2: "failed",
                                                       3: "done"}
  assert results[1].how() == "exit status 3" and "boom: bad thing" in results[1].tail
  assert results[2].how() == "killed by SIGKILL (out of memory?)"
  # Folds 0 and 1 ran at the same time, on the two groups.
  log0 = (tmp_path / "logs" / "fold0.log").read_text()
  assert "[seg3d] step 5/10 on x" in log0 and "slot y" in results[1].tail
  assert "=== cv: fold 0 started" in log0 and "SLOT=x" in log0
  assert any("fold1 FAILED" in line and "exit status 3" in line for line in lines)
  assert lines[-1] == "cv: fold0 done | fold1 FAILED | fold2 FAILED | fold3 done"
  message = children.failure_message([results[1], results[2]], "the report covers fold(s) 0, 3")
  assert message.startswith("2 fold(s) failed: 1, 2; the report covers fold(s) 0, 3")
  assert str(tmp_path / "logs" / "fold1.log") in message and "    boom: bad thing" in message


def test_a_signal_is_forwarded_and_the_exit_status_follows_it(tmp_path):
  ready = [tmp_path / "ready0", tmp_path / "ready1"]
  child = ("def stop(signum, frame):\n"
           "  print('[seg3d] saved a checkpoint after', signal.Signals(signum).name)\n"
           "  sys.exit(128 + signum)\n"
           "signal.signal(signal.SIGTERM, stop)\n"
           "pathlib.Path(sys.argv[1]).touch()\n"
           "time.sleep(120)\n")
  fold_commands = {k: fake_fold(child) + [str(ready[k])] for k in (0, 1)}
  fold_commands[2] = fake_fold("print('must not start')")
  slots = [devices.Slot({}, "cpu")] * 2

  def send_when_ready():
    for _ in range(600):
      if all(r.exists() for r in ready):
        break
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)

  before = signal.getsignal(signal.SIGTERM)
  threading.Thread(target=send_when_ready, daemon=True).start()
  start = time.monotonic()
  with pytest.raises(Interrupted, match="SIGTERM") as info:
    children.run_folds(fold_commands, slots, tmp_path / "logs", progress=lambda _: None, poll_s=0.05)
  assert info.value.exit_code == 128 + signal.SIGTERM
  assert time.monotonic() - start < 60
  for k in (0, 1):
    assert "saved a checkpoint after SIGTERM" in (tmp_path / "logs" / f"fold{k}.log").read_text()
  assert not (tmp_path / "logs" / "fold2.log").exists()
  assert signal.getsignal(signal.SIGTERM) is before


# ---------------------------------------------------------------------------- end to end

TINY = ("model.width1=4", "model.width2=8", "model.conv_impl='xla'",
        "preprocess.spacing=(2.0,2.0,2.0)",
        "preprocess.crop_size=(16,16,16)", "preprocess.margin_mm=2.0",
        "input.crop_3d=(16,16,8)", "input.crop_2d=(16,16)", "input.crop_predictor=(16,16,8)",
        "train.seg3d.steps=2", "train.seg2d.steps=2", "train.predictor.steps=2",
        "train.seg2d.batch_size=2", "train.log_every=1", "train.checkpoint_every=2",
        "optim.warmup_steps=1", "nifti='none'", "splits.num_folds=2", "cv.folds=(0,1)",
        "cv.concurrent=2", "cv.progress_every=5")


def launch_cv(workdir, data, cache):
  env = cpu_env(WH_ERRMAP_CACHE=str(cache))
  start = time.monotonic()
  result = subprocess.run(
      [sys.executable, "launch.py", "--experiment=cv_small", f"--workdir={workdir}",
       f"--data_dir={data}", *(f"--set={s}" for s in TINY)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  return result, time.monotonic() - start


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
  """A 2-fold cv with fold1 blocked by a file where its folder goes, then the same command
  again with the file removed."""
  root = tmp_path_factory.mktemp("cv")
  data = root / "data"
  data.mkdir()
  rng = np.random.default_rng(0)
  for i in range(4):
    label = np.roll(blob_label(), i, axis=0)
    image = (100 + 50 * (label > 0) + rng.normal(0, 5, label.shape)).astype(np.float32)
    write_nifti(data / f"mr_train_100{i + 1}_image.nii.gz", image)
    write_nifti(data / f"mr_train_100{i + 1}_label.nii.gz", label)
  workdir = root / "run"
  workdir.mkdir()
  (workdir / "fold1").write_text("in the way")
  first = launch_cv(workdir, data, root / "cache")
  first_report = (workdir / "report" / "report.md").read_text()
  print(f"\n--- first run, stdout:\n{first[0].stdout}\n--- stderr:\n{first[0].stderr}")
  (workdir / "fold1").unlink()
  second = launch_cv(workdir, data, root / "cache")
  print(f"--- second run, stdout:\n{second[0].stdout}")
  return workdir, first, first_report, second


def test_a_failed_fold_is_named_and_the_report_still_written(two_runs):
  workdir, (result, seconds), report, _ = two_runs
  print(f"first run: {seconds:.0f} s")
  assert result.returncode == 1, result.stderr[-3000:]
  assert result.stderr.startswith("error: 1 fold(s) failed: 1;"), result.stderr[-3000:]
  assert str(workdir / "logs" / "fold1.log") in result.stderr
  assert "a part of the path is a file" in result.stderr   # fold1's own error, from its log
  assert "Traceback" not in result.stderr
  assert (workdir / "fold0" / "records.json").exists()
  assert "**Missing or incomplete: fold 1 (" in report
  assert "cv: fold0 done" in result.stdout and "cv: fold1 FAILED" in result.stdout
  recorded = json.loads((workdir / "config.json").read_text())
  assert "cv" not in recorded and recorded["train"]["seg3d"]["steps"] == 2


def test_running_again_skips_finished_folds_and_completes_the_rest(two_runs):
  workdir, _, _, (result, seconds) = two_runs
  print(f"second run: {seconds:.0f} s")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "cv: fold0 has its records" in result.stdout
  assert "fold0 started" not in result.stdout and "cv: fold1 done" in result.stdout
  assert (workdir / "fold1" / "records.json").exists()
  assert "All 2 folds are complete." in (workdir / "report" / "report.md").read_text()
  log = (workdir / "logs" / "fold1.log").read_text()
  assert log.count("=== cv: fold 1 started") == 2   # the failed attempt is kept
