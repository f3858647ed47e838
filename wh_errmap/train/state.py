"""Train state, optimizer and model construction from config."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from wh_errmap.models.voxresnet import VoxResNet
from wh_errmap.train.sharding import replicated


class TrainState(flax.struct.PyTreeNode):
  """Everything that changes during training; a pytree, so it checkpoints and shards."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  def apply_gradients(self, grads: Any, batch_stats: Any) -> "TrainState":
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        batch_stats=batch_stats, opt_state=opt_state)


def compute_dtype(name: str) -> jnp.dtype:
  """The model's compute dtype from config: "auto" is bfloat16 on GPU/TPU, float32 on CPU.

  Parameters, batch statistics, optimizer state and losses stay float32 either way (mixed
  precision); on the CPU bf16 arithmetic is emulated and slower than float32.
  """
  if name == "auto":
    return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
  if name not in ("float32", "bfloat16"):
    raise ValueError(f"model.dtype must be 'auto', 'float32' or 'bfloat16', got {name!r}")
  return jnp.dtype(name)


def conv_impl(name: str, space: int = 1) -> str:
  """The model's convolution form: model.conv_impl, with "auto" resolved for a mesh whose
  'space' axis splits each volume over `space` devices.

  XLA partitions its own convolution along a split spatial axis with one halo exchange per
  direction; the CPU's matmul form (Conv3) is a pad, shifted slices and a sum of shifted
  partial products, each partitioned separately (a 3D layer's forward + backward on a volume
  split over 4 CPU devices: 10 collective permutes against XLA's 6, same results). So
  "auto" is XLA's convolution whenever space > 1; an explicit "matmul" is kept.
  """
  if name == "auto" and space > 1:
    return "xla"
  return name


def make_model(model: ml_collections.ConfigDict, spatial_dims: int, num_classes: int,
               space: int = 1) -> VoxResNet:
  """A VoxResNet from a `model` config block (see experiments/base.py), for a mesh that
  splits each volume over `space` devices (see conv_impl)."""
  return VoxResNet(spatial_dims=spatial_dims, num_classes=num_classes, width1=model.width1,
                   width2=model.width2, num_voxres=model.num_voxres, norm=model.norm,
                   upsample=model.upsample, conv_impl=conv_impl(model.conv_impl, space),
                   dtype=compute_dtype(model.dtype))


def make_optimizer(optim: ml_collections.ConfigDict, num_steps: int,
                   lr_factor: float = 1.0) -> optax.GradientTransformation:
  """Adam (or plain SGD) with linear warm-up, then cosine decay or a constant rate.

  lr_factor multiplies optim.learning_rate (per-device batch sizing, see
  sharding.model_layout).
  """
  # optax needs at least one warm-up step and one decay step, also for 1-step runs.
  warmup = max(1, min(optim.warmup_steps, num_steps - 1))
  peak = optim.learning_rate * lr_factor
  if optim.schedule == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, peak, warmup, max(num_steps, warmup + 1), end_value=peak * optim.final_lr_fraction)
  elif optim.schedule == "constant":
    schedule = optax.linear_schedule(0.0, peak, warmup)
  else:
    raise ValueError(f"optim.schedule must be 'cosine' or 'constant', got {optim.schedule!r}")
  if optim.name == "adam":
    return optax.adamw(schedule, weight_decay=optim.weight_decay)
  if optim.name == "sgd":
    return optax.chain(optax.add_decayed_weights(optim.weight_decay), optax.sgd(schedule))
  raise ValueError(f"optim.name must be 'adam' or 'sgd', got {optim.name!r}")


def create_state(model: VoxResNet, tx: optax.GradientTransformation, input_shape: tuple,
                 rng: jax.Array, mesh: jax.sharding.Mesh) -> TrainState:
  """Initialises the state directly on the devices, replicated over the mesh.

  input_shape: (N, *spatial, C) of one batch; only its spatial rank and channels matter.
  """
  def init() -> TrainState:
    variables = model.init(rng, jnp.zeros(input_shape, jnp.float32), train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      tx=tx)

  return jax.jit(init, out_shardings=replicated(mesh))()
