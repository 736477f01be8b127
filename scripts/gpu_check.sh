#!/usr/bin/env bash
# First hour on a GPU host: real checks, in order, on whatever GPUs this machine has.
#   scripts/gpu_check.sh            (PY=path/to/python; default the venv of `make setup-gpu`)
# 0 preflight the SmolLM2 run below against this host (driver >= 580, backend, sizes, space)
# 1 devices   JAX sees GPUs (backend gpu)
# 2 fraction  JAX's pool is the configured share of a GPU (XLA_PYTHON_CLIENT_MEM_FRACTION)
# 3 train     2 GRPO steps of SmolLM2-135M with vLLM on the same GPU (bf16, verify judge)
# 4 sync      both steps pushed the trainer's weights into vLLM
# 5 export    the run wrote an HF dir that loads back
# The run spans every GPU JAX sees (FSDP), so its micro-batch is sized to their number (GPUS,
# default `nvidia-smi -L`'s count): one multiple of it, at least the preset's 2.
# Prints PASS / FAIL / SKIP per check; exits 1 if any failed. Needs `make setup-gpu`.
# PRINT_CMD=1 prints the preflight, fraction and train commands (one a line) and exits.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY="${PY:-.venv-gpu/bin/python}"
export PYTHONPATH="${PYTHONPATH:-$PWD}"
WORK="${WORK:-$(mktemp -d -t pasr_gpu_check.XXXXXX)}"
failed=0
result() { printf '%-5s %-9s %s\n' "$1" "$2" "$3"; [[ "$1" == FAIL ]] && failed=1; return 0; }
skip_rest() { for c in "$@"; do result SKIP "$c" "(an earlier check failed)"; done; exit 1; }

if [[ -z "${GPUS:-}" ]]; then
  GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
fi
GPUS=$(( GPUS > 0 ? GPUS : 1 ))
micro=$(( GPUS * ((2 + GPUS - 1) / GPUS) ))
run="$WORK/run"
common=(--config=configs/smollm2_135m.py --config.mesh.platform=cuda
        --config.optim.micro_batch="$micro" --config.rollout.vllm.gpu_memory_utilization=0.3)
train=(--config.workdir="$run" --config.train.steps=2 --config.checkpoint.every=2
       --config.train.export=True --config.model.dtype=bfloat16
       --config.rollout.vllm.dtype=bfloat16 --config.rollout.vllm.enforce_eager=False
       --config.judge.base_url="http://127.0.0.1:${JUDGE_PORT:-8011}")
if [[ "${PRINT_CMD:-}" == 1 ]]; then
  for m in pasr_jax.preflight pasr_jax.devices pasr_jax.train; do
    printf '%q ' "$PY" -m "$m" "${common[@]}"
    if [[ "$m" != pasr_jax.devices ]]; then printf '%q ' "${train[@]}"; fi
    printf '\n'
  done
  exit 0
fi
if [[ ! -x "$PY" ]]; then
  result FAIL devices "no $PY: run \`make setup-gpu\` (or set PY=)"; exit 1
fi

# 0 preflight (the preset autostarts the verify judge, so it may be silent now)
if "$PY" -m pasr_jax.preflight "${common[@]}" "${train[@]}" \
    > "$WORK/preflight.log" 2>&1; then
  result PASS preflight "$(grep -c '^OK' "$WORK/preflight.log") checks ok ($WORK/preflight.log)"
else
  result FAIL preflight "$(grep '^fix' "$WORK/preflight.log" | tr '\n' ' ')"
  skip_rest devices fraction train sync export
fi

# 1 devices
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  result FAIL devices "no GPU found (nvidia-smi missing or lists none)"
  skip_rest fraction train sync export
fi
out=$("$PY" -c "import jax; print(jax.default_backend(), jax.local_device_count())" 2>"$WORK/devices.err" | tail -1)
if [[ "$out" == gpu* ]]; then
  result PASS devices "JAX backend and local devices: $out ($(nvidia-smi -L | head -1))"
else
  result FAIL devices "JAX does not see the GPUs: '$out' (see $WORK/devices.err)"
  skip_rest fraction train sync export
fi

# 2 fraction: vLLM colocated at 0.3 -> JAX 0.6 of each GPU
json=$("$PY" -m pasr_jax.devices "${common[@]}" 2>"$WORK/fraction.err" | tail -1)
if "$PY" - "$json" <<'PYEOF'
import json, subprocess, sys
d = json.loads(sys.argv[1])["jax"]
total = int(subprocess.check_output(["nvidia-smi", "--query-gpu=memory.total",
                                     "--format=csv,noheader,nounits"]).split()[0]) * 2**20
share = d["bytes_limit"] / total
print(f"XLA_PYTHON_CLIENT_MEM_FRACTION={d['XLA_PYTHON_CLIENT_MEM_FRACTION']}, "
      f"JAX pool {d['bytes_limit'] / 2**30:.1f} GiB = {share:.3f} of {total / 2**30:.1f} GiB")
sys.exit(0 if abs(share - 0.6) < 0.03 else 1)
PYEOF
then result PASS fraction "(0.9 - vLLM's 0.3)"
else result FAIL fraction "JAX's pool is not 0.6 of the GPU (see above, $WORK/fraction.err)"
fi

# 3 train: 2 steps, vLLM on the same GPU, sync every step, export at the end
"$PY" -m pasr_jax.train "${common[@]}" "${train[@]}" > "$WORK/train.log" 2>&1
if grep -q "done at step 2" "$WORK/train.log"; then
  result PASS train "$(grep -o 'vLLM engine up in [0-9.]*s' "$WORK/train.log" | head -1); log $WORK/train.log"
else
  result FAIL train "see $WORK/train.log: $(tail -1 "$WORK/train.log")"
  skip_rest sync export
fi

# 4 sync: metrics of both steps carry a sync and policy version 2 at the end
if "$PY" - "$run/metrics.jsonl" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
s = [r["sync/total_s"] for r in rows if "sync/total_s" in r]
print(f"{len(s)} syncs, {', '.join(f'{x:.2f}' for x in s)} s, policy version {rows[-1]['policy_version']:g}")
sys.exit(0 if len(s) == 2 and rows[-1]["policy_version"] == 2 else 1)
PYEOF
then result PASS sync ""
else result FAIL sync "see $run/metrics.jsonl"
fi

# 5 export: the HF dir loads back into the JAX model
if "$PY" -c "
import sys; from pasr_jax.models.hf import load_hf
m, c = load_hf(sys.argv[1]); print(c.model_type, c.num_layers, 'layers')" "$run/hf"; then
  result PASS export "$run/hf"
else
  result FAIL export "$run/hf does not load"
fi
exit "$failed"
