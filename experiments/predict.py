"""Quality control of new masks with a trained predictor (a run, or an exported model file).

  python launch.py --experiment=predict --image=X.nii.gz --mask=Y.nii.gz --model=heart.whqc
  python launch.py --experiment=predict --image=IMAGES/ --mask=MASKS/ --workdir=RUN \\
      --labels=MASKS/dataset.json

--labels: the masks' label convention: mmwhs (the default: MMWHS codes only),
totalsegmentator, an nnU-Net dataset.json, or an inline map such as 1:RV,2:Myo,3:LV.
A scan that looks like another modality than the model's training scans (CT in Hounsfield
units given to an MR model, or the reverse; by its raw intensities, or a CT-only label
convention) is out_of_distribution; --allow_modality assesses it anyway, with a warning.
Folders pair `X_image`/`X_0000`/`X` images with `X_label`/`X_mask`/`X` masks, or with
TotalSegmentator's per-structure folders `X/heart_*.nii.gz`.

Writes, per pair (= <image case>__<mask name>), NIfTI error maps on the image's own grid,
a PNG and `_qc.json` (scores, per-structure predicted Dice and error volume, verdict); and
for the whole output folder `qc.tsv`, `index.html` and ITK-SNAP / Slicer label files;
plus a new summary-<time>.json for a folder run. Output folder: --set=output_dir=...
(default: MODEL_FILE's folder/predict or RUN/predict). An existing result is replaced
only with --overwrite; the same assessment again is reused. In a folder, a failing pair
is reported and skipped; the pairs are read ahead of the predictor and written behind it.

--shard=i/n (i = 0..n-1) assesses every n-th pair of the folder (by pair name) from the i-th:
n jobs of a SLURM array, or n processes on one host, each run one shard into one output
folder (or one each) and write shard-i-of-n.json instead of the table; then
`--experiment=qc_merge --results=FOLDER[,FOLDER...]` writes one qc.tsv, summary.json and
gallery. A run killed at any point resumes when started again: finished pairs are kept.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import ml_collections

from . import base
from wh_errmap.errors import UserError
from wh_errmap.qc.assessment import convention_from
from wh_errmap.qc import cohort
from wh_errmap.qc.folder import assess, settings_identity, write_folder_report, write_summary
from wh_errmap.qc.merge import write_manifest
from wh_errmap.qc.pairing import pair_folder, pair_name
from wh_errmap.qc.predictor import load_predictor, load_predictor_file
from wh_errmap.qc.verdict import VERDICTS, Settings, modality_notice
from wh_errmap.utils.progress import console
from wh_errmap.utils.workdir import check_writable

# Never read by run(): the predictor brings its own model, preprocessing and training
# settings (its run's or its model file's), and the verdicts use the top-level threshold.
UNREAD = {**dict.fromkeys(base.TRAINING_GROUPS), "predictor": None,
          "predictor.threshold": "threshold", "preprocess": None, "splits": None,
          "data_dir": None}


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.image = ""        # a NIfTI image, or a folder of them
  c.mask = ""         # its mask, a TotalSegmentator per-structure folder, or a folder of masks
  c.labels = ""       # label convention of the masks ("" = MMWHS codes only)
  c.model_file = ""   # --model: a model file (export_model); "" = the run in --workdir
  c.output_dir = ""   # "" = <workdir>/predict, or predict/ beside the model file
  c.fold = 0          # whose predictor to use (any trained fold of the run)
  c.threshold = 0.5   # error probability above which a voxel counts as wrong
  c.figures = True    # a PNG per case, index.html and the label files
  c.allow_partial = False  # use a predictor whose training has not finished (announced)
  # assess scans that look like another modality than the model's training scans as if they
  # were not (announced once), instead of marking them out_of_distribution
  c.allow_modality = False
  c.qc = ml_collections.ConfigDict()
  c.qc.min_real_fraction = 0.5   # out_of_distribution when the scan covers less of the box
  c.qc.volume_factor = 2.0       # ... a structure volume outside training's [min/f, max*f]
  c.qc.intensity_margin = 0.25   # ... intensities farther from training than any of its cases
  # ... the image inside the mask unlike any training heart: farther than the training
  # cases are from each other (leave one out) times this
  c.qc.appearance_factor = 1.2
  c.qc.shape_bucket = 16         # pad crops to a multiple of this: fewer compilations
  c.qc.prefetch = 2              # pairs read and preprocessed ahead of the predictor
  c.qc.read_threads = 1          # threads reading them (each pair is read by one)
  # pairs of one shape bucket, already read, that go through the predictor in one call;
  # 0 = 4 on a GPU or TPU, 1 on the CPU (where a batch is no faster than its cases in turn)
  c.qc.batch = 0
  c.shard = ""                   # --shard=i/n: this job's share of a folder's pairs
  return c


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  if not config.image or not config.mask:
    raise UserError("predict needs --image and --mask (two files, or two folders)")
  image, mask = Path(config.image), Path(config.mask)
  for what, path in (("--image", image), ("--mask", mask)):
    if not path.exists():
      raise UserError(f"{what}={path}: not found")
  folders = image.is_dir()
  if folders and not mask.is_dir():
    raise UserError(f"--image={image} is a folder and --mask={mask} a file: give two files "
                    f"or two folders")
  shard = cohort.parse_shard(config.shard)
  if shard is not None and not folders:
    raise UserError(f"--shard={config.shard} splits a folder's pairs; --image={image} is a file")
  settings = Settings.from_config(config)
  labels = convention_from(config.labels)   # a bad --labels fails before any model work
  if config.model_file:
    predictor = load_predictor_file(config.model_file)
    default_out = Path(config.model_file).absolute().parent / "predict"
  else:
    predictor = load_predictor(workdir, config.fold, config.allow_partial)
    default_out = Path(workdir) / "predict"
  predictor = dataclasses.replace(predictor, shape_bucket=int(config.qc.shape_bucket))
  output_dir = check_writable(config.output_dir or default_out)
  partial = ("" if predictor.finished else
             f" (PARTLY TRAINED predictor: step {predictor.step} of {predictor.total_steps})")
  if predictor.reference is None:
    console("warning: the predictor has no training reference (a run from before it was "
            "recorded): structure volume, intensity and modality checks are skipped")
  notice = modality_notice(predictor.reference, settings.allow_modality)
  if notice:
    console(notice)
  if not folders:
    result, reused = assess(image, mask, predictor, output_dir, settings, labels,
                            config.overwrite, config.figures)
    write_folder_report(output_dir, config.figures)
    kept = "already assessed, kept: use --overwrite to redo; " if reused else ""
    dice = result["mean_predicted_dice"]
    console(f"{result['pair']}: {result['verdict']}"
            f"{' (' + '; '.join(result['reasons']) + ')' if result['reasons'] else ''}; "
            f"mean predicted Dice {'-' if dice is None else f'{dice:.3f}'}, "
            f"QI {result['qi']:.4f} (soft {result['soft_qi']:.4f}); "
            f"{kept}outputs in {output_dir}{partial}")
    return
  pairs, problems = pair_folder(image, mask)
  found = len(pairs)
  if shard is not None:
    pairs = cohort.shard_pairs(pairs, *shard)
    problems = problems if shard[0] == 0 else []   # unpaired inputs: reported by shard 0
  console(f"[predict] {len(pairs)} pairs" + (f" (shard {shard[0]}/{shard[1]} of {found})"
                                              if shard else "") + f" in {image}"
          + (f", {len(problems)} input(s) without a pair" if problems else ""))
  timing = cohort.PhaseTimes()
  rows, failed = cohort.assess_many(pairs, predictor, output_dir, settings, labels,
                                    config.overwrite, config.figures, console,
                                    prefetch=config.qc.prefetch,
                                    read_threads=config.qc.read_threads,
                                    batch=config.qc.batch or cohort.default_batch(),
                                    timing=timing)
  problems += failed
  reused = [r["pair"] for r in rows if r["reused"]]
  counts = {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS}
  done = (f"{len(rows)} pairs assessed ({len(reused)} of them kept from before): "
          + ", ".join(f"{n} {v}" for v, n in counts.items() if n))
  if shard is not None:
    manifest = write_manifest(output_dir, *shard, [pair_name(*p) for p in pairs],
                              settings_identity(predictor, settings, labels),
                              rows, problems, timing.to_json(),
                              {"image": str(image.absolute()), "mask": str(mask.absolute())})
    console(f"{done}; shard manifest {manifest}{partial}. When every shard has finished: "
            f"launch.py --experiment=qc_merge --results={output_dir}")
  else:
    report = write_folder_report(output_dir, config.figures)
    summary = write_summary(output_dir, {
        "predictor": predictor.provenance, "threshold": settings.threshold, "cases": rows,
        "already_assessed": reused, "problems": problems, "timing": timing.to_json()})
    console(f"{done}; table {report['tsv']}" + (f", gallery {report['html']}" if "html" in report
                                                 else "") + f"; summary {summary}{partial}")
  if problems:
    raise UserError(f"{len(problems)} input(s) skipped: " + "; ".join(problems))
