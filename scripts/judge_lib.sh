# shellcheck shell=bash
# Sourced by the launch scripts: start a judge on this host and wait until it answers.
#   start_judge SPEC PORT [GPUS]   SPEC: verify (rule-based, CPU) or an HF model dir (vLLM,
#                                  on GPUS = CUDA_VISIBLE_DEVICES of the judge, one tensor-
#                                  parallel rank per GPU unless JUDGE_TP says); sets judge_pid
#   wait_judge PORT                until GET /v1/models answers (JUDGE_WAIT_S, default 1800)
# With PRINT_CMD=1 start_judge prints the command instead and wait_judge returns at once.

start_judge() {
  local spec="$1" port="$2" gpus="${3:-}" cmd
  if [[ "$spec" == verify ]]; then
    cmd=(scripts/serve_judge.sh verify "$port")
  elif [[ -n "$gpus" ]]; then
    cmd=(env "CUDA_VISIBLE_DEVICES=$gpus"
         "JUDGE_TP=${JUDGE_TP:-$(awk -F, '{print NF}' <<<"$gpus")}"
         scripts/serve_judge.sh vllm "$spec" "$port")
  else
    cmd=(scripts/serve_judge.sh vllm "$spec" "$port")
  fi
  if [[ "${PRINT_CMD:-}" == 1 ]]; then
    if [[ "${cmd[0]}" == env ]]; then cmd=("${cmd[@]:1}"); fi
    printf '%q ' "${cmd[@]}"; printf '&\n'
    judge_pid=""
    return 0
  fi
  "${cmd[@]}" &
  judge_pid=$!
}

wait_judge() {
  local url="http://127.0.0.1:$1/v1/models" deadline=$((SECONDS + ${JUDGE_WAIT_S:-1800}))
  [[ "${PRINT_CMD:-}" == 1 ]] && return 0
  # A judge model takes minutes to load; the trainer would otherwise fail its first check.
  until "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" \
      "$url" 2>/dev/null; do
    if ! kill -0 "$judge_pid" 2>/dev/null; then
      echo "$(basename "$0"): the judge exited before answering $url" >&2; exit 1
    fi
    if (( SECONDS >= deadline )); then
      echo "$(basename "$0"): no answer from $url after ${JUDGE_WAIT_S:-1800}s (JUDGE_WAIT_S)" >&2
      exit 1
    fi
    sleep 2
  done
  echo "$(basename "$0"): judge up at $url" >&2
}

# Prints a command (PRINT_CMD=1) or runs it: run_or_print ENV=V... -- CMD ARGS...
run_or_print() {
  local envs=()
  while [[ "$1" != -- ]]; do envs+=("$1"); shift; done
  shift
  # ${a[@]+"${a[@]}"}: an empty array expanded under `set -u` fails on bash < 4.4.
  if [[ "${PRINT_CMD:-}" == 1 ]]; then
    printf '%q ' ${envs[@]+"${envs[@]}"} "$@"; printf '\n'
    return 0
  fi
  env ${envs[@]+"${envs[@]}"} "$@"
}
