#!/usr/bin/env bash
# The device check in one command: installs the carried wheels (.whl/, from benchmarks/gpu_wheels.sh) without network
# where webdataset/soundfile/braceexpand/miniaudio are not importable, puts this checkout first on PYTHONPATH (speakerid is
# not installed there), and runs benchmarks/gpu_check.py: one table on stdout, OUT_DIR/gpu_check.json and .log.
#
#   bash benchmarks/gpu_check.sh OUT_DIR [--tiny] [--device cpu] [--only SECTION …]
#
# PYTHON: the interpreter (default python3, the device image's torch Python). Exit status: gpu_check.py's (1 when
# any section failed), or 2 when the set-up itself fails (the message says what to do).
set -uo pipefail
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: bash benchmarks/gpu_check.sh OUT_DIR [--tiny] [--device cpu] [--only SECTION …]" >&2
    exit 2
fi
OUT=$1; shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
if ! "$PY" -c "import webdataset, soundfile, braceexpand, miniaudio" 2>/dev/null; then
    if ! compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
        echo "error: webdataset/soundfile/braceexpand/miniaudio are not importable by $PY and $ROOT/.whl/ holds no wheels:" \
             "run 'bash benchmarks/gpu_wheels.sh' on a machine with network first, and carry .whl" >&2
        exit 2
    fi
    SITE=$(mktemp -d /tmp/speakerid-wheels.XXXXXX)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$ROOT"/.whl/*.whl \
        || { echo "error: installing $ROOT/.whl/*.whl into $SITE failed (see pip's message above)" >&2; exit 2; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "installed $(ls "$ROOT"/.whl/*.whl | wc -l) wheels from .whl/ into $SITE"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" "$ROOT/benchmarks/gpu_check.py" --out "$OUT" "$@"
