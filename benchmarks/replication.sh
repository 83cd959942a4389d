#!/usr/bin/env bash
# Run the replication studies one after the other (docs/REPLICATION.md).
#   bash benchmarks/replication.sh [study numbers...]      # default: 2 3 5 1 4 4b 2b
# Each study writes runs/replication/studyN/ and its log to docs/replication-logs/studyN.log;
# all share one artifact cache, so a clean model or a poisoned model is trained once.
# Kill it any time: the same command resumes where it stopped.
set -u
cd "$(dirname "$0")/.."
data="${POISONLAB_DATA:-../shared/data}"
mkdir -p docs/replication-logs runs/replication
studies=("$@"); [ ${#studies[@]} -eq 0 ] && studies=(2 3 5 1 4 4b 2b)
for n in "${studies[@]}"; do
  cfg=$(ls examples/replication/study${n}_*.toml)
  log=docs/replication-logs/study${n}.log
  echo "== study $n: $cfg  (start $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg))" | tee -a "$log"
  start=$(date +%s)
  poisonlab run "$cfg" --out runs/replication/study${n} --cache runs/replication/cache --data-dir "$data" --quiet 2>&1 \
    | tee -a "$log"
  echo "== study $n done: $(( $(date +%s) - start )) s wall (end $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg))" | tee -a "$log"
done
