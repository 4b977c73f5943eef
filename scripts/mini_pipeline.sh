#!/usr/bin/env bash
# The whole Edit-R1 pipeline on the mini world, stage by stage (README, "Two commands").
#
#   scripts/mini_pipeline.sh [RUN_DIR] [SEED]          the full mini run, default runs/mini 0 (~22 min)
#   scripts/mini_pipeline.sh --demo [RUN_DIR] [SEED]   every stage at demo scale, default runs/demo 0
#                                                      (~6 min; too few SFT steps for the RRM to
#                                                      learn to compare: a tour, not the reproduction)
#
# Stages hand over through files in RUN_DIR only (no stage imports another):
#   1. build_data.py            -> data/ (contexts, candidates, trajectories, SFT sets, pairs)
#   2. sft_rrm.py  x2           -> sft_rrm/ (Think+Verify), sft_rrm_think_only/ (the ablation)
#   3. gcpo.py -> gcpo_rrm/, then  | flow_grpo.py -> flow_grpo_sft/ (SFT-RRM reward), side by side
#   4. flow_grpo.py -> flow_grpo_gcpo/ (GCPO-RRM reward)   |
#   5. evaluate.py              -> eval/ (summary.json, report.md, report.html)
# Independent stages run side by side, one CPU thread each (this machine has 2 cores).
# Every stage's full log is in RUN_DIR/logs/<stage>.log; this script prints one line per stage.
# Rerun after an interruption: a stage whose last file exists (data/stats.json, <stage>/summary.json,
# eval/summary.json; each written last and atomically) is skipped, the others run again.
# Extra flags per stage (e.g. a smaller run in tests/test_pipeline.py): DATA_ARGS, SFT_ARGS,
# GCPO_ARGS, FLOW_ARGS, EVAL_ARGS, e.g.  SFT_ARGS="--max_steps 50" scripts/mini_pipeline.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO=0
if [ "${1:-}" = "--demo" ]; then DEMO=1; shift; fi
RUN=${1:-$([ $DEMO = 1 ] && echo runs/demo || echo runs/mini)}
SEED=${2:-0}
if [ $DEMO = 1 ]; then
  # Demo scale: a fifth of the data, a fifth of the SFT steps (the same 1.8 epochs), a sixth of
  # GCPO's, 4 Flow-GRPO steps, one edit per test context. Flags given in *_ARGS come after
  # these, so they win.
  DATA_ARGS="--n_train 300 --n_val 20 --n_test 40 ${DATA_ARGS:-}"
  SFT_ARGS="--max_steps 100 --eval_max_pairs 60 ${SFT_ARGS:-}"
  GCPO_ARGS="--steps 10 --eval_max_pairs 40 ${GCPO_ARGS:-}"
  FLOW_ARGS="--steps 4 --group_size 8 --eval_contexts 16 ${FLOW_ARGS:-}"
  EVAL_ARGS="--edit_seeds 1 ${EVAL_ARGS:-}"
  echo "demo scale: every stage runs, with too few steps to reproduce the paper's directions;" \
       "the reproduction is scripts/mini_pipeline.sh without --demo (~22 min, README)"
fi
PY=${PYTHON:-python}
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$RUN/logs"
T0=$(date +%s)

stage() {  # stage <name> <done file> <command...>: run, log, print the time and the last summary line
  local name=$1 done_file=$2; shift 2
  local t=$(date +%s)
  if [ -e "$RUN/$done_file" ]; then  # a finished stage of an earlier, interrupted run: kept
    echo "[$(date +%T)] skip   $name ($RUN/$done_file exists: finished earlier; delete it to redo)"; return 0
  fi
  echo "[$(date +%T)] start  $name"
  if ! "$@" > "$RUN/logs/$name.log" 2>&1; then
    echo "[$(date +%T)] FAILED $name -- see $RUN/logs/$name.log:"; tail -n 20 "$RUN/logs/$name.log"; return 1
  fi
  echo "[$(date +%T)] done   $name ($(( $(date +%s) - t )) s): $(tr '\r' '\n' < "$RUN/logs/$name.log" | grep -E '^\[eval final\]|^report:|^\[final\]|^wrote' | tail -n 1)"
}

stage build_data      data/stats.json $PY build_data.py --run_dir "$RUN" --seed "$SEED" ${DATA_ARGS:-}
echo "           data: $(wc -l < "$RUN/data/sft_think_verify.jsonl") SFT rows per set, preference pairs" \
     "$(wc -l < "$RUN/data/pairs_train.jsonl") / $(wc -l < "$RUN/data/pairs_val.jsonl") / $(wc -l < "$RUN/data/pairs_test.jsonl") (train / val / test)"
stage sft_think_verify sft_rrm/summary.json $PY sft_rrm.py --run_dir "$RUN" --seed "$SEED" ${SFT_ARGS:-} &
P1=$!
stage sft_think_only  sft_rrm_think_only/summary.json $PY sft_rrm.py --run_dir "$RUN" --seed "$SEED" --sft_set think_only ${SFT_ARGS:-} &
P2=$!
wait $P1 || exit 1; wait $P2 || exit 1
# core 1: GCPO, then Flow-GRPO with its RRM; core 2 meanwhile: Flow-GRPO with the SFT-RRM
( stage gcpo          gcpo_rrm/summary.json $PY gcpo.py --run_dir "$RUN" --seed "$SEED" --model "$RUN/sft_rrm" ${GCPO_ARGS:-} &&
  stage flow_grpo_gcpo flow_grpo_gcpo/summary.json $PY flow_grpo.py --run_dir "$RUN" --seed "$SEED" --reward_model "$RUN/gcpo_rrm" --output_name flow_grpo_gcpo ${FLOW_ARGS:-} ) &
P1=$!
stage flow_grpo_sft   flow_grpo_sft/summary.json $PY flow_grpo.py --run_dir "$RUN" --seed "$SEED" --reward_model "$RUN/sft_rrm" --output_name flow_grpo_sft ${FLOW_ARGS:-} &
P2=$!
wait $P1 || exit 1; wait $P2 || exit 1
stage evaluate        eval/summary.json $PY evaluate.py --run_dir "$RUN" --seed "$SEED" ${EVAL_ARGS:-}
echo "pipeline done in $(( $(date +%s) - T0 )) s"
[ $DEMO = 1 ] && echo "(demo scale: not the reproduction table; README, 'The reproduction table')"
cat "$RUN/eval/headline.md" 2>/dev/null || true
echo "report: $RUN/eval/report.html"
