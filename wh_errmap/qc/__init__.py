"""The QC tool: assessing other people's masks with a trained predictor.

    from wh_errmap import qc
    result = qc.assess("scan.nii.gz", "scan_mask.nii.gz", "heart.whqc", labels="1:RV,2:Myo,3:LV")
    result.scores["verdict"], result.scores["mean_predicted_dice"], result.error_prob

Modules: `assessment` (one mask, in memory), `verdict` (the rules and the out-of-distribution
checks), `predictor` and `model_file` (a trained predictor from a run or one file),
`calibration` (fitted on the user's labelled cases), `pairing` and `folder` (folders of
pairs, written to an output folder), `figure`, `gallery` and `colours` (the visual report).
"""
from wh_errmap.qc.assessment import Assessment, assess
from wh_errmap.qc.verdict import VERDICTS, Settings

__all__ = ["VERDICTS", "Assessment", "Settings", "assess"]
