#!/usr/bin/env bash
# The wheels the GPU device machine lacks, downloaded HERE (with network) into .whl/ at the repository root, for the
# device's Python (3.12, CPython, manylinux x86_64). benchmarks/gpu_check.sh installs them there without network.
#
#   bash benchmarks/gpu_wheels.sh [PYTHON]       # PYTHON: any interpreter with pip (default: python3)
#
# The device image (/work/.library/device/KINDS.md: Python 3.12.3, torch 2.11, accelerate, numpy, scipy, rich,
# scikit-learn, pyyaml, safetensors) lacks what speakerid imports beside those: webdataset (needs braceexpand,
# numpy, pyyaml), soundfile (needs cffi, which needs pycparser; its manylinux wheel bundles libsndfile), miniaudio
# (dr_flac for flac members; needs cffi).
# One version of each (two stop the whole install); --no-deps, so every dependency is named here.
# Idempotent: a wheel already in .whl/ is not fetched again. .whl/ is ignored (.gitignore).
set -euo pipefail
PYTHON=${1:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST="$ROOT/.whl"
WHEELS=(webdataset==1.0.2 braceexpand==0.1.7 soundfile==0.13.1 miniaudio==1.71 cffi==2.0.0 pycparser==2.23)
mkdir -p "$DEST"
for spec in "${WHEELS[@]}"; do
    name=${spec%%==*}; version=${spec##*==}
    if compgen -G "$DEST/${name}-${version}-*.whl" >/dev/null; then
        echo "have ${spec}"
        continue
    fi
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "$spec"
    echo "got ${spec}"
done
# one version of each name, or pip --no-index stops the install on the device
dupes=$(cd "$DEST" && ls *.whl | cut -d- -f1 | sort | uniq -d)
if [ -n "$dupes" ]; then
    echo "error: several versions in $DEST of: $dupes; delete the older wheels and run again" >&2
    exit 1
fi
ls -1 "$DEST"
