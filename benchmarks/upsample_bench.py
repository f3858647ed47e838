"""Training-step time of the VoxResNet segmentors for each side-output upsampling.

    python benchmarks/upsample_bench.py [rounds]      (from the repository root)

Small preset (experiments/base.py apply_small_sizes): widths 8/16, one VoxRes module per
stage; 3D crops 64 x 64 x 48 in batches of 2, 2D crops 96 x 96 in batches of 8; 8 classes.
jax.jit(jax.value_and_grad(loss)) over the parameters (batch norm in train mode, softmax CE
summed over the five outputs) is compiled and run once untimed, then each round times one
step of every form in turn (interleaved, so load changes on a shared machine hit all forms
alike); the median per form is printed as a Markdown table. "transpose" and "deconv" are
the same function with the same parameters: their losses must agree.
"""
import pathlib
import statistics
import sys
import time

import jax
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from wh_errmap.data.structures import NUM_CLASSES  # noqa: E402
from wh_errmap.models.voxresnet import OUTPUT_NAMES, VoxResNet  # noqa: E402

FORMS = ("linear", "transpose", "deconv")
CASES = {"3D 2x64x64x48": (3, (2, 64, 64, 48)), "2D 8x96x96": (2, (8, 96, 96))}


def make_step(spatial_dims, shape, form):
  model = VoxResNet(spatial_dims=spatial_dims, num_classes=NUM_CLASSES, width1=8, width2=16,
                    num_voxres=1, upsample=form)
  x = jax.random.normal(jax.random.key(0), (*shape, 1))
  labels = jax.random.randint(jax.random.key(1), shape, 0, NUM_CLASSES)
  variables = jax.jit(model.init, static_argnames="train")(jax.random.key(2), x, train=False)

  def loss_fn(params, x, labels):
    outputs, _ = model.apply({**variables, "params": params}, x, train=True,
                             mutable=["batch_stats"])
    return sum(optax.softmax_cross_entropy_with_integer_labels(outputs[name], labels).mean()
               for name in OUTPUT_NAMES)

  step = jax.jit(jax.value_and_grad(loss_fn))
  params = variables["params"]
  start = time.perf_counter()
  loss, _ = jax.block_until_ready(step(params, x, labels))
  compile_s = time.perf_counter() - start
  return (lambda: jax.block_until_ready(step(params, x, labels))), compile_s, float(loss)


def main(rounds):
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {rounds} rounds")
  print("| case | form | loss | compile+1st (s) | median ms/step | min | max |")
  print("|---|---|---:|---:|---:|---:|---:|")
  for case, (spatial_dims, shape) in CASES.items():
    steps = {form: make_step(spatial_dims, shape, form) for form in FORMS}
    np.testing.assert_allclose(steps["deconv"][2], steps["transpose"][2], rtol=1e-5)
    times = {form: [] for form in FORMS}
    for _ in range(rounds):
      for form, (step, _, _) in steps.items():
        start = time.perf_counter()
        step()
        times[form].append(1e3 * (time.perf_counter() - start))
    for form in FORMS:
      t = times[form]
      print(f"| {case} | {form} | {steps[form][2]:.5f} | {steps[form][1]:.1f} | "
            f"{statistics.median(t):.0f} | {min(t):.0f} | {max(t):.0f} |", flush=True)


if __name__ == "__main__":
  main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
