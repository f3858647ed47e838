"""Which devices each fold of a cross-validation runs on (`experiments/cv.py`).

The parent process must not start a JAX backend itself (on a GPU, JAX takes most of the
memory at first use and the children would starve): devices are counted by a short probe
subprocess, and nothing here imports jax. On a host with several GPUs the folds run at the
same time, one per group of GPUs (CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES); on the CPU or
a TPU one after another with every device.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from typing import Any, Mapping, Sequence

from wh_errmap.errors import UserError

_PROBE = ("import json, jax; d = jax.local_devices(); print(json.dumps({"
          "'backend': jax.default_backend(), 'count': len(d), "
          "'version': str(getattr(d[0].client, 'platform_version', ''))}))")


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
