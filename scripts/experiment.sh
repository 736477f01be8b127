#!/usr/bin/env bash
# `make experiment`: the CPU-scale PASR experiment of issue 18 (53.5 min measured on a shared 2-core
# host, 2026-12-01). Format cold start (SFT; NOT part of the PASR paper) +
# PASR on the GSM8K training slice of the SmolLM2 preset, export, then greedy evaluation of
# vanilla SmolLM2, the cold-started model alone and the trained model (both in pasr mode) on
# the first 100 items of GSM8K test and ARC-C with the verify judge, and `evaluate compare`
# (table + refinement analysis). The cold-start-only row separates what SFT on the format did
# from what PASR's RL did.
#   EVAL_DATA  root of the PASR test sets (default configs/data/eval_100: their first 100 rows)
#   EXP_STEPS  PASR steps (default 15)   EXP_DIR  output root (default runs/experiment)
set -euo pipefail
PY=${PY:-.venv/bin/python}
EVAL_DATA=${EVAL_DATA:-configs/data/eval_100}
EXP_STEPS=${EXP_STEPS:-15}
EXP_DIR=${EXP_DIR:-runs/experiment}
PORT=${JUDGE_PORT:-8011}
for d in gsm8k arc; do
  [ -d "$EVAL_DATA/$d" ] || { echo "experiment: EVAL_DATA=$EVAL_DATA has no $d/ (PASR test sets)" >&2; exit 2; }
done
mkdir -p "$EXP_DIR"
SMOL=$($PY -c "from pasr_jax.smollm2 import smollm2_dir; print(smollm2_dir())")
start=$(date +%s)

$PY -m pasr_jax.judge --backend verify --host 127.0.0.1 --port "$PORT" > "$EXP_DIR/judge.log" 2>&1 &
JUDGE=$!
trap 'kill $JUDGE 2>/dev/null || true' EXIT
URL=http://127.0.0.1:$PORT
$PY -c "import sys, time
from pasr_jax.judge.local import judge_answers
for _ in range(240):
  if judge_answers('$URL'): sys.exit(0)
  time.sleep(0.5)
sys.exit('experiment: the verify judge did not come up; see $EXP_DIR/judge.log')"

$PY -m pasr_jax.train --config=configs/smollm2_135m.py --config.workdir="$EXP_DIR/train" \
  --config.judge.base_url="$URL" --config.train.steps="$EXP_STEPS" --config.train.export=True \
  --config.checkpoint.every=5
echo "[experiment] training done after $(( $(date +%s) - start )) s"

EVAL=(--config=configs/eval.py --config.data_dir="$EVAL_DATA" --config.datasets=gsm8k,arc
      --config.limit=100 --config.max_tokens=256 --config.judge.base_url="$URL"
      --config.rollout.vllm.max_model_len=2048)
$PY -m pasr_jax.evaluate "${EVAL[@]}" --config.model="$SMOL" --config.mode=vanilla \
  --config.out_dir="$EXP_DIR/eval_vanilla"
$PY -m pasr_jax.evaluate "${EVAL[@]}" --config.model="$EXP_DIR/train/cold_start/hf" \
  --config.mode=pasr --config.out_dir="$EXP_DIR/eval_cold_start"
$PY -m pasr_jax.evaluate "${EVAL[@]}" --config.model="$EXP_DIR/train/hf" --config.mode=pasr \
  --config.out_dir="$EXP_DIR/eval_pasr"
$PY -m pasr_jax.evaluate compare "$EXP_DIR/eval_vanilla" "$EXP_DIR/eval_cold_start" "$EXP_DIR/eval_pasr" \
  --png="$EXP_DIR/compare.png" | tee "$EXP_DIR/compare.md"
cp "$EXP_DIR/train/reward_curve.png" "$EXP_DIR/reward_curve.png"
echo "[experiment] $(date -u +%F) commit $(git rev-parse --short HEAD 2>/dev/null || echo ?):" \
  "done in $(( $(date +%s) - start )) s; table $EXP_DIR/compare.md, curves $EXP_DIR/reward_curve.png"
