#!/usr/bin/env bash
# One prepared check of a GPU machine, sized to end within 8 minutes:
#   a. the GPU-relevant tests (models, losses, masks, training, benchmark, torch reference),
#   b. the benchmark at paper size beside the PyTorch reference, with
#   c. the latency of quality control of one case (error map + QI of a mask),
#   d. a short paper-size cv_fold on the phantom, once in bfloat16 and once in float32,
# then a summary ($OUT/summary.md and summary.json, printed): throughput of every model,
# the projected wall time of the full 5-fold run, bf16 vs f32 quality, the benchmark table
# and its targets. Each phase has a share of the time and is stopped (or skipped, with a
# note) when its share is spent, so the script always ends with the summary.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine, with .whl/ beside it
#   bash benchmarks/gpu_check.sh --dry-run   # the same phases on the CPU, tiny, ~1-2 min
#
# Needs: Linux x86_64 with one or more NVIDIA GPUs; Python 3.11 or 3.12 with jax (CUDA build),
# flax, optax, orbax-checkpoint, absl-py and, for the PyTorch column, a CUDA build of torch.
# No network is needed: what the machine lacks of requirements.txt comes from .whl/.
#
# Environment: OUT (results, default gpu_check_out; at most 6 files, flat), PYTHON (default
# python3), GPU_CHECK_SCRATCH (workdirs and data cache, default a new folder in /tmp),
# CV_STEPS (training steps per model of the short cv_fold, default 300).
# Missing ml_collections / nibabel / grain are installed from .whl/ (benchmarks/fetch_wheels.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=0
case "${1:-}" in
  --dry-run) dry_run=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac

python="${PYTHON:-python3}"
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
scratch="${GPU_CHECK_SCRATCH:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
mkdir -p "$scratch"
cache="$scratch/cache"
log="$out/log.txt"
phases="$scratch/phases.jsonl"
: > "$log"
: > "$phases"
export PYTHONUNBUFFERED=1

say() { echo "$*" | tee -a "$log"; }

# record NAME STATUS SECONDS NOTE: one line of phases.jsonl (NOTE without double quotes).
record() {
  printf '{"phase": "%s", "status": "%s", "seconds": %s, "note": "%s"}\n' \
    "$1" "$2" "$3" "$4" >> "$phases"
}

# phase NAME END MIN CMD...: runs CMD (output to the console and the log) until END seconds
# after the script's start (SIGTERM, then SIGKILL 20 s later); skipped with a note when
# fewer than MIN seconds are left. The outcome goes to phases.jsonl; returns 0 either way.
phase() {
  local name=$1 end=$2 min=$3
  shift 3
  local left=$((end - SECONDS)) start=$SECONDS rc status
  if ((left < min)); then
    say "=== $name: skipped, ${left} s of its time left (needs ${min} s)"
    record "$name" skipped 0 "skipped: ${left} s of its time left, needs ${min} s"
    return 0
  fi
  say "=== $name (at most ${left} s): $*"
  set +e
  timeout -k 20 "$left" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  set -e
  local took=$((SECONDS - start))
  if ((rc == 0)); then
    status=ok; record "$name" ok "$took" ""
  elif ((rc == 124 || rc == 137)); then
    status=stopped; record "$name" stopped "$took" "stopped at its time limit (${left} s)"
  else
    status=failed; record "$name" failed "$took" "exit status $rc"
  fi
  say "=== $name: $status after ${took} s"
}

# --- Packages the GPU machine lacks -------------------------------------------------------
if ! "$python" -c "import ml_collections, nibabel, grain" 2>/dev/null; then
  if compgen -G ".whl/*.whl" > /dev/null; then
    say "installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into /tmp/site"
    if "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl 2>&1 | tee -a "$log"; then
      export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    else
      say "warning: installing .whl/ failed; the phases that need those packages will fail"
    fi
  else
    say "warning: ml_collections, nibabel or grain is missing and .whl/ is empty" \
        "(run benchmarks/fetch_wheels.sh where there is network)"
  fi
fi

# --- Sizes and time shares ------------------------------------------------------------------
# END_* are seconds after the start by which each phase must end; time a phase leaves
# unused goes to the next. The shares add up to 455 s; with the 20 s grace of a stopped
# phase and the summary, the whole run stays under 8 minutes on any machine.
cv_steps="${CV_STEPS:-300}"
if ((dry_run)); then
  mode=dry-run
  num_cases=5   # the fewest that split into 5 folds
  cv_steps="${CV_STEPS:-4}"
  tests=(tests/throughput/test_throughput.py -k "peak_flops or table_shows or small_preset")
  # XLA's convolution (the GPU's) compiles 2-3x faster than the CPU's matmul form.
  tiny=(--set model.width1=4 --set model.width2=8 --set model.num_voxres=1 --set model.conv_impl=xla
        --set 'input.crop_3d=(16,16,16)' --set 'input.crop_2d=(16,16)'
        --set 'input.crop_predictor=(16,16,16)' --set train.seg2d.batch_size=4)
  bench_sets=("${tiny[@]}" --set 'preprocess.crop_size=(24,24,16)'
              --set benchmark.warmup=1 --set benchmark.iters=2)
  # The phantom's voxels 3x coarser: written and preprocessed in seconds, not a minute.
  data_sets=(--set phantom_scale=3 --set 'preprocess.spacing=(8.0,8.0,8.0)'
             --set 'preprocess.crop_size=(24,24,24)' --set preprocess.margin_mm=8.0)
  cv_sets=("${tiny[@]}" --set optim.warmup_steps=2 --set train.log_every=2)
  END_TESTS=120 END_BENCH=300 END_BF16=600 END_F32=600
  MIN_TESTS=10 MIN_BENCH=20 MIN_CV=20
else
  mode=gpu
  num_cases=20  # the paper's; generating + preprocessing them takes ~35 s on one core
  tests=(tests/models/test_voxresnet.py tests/train/test_losses.py tests/train/test_masks.py
         tests/train/test_training.py tests/throughput/test_throughput.py
         tests/benchmarks/test_torch_reference.py)
  bench_sets=(--set benchmark.warmup=3 --set benchmark.iters=20)
  data_sets=()
  cv_sets=(--set train.log_every=25)
  END_TESTS=60 END_BENCH=215 END_BF16=340 END_F32=455
  MIN_TESTS=15 MIN_BENCH=60 MIN_CV=60
fi
common=(--cache_dir="$cache" --seed=0)

printf '{"mode": "%s", "num_cases": %d, "cv_steps": %d, "paper_steps": 20000, "num_folds": 5, "scratch": "%s"}\n' \
  "$mode" "$num_cases" "$cv_steps" "$scratch" > "$scratch/settings.json"
say "gpu_check ($mode): outputs in $out, workdirs and data in $scratch"

# --- Data: phantom + preprocessing, on the CPU while the GPU runs the tests and benchmark ----
(
  start=$SECONDS
  set +e
  JAX_PLATFORMS=cpu "$python" launch.py --experiment=prepare_data --num_cases="$num_cases" \
    "${common[@]}" "${data_sets[@]}" > "$scratch/prepare.log" 2>&1
  rc=$?
  if ((rc == 0)); then record data ok $((SECONDS - start)) "$num_cases phantom cases"
  else record data failed $((SECONDS - start)) "exit status $rc"; fi
) &
prepare_pid=$!

# --- a. tests -----------------------------------------------------------------------------
# Tests that would start in the last 15 s of the share are skipped (the report is kept).
phase tests "$END_TESTS" "$MIN_TESTS" \
  env GPU_CHECK_TESTS_DEADLINE=$(($(date +%s) + END_TESTS - SECONDS - 15)) \
  "$python" -m pytest -x -q -p no:cacheprovider -p benchmarks.pytest_deadline \
  --junitxml="$scratch/tests.xml" "${tests[@]}"

# --- b, c. benchmark (paper size, PyTorch beside it, QC latency) --------------------------
# time_budget_s leaves the grace before the hard stop; JAX takes under half the GPU's
# memory so that the PyTorch reference (another process) has room.
benchmark() {
  phase benchmark "$END_BENCH" "$MIN_BENCH" \
    env XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 "$python" launch.py --experiment=benchmark \
    --workdir="$scratch/bench" "${common[@]}" "${bench_sets[@]}" \
    --set 'benchmark.configs=("paper",)' --set benchmark.reference=auto \
    --set benchmark.time_budget_s=$((END_BENCH - SECONDS - 15))
}

# --- d. short cv_fold, bf16 and f32 -------------------------------------------------------
cv_fold() {   # cv_fold DTYPE END
  if ! grep -q '"phase": "data", "status": "ok"' "$phases"; then
    say "=== cv_$1: skipped, the data could not be prepared (see the log)"
    record "cv_$1" skipped 0 "skipped: data preparation failed"
    return 0
  fi
  phase "cv_$1" "$2" "$MIN_CV" \
    "$python" launch.py --experiment=cv_fold --fold=0 --workdir="$scratch/cv_$1" \
    --num_cases="$num_cases" "${common[@]}" "${data_sets[@]}" "${cv_sets[@]}" \
    --set model.dtype="$1" --set nifti=none \
    --set train.seg3d.steps="$cv_steps" --set train.seg2d.steps="$cv_steps" \
    --set train.predictor.steps="$cv_steps" --set train.checkpoint_every="$cv_steps"
}

if ((dry_run)); then
  # Two CPU cores and compilation (most of the dry run) on one thread each: side by side.
  benchmark &
  wait "$prepare_pid" || true
  cv_fold bfloat16 "$END_BF16" &
  cv_fold float32 "$END_F32" &
  wait
else
  benchmark
  wait "$prepare_pid" || true
  cv_fold bfloat16 "$END_BF16"
  cv_fold float32 "$END_F32"
fi
cat "$scratch/prepare.log" >> "$log"
for f in benchmark.json benchmark.md; do
  if [[ -f "$scratch/bench/$f" ]]; then cp "$scratch/bench/$f" "$out/$f"; fi
done

# --- summary --------------------------------------------------------------------------------
set +e
"$python" benchmarks/gpu_check_summary.py --scratch "$scratch" --out "$out" 2>&1 | tee -a "$log"
summary_rc=${PIPESTATUS[0]}
set -e
say "gpu_check finished in ${SECONDS} s"
if ((summary_rc != 0)) || grep -qE '"status": "(failed|stopped|skipped)"' "$phases"; then
  exit 1
fi
