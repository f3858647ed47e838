"""create_state: the model's initial variables (the initialiser compiled without LLVM's
optimisations on the CPU) and a fresh optimizer, replicated over the mesh."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tests.train.tiny import tiny_config
from wh_errmap.models.factory import make_model
from wh_errmap.train.state import create_state, make_optimizer
from wh_errmap.utils.mesh import make_mesh


def test_the_state_holds_the_models_own_initial_variables_and_a_fresh_optimizer():
  config = tiny_config()
  model = make_model(config.model, 3, 1)
  rng = jax.random.key(7)
  state = create_state(model, make_optimizer(config.optim, 10), (2, 16, 16, 8, 1), rng,
                       make_mesh(jax.devices()[:1]))
  # Independently: flax's init with the same key, eagerly.
  want = model.init(rng, jnp.zeros((2, 16, 16, 8, 1)), train=False)
  got = {"params": state.params, "batch_stats": state.batch_stats}
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  assert int(state.step) == 0
  # Adam's moments start at zero.
  moments = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
  assert moments and all(not np.asarray(m).any() for m in moments)
