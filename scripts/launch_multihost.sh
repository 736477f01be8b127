#!/usr/bin/env bash
# Run one training process per host. Start this script on every host with the same
# COORDINATOR (host:port of process 0), NUM_PROCESSES and its own PROCESS_ID; extra arguments
# go to `python -m pasr_jax.train`. They become --config.mesh.* overrides
# (mesh.distributed=True; jax.distributed.initialize() reads only the coordinator address and
# local device ids from the environment, so the count and the id are passed explicitly, and
# JAX's SLURM / Open MPI detection, which would give each process one GPU, is then off).
# LOCAL_DEVICE_IDS (e.g. 0,1,2,3) limits this process to those GPUs (several processes on one
# host: each one's vLLM engine then runs on the first of its own GPUs). Each process samples
# its share of every step's questions on its own vLLM engine; the workdir must be on a
# filesystem every host shares (Orbax writes each host's shards there; process 0 writes the logs).
#
# The judge, one of:
#   JUDGE=""         (default) judge.base_url of the config: one shared judge every host
#                    reaches, e.g. --config.judge.base_url=http://judge-host:8001 (serve it with
#                    JUDGE_HOST=0.0.0.0 scripts/serve_judge.sh vllm DIR 8001)
#   JUDGE=verify     the rule-based grader started on each host at 127.0.0.1:$JUDGE_PORT
#   JUDGE=MODEL_DIR  vLLM serving that model on each host's JUDGE_GPUS (required; keep them
#                    out of the trainer's: LOCAL_DEVICE_IDS, also required then)
# MODULE=pasr_jax.devices runs only the device setup and prints what JAX sees
# (MODULE=pasr_jax.preflight: the checks); PRINT_CMD=1 prints the commands instead of running
# them. PYTHON defaults to the GPU venv of `make setup-gpu` (else .venv).
#
#
#   COORDINATOR=10.0.0.1:1234 NUM_PROCESSES=2 PROCESS_ID=0 \
#     scripts/launch_multihost.sh --config=configs/qwen2_5_7b.py:2x8 \
#     --config.judge.base_url=http://10.0.0.3:8001
#
# Under SLURM (one task per node: srun --ntasks-per-node=1) the three default to
# NUM_PROCESSES=$SLURM_NTASKS, PROCESS_ID=$SLURM_PROCID and the first host of
# $SLURM_JOB_NODELIST on COORDINATOR_PORT (default 12355); see docs/gpu.md.
# NCCL_NVLS_ENABLE=0 unless set: NVLink SHARP buffers take GBs of each GPU beside a colocated
# vLLM engine on NVSwitch hosts.
set -euo pipefail
if [[ -n "${SLURM_JOB_ID:-}" && -z "${COORDINATOR:-}" && -n "${SLURM_JOB_NODELIST:-}" ]]; then
  first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1 || true)
  if [[ -n "$first" ]]; then COORDINATOR="$first:${COORDINATOR_PORT:-12355}"; fi
fi
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  NUM_PROCESSES="${NUM_PROCESSES:-${SLURM_NTASKS:-}}"
  PROCESS_ID="${PROCESS_ID:-${SLURM_PROCID:-}}"
fi
: "${COORDINATOR:?set COORDINATOR=host:port of process 0}"
: "${NUM_PROCESSES:?set NUM_PROCESSES}"
: "${PROCESS_ID:?set PROCESS_ID (0..NUM_PROCESSES-1)}"
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
# shellcheck source=scripts/judge_lib.sh
source scripts/judge_lib.sh
if [[ -z "${PYTHON:-}" ]]; then
  PYTHON=.venv/bin/python
  if [[ -x .venv-gpu/bin/python ]]; then PYTHON=.venv-gpu/bin/python; fi
fi
PY="$PYTHON"
export PYTHONPATH="${PYTHONPATH:-$PWD}"
JUDGE="${JUDGE:-}"
JUDGE_PORT="${JUDGE_PORT:-8001}"
judge=()
if [[ -n "$JUDGE" && "$JUDGE" != verify ]]; then
  # vLLM would otherwise serve the judge on GPU 0 at 0.9 of its memory, beside the trainer.
  if [[ -z "${JUDGE_GPUS:-}" || -z "${LOCAL_DEVICE_IDS:-}" ]]; then
    echo "launch_multihost.sh: JUDGE=$JUDGE needs JUDGE_GPUS and LOCAL_DEVICE_IDS apart, e.g. JUDGE_GPUS=6,7 LOCAL_DEVICE_IDS=0,1,2,3,4,5" >&2
    exit 2
  fi
  for g in ${JUDGE_GPUS//,/ }; do
    if [[ ",$LOCAL_DEVICE_IDS," == *",$g,"* ]]; then
      echo "launch_multihost.sh: JUDGE_GPUS=$JUDGE_GPUS shares GPU $g with LOCAL_DEVICE_IDS=$LOCAL_DEVICE_IDS: keep the trainer off the judge's GPUs" >&2
      exit 2
    fi
  done
fi
if [[ -n "$JUDGE" ]]; then
  start_judge "$JUDGE" "$JUDGE_PORT" "${JUDGE_GPUS:-}"
  if [[ -n "$judge_pid" ]]; then trap 'kill "$judge_pid" 2>/dev/null || true' EXIT; fi
  wait_judge "$JUDGE_PORT"
  judge=(--config.judge.base_url="http://127.0.0.1:$JUDGE_PORT")
fi
cmd=("$PYTHON" -m "${MODULE:-pasr_jax.train}" "$@" ${judge[@]+"${judge[@]}"}
  --config.mesh.distributed=True
  --config.mesh.coordinator_address="$COORDINATOR"
  --config.mesh.num_processes="$NUM_PROCESSES"
  --config.mesh.process_id="$PROCESS_ID"
  --config.mesh.local_device_ids="${LOCAL_DEVICE_IDS:-}")
if [[ "${PRINT_CMD:-}" == 1 ]]; then
  run_or_print NCCL_NVLS_ENABLE="$NCCL_NVLS_ENABLE" -- "${cmd[@]}"
elif [[ -z "$JUDGE" ]]; then
  exec "${cmd[@]}"
else
  # The trainer in the background so SIGTERM / Ctrl-C reach it (it saves, then exits 130).
  "${cmd[@]}" &
  trainer=$!
  trap 'kill -TERM "$trainer" 2>/dev/null || true' TERM INT
  status=0
  wait "$trainer" || status=$?
  if kill -0 "$trainer" 2>/dev/null; then wait "$trainer" || status=$?; fi
  exit "$status"
fi
