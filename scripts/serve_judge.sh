#!/usr/bin/env bash
# Start a judge for training or evaluation (foreground; Ctrl-C stops it).
#   scripts/serve_judge.sh verify [PORT]            rule-based grader (CPU, no model)
#   scripts/serve_judge.sh vllm MODEL_DIR [PORT]    vLLM's OpenAI server for an HF model dir, or
#       32b  $JUDGE_MODELS/Qwen2.5-32B-Instruct: the judge the PASR paper names (65 GB in bf16)
#       14b  $JUDGE_MODELS/Qwen2.5-14B-Instruct: what the original repository serves (1 GPU)
#     JUDGE_MODELS (default: models) holds those HF dirs, downloaded beforehand.
# vLLM judge on GPUs: JUDGE_TP GPUs of tensor parallelism (default: the GPUs in
# CUDA_VISIBLE_DEVICES; 2 for 32b); JUDGE_MAX_LEN tokens of context (default 8192: a question,
# a reference and a 1500-token answer; a 32B judge's own 32k does not fit one 80 GB GPU).
# Keys of python -m pasr_jax.judge (--config.KEY=V) go after the port, then vLLM flags after
# `--`, e.g.  scripts/serve_judge.sh vllm DIR 8001 --config.served_model_name=judge -- --max-num-seqs 64
# JUDGE_HOST=0.0.0.0 serves other hosts too (one judge shared by a multi-host run); it then needs
# JUDGE_API_KEY (requests must carry `Authorization: Bearer $JUDGE_API_KEY`; the trainer reads
# the key from the env var named by judge.api_key_env), or JUDGE_ALLOW_NO_KEY=1.
set -euo pipefail
caller="$PWD"
cd "$(dirname "$0")/.."
me="$(basename "$0")"
if [[ -z "${PY:-}" ]]; then
  PY=.venv/bin/python
  if [[ -x .venv-gpu/bin/python ]]; then PY=.venv-gpu/bin/python; fi
fi
host="${JUDGE_HOST:-127.0.0.1}"
export PYTHONPATH="${PYTHONPATH:-$PWD}"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"

backend="${1:-}"
case "$backend" in
  verify)
    port="${2:-8001}"
    shift $(( $# >= 2 ? 2 : 1 ))
    cmd=("$PY" -m pasr_jax.judge --config.backend=verify "--config.host=$host" "--config.port=$port")
    ;;
  vllm)
    model="${2:?usage: serve_judge.sh vllm MODEL_DIR|32b|14b [PORT] [-- vllm flags]}"
    tp_default=1
    case "$model" in
      32b) hub=Qwen/Qwen2.5-32B-Instruct; tp_default=2 ;;
      14b) hub=Qwen/Qwen2.5-14B-Instruct ;;
      *) hub="" ;;
    esac
    if [[ -n "$hub" ]]; then
      model="${JUDGE_MODELS:-models}/${hub#*/}"
    elif [[ "$model" != /* && -e "$caller/$model" ]]; then
      model="$caller/$model"  # relative to where the script was called from
    fi
    if [[ ! -f "$model/config.json" ]]; then
      if [[ -n "$hub" ]]; then
        echo "$me: $2 = $hub: no HF dir at $model; download $hub there (or set JUDGE_MODELS to the dir holding it), or pass a model dir" >&2
      else
        echo "$me: $model is not an HF model dir (no config.json); pass the dir of the judge's weights" >&2
      fi
      exit 2
    fi
    port="${3:-8001}"
    shift $(( $# >= 3 ? 3 : 2 ))
    cmd=("$PY" -m pasr_jax.judge --config.backend=vllm "--config.model=$model" "--config.host=$host"
         "--config.port=$port")
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
      tp_default="$(awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES")"
    fi
    ;;
  *)
    sed -n '2,15p' "$0" >&2
    exit 2
    ;;
esac
# Keys for pasr_jax.judge, then after `--` the flags for vLLM. One array throughout: an empty
# array expanded under `set -u` fails on bash < 4.4.
while (($#)) && [[ "$1" != -- ]]; do cmd+=("$1"); shift; done
if (($#)); then shift; fi
# The judge itself refuses an unset key variable, and a non-loopback host without a key.
if [[ -n "${JUDGE_API_KEY:-}" ]]; then cmd+=(--config.api_key_env=JUDGE_API_KEY); fi
if [[ "${JUDGE_ALLOW_NO_KEY:-}" == 1 ]]; then cmd+=(--config.allow_no_key=True); fi
if [[ "$backend" == vllm ]]; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    # On GPUs: the model's own dtype, CUDA graphs, a context that fits, tensor parallelism
    # (first, so a --tensor-parallel-size given after `--` wins).
    cmd+=(--config.dtype=auto --config.enforce_eager=False
          "--config.max_model_len=${JUDGE_MAX_LEN:-8192}"
          -- --tensor-parallel-size "${JUDGE_TP:-$tp_default}")
  else
    if [[ -n "${JUDGE_MAX_LEN:-}" ]]; then cmd+=("--config.max_model_len=$JUDGE_MAX_LEN"); fi
    cmd+=(--)
  fi
  cmd+=("$@")
fi
if [[ "${PRINT_CMD:-}" == 1 ]]; then
  printf '%q ' "${cmd[@]}"; printf '\n'
  exit 0
fi
exec "${cmd[@]}"
