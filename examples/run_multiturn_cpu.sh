#!/usr/bin/env bash
# The multi-turn CPU demo: the calculator task (tool calls, episodes of up to 3 turns), SAPO + R3
# across turns on a tiny MoE, 2 gloo ranks; configs/multiturn_cpu.yaml, docs/demo.md "Multi-turn".
#
#   examples/run_multiturn_cpu.sh [key.sub=value ...]     e.g. output_dir=runs/mt seed=1
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
NPROC=${NPROC:-2}  # the config is TP=2 (the planner reads this line)
CONFIG=configs/multiturn_cpu.yaml NPROC="$NPROC" exec bash examples/run_tiny_cpu.sh "$@"
