#!/usr/bin/env bash
# On the lent GPU machine, after scripts/gpu/env.sh; everything it writes lands in $OUT. One part per `run` call
# (each fits in one call's 10 minutes; session 18's single call of the first part's predecessor took 5 min):
#   speed.sh 7b       issue #3's speed goals on a Llama-2-7B-shaped model with random bfloat16 weights (no model file);
#                     steps vary by process (session 18: MAP's step 0.86x MLE's, the same arithmetic), so the
#                     training ratios are read over rounds of one subprocess per method in turn
#   speed.sh cloze    the same model in the cloze format, where BLoB's step was 1.75x MLE's in session 18 (not
#                     diagnosed), then its profile with the runtime calls that wait and the lines that synchronize
#   speed.sh posthoc  issue #4's cost goal with the real model in float32 (in session 18's grid, three grids sharing
#                     the GPU, Laplace's fit took 1.2-1.3x an MLE epoch): one MLE epoch over all ARC-E training
#                     questions, then each post-hoc fit, alone on the GPU; session 19 changed the fit (FINDINGS 28:
#                     one product for the prior's grid, one backward fewer) and predicts 0.2-0.35x, not measured
#   speed.sh nan      the first lease's bfloat16 NaN batch (FINDINGS 29) through plain SDPA and bayeslora's attention
#                     (no cuDNN kernel where a backward follows): plain SDPA's gradients are expected NaN, ours finite
set -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
case "${1:-}" in
7b)
  python3 -m bayeslora.cli bench speed --model random:llama2-7b --batch-size 4 --steps 10 --rounds 3 --samples 1,2,10 \
    --parts train,predictive --methods mle,blob,map --md "$OUT/speed.md" --json "$OUT/speed.json" 2>&1 | tail -n 50 ;;
cloze)
  python3 -m bayeslora.cli bench speed --model random:llama2-7b --batch-size 4 --steps 10 --rounds 3 --format cloze \
    --parts train --methods mle,blob --md "$OUT/speed-cloze.md" --json "$OUT/speed-cloze.json" 2>&1 | tail -n 12
  python3 scripts/profile_train_step.py --method blob --targets q_proj,v_proj,lm_head --model random:llama2-7b \
    --batch-size 4 --steps 5 > "$OUT/profile-blob.txt" 2>&1
  grep -E "^## |runtime calls|synchronizing| x /|step time" "$OUT/profile-blob.txt" ;;
posthoc)
  python3 -m bayeslora.cli bench speed --model "$SMOLLM2" --dtype float32 --parts posthoc --fit-questions 2251 \
    --batch-size 16 --md "$OUT/speed-posthoc.md" --json "$OUT/speed-posthoc.json" 2>&1 | tail -n 15 ;;
nan)
  python3 scripts/attention_nan_replay.py --model "$SMOLLM2" --dtype bfloat16 2>&1 | grep -v -i warn | tail -n 12 ;;
*) echo "usage: speed.sh 7b | cloze | posthoc | nan" >&2; exit 2 ;;
esac
