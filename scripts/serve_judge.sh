#!/usr/bin/env bash
# Start a local judge on 127.0.0.1 for training or evaluation (foreground; Ctrl-C stops it).
#   scripts/serve_judge.sh verify [PORT]            rule-based grader (CPU, no model)
#   scripts/serve_judge.sh vllm MODEL_DIR [PORT]    vLLM's OpenAI server for an HF model dir
# Extra vLLM flags go after `--`, e.g.  scripts/serve_judge.sh vllm DIR 8001 -- --tensor-parallel-size 4
# Set JUDGE_API_KEY to require `Authorization: Bearer $JUDGE_API_KEY`
# (the trainer reads the key from the env var named by judge.api_key_env).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
export PYTHONPATH="${PYTHONPATH:-$PWD}"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"

key=()
if [[ -n "${JUDGE_API_KEY:-}" ]]; then key=(--api-key-env JUDGE_API_KEY); fi

backend="${1:-}"
case "$backend" in
  verify)
    port="${2:-8001}"
    shift $(( $# >= 2 ? 2 : 1 ))
    exec "$PY" -m pasr_jax.judge --backend verify --port "$port" "${key[@]}" "$@"
    ;;
  vllm)
    model="${2:?usage: serve_judge.sh vllm MODEL_DIR [PORT] [-- vllm flags]}"
    port="${3:-8001}"
    shift $(( $# >= 3 ? 3 : 2 ))
    # On a GPU use the model's own dtype and CUDA graphs.
    if command -v nvidia-smi >/dev/null 2>&1; then
      gpu=(--dtype auto --no-enforce-eager)
    else
      gpu=()
    fi
    exec "$PY" -m pasr_jax.judge --backend vllm --model "$model" --port "$port" \
      "${key[@]}" "${gpu[@]}" "$@"
    ;;
  *)
    sed -n '2,7p' "$0" >&2
    exit 2
    ;;
esac
