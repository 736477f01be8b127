#!/usr/bin/env bash
# Run one training process per host. Start this script on every host with the same
# COORDINATOR (host:port of process 0), NUM_PROCESSES and its own PROCESS_ID; extra arguments
# go to `python -m pasr_jax.train`. They become --config.mesh.* overrides
# (mesh.distributed=True; jax.distributed.initialize() reads only the coordinator address and
# local device ids from the environment, so the count and the id are passed explicitly).
# LOCAL_DEVICE_IDS (e.g. 0,1,2,3) limits this process to those GPUs. Each process samples its
# share of every step's questions on its own vLLM engine; the workdir must be on a filesystem
# every host shares (Orbax writes each host's shards there; process 0 writes the logs).
# MODULE=pasr_jax.devices runs only the device setup and prints what JAX sees.
#
#   COORDINATOR=10.0.0.1:1234 NUM_PROCESSES=2 PROCESS_ID=0 \
#     scripts/launch_multihost.sh --config=configs/qwen2_5_7b.py --config.mesh.shape='(1,-1,1)'
set -euo pipefail
: "${COORDINATOR:?set COORDINATOR=host:port of process 0}"
: "${NUM_PROCESSES:?set NUM_PROCESSES}"
: "${PROCESS_ID:?set PROCESS_ID (0..NUM_PROCESSES-1)}"
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:-$PWD}"
exec "${PYTHON:-.venv/bin/python}" -m "${MODULE:-pasr_jax.train}" "$@" \
  --config.mesh.distributed=True \
  --config.mesh.coordinator_address="$COORDINATOR" \
  --config.mesh.num_processes="$NUM_PROCESSES" \
  --config.mesh.process_id="$PROCESS_ID" \
  --config.mesh.local_device_ids="${LOCAL_DEVICE_IDS:-}"
