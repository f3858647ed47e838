"""Quality control of new cases with a trained run's predictor.

  python launch.py --experiment=predict --image=X.nii.gz --mask=Y.nii.gz --workdir=RUN
  python launch.py --experiment=predict --image=IMAGES/ --mask=MASKS/ --workdir=RUN

Writes <pair>_error_prob.nii.gz, <pair>_error.nii.gz (on the image's own grid) and
<pair>_qc.json (QI, counts, inputs, predictor), pair = <image case>__<mask name>, to
--set=output_dir=... (default RUN/predict), plus a new summary-<time>.json for a folder.
The run itself is only read. An existing result is replaced only with --overwrite; the
same assessment again is reused. In a folder, a failing pair is reported and skipped.
"""
from __future__ import annotations

from pathlib import Path

import ml_collections

from experiments import base
from wh_errmap.errors import UserError
from wh_errmap.predict import assess, assess_many, load_predictor, pair_folder, write_summary
from wh_errmap.progress import console
from wh_errmap.workdir import check_writable


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.image = ""        # a NIfTI image, or a folder of them
  c.mask = ""         # its mask (MMWHS codes or classes 0..7), or a folder of masks
  c.output_dir = ""   # "" = <workdir>/predict
  c.fold = 0          # whose predictor to use (any trained fold of the run)
  c.threshold = 0.5   # error probability above which a voxel counts as wrong
  c.allow_partial = False  # use a predictor whose training has not finished (announced)
  return c


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  if not config.image or not config.mask:
    raise UserError("predict needs --image and --mask (two files, or two folders)")
  image, mask = Path(config.image), Path(config.mask)
  if image.is_dir() != mask.is_dir():
    raise UserError(f"--image={image} and --mask={mask}: give two files or two folders")
  output_dir = check_writable(config.output_dir or Path(workdir) / "predict")
  predictor = load_predictor(workdir, config.fold, config.allow_partial)
  partial = ("" if predictor.finished else
             f" (PARTLY TRAINED predictor: step {predictor.step} of {predictor.total_steps})")
  if not image.is_dir():
    result, reused = assess(image, mask, predictor, output_dir, config.threshold,
                            config.overwrite)
    kept = "already assessed, kept: use --overwrite to redo; " if reused else ""
    console(f"{result['pair']}: QI {result['qi']:.4f} (soft {result['soft_qi']:.4f}); "
            f"{kept}outputs in {output_dir}{partial}")
    return
  pairs, problems = pair_folder(image, mask)
  results, reused, failed = assess_many(pairs, predictor, output_dir, config.threshold,
                                        config.overwrite, console)
  problems += failed
  summary = write_summary(output_dir, {
      "predictor": predictor.provenance, "threshold": config.threshold, "cases": results,
      "already_assessed": reused, "problems": problems})
  console(f"{len(results)} pairs assessed ({len(reused)} of them kept from before); "
          f"summary in {summary}{partial}")
  if problems:
    raise UserError(f"{len(problems)} input(s) skipped: " + "; ".join(problems))
