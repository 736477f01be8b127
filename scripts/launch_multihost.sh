#!/usr/bin/env bash
# Run one training process per host. Start this script on every host with the same
# COORDINATOR (host:port of process 0), NUM_PROCESSES and its own PROCESS_ID; extra arguments
# go to `python -m pasr_jax.train`. jax.distributed.initialize() reads these variables
# (config field mesh.distributed=True turns it on); on GPU clusters with SLURM or
# Open MPI, JAX detects them itself and the variables can be left unset.
#
#   COORDINATOR=10.0.0.1:1234 NUM_PROCESSES=2 PROCESS_ID=0 \
#     scripts/launch_multihost.sh --config=configs/qwen2_5_7b.py --config.mesh.shape='(1,-1,1)'
set -euo pipefail
: "${COORDINATOR:?set COORDINATOR=host:port of process 0}"
: "${NUM_PROCESSES:?set NUM_PROCESSES}"
: "${PROCESS_ID:?set PROCESS_ID (0..NUM_PROCESSES-1)}"
export JAX_COORDINATOR_ADDRESS="$COORDINATOR"
export JAX_NUM_PROCESSES="$NUM_PROCESSES"
export JAX_PROCESS_ID="$PROCESS_ID"
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m pasr_jax.train --config.mesh.distributed=True "$@"
