"""Training: mesh and shardings, train state, step functions, the resumable loop."""
