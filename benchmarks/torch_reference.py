"""PyTorch reference of the wh_errmap training and inference steps, for benchmarking.

A standalone re-implementation (torch, numpy and the standard library only; it imports
neither jax nor wh_errmap, so it runs where those are absent) of

  * `wh_errmap.models.voxresnet.VoxResNet` (2D and 3D, batch norm, linear upsampling),
    in torch's channels-first layout: a JAX (N, X, Y, Z, C) array is a torch
    (N, C, D, H, W) tensor with X -> D, Y -> H, Z -> W;
  * `wh_errmap.losses.segmentation_loss` and `error_map_loss` (deeply supervised
    cross entropy + soft Dice);
  * the segmentor and predictor training steps of `wh_errmap.train.steps` (the predictor's
    10 auto masks come from frozen segmentors inside the step, as in `wh_errmap.masks`);
  * whole-volume inference (3D segmentor, 2D segmentor slice by slice, predictor, QI).

Usage:

  python benchmarks/torch_reference.py --spec SPEC.json --out OUT.json

SPEC.json holds {"configs": [...], "warmup", "iters", "device", "amp", "compile",
"channels_last", "steps"}; see `run` for the fields and the result format.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SIDE_OUTPUTS = ("side2", "side3", "side4", "side5")
OUTPUT_NAMES = ("final",) + SIDE_OUTPUTS
NUM_DOWNSAMPLINGS = 3
SIZE_MULTIPLE = 2**NUM_DOWNSAMPLINGS
NUM_CLASSES = 8
DICE_EPS = 1.0
GT_PROBABILITY = 0.1
LEARNING_RATE = 1e-3
SLICE_CHUNK = 32
ERROR_THRESHOLD = 0.5
STEPS = ("seg3d_train", "seg2d_train", "predictor_train", "inference")
# flax's BatchNorm momentum 0.9 (weight of the old running average) is torch's 0.1.
BN_MOMENTUM = 0.1
BN_EPS = 1e-5

PAPER_CONFIG = {
    "name": "paper", "width1": 32, "width2": 64, "num_voxres": 2, "num_classes": NUM_CLASSES,
    "crop_3d": [96, 96, 80], "crop_2d": [96, 96], "crop_predictor": [96, 96, 80],
    "batch_3d": 2, "batch_2d": 16, "batch_predictor": 2, "volume": [120, 120, 90],
}

Outputs = dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

def linear_interp_matrix(in_size: int, factor: int,
                         device: torch.device | str | None = None) -> torch.Tensor:
  """(in_size * factor, in_size) float32 weights: output voxel x samples input at x / factor.

  The same grid as wh_errmap's `_linear_interp_matrix`: input voxel i sits on output voxel
  factor * i, and output voxels past factor * (in_size - 1) take the last input value.
  Built from torch ops so that torch.compile can fold it into a constant.
  """
  out_size = in_size * factor
  x = torch.arange(out_size, device=device)
  lo = torch.clamp(torch.div(x, factor, rounding_mode="floor"), max=in_size - 1)
  hi = torch.clamp(lo + 1, max=in_size - 1)
  frac = torch.clamp((x - lo * factor).to(torch.float32) / factor, 0.0, 1.0)[:, None]
  return (F.one_hot(lo, in_size).to(torch.float32) * (1.0 - frac)
          + F.one_hot(hi, in_size).to(torch.float32) * frac)


def upsample_linear(x: torch.Tensor, factor: int) -> torch.Tensor:
  """Separable (bi/tri)linear upsampling of (N, C, *S) by an integer factor, in float32.

  Applies one interpolation matrix per spatial axis (first spatial axis first, as the JAX
  version), outside autocast so that the interpolation is not rounded to bf16.
  """
  with torch.autocast(device_type=x.device.type, enabled=False):
    x = x.float()
    for axis in range(2, x.ndim):
      weights = linear_interp_matrix(x.shape[axis], factor, x.device)
      x = torch.movedim(torch.tensordot(weights, x, dims=([1], [axis])), 0, axis)
  return x


def _lecun_normal_(weight: torch.Tensor) -> None:
  """flax's default kernel init: truncated normal (+-2 std) of variance 1 / fan_in."""
  fan_in = weight.shape[1] * math.prod(weight.shape[2:])
  # 0.8796... is the std of a unit normal truncated to [-2, 2] (as in jax's variance_scaling).
  std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
  nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


def _conv(spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int,
          stride: int = 1) -> nn.Module:
  """Conv with bias, padding (k - 1) / 2 and flax's initialisation."""
  cls = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
  conv = cls(in_channels, out_channels, kernel_size, stride=stride,
             padding=(kernel_size - 1) // 2, bias=True)
  _lecun_normal_(conv.weight)
  nn.init.zeros_(conv.bias)
  return conv


def _norm(spatial_dims: int, channels: int) -> nn.Module:
  cls = nn.BatchNorm3d if spatial_dims == 3 else nn.BatchNorm2d
  return cls(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class VoxRes(nn.Module):
  """Pre-activation residual module: x + conv2(relu(norm2(conv1(relu(norm1(x))))))."""

  def __init__(self, spatial_dims: int, channels: int) -> None:
    super().__init__()
    self.norm1 = _norm(spatial_dims, channels)
    self.conv1 = _conv(spatial_dims, channels, channels, 3)
    self.norm2 = _norm(spatial_dims, channels)
    self.conv2 = _conv(spatial_dims, channels, channels, 3)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = self.conv1(F.relu(self.norm1(x)))
    y = self.conv2(F.relu(self.norm2(y)))
    return x + y


class VoxResNet(nn.Module):
  """Deeply supervised VoxResNet (2D or 3D), the torch twin of wh_errmap's flax model.

  Submodule names follow the flax parameter names (conv1a, norm1a, conv1b, stage{s}_norm,
  stage{s}_down, stage{s}_voxres{k}.{norm1,conv1,norm2,conv2}, side{2..5}_classifier), so
  parameters map one to one. Only batch norm and linear upsampling are implemented.

  Args:
    spatial_dims: 2 or 3.
    in_channels: 1 for the segmentors, 1 + num_classes for the predictor.
    num_classes: output channels (8 for the segmentors, 1 for the predictor).
    width1: channels of conv1a/conv1b.
    width2: channels of the three downsampling stages.
    num_voxres: VoxRes modules per stage.
  """

  def __init__(self, spatial_dims: int = 3, in_channels: int = 1, num_classes: int = 8,
               width1: int = 32, width2: int = 64, num_voxres: int = 2) -> None:
    super().__init__()
    if spatial_dims not in (2, 3):
      raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    self.spatial_dims = spatial_dims
    self.num_classes = num_classes
    d = spatial_dims
    self.conv1a = _conv(d, in_channels, width1, 3)
    self.norm1a = _norm(d, width1)
    self.conv1b = _conv(d, width1, width1, 3)
    channels = width1
    for stage in range(1, NUM_DOWNSAMPLINGS + 1):
      self.add_module(f"stage{stage}_norm", _norm(d, channels))
      self.add_module(f"stage{stage}_down", _conv(d, channels, width2, 3, stride=2))
      channels = width2
      for k in range(1, num_voxres + 1):
        self.add_module(f"stage{stage}_voxres{k}", VoxRes(d, width2))
    self.num_voxres = num_voxres
    for name, channels in zip(SIDE_OUTPUTS, (width1, width2, width2, width2)):
      self.add_module(f"{name}_classifier", _conv(d, channels, num_classes, 1))

  def forward(self, x: torch.Tensor) -> Outputs:
    """Logits of the fused and side outputs.

    Args:
      x: (N, C_in, *spatial) float input of any spatial size: it is edge-padded at the far
        end of each spatial axis to a multiple of 8 and the outputs are cropped back.
    Returns:
      {"final", "side2", ..., "side5"} -> (N, num_classes, *spatial) float32 logits;
      "final" is the sum of the four side outputs.
    """
    if x.ndim != self.spatial_dims + 2:
      raise ValueError(f"expected (N, C, *{self.spatial_dims} spatial) input, got "
                       f"{tuple(x.shape)}")
    spatial = tuple(x.shape[2:])
    pad = [-size % SIZE_MULTIPLE for size in spatial]
    if any(pad):
      # F.pad takes (last axis low, last axis high, ...): pad only the far end.
      x = F.pad(x, [v for p in reversed(pad) for v in (0, p)], mode="replicate")

    h = self.conv1a(x)
    h = self.conv1b(F.relu(self.norm1a(h)))
    features = [h]
    for stage in range(1, NUM_DOWNSAMPLINGS + 1):
      h = F.relu(getattr(self, f"stage{stage}_norm")(h))
      h = getattr(self, f"stage{stage}_down")(h)
      for k in range(1, self.num_voxres + 1):
        h = getattr(self, f"stage{stage}_voxres{k}")(h)
      features.append(h)

    crop = (slice(None), slice(None), *(slice(0, size) for size in spatial))
    sides = {}
    for level, (name, feature) in enumerate(zip(SIDE_OUTPUTS, features)):
      # Classify at low resolution, then upsample the logits in float32 (equal to upsampling
      # the features first, since both maps are linear and the weights sum to 1).
      logits = getattr(self, f"{name}_classifier")(feature).float()
      if level:
        logits = upsample_linear(logits, 2**level)
      sides[name] = logits[crop]
    final = sides["side2"] + sides["side3"] + sides["side4"] + sides["side5"]
    return {"final": final, **sides}


def count_params(model: nn.Module) -> int:
  """Number of trainable scalars of a module."""
  return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------

def _soft_dice(probs: torch.Tensor, targets: torch.Tensor, eps: float) -> torch.Tensor:
  """(N, K) smoothed Dice per sample and class of (N, K, *S) probabilities and targets."""
  spatial = tuple(range(2, probs.ndim))
  intersection = torch.sum(probs * targets, dim=spatial)
  denominator = torch.sum(probs, dim=spatial) + torch.sum(targets, dim=spatial)
  return (2.0 * intersection + eps) / (denominator + eps)


def _squeeze_channel(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
  """float32 logits shaped like targets, dropping a channel axis of size 1."""
  if logits.ndim == targets.ndim + 1 and logits.shape[1] == 1:
    logits = logits[:, 0]
  if logits.shape != targets.shape:
    raise ValueError(f"logits {tuple(logits.shape)} do not match targets "
                     f"{tuple(targets.shape)}")
  return logits.float()


def _deeply_supervised(outputs: Mapping[str, torch.Tensor], side_weights: Sequence[float],
                       dice_weight: float, ce: Callable[[torch.Tensor], torch.Tensor],
                       dice: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
  """sum over outputs of weight * (ce + dice_weight * dice), "final" weighted 1."""
  sides = sorted(name for name in outputs if name != "final")
  if "final" not in outputs or len(sides) != len(side_weights):
    raise ValueError(f"expected 'final' and {len(side_weights)} side outputs, got "
                     f"{sorted(outputs)}")
  total = None
  for name, weight in zip(["final", *sides], [1.0, *side_weights]):
    term = weight * (ce(outputs[name]) + dice_weight * dice(outputs[name]))
    total = term if total is None else total + term
  return total


def segmentation_loss(outputs: Mapping[str, torch.Tensor], labels: torch.Tensor,
                      num_classes: int, side_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                      dice_weight: float = 1.0, include_background: bool = False,
                      eps: float = DICE_EPS) -> torch.Tensor:
  """Deeply supervised softmax CE + soft Dice of a segmentor (wh_errmap.losses).

  Args:
    outputs: {"final", side names} -> (N, num_classes, *S) logits.
    labels: (N, *S) integer classes in [0, num_classes).
    num_classes: C including background.
    side_weights: weights of the side outputs in sorted name order; "final" has weight 1.
    dice_weight: weight of the Dice term relative to CE in each output.
    include_background: whether class 0 takes part in the Dice mean.
    eps: Dice smoothing in numerator and denominator.
  Returns:
    float32 scalar loss.
  """
  labels = labels.long()
  onehot = torch.movedim(F.one_hot(labels, num_classes), -1, 1).float()
  if not include_background:
    onehot = onehot[:, 1:]

  def ce(logits: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels)

  def dice(logits: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(logits.float(), dim=1)
    if not include_background:
      probs = probs[:, 1:]
    return 1.0 - _soft_dice(probs, onehot, eps).mean()

  return _deeply_supervised(outputs, side_weights, dice_weight, ce, dice)


def error_map_loss(outputs: Mapping[str, torch.Tensor], targets: torch.Tensor,
                   side_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                   dice_weight: float = 1.0, eps: float = DICE_EPS) -> torch.Tensor:
  """Deeply supervised sigmoid BCE + binary soft Dice of the error-map predictor.

  Args:
    outputs: {"final", side names} -> (N, 1, *S) or (N, *S) error logits.
    targets: (N, *S) {0, 1} true error map.
    side_weights, dice_weight, eps: as in `segmentation_loss`.
  Returns:
    float32 scalar loss.
  """
  targets = targets.float()

  def ce(logits: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(_squeeze_channel(logits, targets), targets)

  def dice(logits: torch.Tensor) -> torch.Tensor:
    probs = torch.sigmoid(_squeeze_channel(logits, targets))
    return 1.0 - _soft_dice(probs[:, None], targets[:, None], eps).mean()

  return _deeply_supervised(outputs, side_weights, dice_weight, ce, dice)


# --------------------------------------------------------------------------------------------
# Masks of the frozen segmentors
# --------------------------------------------------------------------------------------------

def slicewise(model: nn.Module, volume: torch.Tensor, slice_chunk: int | None = None,
              memory_format: torch.memory_format = torch.contiguous_format) -> Outputs:
  """Applies a 2D model to every axial slice (last axis W) of (N, C, D, H, W) volumes.

  Returns {output: (N, K, D, H, W)} logits.
  """
  n, c, d, h, w = volume.shape
  slices = volume.permute(0, 4, 1, 2, 3).reshape(n * w, c, d, h)
  slices = slices.contiguous(memory_format=memory_format)
  chunks = [slices] if slice_chunk is None else torch.split(slices, slice_chunk)
  parts = [model(chunk) for chunk in chunks]
  outputs = {name: torch.cat([part[name] for part in parts]) for name in OUTPUT_NAMES}
  return {name: logits.reshape(n, w, -1, d, h).permute(0, 2, 3, 4, 1)
          for name, logits in outputs.items()}


def auto_masks(seg3d: nn.Module, seg2d: nn.Module, image: torch.Tensor,
               memory_format_2d: torch.memory_format = torch.contiguous_format,
               slice_chunk: int | None = None) -> torch.Tensor:
  """(10, N, D, H, W) int64 masks: argmax of the 3D then 2D models' 5 outputs each."""
  outputs3d = seg3d(image)
  outputs2d = slicewise(seg2d, image, slice_chunk, memory_format_2d)
  return torch.stack([torch.argmax(outputs[name], dim=1)
                      for outputs in (outputs3d, outputs2d) for name in OUTPUT_NAMES])


def pick_masks(masks: torch.Tensor, label: torch.Tensor, gt_probability: float,
               generator: torch.Generator | None = None) -> torch.Tensor:
  """One (N, *S) mask per sample: a uniform auto mask, or the label with gt_probability."""
  num_auto, n = masks.shape[:2]
  choice = torch.randint(0, num_auto, (n,), device=masks.device, generator=generator)
  use_gt = torch.rand((n,), device=masks.device, generator=generator) < gt_probability
  choice = torch.where(use_gt, torch.full_like(choice, num_auto), choice)
  candidates = torch.cat([masks, label[None].to(masks.dtype)])
  return candidates[choice, torch.arange(n, device=masks.device)]


def predictor_input(image: torch.Tensor, mask: torch.Tensor, num_classes: int) -> torch.Tensor:
  """(N, 1, *S) image and (N, *S) mask -> (N, 1 + num_classes, *S) predictor input."""
  onehot = torch.movedim(F.one_hot(mask.long(), num_classes), -1, 1).to(image.dtype)
  return torch.cat([image, onehot], dim=1)


# --------------------------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------------------------

def blob_batch(rng: np.random.Generator, batch: int, shape: Sequence[int],
               num_classes: int = NUM_CLASSES) -> tuple[np.ndarray, np.ndarray]:
  """Random (batch, 1, *shape) float32 images and (batch, *shape) int64 labels with blobs.

  Each sample holds one ellipsoid per foreground class at a random place (later classes
  overwrite earlier ones); the image is class-dependent intensity plus noise.
  """
  grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
  labels = np.zeros((batch, *shape), np.int64)
  for b in range(batch):
    for cls in range(1, num_classes):
      centre = [rng.uniform(0.2 * n, 0.8 * n) for n in shape]
      radius = [rng.uniform(0.08 * n, 0.25 * n) + 1.0 for n in shape]
      inside = sum(((g - c) / r)**2 for g, c, r in zip(grids, centre, radius)) <= 1.0
      labels[b][inside] = cls
  images = (labels / num_classes + rng.normal(0.0, 0.2, labels.shape)).astype(np.float32)
  return images[:, None], labels


class _Settings:
  """Resolved device, precision, compile and layout settings."""

  def __init__(self, spec: Mapping[str, Any]) -> None:
    device = spec.get("device", "auto")
    if device == "auto":
      device = "cuda" if torch.cuda.is_available() else "cpu"
    self.device = torch.device(device)
    on_cuda = self.device.type == "cuda"
    amp = spec.get("amp", "auto")
    if amp == "auto":
      amp = "bf16" if on_cuda else "none"
    if amp not in ("bf16", "none"):
      raise ValueError(f"amp must be 'auto', 'bf16' or 'none', got {amp!r}")
    self.amp = amp
    self.compile = _auto_bool(spec.get("compile", "auto"), on_cuda, "compile")
    self.channels_last = _auto_bool(spec.get("channels_last", "auto"), on_cuda, "channels_last")
    self.compile_errors: list[str] = []
    self.seed = int(spec.get("seed", 0))

  def autocast(self) -> torch.autocast:
    return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                          enabled=self.amp == "bf16")

  def memory_format(self, spatial_dims: int) -> torch.memory_format:
    if not self.channels_last:
      return torch.contiguous_format
    return torch.channels_last_3d if spatial_dims == 3 else torch.channels_last

  def sync(self) -> None:
    if self.device.type == "cuda":
      torch.cuda.synchronize(self.device)


def _auto_bool(value: Any, auto: bool, name: str) -> bool:
  if value == "auto":
    return auto
  if isinstance(value, bool):
    return value
  raise ValueError(f"{name} must be 'auto', true or false, got {value!r}")


def _model(settings: _Settings, spatial_dims: int, in_channels: int, num_classes: int,
           config: Mapping[str, Any], train: bool) -> nn.Module:
  model = VoxResNet(spatial_dims, in_channels, num_classes, config["width1"], config["width2"],
                    config["num_voxres"])
  model = model.to(settings.device, memory_format=settings.memory_format(spatial_dims))
  model.train(train)
  if not train:
    model.requires_grad_(False)
  return model


def _maybe_compile(fn: Callable, enabled: bool) -> Callable:
  return torch.compile(fn, dynamic=False) if enabled else fn


def _optimizer(settings: _Settings, model: nn.Module) -> torch.optim.Optimizer:
  if settings.device.type == "cuda":
    return torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, fused=True)
  return torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)


def _to_device(settings: _Settings, array: np.ndarray, spatial_dims: int | None = None
               ) -> torch.Tensor:
  tensor = torch.from_numpy(array).to(settings.device)
  if spatial_dims is not None:
    tensor = tensor.contiguous(memory_format=settings.memory_format(spatial_dims))
  return tensor


class _Step:
  """A built benchmark step: `iteration()` runs one synchronised iteration."""

  def __init__(self, iteration: Callable[[], Any], batch: int, voxels: int, num_params: int,
               extra: Callable[[], dict[str, Any]] | None = None) -> None:
    self.iteration = iteration
    self.batch = batch
    self.voxels = voxels
    self.num_params = num_params
    self.extra = extra or (lambda: {})


def _build_segmentor_train(settings: _Settings, config: Mapping[str, Any], spatial_dims: int,
                           compile_: bool) -> _Step:
  crop = config["crop_3d"] if spatial_dims == 3 else config["crop_2d"]
  batch = config["batch_3d"] if spatial_dims == 3 else config["batch_2d"]
  num_classes = config["num_classes"]
  rng = np.random.default_rng(settings.seed)
  images, labels = blob_batch(rng, batch, crop, num_classes)
  image = _to_device(settings, images, spatial_dims)
  label = _to_device(settings, labels)
  model = _model(settings, spatial_dims, 1, num_classes, config, train=True)
  optimizer = _optimizer(settings, model)

  def forward_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with settings.autocast():
      outputs = model(x)
    return segmentation_loss(outputs, y, num_classes)

  forward_loss = _maybe_compile(forward_loss, compile_)

  def iteration() -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = forward_loss(image, label)
    loss.backward()
    optimizer.step()
    return loss.item()

  return _Step(iteration, batch, math.prod(crop), count_params(model))


def _build_predictor_train(settings: _Settings, config: Mapping[str, Any],
                           compile_: bool) -> _Step:
  crop = config["crop_predictor"]
  batch = config["batch_predictor"]
  num_classes = config["num_classes"]
  rng = np.random.default_rng(settings.seed + 1)
  images, labels = blob_batch(rng, batch, crop, num_classes)
  image = _to_device(settings, images, 3)
  label = _to_device(settings, labels)
  seg3d = _model(settings, 3, 1, num_classes, config, train=False)
  seg2d = _model(settings, 2, 1, num_classes, config, train=False)
  predictor = _model(settings, 3, 1 + num_classes, 1, config, train=True)
  optimizer = _optimizer(settings, predictor)
  generator = torch.Generator(device=settings.device)
  generator.manual_seed(settings.seed)
  memory_format_2d = settings.memory_format(2)
  memory_format_3d = settings.memory_format(3)

  def masks_of(x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), settings.autocast():
      return auto_masks(seg3d, seg2d, x, memory_format_2d)

  def forward_loss(x: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
    with settings.autocast():
      outputs = predictor(x)
    return error_map_loss(outputs, error)

  masks_of = _maybe_compile(masks_of, compile_)
  forward_loss = _maybe_compile(forward_loss, compile_)

  def iteration() -> float:
    masks = masks_of(image)
    mask = pick_masks(masks, label, GT_PROBABILITY, generator)
    inputs = predictor_input(image, mask, num_classes).contiguous(memory_format=memory_format_3d)
    error = (mask != label).float()
    optimizer.zero_grad(set_to_none=True)
    loss = forward_loss(inputs, error)
    loss.backward()
    optimizer.step()
    return loss.item()

  return _Step(iteration, batch, math.prod(crop), count_params(predictor))


def _build_inference(settings: _Settings, config: Mapping[str, Any], compile_: bool) -> _Step:
  volume = config["volume"]
  num_classes = config["num_classes"]
  rng = np.random.default_rng(settings.seed + 2)
  images, _ = blob_batch(rng, 1, volume, num_classes)
  image = _to_device(settings, images, 3)
  seg3d = _model(settings, 3, 1, num_classes, config, train=False)
  seg2d = _model(settings, 2, 1, num_classes, config, train=False)
  predictor = _model(settings, 3, 1 + num_classes, 1, config, train=False)
  # All parameters: the models are frozen here, but are trained in the other steps.
  num_params = sum(p.numel() for m in (seg3d, seg2d, predictor) for p in m.parameters())
  memory_format_2d = settings.memory_format(2)
  memory_format_3d = settings.memory_format(3)
  run3d = _maybe_compile(seg3d, compile_)
  run2d = _maybe_compile(seg2d, compile_)
  run_predictor = _maybe_compile(predictor, compile_)
  last_qi: list[float] = []

  def iteration() -> float:
    with torch.inference_mode(), settings.autocast():
      outputs3d = run3d(image)
      masks3d = {name: torch.argmax(logits, dim=1) for name, logits in outputs3d.items()}
      outputs2d = slicewise(run2d, image, SLICE_CHUNK, memory_format_2d)
      masks2d = {name: torch.argmax(logits, dim=1) for name, logits in outputs2d.items()}
      del masks2d  # computed as in whole-volume inference; only the 3D mask is checked here
      inputs = predictor_input(image, masks3d["final"], num_classes)
      error_prob = torch.sigmoid(
          run_predictor(inputs.contiguous(memory_format=memory_format_3d))["final"][:, 0])
      qi = 1.0 - (error_prob > ERROR_THRESHOLD).float().mean()
      value = qi.item()
    last_qi[:] = [value]
    return value

  return _Step(iteration, 1, math.prod(volume), num_params,
               extra=lambda: {"qi": last_qi[0] if last_qi else None})


def _build(settings: _Settings, config: Mapping[str, Any], step: str, compile_: bool) -> _Step:
  if step == "seg3d_train":
    return _build_segmentor_train(settings, config, 3, compile_)
  if step == "seg2d_train":
    return _build_segmentor_train(settings, config, 2, compile_)
  if step == "predictor_train":
    return _build_predictor_train(settings, config, compile_)
  if step == "inference":
    return _build_inference(settings, config, compile_)
  raise ValueError(f"unknown step {step!r}; expected one of {STEPS}")


def _time_step(settings: _Settings, step: _Step, warmup: int, iters: int
               ) -> tuple[list[float], int | None]:
  """Runs warmup untimed and iters timed iterations; returns (seconds, peak bytes)."""
  for _ in range(warmup):
    step.iteration()
  settings.sync()
  if settings.device.type == "cuda":
    torch.cuda.reset_peak_memory_stats(settings.device)
  seconds = []
  for _ in range(iters):
    start = time.perf_counter()
    step.iteration()
    settings.sync()
    seconds.append(time.perf_counter() - start)
  peak = None
  if settings.device.type == "cuda":
    peak = int(torch.cuda.max_memory_allocated(settings.device))
  return seconds, peak


def _release(settings: _Settings) -> None:
  gc.collect()
  if settings.device.type == "cuda":
    torch.cuda.empty_cache()


def _run_step(settings: _Settings, config: Mapping[str, Any], step_name: str, warmup: int,
              iters: int) -> dict[str, Any]:
  """Builds and times one step, falling back to eager if torch.compile fails."""
  torch.manual_seed(settings.seed)
  compiled = settings.compile
  try:
    step = _build(settings, config, step_name, compiled)
    seconds, peak = _time_step(settings, step, warmup, iters)
  except Exception as error:  # noqa: BLE001 -- any compile failure falls back to eager
    if not compiled:
      raise
    message = f"{config['name']}/{step_name}: {type(error).__name__}: {error}"
    settings.compile_errors.append(message[:2000])
    print(f"torch.compile failed, falling back to eager: {message[:500]}", file=sys.stderr)
    step = None
    _reset_dynamo()
    _release(settings)
    compiled = False
    torch.manual_seed(settings.seed)
    step = _build(settings, config, step_name, compiled)
    seconds, peak = _time_step(settings, step, warmup, iters)
  median = statistics.median(seconds)
  result = {
      "config": config["name"], "step": step_name, "batch": step.batch,
      "seconds_per_iter": median, "seconds_all": seconds,
      "samples_per_s": step.batch / median if median > 0 else None,
      "voxels_per_sample": step.voxels, "peak_memory_bytes": peak,
      "num_params": step.num_params, "compiled": compiled, **step.extra(),
  }
  del step
  if compiled:
    _reset_dynamo()
  _release(settings)
  return result


def _reset_dynamo() -> None:
  """Drops torch.compile's caches, so that every step compiles (and is limited) alone."""
  from torch import _dynamo  # pylint: disable=import-outside-toplevel
  _dynamo.reset()


def _device_name(device: torch.device) -> str:
  if device.type == "cuda":
    return torch.cuda.get_device_name(device)
  return platform.processor() or platform.machine() or "cpu"


def run(spec: Mapping[str, Any]) -> dict[str, Any]:
  """Runs the benchmark described by a spec and returns the result dict.

  Args:
    spec: {"configs": [config, ...], "warmup": int, "iters": int, "device": "auto" | "cpu" |
      "cuda", "amp": "auto" | "bf16" | "none", "compile": "auto" | bool,
      "channels_last": "auto" | bool, "steps": optional list of STEPS, "seed": optional int}.
      A config holds name, width1, width2, num_voxres, num_classes, crop_3d, crop_2d,
      crop_predictor, batch_3d, batch_2d, batch_predictor and volume; missing fields take
      the paper's values (PAPER_CONFIG).
  Returns:
    {"framework": "pytorch", "torch_version", "device", "device_name", "num_threads",
     "settings": {"amp", "compile" (as used: False if any step fell back to eager),
     "channels_last"}, "results": [one dict per config and step]}. Each result has
     config, step, batch, seconds_per_iter (median), seconds_all, samples_per_s,
     voxels_per_sample, peak_memory_bytes (CUDA peak over the timed iterations, reset
     after the warm-up; None on CPU), num_params, compiled, and "qi" for inference.
  """
  settings = _Settings(spec)
  if settings.device.type == "cuda":
    torch.backends.cudnn.benchmark = True
  if settings.compile:
    from torch import _dynamo  # pylint: disable=import-outside-toplevel
    # Every model shape is a separate graph of the same forward; allow them all.
    for name in ("recompile_limit", "cache_size_limit"):
      if hasattr(_dynamo.config, name):
        setattr(_dynamo.config, name, max(getattr(_dynamo.config, name), 64))
  warmup = int(spec.get("warmup", 2))
  iters = int(spec.get("iters", 5))
  if iters < 1:
    raise ValueError(f"iters must be at least 1, got {iters}")
  steps = list(spec.get("steps", STEPS))
  unknown = [s for s in steps if s not in STEPS]
  if unknown:
    raise ValueError(f"unknown steps {unknown}; expected a subset of {STEPS}")
  results = []
  for config in spec.get("configs", [PAPER_CONFIG]):
    config = {**PAPER_CONFIG, **config}
    for step_name in steps:
      result = _run_step(settings, config, step_name, warmup, iters)
      results.append(result)
      print(f"[torch {settings.device.type}] {config['name']} {step_name}: "
            f"{result['seconds_per_iter']:.4f} s/iter", file=sys.stderr, flush=True)
  all_compiled = settings.compile and all(r["compiled"] for r in results)
  out = {
      "framework": "pytorch",
      "torch_version": torch.__version__,
      "device": settings.device.type,
      "device_name": _device_name(settings.device),
      "num_threads": torch.get_num_threads(),
      "settings": {"amp": settings.amp, "compile": all_compiled,
                   "channels_last": settings.channels_last},
      "results": results,
  }
  if settings.compile_errors:
    out["settings"]["compile_errors"] = settings.compile_errors
  return out


def write_json_atomic(path: str, data: Any) -> None:
  """Writes JSON to a temporary file beside `path`, then renames it over `path`."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(data, f, indent=2)
      f.write("\n")
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--spec", required=True, help="benchmark spec JSON file")
  parser.add_argument("--out", required=True, help="where to write the results JSON")
  args = parser.parse_args(argv)
  with open(args.spec) as f:
    spec = json.load(f)
  write_json_atomic(args.out, run(spec))
  return 0


if __name__ == "__main__":
  sys.exit(main())
