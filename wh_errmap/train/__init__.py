"""Training: batch layouts, train state, losses, the predictor's training masks (segmentors,
perturbations, precomputed), step functions, checkpoints, the resumable loop and the stages
of a fold."""
