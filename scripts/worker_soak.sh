#!/usr/bin/env bash
# Back-to-back runs of knn.py and probe.py with the default data-loading workers (8 per process), on 1 and 2
# processes: every run must end (a run over its time limit is a hang) and leave no process behind. The workers are
# started by spawn: before, one fork in a row of runs could leave a worker waiting forever (CPython gh-112275).
#   bash scripts/worker_soak.sh [ROUNDS]        # each round: knn.py x1, knn.py x2 processes, probe.py --logreg x1
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-10}
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
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
B=(--data_path "$T/data" --init "$T/mae.pt" --device cpu --crop_pct 1 --batch_size 8)
runs=0; t0=$(date +%s)
for r in $(seq 1 "$ROUNDS"); do
  for cmd in "python knn.py ${B[*]} --k 5" \
             "python -m torch.distributed.run --standalone --nproc_per_node 2 knn.py ${B[*]} --k 5" \
             "python probe.py ${B[*]} --logreg 1 --per_class 4 --out_dir $T/lr$r"; do
    setsid bash -c "exec $cmd" > "$T/log" 2>&1 &
    pid=$!
    if ! timeout 300 tail --pid=$pid -f /dev/null; then
      echo "HUNG: round $r: $cmd"; ps -o pid,stat,args -g "$pid" || true; kill -9 -- -"$pid"; exit 1
    fi
    wait $pid || { echo "FAILED: round $r: $cmd"; tail -5 "$T/log"; exit 1; }
    for i in $(seq 50); do pgrep -g "$pid" > /dev/null || break; sleep 0.1; done
    if pgrep -g "$pid" > /dev/null; then echo "LEFT BEHIND: round $r: $cmd"; ps -o pid,args -g "$pid"; exit 1; fi
    runs=$((runs + 1))
  done
done
echo "PASSED: $runs runs in $(( $(date +%s) - t0 )) s, none hung, no process left"
