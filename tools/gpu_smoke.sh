#!/usr/bin/env bash
# GPU smoke run on ONE NVIDIA GPU with torch but no network (tools/gpu_smoke.py says what runs).
#
#   tools/gpu_smoke.sh prepare [WHEEL_DIR]   # here, with network: fetch the wheels to carry
#   tools/gpu_smoke.sh [WHEEL_DIR] [ARGS]    # there: install what does not import, run, one summary line
#
# A bare GPU machine has torch, numpy, safetensors, transformers, pyyaml and tqdm. Everything
# else our imports need is carried as wheels in WHEEL_DIR (default: $SAPO_SMOKE_WHEELS, else
# .whl): megatron-core, omegaconf + antlr4-python3-runtime, pybase64, psutil, packaging. The
# compiled ones (megatron-core, pybase64) are fetched for every CPython in SMOKE_PYTHONS and pip
# picks the one matching the machine's own interpreter; megatron-core's newest release in our
# supported range differs by Python version (0.16 on 3.10/3.11, 0.19 on 3.12+). Only the
# packages that do not import are installed, with --no-index --no-deps, into $SAPO_SMOKE_SITE
# (default /tmp/sapo_smoke_site); the checkout itself goes first on PYTHONPATH. ARGS go to
# tools/gpu_smoke.py (e.g. --out DIR, --device cpu, --limit S).
#
# Its bench stage also measures the fused output-layer log-probs (loss.fused_logprobs, the
# trainer's default) in bf16 at Qwen3 sizes (T 8192, vocab 151936, hidden 4096) against the
# unfused path: fused_mem_ratio, fused_fwd_speed_ratio and fused_speed_ratio in the summary line.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
SMOKE_PYTHONS="${SMOKE_PYTHONS:-3.10 3.11 3.12 3.13}"
# requirement -> the module that proves it is there
PACKAGES=(
    "megatron-core$("$PY" -c "import ast,sys; t=ast.parse(open(sys.argv[1]).read()); print(next(ast.literal_eval(n.value) for n in t.body if isinstance(n, ast.Assign) and getattr(n.targets[0], 'id', '') == 'SUPPORTED'))" "$ROOT/sapo_megatron/mcore/version.py"):megatron.core"
    "omegaconf>=2.4:omegaconf"
    "antlr4-python3-runtime:antlr4"
    "pybase64>=1.3:pybase64"
    "psutil>=5.9:psutil"
    "packaging>=24.2:packaging"
)

if [[ "${1:-}" == "prepare" ]]; then
    DIR="${2:-${SAPO_SMOKE_WHEELS:-$ROOT/.whl}}"
    mkdir -p "$DIR"
    for entry in "${PACKAGES[@]}"; do
        spec="${entry%%:*}"
        for version in $SMOKE_PYTHONS; do
            "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
                --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
                --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
                -d "$DIR" "$spec"
        done
    done
    ls -l "$DIR"
    exit 0
fi

WHEELS="${1:-${SAPO_SMOKE_WHEELS:-$ROOT/.whl}}"
[[ $# -gt 0 ]] && shift
SITE="${SAPO_SMOKE_SITE:-/tmp/sapo_smoke_site}"
missing=()
for entry in "${PACKAGES[@]}"; do
    "$PY" -c "import ${entry##*:}" 2>/dev/null || missing+=("${entry%%:*}")
done
if (( ${#missing[@]} )); then
    compgen -G "$WHEELS/*.whl" >/dev/null || {
        echo "GPU_SMOKE ok=0 error=missing_${missing[*]// /,}_and_no_wheels_in_$WHEELS"; exit 1; }
    echo "installing from $WHEELS for $("$PY" -V 2>&1): ${missing[*]}"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --find-links "$WHEELS" --target "$SITE" "${missing[@]}"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
# The checkout first: its tools, configs and benchmarks are what runs.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"
# The driver cuts its stages to --limit (default 540 s); this outer bound only catches a hang
# of the driver itself.
exec timeout "${SAPO_SMOKE_TIMEOUT:-600}" "$PY" tools/gpu_smoke.py "$@"
