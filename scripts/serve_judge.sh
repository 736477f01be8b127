#!/usr/bin/env bash
# Start a local judge on 127.0.0.1 for training or evaluation (foreground; Ctrl-C stops it).
#   scripts/serve_judge.sh verify [PORT]            rule-based grader (CPU, no model)
#   scripts/serve_judge.sh vllm MODEL [PORT]        vLLM's OpenAI server for an HF model dir, or
#       32b  Qwen2.5-32B-Instruct: the judge the PASR paper names (65 GB in bf16: 2+ GPUs)
#       14b  Qwen2.5-14B-Instruct: what the original repository serves (PASR/vllm_empoy.sh, 1 GPU)
#     (32b / 14b are hub model ids: the host needs them cached or hub access)
# Extra vLLM flags go after `--`, e.g.  scripts/serve_judge.sh vllm DIR 8001 -- --tensor-parallel-size 4
# JUDGE_HOST=0.0.0.0 serves other hosts too (one judge shared by a multi-host run).
# Set JUDGE_API_KEY to require `Authorization: Bearer $JUDGE_API_KEY`
# (the trainer reads the key from the env var named by judge.api_key_env).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PY:-}" ]]; then
  PY=.venv/bin/python
  if [[ -x .venv-gpu/bin/python ]]; then PY=.venv-gpu/bin/python; fi
fi
host="${JUDGE_HOST:-127.0.0.1}"
export PYTHONPATH="${PYTHONPATH:-$PWD}"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"

key=()
if [[ -n "${JUDGE_API_KEY:-}" ]]; then key=(--api-key-env JUDGE_API_KEY); fi

backend="${1:-}"
case "$backend" in
  verify)
    port="${2:-8001}"
    shift $(( $# >= 2 ? 2 : 1 ))
    exec "$PY" -m pasr_jax.judge --backend verify --host "$host" --port "$port" "${key[@]}" "$@"
    ;;
  vllm)
    model="${2:?usage: serve_judge.sh vllm MODEL_DIR|32b|14b [PORT] [-- vllm flags]}"
    case "$model" in
      32b) model=Qwen/Qwen2.5-32B-Instruct ;;
      14b) model=Qwen/Qwen2.5-14B-Instruct ;;
    esac
    port="${3:-8001}"
    shift $(( $# >= 3 ? 3 : 2 ))
    # On a GPU use the model's own dtype and CUDA graphs.
    if command -v nvidia-smi >/dev/null 2>&1; then
      gpu=(--dtype auto --no-enforce-eager)
    else
      gpu=()
    fi
    exec "$PY" -m pasr_jax.judge --backend vllm --model "$model" --host "$host" --port "$port" \
      "${key[@]}" "${gpu[@]}" "$@"
    ;;
  *)
    sed -n '2,12p' "$0" >&2
    exit 2
    ;;
esac
