#!/usr/bin/env bash
# Qwen3-30B-A3B SAPO RL on ONE 8-GPU node, configs/qwen3_30b_a3b_sapo.yaml.
#
#   GPUs 0-3  trainer: torchrun, 4 ranks, EP=4 (see the config for the memory arithmetic)
#   GPUs 4-5  SGLang server 1, TP=2, http://127.0.0.1:30000
#   GPUs 6-7  SGLang server 2, TP=2, http://127.0.0.1:30001
# Rollout and training alternate, so a split wastes some GPU time; it keeps both sides simple
# (no weight offloading between phases) and SGLang's KV cache large. Servers listen on loopback
# only: nothing outside this node needs them.
#
#   export QWEN3_30B_A3B_HF_DIR=/path/to/Qwen3-30B-A3B DAPO_MATH_PATH=/path/to/dapo-math-17k.parquet
#   examples/run_qwen3_30b_a3b_sapo.sh [key.sub=value ...]
#   DRY_RUN=1 examples/run_qwen3_30b_a3b_sapo.sh       print the commands only
#
# SGLANG_PYTHON: the interpreter of SGLang's environment (it pins its own CUDA stack).
# SGLANG_API_KEY: optional; read from the environment, never from the config.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source examples/common.sh

MODEL=$(require_var QWEN3_30B_A3B_HF_DIR)
OUTPUT_DIR=${OUTPUT_DIR:-runs/qwen3-30b-a3b-sapo}
SGLANG_PYTHON=${SGLANG_PYTHON:-python}
TRAINER_GPUS=${TRAINER_GPUS:-0,1,2,3}
SGLANG_GPU_GROUPS=(${SGLANG_GPU_GROUPS:-4,5 6,7})
SGLANG_PORT=${SGLANG_PORT:-30000}
SGLANG_START_TIMEOUT=${SGLANG_START_TIMEOUT:-1800}

is_dry_run || mkdir -p "$OUTPUT_DIR"
set_sglang_api_args
trap kill_bg EXIT

urls=()
for i in "${!SGLANG_GPU_GROUPS[@]}"; do
  gpus=${SGLANG_GPU_GROUPS[$i]}
  port=$((SGLANG_PORT + i))
  tp=$(( $(tr -cd , <<<"$gpus" | wc -c) + 1 ))
  run_bg "$OUTPUT_DIR/sglang-$i.log" env CUDA_VISIBLE_DEVICES="$gpus" "$SGLANG_PYTHON" -m sglang.launch_server \
    --model-path "$MODEL" --tp-size "$tp" --dtype bfloat16 \
    --host 127.0.0.1 --port "$port" \
    --enable-return-routed-experts --mem-fraction-static 0.85 "${SGLANG_API_ARGS[@]}"
  urls+=("http://127.0.0.1:$port")
done
for i in "${!urls[@]}"; do
  wait_healthy "${urls[$i]}" "$i" "$OUTPUT_DIR/sglang-$i.log" "$SGLANG_START_TIMEOUT"
done

nproc=$(( $(tr -cd , <<<"$TRAINER_GPUS" | wc -c) + 1 ))
run_fg env CUDA_VISIBLE_DEVICES="$TRAINER_GPUS" ${TORCHRUN:-torchrun} --standalone --nproc_per_node="$nproc" \
  -m sapo_megatron.cli train --config configs/qwen3_30b_a3b_sapo.yaml \
  "run.output_dir=$OUTPUT_DIR" "rollout.sglang.urls=[$(join_by , "${urls[@]}")]" "$@"
