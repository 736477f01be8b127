#!/usr/bin/env bash
# One GPU host, a paper preset: the judge on its own GPUs, trainer + vLLM on the rest.
#
#   scripts/launch_gpu.sh POLICY_HF_DIR JUDGE [--config=configs/qwen3_8b.py] [--config.x=y ...]
#
# JUDGE: an HF model dir (served by vLLM on JUDGE_GPUS), `verify` (the rule-based grader, no
# GPU), or the http(s) URL of a judge already running (a hosted one: its key in the env var
# named by judge.api_key_env); then no local judge starts and JUDGE_GPUS stay unused.
#
# The preset is configs/qwen2_5_7b.py unless a --config=... is among the arguments (it replaces
# the default, e.g. --config=configs/qwen3_8b.py or the base model's configs/qwen2_5_7b_base.py).
# GPU split (8 GPUs; edit the three variables for other machines):
#   JUDGE_GPUS   the judge: vLLM's OpenAI server for JUDGE_MODEL on 127.0.0.1:$JUDGE_PORT
#   ROLLOUT_GPUS vLLM rollout engine (its engine core is a child process of the trainer and
#                inherits CUDA_VISIBLE_DEVICES; tensor_parallel_size = number of these GPUs)
#   TRAIN_GPUS   JAX (FSDP over these devices, mesh (1,-1,1))
# The trainer process sees ROLLOUT_GPUS + TRAIN_GPUS; JAX is limited to the TRAIN_GPUS by
# --config.mesh.cuda_visible_devices (indices within CUDA_VISIBLE_DEVICES; the trainer sets
# `jax_cuda_visible_devices` from it, as JAX 0.10.2 ignores JAX_CUDA_VISIBLE_DEVICES), and vLLM
# takes the first ones. vLLM has GPUs of its own here (rollout.vllm.colocate=False), so JAX may
# take 0.9 of its GPUs. The micro-batch is sized to the TRAIN_GPUS (one sequence per GPU, at
# least the preset's). The trainer starts once the judge answers GET /v1/models.
# The engine and JAX have GPUs of their own, so one batch is sampled ahead while the trainer
# updates (rollout.max_staleness=1; MAX_STALENESS=0, or --config.rollout.max_staleness=0 among
# the arguments, keeps the strictly synchronous loop).
# JUDGE_BACKEND=verify serves the rule-based grader instead of a judge model (no GPU);
# NCCL_NVLS_ENABLE=0 unless set: NVLink SHARP buffers take GBs of each GPU on NVSwitch hosts.
# MODULE=pasr_jax.devices runs only the device setup and prints what JAX sees
# (MODULE=pasr_jax.preflight: the checks); PRINT_CMD=1 prints the commands instead of running them.
# PY defaults to the GPU venv of `make setup-gpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/judge_lib.sh
source scripts/judge_lib.sh
usage="usage: launch_gpu.sh POLICY_HF_DIR JUDGE_HF_DIR|verify|URL [--config=PRESET] [--config.x=y ...]"
POLICY="${1:?$usage}"
MAX_STALENESS=${MAX_STALENESS:-1}
JUDGE_MODEL="${2:?$usage}"
shift 2
PRESET="configs/qwen2_5_7b.py"
extra=()
for a in "$@"; do
  if [[ "$a" == --config=* ]]; then PRESET="${a#--config=}"; else extra+=("$a"); fi
done
JUDGE_GPUS="${JUDGE_GPUS:-6,7}"
ROLLOUT_GPUS="${ROLLOUT_GPUS:-4,5}"
TRAIN_GPUS="${TRAIN_GPUS:-0,1,2,3}"
JUDGE_PORT="${JUDGE_PORT:-8001}"
JUDGE_BACKEND="${JUDGE_BACKEND:-vllm}"
MODULE="${MODULE:-pasr_jax.train}"
PY="${PY:-.venv-gpu/bin/python}"
export PYTHONPATH="${PYTHONPATH:-$PWD}"
if [[ "${PRINT_CMD:-}" != 1 && ! -x "$PY" ]]; then
  echo "launch_gpu.sh: no $PY: run \`make setup-gpu\` (or set PY=)" >&2; exit 1
fi

n_rollout=$(awk -F, '{print NF}' <<<"$ROLLOUT_GPUS")
n_train=$(awk -F, '{print NF}' <<<"$TRAIN_GPUS")
jax_idx=$(seq -s, "$n_rollout" $((n_rollout + n_train - 1)))
micro=$(( n_train >= 8 ? n_train : n_train * ((8 + n_train - 1) / n_train) ))
nvls="${NCCL_NVLS_ENABLE:-0}"

judge_url="http://127.0.0.1:$JUDGE_PORT"
if [[ "$JUDGE_MODEL" == http://* || "$JUDGE_MODEL" == https://* ]]; then
  judge_url="$JUDGE_MODEL"
else
  if [[ "$JUDGE_BACKEND" != verify && "$JUDGE_MODEL" != verify ]]; then
    for g in ${JUDGE_GPUS//,/ }; do
      if [[ ",$ROLLOUT_GPUS,$TRAIN_GPUS," == *",$g,"* ]]; then
        echo "launch_gpu.sh: JUDGE_GPUS=$JUDGE_GPUS shares GPU $g with ROLLOUT_GPUS=$ROLLOUT_GPUS / TRAIN_GPUS=$TRAIN_GPUS: give the judge GPUs of its own" >&2
        exit 2
      fi
    done
  fi
  if [[ "$JUDGE_BACKEND" == verify ]]; then
    start_judge verify "$JUDGE_PORT"
  else
    start_judge "$JUDGE_MODEL" "$JUDGE_PORT" "$JUDGE_GPUS"
  fi
  if [[ -n "$judge_pid" ]]; then trap 'kill "$judge_pid" 2>/dev/null || true' EXIT; fi
  wait_judge "$JUDGE_PORT"
fi

run_or_print CUDA_VISIBLE_DEVICES="$ROLLOUT_GPUS,$TRAIN_GPUS" NCCL_NVLS_ENABLE="$nvls" -- \
  "$PY" -m "$MODULE" --config="$PRESET" \
    --config.model.path="$POLICY" \
    --config.judge.base_url="$judge_url" \
    --config.mesh.cuda_visible_devices="$jax_idx" \
    --config.rollout.vllm.colocate=False \
    --config.rollout.vllm.tensor_parallel_size="$n_rollout" \
    --config.rollout.vllm.gpu_memory_utilization=0.85 \
    --config.optim.micro_batch="$micro" \
    --config.optim.sequences_per_update="$micro" \
    --config.rollout.max_staleness="$MAX_STALENESS" \
    ${extra[@]+"${extra[@]}"}
