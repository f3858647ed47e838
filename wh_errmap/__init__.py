"""wh_errmap: ground-truth-free error maps and quality indicators for whole-heart segmentation."""
