#!/usr/bin/env bash
# Run one training process per host. Start this script on every host with the same
# COORDINATOR (host:port of process 0), NUM_PROCESSES and its own PROCESS_ID; extra arguments
# go to `python -m pasr_jax.train`. They become --config.mesh.* overrides
# (mesh.distributed=True; jax.distributed.initialize() reads only the coordinator address from
# the environment, so the count and the id are passed explicitly). Each process samples its
# share of every step's questions on its own vLLM engine; the workdir must be on a filesystem
# every host shares (Orbax writes each host's shards there; process 0 writes the logs).
#
#   COORDINATOR=10.0.0.1:1234 NUM_PROCESSES=2 PROCESS_ID=0 \
#     scripts/launch_multihost.sh --config=configs/qwen2_5_7b.py --config.mesh.shape='(1,-1,1)'
set -euo pipefail
: "${COORDINATOR:?set COORDINATOR=host:port of process 0}"
: "${NUM_PROCESSES:?set NUM_PROCESSES}"
: "${PROCESS_ID:?set PROCESS_ID (0..NUM_PROCESSES-1)}"
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m pasr_jax.train --config.mesh.distributed=True \
  --config.mesh.coordinator_address="$COORDINATOR" --config.mesh.num_processes="$NUM_PROCESSES" \
  --config.mesh.process_id="$PROCESS_ID" "$@"
