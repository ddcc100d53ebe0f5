#!/usr/bin/env bash
# On the lent GPU machine, after scripts/gpu/env.sh: the speed benchmarks of issue #3 on a Llama-2-7B-shaped model
# with random bfloat16 weights (no model file needed), then where BLoB's training step spends its time next to MLE's.
# Everything it writes lands in $OUT. Steps vary by process (session 18: MAP's step 0.86x MLE's, the same
# arithmetic), so the training ratios are read over rounds of one subprocess per method in turn.
set -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -m bayeslora.cli bench speed --model random:llama2-7b --batch-size 4 --steps 10 --rounds 3 --samples 1,2,10 \
  --parts train,predictive --methods mle,blob,map --md "$OUT/speed.md" --json "$OUT/speed.json" 2>&1 | tail -n 50
# the cloze format, where BLoB's step was 1.75x MLE's in session 18 (not diagnosed), then its profile with the lines
# that synchronize
python3 -m bayeslora.cli bench speed --model random:llama2-7b --batch-size 4 --steps 10 --rounds 3 --format cloze \
  --parts train --methods mle,blob --md "$OUT/speed-cloze.md" --json "$OUT/speed-cloze.json" 2>&1 | tail -n 12
python3 scripts/profile_train_step.py --method blob --targets q_proj,v_proj,lm_head --model random:llama2-7b \
  --batch-size 4 --steps 5 > "$OUT/profile-blob.txt" 2>&1; grep -A30 "runtime calls that wait" "$OUT/profile-blob.txt"
# issue #4's cost goal on a GPU with the real model (in session 18's grid, three grids sharing the GPU, Laplace's fit
# took 1.2-1.3x an MLE epoch): one MLE epoch over all ARC-E training questions, then each post-hoc fit, alone
[ -f "${SMOLLM2:-}" ] && python3 -m bayeslora.cli bench speed --model "$SMOLLM2" --dtype float32 --parts posthoc \
  --fit-questions 2251 --batch-size 16 --md "$OUT/speed-posthoc.md" --json "$OUT/speed-posthoc.json" 2>&1 | tail -n 15
