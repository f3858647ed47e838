"""Models: the 2D/3D VoxResNet shared by the segmentors and the error-map predictor."""
from wh_errmap.models.voxresnet import OUTPUT_NAMES, SIDE_OUTPUTS, VoxResNet, count_params
