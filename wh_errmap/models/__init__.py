"""Models: the 2D/3D VoxResNet shared by the segmentors and the error-map predictor, its
layers, the three models built from a config, and whole-volume inference."""
