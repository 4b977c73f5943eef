#!/usr/bin/env bash
# Which kind of judge error stops Flow-GRPO? (#7, README flow_grpo.py section, session 18)
#
#   scripts/corrupted_oracles.sh [RUN_DIR] [SEED]      default runs/oracles0 0 (~30 min on 2 cores)
#
# The world's exact utility is the reward (--reward_backend mini:truth), corrupted in one way
# at a time, 40 Flow-GRPO steps each, then every editor edits the 100 test contexts from the
# same 8 starting noises (evaluate.py) and scripts/editor_changes.py prints the paired change
# over the base beside the reward's within-group agreement with the truth in training:
#   f40_oracle   the oracle (agreement ~0.95)
#   f40_n25      + Gaussian noise, sd 2.5 (random errors; agreement ~0.72-0.74)
#   f40_kb6      deductions on the true verdicts with 60% of Keep failures passed (the judges'
#                blind spot: they pass 0.4-0.8 of Keep failures; --noop_call on the world's own
#                no-op call, so with no blind spot this is exactly the oracle)
#   f40_fb6      the same blind spot on Follow failures (a control)
#   f40_kb6c10   the Keep blind spot with a caught Keep failure charged 10 points instead of 5
# Nothing here needs an RRM: build_data.py only supplies the contexts. Runs side by side, one
# CPU thread each; a run whose summary.json exists is skipped, so an interrupted call resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/oracles0}
SEED=${2:-0}
PY=${PYTHON:-python}
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$RUN/logs"
[ -e "$RUN/data/stats.json" ] || $PY build_data.py --run_dir "$RUN" --seed "$SEED" > "$RUN/logs/build_data.log" 2>&1

flow() {  # flow <name> <flags...>: one 40-step Flow-GRPO run on the corrupted oracle
  local name=$1; shift
  [ -e "$RUN/$name/summary.json" ] && return 0
  echo "[$(date +%T)] start $name"
  $PY flow_grpo.py --run_dir "$RUN" --seed "$SEED" --reward_backend mini:truth --steps 40 --report_to none \
      --output_name "$name" "$@" > "$RUN/logs/$name.log" 2>&1 || { tail -n 20 "$RUN/logs/$name.log"; return 1; }
}
BLIND="--reward_mode deductions --noop_call true"
flow f40_oracle & flow f40_n25 --reward_noise 2.5 & wait
flow f40_kb6 $BLIND --oracle_blind keep:0.6 & flow f40_fb6 $BLIND --oracle_blind follow:0.6 & wait
flow f40_kb6c10 $BLIND --oracle_blind keep:0.6 --costs follow:4,keep:10,quality:2
NAMES="f40_oracle f40_n25 f40_kb6 f40_fb6 f40_kb6c10"
[ -e "$RUN/eval_oracles/summary.json" ] || OMP_NUM_THREADS=2 $PY evaluate.py --run_dir "$RUN" \
    --out_dir "$RUN/eval_oracles" --rrms "" --scalar_scorer "" --pairs_split "" \
    --editor_loras "$(for n in $NAMES; do printf '%s,' "$RUN/$n"; done)" > "$RUN/logs/eval_oracles.log" 2>&1
$PY scripts/editor_changes.py "$RUN/eval_oracles"
