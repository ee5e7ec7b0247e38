# Helpers sourced by the launch scripts (not run on its own).
# DRY_RUN=1: every command is printed, one per line, instead of run; nothing is started and no
# server is waited for, so the scripts can be checked on a laptop without GPUs or Slurm.

# Print a command as a shell would accept it back: words quoted only when they need it.
show_cmd() {
  local out=() word safe='^[][A-Za-z0-9_./:=,@%+{}$-]+$'
  for word in "$@"; do
    if [[ "$word" =~ $safe ]]; then out+=("$word"); else out+=("'${word//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

is_dry_run() { [[ "${DRY_RUN:-0}" == 1 ]]; }

# run_fg CMD...: run in the foreground (or print).
run_fg() {
  if is_dry_run; then show_cmd "$@"; else "$@"; fi
}

# run_bg LOG CMD...: start in the background with output to LOG (or print), its pid appended
# to BG_PIDS; kill_bg (the scripts' EXIT trap) stops them. A dry run records no pid (a
# placeholder such as 0 would make `kill` signal the whole process group).
BG_PIDS=()
run_bg() {
  local log=$1; shift
  if is_dry_run; then echo "$(show_cmd "$@") &> $log &"; return; fi
  "$@" >"$log" 2>&1 &
  BG_PIDS+=("$!")
}

kill_bg() {
  local pid
  for pid in "${BG_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
}

# join_by SEP WORDS...
join_by() { local IFS="$1"; shift; echo "$*"; }

# wait_healthy URL INDEX LOG TIMEOUT_S: poll URL/health until it answers; fail early if the
# server (BG_PIDS[INDEX]) died (its log tail says why).
wait_healthy() {
  local url=$1 log=$3 timeout=$4 waited=0
  is_dry_run && { echo "# wait for $url/health"; return 0; }
  local pid=${BG_PIDS[$2]}
  until curl -sf -o /dev/null "$url/health"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "SGLang server for $url exited before becoming healthy; last lines of $log:" >&2
      tail -n 30 "$log" >&2
      return 1
    fi
    if (( waited >= timeout )); then
      echo "SGLang server $url not healthy after ${timeout}s (log: $log)" >&2
      return 1
    fi
    sleep 5; waited=$((waited + 5))
  done
  echo "SGLang server $url is up (${waited}s)"
}

# The model path for a script: the named variable, or a placeholder in dry-run mode.
require_var() {
  local name=$1
  if [[ -n "${!name:-}" ]]; then echo "${!name}"; return; fi
  if is_dry_run; then echo "\$$name"; return; fi
  echo "set $name (see the script's header)" >&2
  return 1
}

# SGLang's --api-key from the environment only (SGLANG_API_KEY, or the variable named by
# SGLANG_API_KEY_ENV, matching rollout.sglang.api_key_env); sets the array SGLANG_API_ARGS.
# Dry-run prints the variable's name, never its value.
set_sglang_api_args() {
  local name=${SGLANG_API_KEY_ENV:-SGLANG_API_KEY}
  SGLANG_API_ARGS=()
  [[ -n "${!name:-}" ]] || return 0
  if is_dry_run; then SGLANG_API_ARGS=(--api-key "\$$name"); else SGLANG_API_ARGS=(--api-key "${!name}"); fi
}

# --- multi-node jobs: the same helpers in every sbatch script ---------------------------------

# The job's hosts, one per line: $HOSTS (space-separated) if set; in dry-run without Slurm,
# node001..nodeN for N=$SLURM_NNODES (or $1); else `scontrol show hostnames`.
job_hosts() {
  if [[ -n "${HOSTS:-}" ]]; then tr ' ' '\n' <<<"$HOSTS" | sed '/^$/d'; return; fi
  if is_dry_run && [[ -z "${SLURM_JOB_NODELIST:-}" ]]; then
    local i; for ((i = 1; i <= ${SLURM_NNODES:-$1}; i++)); do printf 'node%03d\n' "$i"; done
    return
  fi
  scontrol show hostnames "$SLURM_JOB_NODELIST"
}

# The c10d rendezvous port: $RDZV_PORT if set; else one derived from $SLURM_JOB_ID, so that two
# jobs whose first host is the same machine (shared nodes, or the one-machine test) do not
# collide; else 29500. The range 20000-29999 sits below Linux's ephemeral ports (32768+), which
# the kernel hands to outgoing connections and could already hold.
rdzv_port() {
  if [[ -n "${RDZV_PORT:-}" ]]; then echo "$RDZV_PORT"
  elif [[ -n "${SLURM_JOB_ID:-}" ]]; then echo $((20000 + SLURM_JOB_ID % 10000))
  else echo 29500
  fi
}

# torchrun_c10d NNODES NPROC_PER_NODE HEAD: sets the array TORCHRUN_C10D, the torchrun command
# every node agent of the job runs unchanged: NNODES agents meet at a c10d rendezvous hosted on
# HEAD (the job's first host) at $(rdzv_port), keyed by the job id, and the rendezvous hands out
# the node ranks (no --node_rank: it would have to differ per node). Several agents on one
# machine also work (examples/slurm/tiny_cpu.sbatch on one host): each tries to host the
# rendezvous store on HEAD, one does and the others join it as clients. The workers' MASTER_ADDR
# is the FQDN of the agent that became node 0 (torchrun's default, no --local-addr), so every
# node's FQDN must resolve from the others, as the job's host names must for HEAD.
# $TORCHRUN may be a command with arguments (`python -m torch.distributed.run`).
torchrun_c10d() {
  # shellcheck disable=SC2206  # $TORCHRUN is split into words on purpose
  TORCHRUN_C10D=(${TORCHRUN:-torchrun} --nnodes="$1" --nproc_per_node="$2"
    --rdzv_id="${SLURM_JOB_ID:-sapo}" --rdzv_backend=c10d --rdzv_endpoint="$3:$(rdzv_port)")
}

# The trainer's command after the launcher: `train --config CONFIG`, then the script's own
# overrides, then the user's ("$@" of the script) last, so that the user's win. Sets TRAIN_CMD.
train_cmd() {
  local config=$1; shift
  TRAIN_CMD=(-m sapo_megatron.cli train --config "$config" "$@")
}
