"""The base config every experiment starts from: the paper's settings where it states them
(marked "paper"); the network sizes are VoxResNet's own ([1]: Chen et al., NeuroImage 2018,
which the paper cites); the others are this project's choices, listed in docs/fidelity.md."""
from __future__ import annotations

import ml_collections

from wh_errmap.train import perturbations

# Groups read only where models are trained or built from the experiment's own config
# (cv_fold and its kin, benchmark, qc_bench); the other experiments list them in their
# UNREAD (experiments/__init__.py), so that setting one is refused.
TRAINING_GROUPS = ("train", "optim", "loss", "input", "mesh", "model")


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.data_dir = ""          # MMWHS folder; "" = the synthetic phantom, generated into the cache
  c.cache_dir = ""         # "" = $WH_ERRMAP_CACHE or ~/.cache/wh_errmap
  c.modality = "mr"        # which MMWHS cases to use: "mr" (the paper) or "ct"
  c.num_cases = 20         # phantom size when data_dir is "" (MMWHS MR has 20 labelled scans)
  c.phantom_scale = 1.0    # phantom voxel size x this, 1-8: > 1 gives coarser, smaller scans
  #                          (quick trials, tests); 1 = MMWHS-like 1 x 1 x 1.6 mm scans
  c.seed = 0               # one seed for phantom, split, initialisation and data order
  c.fold = 0               # which cross-validation fold to run
  c.overwrite = False      # a workdir recorded with other settings: move it aside, start afresh

  c.preprocess = ml_collections.ConfigDict()
  c.preprocess.spacing = (2.0, 2.0, 2.0)            # mm, isotropic (paper: 2 mm)
  c.preprocess.clip_percentiles = (0.5, 99.5)       # robust intensity range -> [-1, 1]
  c.preprocess.margin_mm = 16.0             # least margin around the heart's bounding box
  c.preprocess.crop_size = (120, 120, 90)   # least crop around the heart (paper: 120 x 120 x 90)

  c.splits = ml_collections.ConfigDict()
  c.splits.num_folds = 5   # 5-fold cross-validation as in the paper

  c.input = ml_collections.ConfigDict(type_safe=False)   # on_device: bool or "auto"
  c.input.crop_3d = (96, 96, 80)     # 3D training crops (paper: 96 x 96 x 80)
  c.input.crop_2d = (96, 96)         # 2D training slices (paper: 96 x 96)
  c.input.crop_predictor = (96, 96, 80)  # the predictor's training crops
  c.input.scale_range = (0.9, 1.1)   # random isotropic scaling
  c.input.num_workers = 0            # grain worker processes; 0 = in the main process
  # Where training crops are made: True = inside the jitted step from the training set
  # held in device memory (grain yields only each sample's case and random parameters);
  # False = on the host (grain + scipy); "auto" = on the device on GPU/TPU when the set
  # takes at most a quarter of its memory, else on the host.
  c.input.on_device = "auto"

  # how a training batch is laid out on the devices (not type-safe: space is an int or "auto")
  c.mesh = ml_collections.ConfigDict(type_safe=False)
  # Devices each volume is split over (along X; XLA exchanges the halos of the
  # convolutions): the batch goes over devices / space rows. 1 = plain data parallelism;
  # "auto" = the fewest that lets the batch split over the rest (batch 2 on 8 devices: 4).
  c.mesh.space = 1

  c.model = ml_collections.ConfigDict()   # VoxResNet, shared by segmentors and predictor
  c.model.width1 = 32          # channels of conv1a/conv1b (VoxResNet [1]: 32)
  c.model.width2 = 64          # channels of the downsampling stages (VoxResNet [1]: 64)
  c.model.num_voxres = 2       # VoxRes modules per stage (VoxResNet [1]: 2)
  c.model.norm = "batch"       # "batch", "group" or "instance"
  # Side outputs: "deconv" = VoxResNet's deconvolution (kernel = stride), computed as a
  # matmul + pixel shuffle with the classifier folded in (as fast as "linear" on CPU);
  # "transpose" = the same function through nn.ConvTranspose (slow gradient in XLA);
  # "linear" = classify at low resolution, then linear interpolation (no learned upsampling).
  c.model.upsample = "deconv"
  c.model.conv_impl = "auto"   # 3^d convs: "xla", "matmul"; "auto" = matmul for 3D on CPU
  c.model.dtype = "auto"       # compute dtype: "auto" = bfloat16 (mixed precision) on GPU/TPU,
  #                              float32 on CPU; or "float32" / "bfloat16" explicitly

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adam"             # "adam" or "sgd" (the paper states no optimizer)
  c.optim.learning_rate = 1e-3      # peak learning rate (not stated in the paper)
  c.optim.warmup_steps = 100        # linear warm-up from 0
  c.optim.schedule = "cosine"       # "cosine" decay to final_lr_fraction, or "constant"
  c.optim.final_lr_fraction = 0.01  # end of the cosine schedule, relative to the peak
  c.optim.weight_decay = 0.0        # decoupled weight decay (0 = plain Adam)
  # With train.*.per_device_batch_size, the learning rate is scaled by this rule from the
  # configured batch_size to the global batch: "sqrt" (Adam), "linear" (SGD) or "none".
  c.optim.lr_scaling = "sqrt"

  c.loss = ml_collections.ConfigDict()
  c.loss.side_weights = (1.0, 1.0, 1.0, 1.0)  # deep supervision, side outputs 2..5
  c.loss.dice_weight = 1.0                    # CE + dice_weight * soft Dice per output
  # Segmentors whose soft Dice is pooled over the batch (one Dice per class per batch, not
  # per sample). The 2D model's slices each hold only some structures; per slice, the
  # absent ones mostly teach it to predict nothing, and at a few hundred steps it never
  # found LA, AO or PA (small preset, fold 0: 2D final Dice 0.35; with batch Dice 0.77).
  c.loss.batch_dice = ("seg2d",)

  c.predictor = ml_collections.ConfigDict()
  # Share of the predictor's training samples that use the GT mask itself. 0 = Eq. 3 of the
  # paper (the loss averages over the automatic masks only); 0.1 also teaches it what a
  # correct mask looks like (an option, see docs/fidelity.md).
  c.predictor.gt_probability = 0.0
  # Where the predictor's training masks come from, as relative weights per sample:
  # "segmentors" = the frozen segmentors' 10 outputs (the paper's), "perturbed" = the
  # ground truth with synthetic errors (wh_errmap/perturbations.py; beyond the paper).
  # "precomputed" = masks of other segmentors (e.g. nnU-Net's out-of-fold predictions) from
  # predictor.mask_dirs, named after the training cases (wh_errmap/precomputed.py).
  c.predictor.mask_sources = ml_collections.ConfigDict(
      {"segmentors": 1.0, "perturbed": 0.0, "precomputed": 0.0})
  # Where the segmentors' training masks are made: "crop" = inside each training step from
  # its augmented crop; "case" = once from each whole training case before training (as the
  # test masks are made from whole scans), then cropped, scaled and flipped with it.
  c.predictor.segmentor_masks = "crop"
  c.predictor.mask_dirs = ""     # comma-separated folders of CASE.nii.gz / CASE_*.nii.gz
  c.predictor.mask_labels = ""   # their label convention, as predict's --labels ("" = MMWHS)
  # Rates (per-sample probabilities) and magnitudes (voxels) of the synthetic errors.
  c.predictor.perturbations = ml_collections.ConfigDict(dict(perturbations.DEFAULTS))
  c.predictor.threshold = 0.5        # error probability above which a voxel counts as wrong

  c.report = ml_collections.ConfigDict()
  c.report.failure_dice = 0.75     # a mask with true Dice below this is a failure (AUROC);
                                   # predict: verdict "fail" below it (predicted Dice)
  c.report.review_band = 0.10      # predict: verdict "review" below failure_dice + this

  c.train = ml_collections.ConfigDict()
  # Per model: training steps; the global batch over all devices; per_device_batch_size > 0
  # makes the global batch that many per device instead, with the learning rate scaled by
  # optim.lr_scaling (0 = off); learning_rate > 0 is this model's own peak rate.
  c.train.seg3d = ml_collections.ConfigDict({
      "steps": 20000,                 # training steps of the 3D segmentor
      "batch_size": 2,                # global batch (3D crops, all devices)
      "per_device_batch_size": 0,     # > 0: this many crops per device instead
      "learning_rate": 0.0})          # peak rate of this model; 0 = optim.learning_rate
  c.train.seg2d = ml_collections.ConfigDict({
      "steps": 20000,                 # training steps of the 2D segmentor
      "batch_size": 16,               # global batch (2D slices, all devices)
      "per_device_batch_size": 0,     # > 0: this many slices per device instead
      "learning_rate": 0.0})          # peak rate of this model; 0 = optim.learning_rate
  c.train.predictor = ml_collections.ConfigDict({
      "steps": 20000,                 # training steps of the error-map predictor
      "batch_size": 2,                # global batch (3D crops, all devices)
      "per_device_batch_size": 0,     # > 0: this many crops per device instead
      "learning_rate": 0.0})          # peak rate of this model; 0 = optim.learning_rate
  c.train.log_every = 50           # console + metrics.jsonl every N steps
  c.train.checkpoint_every = 1000  # orbax checkpoint every N steps (and at the end)
  c.train.keep_checkpoints = 3     # newest checkpoints kept per model
  return c


def apply_small_sizes(c: ml_collections.ConfigDict) -> None:
  """CPU-sized model, voxels, crops and batches (the quick start's; see cv_fold_small).

  Kept here, free of data imports, so the benchmark can use it on machines without nibabel.
  """
  c.model.width1 = 8
  c.model.width2 = 16
  c.model.num_voxres = 1
  # At a few hundred steps the learned deconvolution trains to lower Dice than linear
  # upsampling (fold 0, 500/400 steps: 3D final 0.737 vs 0.802, 2D final 0.218 vs 0.350),
  # so the CPU preset keeps "linear"; the paper's (20000 steps) uses "deconv".
  c.model.upsample = "linear"
  c.preprocess.spacing = (3.0, 3.0, 3.0)
  c.preprocess.crop_size = (80, 80, 60)
  c.input.crop_3d = (64, 64, 48)
  c.input.crop_2d = (96, 96)
  c.input.crop_predictor = (48, 48, 40)
  c.train.seg3d.batch_size = 2
  c.train.seg2d.batch_size = 8
  c.train.predictor.batch_size = 2
