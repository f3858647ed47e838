"""wh_errmap: ground-truth-free error maps and quality indicators for whole-heart segmentation."""

__version__ = "0.1.0"
