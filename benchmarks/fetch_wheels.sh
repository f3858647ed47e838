#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the wheels that a GPU machine without network needs
# beside a JAX + torch image (Python 3.12, manylinux x86_64): ml_collections, nibabel and
# grain at the versions pinned in requirements.txt, and those of their requirements that such
# an image usually lacks (array-record, portpicker; absl-py, PyYAML, numpy, packaging, etils,
# fsspec, zipp, cloudpickle, protobuf, psutil and typing-extensions are expected there).
# Run it on a machine with network, then copy .whl/ with the checkout to the GPU machine,
# where benchmarks/gpu_check.sh installs what is missing from it.
#   bash benchmarks/fetch_wheels.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
python="${1:-python3}"

pinned() {   # the version requirements.txt pins for package $1
  local line
  line="$(grep -iE "^$1==" requirements.txt)" || { echo "requirements.txt pins no $1" >&2; exit 1; }
  echo "${line#*==}"
}

# The versions pip resolves beside grain 0.2.18 (array-record and portpicker are not pinned
# in requirements.txt).
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
