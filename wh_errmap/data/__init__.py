"""Data: NIfTI io and validation, MMWHS layout, phantom, preprocessing, splits, input pipeline."""
from wh_errmap.data.mmwhs import CasePaths, find_cases
from wh_errmap.data.nifti_io import (MMWHS_CODES, NUM_CLASSES, STRUCTURES, Case, InvalidCaseError,
                                     load_case, save_nifti)
from wh_errmap.data.preprocess import (PreprocessConfig, PreprocessedCase, preprocess_case,
                                       restore_to_original)
