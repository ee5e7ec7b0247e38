#!/usr/bin/env bash
# The CPU demo: SAPO + R3 routing replay on a tiny MoE, 2 ranks (gloo: the trainer picks gloo
# when there is no GPU), TP=2, configs/tiny_cpu.yaml.
#
#   examples/run_tiny_cpu.sh [key.sub=value ...]     e.g. output_dir=runs/a seed=1 loss.tau_neg=1.1
#   DRY_RUN=1 examples/run_tiny_cpu.sh ...           print the command instead of running it
#   CONFIG=tests/configs/x.yaml examples/run_tiny_cpu.sh ...   the same launch with another config
#
# Extra arguments are config overrides; `output_dir=DIR` and `seed=N` are short for
# `run.output_dir=DIR` and `run.seed=N`. Metrics go to <output_dir>/metrics.jsonl.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source examples/common.sh

# Two ranks on two cores: one thread each, or they fight over the cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
NPROC=${NPROC:-2}

run_fg env OMP_NUM_THREADS="$OMP_NUM_THREADS" ${TORCHRUN:-torchrun} --standalone --nproc_per_node="$NPROC" \
  -m sapo_megatron.cli train --config "${CONFIG:-configs/tiny_cpu.yaml}" "$@"
