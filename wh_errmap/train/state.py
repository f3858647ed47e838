"""Train state and optimizer from config."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from wh_errmap.models.voxresnet import VoxResNet
from wh_errmap.utils.mesh import replicated


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


def make_optimizer(optim: ml_collections.ConfigDict, num_steps: int,
                   lr_factor: float = 1.0, learning_rate: float = 0.0,
                   ) -> optax.GradientTransformation:
  """Adam (or plain SGD) with linear warm-up, then cosine decay or a constant rate.

  learning_rate: this model's peak rate (train.<model>.learning_rate); 0 means
  optim.learning_rate. lr_factor multiplies it (per-device batch sizing, see
  sharding.model_layout).
  """
  if learning_rate < 0:
    raise ValueError(f"a learning rate must be > 0 (or 0 for optim.learning_rate), got "
                     f"{learning_rate}")
  # optax needs at least one warm-up step and one decay step, also for 1-step runs.
  warmup = max(1, min(optim.warmup_steps, num_steps - 1))
  peak = (learning_rate or optim.learning_rate) * lr_factor
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

  # Run once, compute-free: on the CPU it compiles without LLVM's optimisations (~1 s
  # instead of 6-13 s per model at the CPU preset); values agree to float32 rounding.
  cpu = mesh.devices.flat[0].platform == "cpu"
  options = {"xla_backend_optimization_level": 0} if cpu else None
  return jax.jit(init, out_shardings=replicated(mesh)).lower().compile(options)()
