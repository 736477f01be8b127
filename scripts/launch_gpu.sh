#!/usr/bin/env bash
# One GPU host, the paper's Qwen2.5-7B setting: the judge on its own GPUs, trainer + vLLM on the rest.
#
#   scripts/launch_gpu.sh /models/Qwen2.5-7B-Instruct /models/judge-model [extra --config.* flags]
#
# GPU split (8 GPUs; edit the three variables for other machines):
#   JUDGE_GPUS   the judge: vLLM's OpenAI server for JUDGE_MODEL on 127.0.0.1:$JUDGE_PORT
#   ROLLOUT_GPUS vLLM rollout engine (its engine core is a child process of the trainer and
#                inherits CUDA_VISIBLE_DEVICES; tensor_parallel_size = number of these GPUs)
#   TRAIN_GPUS   JAX (FSDP over these devices, mesh (1,-1,1))
# The trainer process sees ROLLOUT_GPUS + TRAIN_GPUS; JAX is limited to the TRAIN_GPUS by
# --config.mesh.cuda_visible_devices (indices within CUDA_VISIBLE_DEVICES; the trainer sets
# `jax_cuda_visible_devices` from it, as JAX 0.10.2 ignores JAX_CUDA_VISIBLE_DEVICES), and vLLM
# takes the first ones. vLLM has GPUs of its own here (rollout.vllm.colocate=False), so JAX may
# take 0.9 of its GPUs. The trainer starts once the judge answers GET /v1/models.
# A hosted judge works the same: drop the judge part and pass --config.judge.base_url=URL
# (key in the env var named by judge.api_key_env).
# JUDGE_BACKEND=verify serves the rule-based grader instead of a judge model (no GPU);
# MODULE=pasr_jax.devices runs only the device setup and prints what JAX sees.
set -euo pipefail
cd "$(dirname "$0")/.."
POLICY="${1:?usage: launch_gpu.sh POLICY_HF_DIR JUDGE_HF_DIR [--config.x=y ...]}"
JUDGE_MODEL="${2:?usage: launch_gpu.sh POLICY_HF_DIR JUDGE_HF_DIR [--config.x=y ...]}"
shift 2
JUDGE_GPUS="${JUDGE_GPUS:-6,7}"
ROLLOUT_GPUS="${ROLLOUT_GPUS:-4,5}"
TRAIN_GPUS="${TRAIN_GPUS:-0,1,2,3}"
JUDGE_PORT="${JUDGE_PORT:-8001}"
JUDGE_BACKEND="${JUDGE_BACKEND:-vllm}"
JUDGE_WAIT_S="${JUDGE_WAIT_S:-1800}"
MODULE="${MODULE:-pasr_jax.train}"
PY="${PY:-.venv/bin/python}"
export PYTHONPATH="${PYTHONPATH:-$PWD}"

n_rollout=$(awk -F, '{print NF}' <<<"$ROLLOUT_GPUS")
n_train=$(awk -F, '{print NF}' <<<"$TRAIN_GPUS")
jax_idx=$(seq -s, "$n_rollout" $((n_rollout + n_train - 1)))

if [[ "$JUDGE_BACKEND" == verify ]]; then
  scripts/serve_judge.sh verify "$JUDGE_PORT" &
else
  CUDA_VISIBLE_DEVICES="$JUDGE_GPUS" scripts/serve_judge.sh vllm "$JUDGE_MODEL" "$JUDGE_PORT" -- \
    --tensor-parallel-size "$(awk -F, '{print NF}' <<<"$JUDGE_GPUS")" &
fi
judge_pid=$!
trap 'kill "$judge_pid" 2>/dev/null || true' EXIT

# A judge model takes minutes to load; the trainer would otherwise fail its first check.
url="http://127.0.0.1:$JUDGE_PORT/v1/models"
deadline=$((SECONDS + JUDGE_WAIT_S))
until "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" \
    "$url" 2>/dev/null; do
  if ! kill -0 "$judge_pid" 2>/dev/null; then
    echo "launch_gpu.sh: the judge exited before answering $url" >&2; exit 1
  fi
  if (( SECONDS >= deadline )); then
    echo "launch_gpu.sh: no answer from $url after ${JUDGE_WAIT_S}s (JUDGE_WAIT_S)" >&2; exit 1
  fi
  sleep 2
done
echo "launch_gpu.sh: judge up at $url" >&2

CUDA_VISIBLE_DEVICES="$ROLLOUT_GPUS,$TRAIN_GPUS" \
  "$PY" -m "$MODULE" --config=configs/qwen2_5_7b.py \
    --config.model.path="$POLICY" \
    --config.judge.base_url="http://127.0.0.1:$JUDGE_PORT" \
    --config.mesh.cuda_visible_devices="$jax_idx" \
    --config.rollout.vllm.colocate=False \
    --config.rollout.vllm.tensor_parallel_size="$n_rollout" \
    --config.rollout.vllm.gpu_memory_utilization=0.85 \
    "$@"
