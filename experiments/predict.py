"""Quality control of new cases with a trained run's predictor.

  python launch.py --experiment=predict --image=X.nii.gz --mask=Y.nii.gz --workdir=RUN
  python launch.py --experiment=predict --image=IMAGES/ --mask=MASKS/ --workdir=RUN

Writes <case>_error_prob.nii.gz, <case>_error.nii.gz (on the image's own grid) and
<case>_qc.json (QI and counts) to --set=output_dir=... (default RUN/predict), plus
summary.json for a folder. In a folder, a bad pair is reported and skipped.
"""
from __future__ import annotations

from pathlib import Path

import ml_collections

from experiments import base
from wh_errmap.atomic import write_json
from wh_errmap.errors import UserError
from wh_errmap.predict import assess, assess_many, load_predictor, pair_folder
from wh_errmap.progress import console
from wh_errmap.workdir import check_writable


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.image = ""        # a NIfTI image, or a folder of them
  c.mask = ""         # its mask (MMWHS codes or classes 0..7), or a folder of masks
  c.output_dir = ""   # "" = <workdir>/predict
  c.fold = 0          # whose predictor to use (any trained fold of the run)
  c.threshold = 0.5   # error probability above which a voxel counts as wrong
  return c


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  if not config.image or not config.mask:
    raise UserError("predict needs --image and --mask (two files, or two folders)")
  image, mask = Path(config.image), Path(config.mask)
  output_dir = check_writable(config.output_dir or Path(workdir) / "predict")
  model, variables, run_config = load_predictor(workdir, config.fold)
  predictor = (model, variables)
  if not image.is_dir():
    result = assess(image, mask, predictor, run_config, output_dir, config.threshold)
    console(f"{result['case_id']}: QI {result['qi']:.4f} (soft {result['soft_qi']:.4f}); "
            f"outputs in {output_dir}")
    return
  if not mask.is_dir():
    raise UserError(f"{mask}: --image is a folder, so --mask must be a folder too")
  pairs, problems = pair_folder(image, mask)
  results, failed = assess_many(pairs, predictor, run_config, output_dir, config.threshold,
                                console)
  problems += failed
  write_json(output_dir / "summary.json", {"cases": results, "problems": problems})
  console(f"{len(results)} cases assessed; outputs in {output_dir}")
  if problems:
    raise UserError(f"{len(problems)} input(s) skipped: " + "; ".join(problems))
