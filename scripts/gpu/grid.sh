#!/usr/bin/env bash
# On the lent GPU machine, after scripts/gpu/env.sh and the model re-assembly (scripts/gpu/README.md): the gpu-arc-e
# calibration grid, one grid folder per seed, the three side by side (SmolLM2 is launch-bound on a GPU, so three
# processes share it well). Methods run in the order below, the post-hoc ones right after MLE.
#   grid.sh start [GROUPS]  starts the three seeds in a new process session, so that they run on between `run`
#                        calls while the machine is held (a rerun resumes: finished cells are skipped, an interrupted
#                        training resumes from its checkpoint). GROUPS: space-separated comma lists of methods, one
#                        `bench calibration` each, in order; default "mle,blob,temperature,laplace,tfb mle,mcd,ens,map"
#                        (session 18's table lacks "mcd,map,ens");
#   grid.sh stop         stops the seeds (their loops, then the grids; a stopped grid stops its running cell);
#   grid.sh wait LIMIT   waits until the seeds finish or LIMIT seconds pass, then packs the folders' small files
#                        into $OUT/gpu-grid.tgz (merge the seeds' results.jsonl and cells/ into one folder here and
#                        run `bayeslora bench report` on it).
set -u
mkdir -p /root/runs
case "${1:-}" in
start)
  # the checkout is laid anew by every `run` call: the seeds read code and data from copies outside it
  rm -rf /root/code /root/data && cp -r src /root/code && cp -r "$BAYESLORA_DATA" /root/data
  export PYTHONPATH=/tmp/site:/root/code BAYESLORA_DATA=/root/data
  groups=${2:-"mle,blob,temperature,laplace,tfb mle,mcd,ens,map"}
  for s in 1 2 3; do
    OMP_NUM_THREADS=5 setsid nohup bash -c "for m in $groups; do
      python3 -m bayeslora.cli bench calibration --preset gpu-arc-e --model '$SMOLLM2' --seeds $s --methods \$m \
        --out /root/runs/gpu-s$s; done; touch /root/runs/done-s$s" >>"/root/runs/log-s$s.txt" 2>&1 < /dev/null &
  done
  sleep 2; echo "grid started" ;;
wait)
  limit=${2:-500}; t0=$SECONDS
  while [ $((SECONDS - t0)) -lt "$limit" ] && ! ls /root/runs/done-s1 /root/runs/done-s2 /root/runs/done-s3 \
      >/dev/null 2>&1; do sleep 5; done
  tail -n 4 /root/runs/log-s*.txt; ls /root/runs/gpu-s*/cells/ 2>/dev/null | grep json; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
  cd /root/runs && find . -type f -size -2000k -print0 | tar czf "$OUT/gpu-grid.tgz" --null -T - && ls -la "$OUT" ;;
stop)
  # patterns in brackets, so that they never match a shell whose own command line holds them
  pkill -f "[f]or m in "; pkill -f "[b]ayeslora.cli bench calibration"; sleep 5
  pgrep -af "[b]ayeslora.bench.grid" || echo "grid stopped" ;;
*) echo "usage: grid.sh start [GROUPS] | stop | wait LIMIT" >&2; exit 2 ;;
esac
