#!/usr/bin/env bash
# GPU smoke run on ONE NVIDIA GPU with torch but no network (tools/gpu_smoke.py says what runs).
#
#   tools/gpu_smoke.sh prepare [WHEEL_DIR]   # here, with network: fetch the wheels to carry
#   tools/gpu_smoke.sh [WHEEL_DIR]           # there: install what is missing, run, one summary line
#
# WHEEL_DIR (default: $SAPO_SMOKE_WHEELS, else .whl) holds megatron-core (cp312, manylinux),
# pybase64 and this package's own wheel; they are installed with --no-index --no-deps into
# $SAPO_SMOKE_SITE (default /tmp/sapo_smoke_site) when megatron-core does not import. torch,
# numpy, packaging, pyyaml, safetensors and psutil are expected on the machine. Extra
# arguments after WHEEL_DIR go to tools/gpu_smoke.py (e.g. --out DIR, --device cpu).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
MCORE="${SAPO_SMOKE_MCORE:-megatron-core==0.19.2}"

if [[ "${1:-}" == "prepare" ]]; then
    DIR="${2:-${SAPO_SMOKE_WHEELS:-$ROOT/.whl}}"
    mkdir -p "$DIR"
    for spec in "$MCORE" "pybase64==1.5.1"; do
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DIR" "$spec"
    done
    "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" "$ROOT"
    ls -l "$DIR"
    exit 0
fi

WHEELS="${1:-${SAPO_SMOKE_WHEELS:-$ROOT/.whl}}"
[[ $# -gt 0 ]] && shift
SITE="${SAPO_SMOKE_SITE:-/tmp/sapo_smoke_site}"
if ! "$PY" -c "import megatron.core" 2>/dev/null; then
    compgen -G "$WHEELS/*.whl" >/dev/null || { echo "GPU_SMOKE ok=0 error=megatron-core_missing_and_no_wheels_in_$WHEELS"; exit 1; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
# The checkout first: its tools, configs and benchmarks are what runs.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"
exec timeout "${SAPO_SMOKE_TIMEOUT:-540}" "$PY" tools/gpu_smoke.py "$@"
