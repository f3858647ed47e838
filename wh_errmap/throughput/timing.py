"""Throughput of the JAX training steps, whole-volume inference, per-case QC latency and
the input stream.

Every step is timed as the training loop runs it (`loop.compile_step`: donated state, batch
sharded over all devices, no host sync between steps): compile, `warmup` untimed calls, then
`iters` calls and one `block_until_ready` at the end, so the time per step is throughput
including dispatch, as in training. FLOPs come from XLA's cost analysis of the compiled step
and the memory footprint from its memory analysis (arguments + outputs + temporaries, per
device); on GPU the process's peak from the allocator is reported as well. QC ("qc") is
timed as latency instead: each call takes a preprocessed volume and mask from the host and
returns the QI to it, as quality control of one new case does.

Only jax, flax, optax and numpy are needed (the GPU machines lack nibabel and grain); the
input-stream measurement imports grain and scipy itself and is skipped without them.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from wh_errmap.data.structures import NUM_CLASSES
from wh_errmap.metrics.segmentation import quality_indicator
from wh_errmap.models.factory import make_model
from wh_errmap.models.inference import error_probability, segment_logits
from wh_errmap.train.loop import compile_step
from wh_errmap.train.losses import batch_dice
from wh_errmap.train.masks import predictor_mask_sources
from wh_errmap.train.sharding import model_layout
from wh_errmap.train.state import create_state, make_optimizer
from wh_errmap.train.steps import make_predictor_step, make_segmentor_step
from wh_errmap.utils.mesh import global_batch, make_mesh, replicated

STEPS = ("seg3d_train", "seg2d_train", "predictor_train", "inference", "qc", "input")

# Dense peak FLOP/s per device from the vendors' datasheets: (bfloat16, float32). float32
# counts TF32 tensor cores, which XLA uses for f32 convolutions and matmuls by default on
# these GPUs. Matched against jax's device_kind in this order.
PEAK_FLOPS = (
    ("H200", 989.4e12, 494.7e12),
    ("H100 PCIe", 756.0e12, 378.0e12),
    ("H100", 989.4e12, 494.7e12),
    ("A100", 312.0e12, 156.0e12),
)


@dataclasses.dataclass
class Result:
  """One measured step; rates are per global batch over all devices."""
  config: str
  step: str
  batch: int
  voxels_per_sample: int
  seconds_per_iter: float
  flops_per_iter: float | None = None
  footprint_bytes: int | None = None
  peak_bytes: int | None = None
  peak_flops: float | None = None
  note: str = ""
  # Training steps: samples/s of the input stream that feeds this step in training (the
  # host crop stream, or the grain parameter stream when crops are made on the device).
  input_samples_per_s: float | None = None

  @property
  def samples_per_s(self) -> float:
    return self.batch / self.seconds_per_iter

  @property
  def mvoxels_per_s(self) -> float:
    return self.samples_per_s * self.voxels_per_sample / 1e6

  @property
  def flops_per_s(self) -> float | None:
    return None if self.flops_per_iter is None else self.flops_per_iter / self.seconds_per_iter

  @property
  def input_bound(self) -> float | None:
    """Step samples/s over input samples/s: above 1, the step waits for its input."""
    if not self.input_samples_per_s:
      return None
    return self.samples_per_s / self.input_samples_per_s

  @property
  def fraction_of_peak(self) -> float | None:
    if self.flops_per_s is None or self.peak_flops is None:
      return None
    return self.flops_per_s / self.peak_flops

  def to_json(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "samples_per_s": self.samples_per_s,
            "mvoxels_per_s": self.mvoxels_per_s, "flops_per_s": self.flops_per_s,
            "input_bound": self.input_bound,
            "fraction_of_peak": self.fraction_of_peak}


def peak_flops(device: jax.Device, dtype: jnp.dtype) -> float | None:
  """The device's dense peak FLOP/s for `dtype`, or None when unknown (CPUs, other chips)."""
  for name, bf16, f32 in PEAK_FLOPS:
    if name in device.device_kind:
      return bf16 if dtype == jnp.bfloat16 else f32
  return None


def _flops(compiled: Any) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):   # one dict per device program in older jax
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  # Cost analysis is per device program: the whole step does it on every device.
  return None if flops is None or flops <= 0 else float(flops) * jax.device_count()


def _footprint(compiled: Any) -> int | None:
  memory = compiled.memory_analysis()
  if memory is None:
    return None
  return int(memory.argument_size_in_bytes + memory.output_size_in_bytes
             + memory.temp_size_in_bytes - memory.alias_size_in_bytes)


def _device_peak_bytes() -> int | None:
  stats = jax.local_devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")


def _time(run: Callable[[Any], Any], carry: Any, warmup: int, iters: int) -> tuple[float, Any]:
  """Seconds per call of `carry = run(carry)` after `warmup` calls, synchronised at the end."""
  for _ in range(warmup):
    carry = run(carry)
  jax.block_until_ready(carry)
  start = time.perf_counter()
  for _ in range(iters):
    carry = run(carry)
  jax.block_until_ready(carry)
  return (time.perf_counter() - start) / iters, carry


def synthetic_batch(rng: np.random.Generator, batch: int, crop: Sequence[int],
                    ) -> dict[str, np.ndarray]:
  """A training batch with image intensities in [-1, 1] and one ellipsoid per class."""
  grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in crop], indexing="ij")
  label = np.zeros((batch, *crop), np.int32)
  for b in range(batch):
    for c in range(1, NUM_CLASSES):
      centre = rng.uniform(-0.5, 0.5, len(crop))
      radius = rng.uniform(0.15, 0.35, len(crop))
      inside = sum(((g - m) / r) ** 2 for g, m, r in zip(grids, centre, radius)) < 1
      label[b][inside] = c
  image = (label / (NUM_CLASSES - 1) * 1.6 - 0.8 + rng.normal(0, 0.1, label.shape))
  return {"image": image[..., None].astype(np.float32), "label": label}


class StepBench:
  """Builds models, states and batches for one config and times its steps."""

  def __init__(self, name: str, config: ml_collections.ConfigDict, warmup: int, iters: int):
    self.name, self.config, self.warmup, self.iters = name, config, warmup, iters
    self.mesh = make_mesh(jax.devices()[:1])   # random variables, inference and QC
    self.models = {"seg3d": make_model(config.model, 3, NUM_CLASSES),
                   "seg2d": make_model(config.model, 2, NUM_CLASSES),
                   "predictor": make_model(config.model, 3, 1)}
    self.dtype = self.models["seg3d"].dtype
    self.peak = peak_flops(jax.devices()[0], self.dtype)
    self.np_rng = np.random.default_rng(config.seed)
    self._initialised: dict[str, dict[str, Any]] = {}

  def _state(self, model_name: str, crop: Sequence[int], batch: int, channels: int,
             mesh: jax.sharding.Mesh | None = None, model: Any = None):
    tx = make_optimizer(self.config.optim, 1000)
    rng = jax.random.key(self.config.seed + len(model_name))
    return create_state(model or self.models[model_name], tx, (batch, *crop, channels), rng,
                        mesh or self.mesh)

  def _variables(self, model_name: str) -> dict[str, Any]:
    """Random {"params", "batch_stats"} of a model, made once (they do not depend on sizes)."""
    if model_name not in self._initialised:
      model = self.models[model_name]
      channels = 1 + NUM_CLASSES if model_name == "predictor" else 1
      state = self._state(model_name, (8,) * model.spatial_dims, 1, channels)
      self._initialised[model_name] = {"params": state.params, "batch_stats": state.batch_stats}
    return self._initialised[model_name]

  def _result(self, step: str, batch: int, crop: Sequence[int], seconds: float,
              compiled: Any, note: str = "") -> Result:
    return Result(self.name, step, batch, int(np.prod(crop)), seconds, _flops(compiled),
                  _footprint(compiled), _device_peak_bytes(), self.peak, note)

  def train_step(self, step: str) -> Result:
    """Times the 3D or 2D segmentor step, or the predictor step with on-the-fly masks, on
    the model's training layout (sharding.model_layout: mesh.space, per-device batches).

    Where training would make the crops on the device (input.on_device), the timed step
    makes them too, from synthetic volumes held on the device; the input rate beside it is
    that of the stream that feeds the step (see _feed).
    """
    model_name = "predictor" if step == "predictor_train" else step.removesuffix("_train")
    layout = model_layout(self.config, model_name)
    mesh = layout.mesh()
    models = {name: make_model(self.config.model, 2 if name == "seg2d" else 3,
                               1 if name == "predictor" else NUM_CLASSES, layout.space)
              for name in self.models}
    if step == "predictor_train":
      crop, channels = tuple(self.config.input.crop_predictor), 1 + NUM_CLASSES
      fn = make_predictor_step(models["predictor"], models["seg3d"], models["seg2d"],
                               self.config.loss, self.config.predictor.gt_probability,
                               NUM_CLASSES, predictor_mask_sources(self.config))
      frozen = jax.device_put({"seg3d": self._variables("seg3d"),
                               "seg2d": self._variables("seg2d")}, replicated(mesh))
    else:
      spatial = models[model_name].spatial_dims
      crop = tuple(self.config.input.crop_3d if spatial == 3 else self.config.input.crop_2d)
      channels, frozen = 1, None
      fn = make_segmentor_step(models[model_name], self.config.loss,
                               batch_dice(self.config, model_name))
    state = self._state(model_name, crop, layout.batch, channels, mesh, models[model_name])
    batch, device_data, make_batch, input_rate, note = self._feed(crop, layout.batch)
    batch_arrays = global_batch(mesh, batch)
    if device_data is not None:
      device_data = jax.device_put(device_data, replicated(mesh))
    base_rng = jax.device_put(jax.random.key(self.config.seed), replicated(mesh))
    jitted = compile_step(fn, mesh, batch_arrays, with_frozen=frozen is not None,
                          make_batch=make_batch)
    compiled = jitted.lower(state, batch_arrays, base_rng, frozen, device_data).compile()
    seconds, _ = _time(lambda s: compiled(s, batch_arrays, base_rng, frozen, device_data)[0],
                       state, self.warmup, self.iters)
    if layout.space > 1:
      note = f"{note}, {layout.data} x {layout.space} mesh" if note else \
          f"{layout.data} x {layout.space} mesh"
    result = self._result(step, layout.batch, crop, seconds, compiled, note)
    result.input_samples_per_s = input_rate
    return result

  def _synthetic_cases(self) -> list["_Volume"]:
    """Four synthetic preprocessed volumes (preprocess.crop_size), made once."""
    if not hasattr(self, "_cases"):
      volume = tuple(self.config.preprocess.crop_size)
      self._cases = []
      for k in range(4):
        sample = synthetic_batch(self.np_rng, 1, volume)
        self._cases.append(_Volume(f"synthetic{k}", sample["image"][0, ..., 0],
                                   sample["label"][0].astype(np.uint8)))
    return self._cases

  def _feed(self, crop: tuple[int, ...], batch: int) -> tuple:
    """(batch, device_data, make_batch, input samples/s, note) for a step's timing.

    As training feeds it: crops made on the device from the grain parameter stream when
    input.on_device resolves so (device_crops.use_device_data), else host crops. The input
    rate is that stream's, measured here; None (and synthetic host batches) where grain or
    scipy is missing.
    """
    try:
      from wh_errmap.data.device_crops import crop_batch, stack_volumes, use_device_data
      from wh_errmap.data.pipeline import measure_rate, train_dataset
    except ImportError as e:
      return synthetic_batch(self.np_rng, batch, crop), None, None, None, f"no input: {e.name}"
    cases = self._synthetic_cases()
    on_device = use_device_data(self.config.input.on_device, cases)
    output = "params" if on_device else "crops"

    def stream():
      return train_dataset(cases, crop_size=crop, batch_size=batch, seed=self.config.seed,
                           scale_range=tuple(self.config.input.scale_range),
                           num_workers=self.config.input.num_workers, output=output,
                           shard_index=0, shard_count=1)

    rate = measure_rate(stream(), max(self.iters, 4))["samples_per_s"]
    it = iter(stream())
    first = next(it)
    if hasattr(it, "close"):
      it.close()
    if not on_device:
      return first, None, None, rate, ""
    return (first, stack_volumes(cases), functools.partial(crop_batch, crop_size=crop), rate,
            "crops on device")

  def inference(self) -> Result:
    """Times one case: both segmentors' outputs, the error map of the 3D mask and its QI."""
    volume = tuple(self.config.preprocess.crop_size)
    variables = {name: self._variables(name) for name in ("seg3d", "seg2d", "predictor")}
    threshold = self.config.predictor.threshold
    models = self.models

    @jax.jit
    def per_case(variables, image):
      logits3d = segment_logits(models["seg3d"], variables["seg3d"], image)
      logits2d = segment_logits(models["seg2d"], variables["seg2d"], image)
      mask = jnp.argmax(logits3d["final"], -1)
      error = error_probability(models["predictor"], variables["predictor"], image, mask,
                                NUM_CLASSES)
      masks2d = {k: jnp.argmax(v, -1).astype(jnp.uint8) for k, v in logits2d.items()}
      return {"qi": quality_indicator(error[None], threshold)[0], "masks2d": masks2d}

    image = jnp.asarray(synthetic_batch(self.np_rng, 1, volume)["image"][0])
    compiled = per_case.lower(variables, image).compile()
    # The QI goes to the host each case, as in evaluation.
    seconds, _ = _time(lambda _: float(compiled(variables, image)["qi"]), None,
                       self.warmup, self.iters)
    return self._result("inference", 1, volume, seconds, compiled)

  def qc(self) -> Result:
    """Times quality control of one case: a preprocessed volume and a mask from the host in,
    the predictor's error map of that mask and its QI out (no segmentor runs)."""
    volume = tuple(self.config.preprocess.crop_size)
    model, variables = self.models["predictor"], self._variables("predictor")
    threshold = self.config.predictor.threshold

    @jax.jit
    def per_mask(variables, image, mask):
      error = error_probability(model, variables, image, mask, NUM_CLASSES)
      return quality_indicator(error[None], threshold)[0]

    sample = synthetic_batch(self.np_rng, 1, volume)
    image, mask = sample["image"][0], sample["label"][0].astype(np.uint8)
    compiled = per_mask.lower(variables, image, mask).compile()
    # Host arrays in and the QI back each call: latency per case, not pipelined throughput.
    seconds, _ = _time(lambda _: float(compiled(variables, image, mask)), None,
                       self.warmup, self.iters)
    return self._result("qc", 1, volume, seconds, compiled)

  def input_stream(self) -> Result:
    """Samples/s of the grain training stream of 3D crops, as the 3D segmentor's training
    reads it: host crops (grain + scipy), or only their parameters when the crops are made
    on the device (input.on_device)."""
    try:
      from wh_errmap.data.device_crops import use_device_data
      from wh_errmap.data.pipeline import measure_rate, train_dataset
    except ImportError as e:
      return Result(self.name, "input", 0, 0, float("nan"), note=f"skipped: {e}")
    crop = tuple(self.config.input.crop_3d)
    batch = model_layout(self.config, "seg3d").batch
    cases = self._synthetic_cases()
    on_device = use_device_data(self.config.input.on_device, cases)
    dataset = train_dataset(cases, crop_size=crop, batch_size=batch, seed=self.config.seed,
                            scale_range=tuple(self.config.input.scale_range),
                            num_workers=self.config.input.num_workers,
                            output="params" if on_device else "crops",
                            shard_index=0, shard_count=1)
    rate = measure_rate(dataset, max(self.iters, 4))
    return Result(self.name, "input", batch, int(np.prod(crop)),
                  batch / rate["samples_per_s"],
                  note="grain parameters; crops on device" if on_device else "host CPU, grain")

  def run(self, step: str) -> Result:
    if step == "inference":
      return self.inference()
    if step == "qc":
      return self.qc()
    if step == "input":
      return self.input_stream()
    if step in ("seg3d_train", "seg2d_train", "predictor_train"):
      return self.train_step(step)
    raise ValueError(f"unknown benchmark step {step!r}; choose from {', '.join(STEPS)}")


@dataclasses.dataclass
class _Volume:
  case_id: str
  image: np.ndarray
  label: np.ndarray
