#!/usr/bin/env bash
# On the lent GPU machine, after scripts/gpu/env.sh: the speed benchmarks of issue #3 on a Llama-2-7B-shaped model
# with random bfloat16 weights (no model file needed), then where BLoB's training step spends its time next to MLE's.
# Everything it writes lands in $OUT.
set -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -m bayeslora.cli bench speed --model random:llama2-7b --batch-size 4 --steps 5 --repeats 3 --samples 1,2,10 \
  --parts train,predictive --methods mle,map,mcd,ens,blob --md "$OUT/speed.md" --json "$OUT/speed.json" 2>&1 | tail -n 50
python3 scripts/profile_train_step.py --method blob --targets q_proj,v_proj,lm_head --model random:llama2-7b \
  --batch-size 4 --steps 5 > "$OUT/profile-blob.txt" 2>&1; tail -n 45 "$OUT/profile-blob.txt"
