"""Data: the structures, NIfTI io and validation, the MMWHS layout, label conventions, the
phantom, preprocessing, the dataset and its splits, the training input (host pipeline and
device crops) and the training reference of the out-of-distribution checks."""
