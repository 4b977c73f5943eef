#!/usr/bin/env bash
# scripts/gpu_check.sh -- every stage's GPU path (--bf16, --gradient_checkpointing, CUDA
# generation, LoRA, the diffusers pipelines in bf16) on one CUDA device, at demo scale.
#
#   scripts/gpu_check.sh RUN_DIR [LOG_DIR]
#
# RUN_DIR must hold data/ from build_data.py (demo scale is enough) and, as a fallback for the
# later stages, an sft_rrm/ made anywhere (the CPU is fine):
#   python build_data.py --run_dir runs/gpu --n_train 300 --n_val 20 --n_test 40
#   python sft_rrm.py --run_dir runs/gpu --max_steps 100 --eval_max_pairs 60
# Each stage runs under scripts/peak_mem.py (wall time and peak CUDA memory) with its own time
# limit, and a failing stage does not stop the others, so one run shows every problem. The later
# stages use this run's bf16 SFT-RRM (gpu_sft) when its answers parse, else RUN_DIR/sft_rrm.
# Writes LOG_DIR/<stage>.log (default RUN_DIR/gpu_logs) and prints one summary block per stage;
# exits 1 if any stage failed. Not part of the test suite: CI has no GPU (README, GPU recipe).
set -uo pipefail
cd "$(dirname "$0")/.."
RUN=${1:?usage: scripts/gpu_check.sh RUN_DIR [LOG_DIR]}
LOG=${2:-$RUN/gpu_logs}
PY=${PYTHON:-python}
LIMIT=${LIMIT:-150}              # seconds per stage
SFT_STEPS=${SFT_STEPS:-300}      # a GPU runs the mini SFT's 500 steps in about a minute
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$LOG"
FAILED=""
$PY -c "import torch, transformers, diffusers, accelerate, peft; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-', '| transformers', transformers.__version__, '| diffusers', diffusers.__version__, '| accelerate', accelerate.__version__, '| peft', peft.__version__)"

check() {  # check <name> <script> <args...>; STAGES="a b" runs only the stages named
  local name=$1; shift
  [ -z "${STAGES:-}" ] || [[ " $STAGES " == *" $name "* ]] || return 0
  local t=$(date +%s)
  if timeout "$LIMIT" $PY scripts/peak_mem.py "$@" > "$LOG/$name.log" 2>&1; then
    echo "== ok     $name ($(( $(date +%s) - t )) s)"
  else
    local rc=$?   # 124 = ran past its time limit
    echo "== FAILED $name ($(( $(date +%s) - t )) s, rc $rc; limit $LIMIT s) -- last lines of $LOG/$name.log:"
    tr '\r' '\n' < "$LOG/$name.log" | grep -v '^\s*$' | tail -n 25
    FAILED="$FAILED $name"
  fi
  tr '\r' '\n' < "$LOG/$name.log" | grep -aE '^\[eval|^\[final\]|^\[peak_mem\]|^wrote|^report:|^step ' | tail -n 6 | sed 's/^/   /'
}

# 0. the attention-kernel probe (why the training scripts switch cuDNN attention off)
if [ -z "${STAGES:-}" ] || [[ " $STAGES " == *" probe "* ]]; then
  timeout "$LIMIT" $PY scripts/gpu_attention_probe.py "$RUN" 2>&1 | tee "$LOG/probe.log" | grep -a "bf16="
fi
# 1. SFT, full fine-tuning in bf16 with gradient checkpointing; then a LoRA SFT (peft on CUDA)
check sft_bf16  sft_rrm.py --run_dir "$RUN" --output_name gpu_sft --bf16 --gradient_checkpointing \
  --max_steps "$SFT_STEPS" --eval_max_pairs 60 --report_to none
check sft_lora  sft_rrm.py --run_dir "$RUN" --output_name gpu_sft_lora --bf16 --lora_r 16 \
  --max_steps 20 --eval_max_pairs 16 --report_to none
# the bf16 SFT-RRM if its answers parse (else GCPO and the in-process reward would have nothing
# to learn from), else RUN_DIR/sft_rrm
parses() { $PY -c "import json,sys; sys.exit(json.load(open('$1/summary.json'))['eval']['parse_rate'] < 0.5)" 2>/dev/null; }
RRM="$RUN/gpu_sft"; parses "$RRM" || RRM="$RUN/sft_rrm"
echo "   later stages use the RRM in $RRM"
# 2. GCPO: CUDA rollouts with the shared-prefix KV cache, bf16 update with checkpointing
check gcpo_bf16 gcpo.py --run_dir "$RUN" --model "$RRM" --output_name gpu_gcpo --bf16 \
  --gradient_checkpointing --steps 6 --eval_max_pairs 24 --report_to none
# 3. Flow-GRPO of both policies: bf16 frozen weights, float32 LoRA and SDE, in-process RRM reward
check flow_kontext flow_grpo.py --run_dir "$RUN" --reward_model "$RRM" --output_name gpu_flow_kontext \
  --bf16 --gradient_checkpointing --steps 3 --group_size 8 --contexts_per_step 4 --eval_contexts 8 \
  --report_to none
check flow_qwen  flow_grpo.py --run_dir "$RUN" --reward_model "$RRM" --output_name gpu_flow_qwen \
  --policy miniworld/checkpoints/qwen_edit --bf16 --gradient_checkpointing --steps 3 --group_size 8 \
  --contexts_per_step 4 --eval_contexts 8 --report_to none
# 3b. the oracle reward (the world's exact utility) has signal in every group even when the demo
# RRM does not parse yet, so every step updates: no update may be skipped for a non-finite gradient
check flow_truth flow_grpo.py --run_dir "$RUN" --reward_backend mini:truth --output_name gpu_flow_truth \
  --bf16 --gradient_checkpointing --steps 3 --group_size 8 --contexts_per_step 4 --eval_contexts 8 \
  --report_to none
if [ -f "$LOG/flow_truth.log" ] && grep -q "non-finite" "$LOG/flow_truth.log"; then
  echo "== FAILED flow_truth: updates skipped for non-finite gradients"; FAILED="$FAILED flow_truth"
fi
# 4. evaluation on CUDA in bf16: RRM pairs, and the editor with the Kontext LoRA just trained
check evaluate  evaluate.py --run_dir "$RUN" --out_dir "$RUN/gpu_eval" --device "${EVAL_DEVICE:-cuda}" --bf16 \
  --rrms "sft=$RRM" --max_pairs 24 --max_contexts 8 --edit_seeds 1 \
  --editor_loras "$RUN/gpu_flow_kontext"
if [ -n "$FAILED" ]; then echo "GPU check: FAILED:$FAILED"; exit 1; fi
echo "GPU check: every stage ran"
