#!/usr/bin/env bash
# On the lent GPU machine, after scripts/gpu/env.sh and the model re-assembly (docs/RESULTS.md, "GPU runs"): the
# gpu-arc-e calibration grid, one grid folder per seed, the three run side by side (SmolLM2 is launch-bound on a
# GPU, so three processes share it well). Methods run in the order below, the post-hoc ones right after MLE, and
# each seed stops after LIMIT seconds: a rerun resumes (finished cells are skipped, an interrupted training resumes
# from its checkpoint). The folders' small files come back in $OUT/gpu-grid.tgz; merge the seeds' cells/ into one
# folder and run `bayeslora bench report` on it.
limit=${1:-500}
mkdir -p /root/runs
for s in 1 2 3; do
  OMP_NUM_THREADS=5 timeout "$limit" bash -c "for m in mle,blob,temperature,laplace,tfb mle,mcd,ens,map; do
    python3 -m bayeslora.cli bench calibration --preset gpu-arc-e --model '$SMOLLM2' --seeds $s --methods \$m \
      --out /root/runs/gpu-s$s; done" >>"/root/runs/log-s$s.txt" 2>&1 &
done
wait
tail -n 6 /root/runs/log-s*.txt; ls /root/runs/gpu-s*/cells/ | grep json
cd /root/runs && find . -type f -size -2000k -print0 | tar czf "$OUT/gpu-grid.tgz" --null -T - && ls -la "$OUT"
