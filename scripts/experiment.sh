#!/usr/bin/env bash
# `make experiment`: the CPU-scale PASR experiment (SmolLM2-135M, the generated arithmetic
# task of configs/arith_135m.py, difficulty buckets easy/medium/hard). One format cold start
# (SFT on the task's traces; NOT part of the PASR paper) shared by every RL arm, then per arm
# and training seed (data order and sampler: config.seed and data.shuffle_seed) the same steps
# and data from it, an export to $EXP_DIR/<arm>_s<seed>/hf, a greedy evaluation of every run
# on the held-out items (configs/data/arith/test.jsonl: held-out frames of the generator) and
# the out-of-template items (out_of_template.jsonl: sentence templates written apart from
# the generator) with per-item answers, and `evaluate compare` (paired differences with
# McNemar p, the refinements inside answers by bucket, and per arm the seeds pooled with the
# seed as stratum) into $EXP_DIR/compare.md and compare.png.
# Arms: vanilla (the dequantized Q4_1 SmolLM2, plain prompt), cold_start (the SFT alone),
# pasr (cold start + PASR), grpo (cold start + GRPO with format + accuracy rewards only:
# rewards.refine_weight=0), pasr_nocompare (cold start + PASR "w/o comparison": every
# refinement earns rewards.refine_fixed, paper Table 2), pasr_async (pasr with one batch
# sampled ahead: rollout.max_staleness=1, issue 25).
#   EXP_ARMS   RL arms (default "pasr grpo"; add pasr_nocompare when there is time). Measured
#              2026-12-03 with the defaults on the 2-core host: 52.8 min in all (cold start
#              8.3 min; an arm of 6 steps 10.6-12.6 min of training + 3-4 min of evaluation)
#              (one seed). With EXP_SEEDS' three seeds every arm runs three times: not measured.
#   EXP_SEEDS  training seeds per arm (default "0 1 2")
#   EXP_STEPS  RL steps per arm (default 6)
#   EXP_LIMIT  items evaluated per set (default 400 of the 500 held-out; all 300 out-of-template)
#   EXP_DIR    (default runs/experiment)
# Every stage is skipped when its output exists, so a rerun resumes where one stopped.
set -euo pipefail
PY=${PY:-.venv/bin/python}
PRESET=configs/arith_135m.py   # the cold start below imports it too
EXP_ARMS=${EXP_ARMS:-pasr grpo}
EXP_DIR=${EXP_DIR:-runs/experiment}
EXP_LIMIT=${EXP_LIMIT:-400}
EXP_SEEDS=${EXP_SEEDS:-0 1 2}
PORT=${JUDGE_PORT:-8011}
STEPS=(--config.train.steps="${EXP_STEPS:-6}")
for arm in $EXP_ARMS; do
  case $arm in pasr|grpo|pasr_nocompare|pasr_async) ;;
    *) echo "experiment: EXP_ARMS: unknown arm '$arm' (pasr | grpo | pasr_nocompare |" \
            "pasr_async)" >&2; exit 2;;
  esac
done
mkdir -p "$EXP_DIR"
SMOL=$($PY -c "from pasr_jax.smollm2 import smollm2_dir; print(smollm2_dir())")
start=$(date +%s)
stamp() { echo "[experiment] $1 after $(( $(date +%s) - start )) s"; }

$PY -m pasr_jax.judge --config.backend=verify --config.host=127.0.0.1 "--config.port=$PORT" > "$EXP_DIR/judge.log" 2>&1 &
JUDGE=$!
trap 'kill $JUDGE 2>/dev/null || true' EXIT
URL=http://127.0.0.1:$PORT
$PY -c "import sys, time
from pasr_jax.judge.local import judge_answers
for _ in range(240):
  if judge_answers('$URL'): sys.exit(0)
  time.sleep(0.5)
sys.exit('experiment: the verify judge did not come up; see $EXP_DIR/judge.log')"

# The cold start, once: <EXP_DIR>/cold_start/hf (cold_start.ensure skips it when it exists).
$PY - "$EXP_DIR" <<'EOF'
import sys
from configs.arith_135m import get_config
from pasr_jax import cold_start
from pasr_jax.config import RunConfig
c = get_config()
c.workdir = sys.argv[1]
cold_start.ensure(RunConfig.from_tree(c))
EOF
stamp "cold start done"

COLD="$EXP_DIR/cold_start/hf"
SETS=arith,arith_oot   # the held-out frames and the out-of-template set
EVAL=(--config=configs/eval.py --config.data_dir=configs/data --config.datasets="$SETS"
      --config.limit="$EXP_LIMIT" --config.judge.base_url="$URL"
      --config.rollout.vllm.max_model_len=512 --config.rollout.vllm.kv_cache_space_gib=1
      --config.max_tokens=256)  # training's 128 + room: the vanilla model's prose runs longer
evaluate() {  # arm model mode; skipped when its results exist (a rerun resumes)
  [ -f "$EXP_DIR/eval_$1/results.json" ] || $PY -m pasr_jax.evaluate "${EVAL[@]}" \
    --config.model="$2" --config.mode="$3" --config.out_dir="$EXP_DIR/eval_$1"
  stamp "arm $1 evaluated"
}
evaluate cold_start "$COLD" pasr
for run in $(for a in $EXP_ARMS; do for s in $EXP_SEEDS; do echo "${a}_s$s"; done; done); do
  arm=${run%_s*}; seed=${run##*_s}
  case $arm in
    pasr) ARM=();;
    # No refine reward; the baseline answers would be sampled for nothing.
    grpo) ARM=(--config.rewards.refine_weight=0 --config.rollout.baseline=False);;
    # No comparison with the baseline: every refinement earns rewards.refine_fixed.
    pasr_nocompare) ARM=(--config.rewards.refine_compare=none --config.rollout.baseline=False);;
    # Batch j+1 sampled (one update behind) while batch j trains.
    pasr_async) ARM=(--config.rollout.max_staleness=1);;
  esac
  [ -f "$EXP_DIR/$run/hf/config.json" ] || $PY -m pasr_jax.train --config="$PRESET" \
    --config.workdir="$EXP_DIR/$run" --config.model.path="$COLD" --config.cold_start.enabled=False \
    --config.judge.base_url="$URL" --config.train.export=True --config.seed="$seed" \
    --config.data.shuffle_seed="$seed" "${STEPS[@]}" "${ARM[@]}"
  stamp "arm $arm seed $seed trained"
  evaluate "$run" "$EXP_DIR/$run/hf" pasr
done
evaluate vanilla "$SMOL" vanilla
DIRS=()
for arm in $EXP_ARMS; do for seed in $EXP_SEEDS; do DIRS+=("$EXP_DIR/eval_${arm}_s$seed"); done; done
# The cold-started model is the reference every RL arm is compared with.
$PY -m pasr_jax.evaluate compare "$EXP_DIR/eval_cold_start" "$EXP_DIR/eval_vanilla" "${DIRS[@]}" \
  --config.png="$EXP_DIR/compare.png" | tee "$EXP_DIR/compare.md"
for arm in $EXP_ARMS; do for seed in $EXP_SEEDS; do
  cp "$EXP_DIR/${arm}_s$seed/reward_curve.png" "$EXP_DIR/reward_curve_${arm}_s$seed.png"
done; done
echo "[experiment] $(date -u +%F) commit $(git rev-parse --short HEAD 2>/dev/null || echo ?):" \
  "arms vanilla cold_start $EXP_ARMS, seeds $EXP_SEEDS; done in $(( $(date +%s) - start )) s;" \
  "table $EXP_DIR/compare.md, curves $EXP_DIR/reward_curve_<arm>_s<seed>.png"
