#!/usr/bin/env bash
# Back-to-back runs of knn.py and probe.py with the default data-loading workers (--num_workers 8), on 1 and 2
# processes: every run must end (a run over its time limit is a hang) and leave no process behind, in its process
# group or not (torchrun starts each rank in a session of its own): every process of a run inherits MAECT_RUN=<id>,
# and 5 s after the run has ended none may be left. --loaded: beside 8 busy processes (a CPU hog), as on a shared
# machine under other jobs.
#   bash scripts/worker_soak.sh [ROUNDS] [--loaded]   # each round: knn.py x1, knn.py x2 processes, probe.py --logreg
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=10 LOADED=0
for a in "$@"; do case $a in --loaded) LOADED=1 ;; *) ROUNDS=$a ;; esac; done
T=$(mktemp -d)
HOGS=()
trap '[ ${#HOGS[@]} -eq 0 ] || kill "${HOGS[@]}" 2>/dev/null; rm -rf "$T"' EXIT
python - "$T" <<'PY'
import sys, torch
sys.path.insert(0, "tests")
from conftest import make_image_folder
import vit
make_image_folder(sys.argv[1] + "/data", per_class=24, val_per_class=12)
torch.manual_seed(0)
a = vit.model_args_from_preset("vit_micro", 32, 4)
torch.save(dict(stage="mae", model_args=a, encoder=vit.ViT(**a).state_dict()), sys.argv[1] + "/mae.pt")
PY
if [ "$LOADED" = 1 ]; then
  for i in $(seq 8); do python -c "while True: pass" & HOGS+=($!); done
fi
left() {  # the live processes whose environment holds MAECT_RUN=$1
  for f in /proc/[0-9]*/environ; do
    if grep -qzx "MAECT_RUN=$1" "$f" 2>/dev/null; then
      p=${f#/proc/}; p=${p%/environ}; echo "$p $(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | cut -c1-100)"
    fi
  done
}
B=(--data_path "$T/data" --init "$T/mae.pt" --device cpu --crop_pct 1 --batch_size 8)
runs=0; t0=$(date +%s); times=()
for r in $(seq 1 "$ROUNDS"); do
  for cmd in "python knn.py ${B[*]} --k 5" \
             "python -m torch.distributed.run --standalone --nproc_per_node 2 knn.py ${B[*]} --k 5" \
             "python probe.py ${B[*]} --logreg 1 --per_class 4 --out_dir $T/lr$r"; do
    id="soak$$-$r-$runs"; t1=$(date +%s)
    MAECT_RUN=$id setsid bash -c "exec $cmd" > "$T/log" 2>&1 &
    pid=$!
    if ! timeout 300 tail --pid=$pid -f /dev/null; then
      echo "HUNG: round $r: $cmd"; left "$id"; kill -9 -- -"$pid"; exit 1
    fi
    wait $pid || { echo "FAILED: round $r: $cmd"; tail -5 "$T/log"; exit 1; }
    times+=($(( $(date +%s) - t1 )))
    for i in $(seq 50); do [ -z "$(left "$id")" ] && break; sleep 0.1; done
    if [ -n "$(left "$id")" ]; then echo "LEFT BEHIND: round $r: $cmd"; left "$id"; exit 1; fi
    runs=$((runs + 1))
  done
done
sorted=($(printf '%s\n' "${times[@]}" | sort -n))
echo "PASSED: $runs runs in $(( $(date +%s) - t0 )) s (per run: median ${sorted[$((runs / 2))]} s, slowest" \
     "${sorted[$((runs - 1))]} s), none hung, no process left$([ "$LOADED" = 1 ] && echo ", beside 8 CPU hogs")" \
     "(load average $(cut -d' ' -f1-3 /proc/loadavg))"
