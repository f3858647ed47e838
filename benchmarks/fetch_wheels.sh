#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the wheels that the lent GPU machines lack, for their
# Python 3.12 on manylinux x86_64: ml_collections, nibabel and grain at the versions pinned in
# requirements.txt, and those of their requirements that the machines' image does not hold
# (array-record, portpicker; the rest - absl-py, PyYAML, numpy, packaging, etils, fsspec,
# zipp, cloudpickle, protobuf, psutil, typing-extensions - is there). Run it here, with
# network; benchmarks/gpu_check.sh installs them there (`carry: [".whl"]`).
#   bash benchmarks/fetch_wheels.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
python="${1:-python3}"

pinned() {   # the version requirements.txt pins for package $1
  local line
  line="$(grep -iE "^$1==" requirements.txt)" || { echo "requirements.txt pins no $1" >&2; exit 1; }
  echo "${line#*==}"
}

# Versions that pip resolves with grain 0.2.18 on Python 3.11 here.
wheels=("ml_collections==$(pinned ml_collections)" "nibabel==$(pinned nibabel)"
        "grain==$(pinned grain)" "array-record==0.8.6" "portpicker==1.6.0")

rm -rf .whl && mkdir .whl
"$python" -m pip download --quiet --no-deps --only-binary=:all: --dest .whl \
  --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  "${wheels[@]}"
ls -l .whl
du -sh .whl
