#!/usr/bin/env bash
# Proves the README's SLURM recipe ("## Scaling out") on a real SLURM: starts a one-node cluster on this
# machine, submits that script (taken from README.md, parametrised for a tiny CPU run of contrastive_tune.py
# under torchrun with 2 gloo processes), signals it mid-run as `--signal=B:USR1@...` would, and checks that
# it checkpointed, was requeued, finished by itself, and that its ct.pt equals an uninterrupted run's exactly.
#
#   sudo scripts/slurm_check.sh     (root, Debian/Ubuntu: installs slurm-wlm and munge if missing)
#
# Everything (munged, slurmctld, slurmd, their state and logs, the jobs' files) lives in one temp dir, on
# free ports, with its own munge key; the daemons are stopped at exit. Every wait has a time limit. The temp
# dir is removed after a pass and kept after a failure (or always with SLURM_CHECK_KEEP=1).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
MAX_ITERS=200 LOG_INTERVAL=5 SIGNAL_AT=20  # signal once the log shows iteration >= 20: far from the end
t_start=$SECONDS

say() { echo "[slurm_check +$((SECONDS - t_start))s] $*"; }
fail() { echo "slurm_check: FAILED: $*" >&2; exit 1; }
# wait_for SECONDS WHAT CMD...: poll CMD every 0.5 s; fail naming WHAT when it is not true in time
wait_for() {
    local limit=$1 what=$2; shift 2
    local end=$((SECONDS + limit))
    until "$@"; do
        [ "$SECONDS" -lt "$end" ] || fail "timed out after ${limit}s waiting for $what"
        sleep 0.5
    done
}

# ---- 1. SLURM and munge from Debian's packages --------------------------------------------------------
missing=0
for c in slurmctld slurmd sbatch scontrol squeue sinfo scancel munged; do command -v "$c" >/dev/null || missing=1; done
if [ "$missing" = 1 ]; then
    [ "$(id -u)" = 0 ] || fail "SLURM is not installed and this is not root: run as root (it installs slurm-wlm munge)"
    say "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    timeout 300 apt-get update -qq || fail "apt-get update"
    timeout 600 apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null \
        || fail "apt-get install slurm-wlm munge"
fi
[ "$(id -u)" = 0 ] || fail "the one-node cluster runs its daemons as root: run as root"
say "slurm-wlm $(dpkg-query -W -f '${Version}' slurm-wlm 2>/dev/null || echo '(not from a package)')," \
    "$(munged --version 2>&1 | head -n 1)"
command -v torchrun >/dev/null || fail "torchrun is not on PATH (pip install torch)"
cpus=$(nproc)  # before OMP_NUM_THREADS is set below: nproc obeys it

# ---- 2. a temp dir for everything; daemons and jobs stopped at exit -------------------------------------
T=$(mktemp -d /tmp/slurm_check.XXXXXX)
chmod 755 "$T"  # munged wants every dir above its socket searchable
export SLURM_CONF=$T/slurm.conf
jobs_submitted=()
cleanup() {
    local rc=$?
    set +e
    if [ -f "$SLURM_CONF" ]; then
        for j in "${jobs_submitted[@]}"; do scancel "$j" 2>/dev/null; done
        # let slurmstepd end the jobs' processes before slurmd goes (at most 20 s)
        for _ in $(seq 40); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.5; done
    fi
    # training processes that left their job's process group (torchrun's workers) are not ended by scancel under
    # proctrack/pgid: end any process of this check still running (its command line names the temp dir)
    for d in /proc/[0-9]*; do
        tr '\0' ' ' <"$d/cmdline" 2>/dev/null | grep -qF -- "$T/" && kill "${d#/proc/}" 2>/dev/null
    done
    for d in slurmd slurmctld munged; do
        [ -f "$T/$d.pid" ] && kill "$(cat "$T/$d.pid")" 2>/dev/null
    done
    for d in slurmd slurmctld munged; do  # at most 10 s each
        for _ in $(seq 20); do [ -f "$T/$d.pid" ] && kill -0 "$(cat "$T/$d.pid")" 2>/dev/null || break; sleep 0.5; done
    done
    if [ "$rc" != 0 ]; then
        for f in "$T"/job_*.out "$T"/log/*.log; do
            [ -f "$f" ] && { echo "---- last lines of $f"; tail -n 25 "$f"; }
        done
    fi
    if [ "$rc" != 0 ] || [ -n "${SLURM_CHECK_KEEP:-}" ]; then
        echo "slurm_check: files kept in $T" >&2
    else
        rm -rf "$T"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- 3. tiny data, mae.pt and head.pt (the same tiny models as the tests) ------------------------------
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
say "making a tiny image folder, mae.pt and head.pt in $T"
python3 -c "import sys; sys.path.insert(0, 'tests'); import conftest; conftest.make_image_folder('$T/data')" \
    || fail "generating the image folder"
python3 mae_pretrain.py --data_path "$T/data" --out_dir "$T/mae" --model vit_micro --img_size 32 --patch_size 4 \
    --dec_dim 32 --dec_depth 1 --dec_heads 2 --batch_size 8 --max_iters 2 --num_workers 0 --device cpu \
    >"$T/mae.log" 2>&1 || { tail -n 5 "$T/mae.log"; fail "mae_pretrain.py"; }
python3 nnclr_head.py --data_path "$T/data" --init "$T/mae/mae.pt" --out_dir "$T/head" --batch_size 8 --max_iters 4 \
    --queue_size 64 --num_workers 0 --device cpu --proj_hidden 64 --proj_dim 16 --pred_hidden 64 \
    >"$T/head.log" 2>&1 || { tail -n 5 "$T/head.log"; fail "nnclr_head.py"; }

# ---- 4. the cluster: munged, slurmctld, slurmd on localhost ---------------------------------------------
free_port() { python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
ctld_port=$(free_port) slurmd_port=$(free_port) rdzv_port=$(free_port)
node=$(hostname -s)
mkdir -p "$T/munge" "$T/state" "$T/spool" "$T/log"
head -c 1024 /dev/urandom >"$T/munge/key" && chmod 400 "$T/munge/key"
munged --force --socket="$T/munge/socket" --key-file="$T/munge/key" --pid-file="$T/munged.pid" \
    --log-file="$T/log/munged.log" --seed-file="$T/munge/seed" || fail "munged did not start (see $T/log/munged.log)"
# cgroup-free plugins, so it runs in containers too. proctrack/pgid signals a step's task by its process group
# alone, and torchrun's workers run in sessions of their own: the signal reaches them only if torchrun passes it
# on, so every link of the recipe is tested (with linuxproc or cgroup SLURM would signal the workers too);
# cred_expire: how long a requeued job waits before it may start again (120 s by default); sched_interval: how
# often pending jobs are tried (60 s by default)
cat >"$SLURM_CONF" <<EOF
ClusterName=check
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$T/munge/socket,cred_expire=10
StateSaveLocation=$T/state
SlurmdSpoolDir=$T/spool
SlurmctldPidFile=$T/slurmctld.pid
SlurmdPidFile=$T/slurmd.pid
SlurmctldLogFile=$T/log/slurmctld.log
SlurmdLogFile=$T/log/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=check Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
slurmctld -i || fail "slurmctld did not start (see $T/log/slurmctld.log)"
slurmd -N "$node" || fail "slurmd did not start (see $T/log/slurmd.log)"
node_idle() { [ "$(sinfo -h -n "$node" -o %T 2>/dev/null)" = idle ]; }
wait_for 30 "node $node to be idle in sinfo" node_idle
say "one-node cluster up: $node, $cpus CPUs, slurmctld :$ctld_port, slurmd :$slurmd_port"

# ---- 5. the README's script, parametrised for the tiny CPU run -------------------------------------------
# the ```bash block after "Under SLURM" in README.md; each edit must match exactly once, so the README and this
# check cannot drift apart silently
awk '/^Under SLURM/ {f = 1} f && /^```$/ && b {exit} b {print} f && /^```bash$/ {b = 1}' README.md >"$T/readme.sbatch"
[ -s "$T/readme.sbatch" ] || fail "no \`\`\`bash block after 'Under SLURM' in README.md"
edit() {  # edit FILE OLD NEW: replace the one line part OLD
    local n
    n=$(grep -cF -- "$2" "$1" || true)
    [ "$n" = 1 ] || fail "README's SLURM script: expected '$2' once, found it $n times (update scripts/slurm_check.sh)"
    OLD=$2 NEW=$3 python3 -c "import os, sys; p = sys.argv[1]; s = open(p).read()
open(p, 'w').write(s.replace(os.environ['OLD'], os.environ['NEW']))" "$1"
}
tiny="--data_path $T/data --init $T/mae/mae.pt --head $T/head/head.pt --resume auto --out_dir \"\$CHECK_OUT\"\
 --batch_size 8 --max_iters $MAX_ITERS --log_interval $LOG_INTERVAL --topk 5 --num_workers 1 --device cpu"
cp "$T/readme.sbatch" "$T/job.sbatch"
edit "$T/job.sbatch" "--nproc_per_node 8" "--nproc_per_node 2"
edit "$T/job.sbatch" ":29500" ":$rdzv_port"
edit "$T/job.sbatch" "--data_path DATA --init mae.pt --head head.pt --resume auto" "$tiny"
say "the README's script, as submitted (diff):"
diff "$T/readme.sbatch" "$T/job.sbatch" | sed 's/^/    /' || true
# the #SBATCH lines' resources are overridden on the command line (one node, no GPU, this machine's CPUs);
# --time is only a safety net, its USR1 (2 minutes before) never comes in this short a run
submit() {  # submit NAME: prints the job id
    CHECK_OUT=$T/$1 sbatch --parsable --job-name "$1" --nodes 1 --gpus-per-node 0 --cpus-per-task "$cpus" \
        --time 10 --chdir "$repo" --output "$T/job_$1.out" "$T/job.sbatch" || fail "sbatch ($1)"
}
job_field() { scontrol show job "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p" | head -n 1; }
job_state() { [ "$(job_field "$1" JobState)" = "$2" ]; }
job_done() {
    case "$(job_field "$1" JobState)" in
        COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|PREEMPTED|BOOT_FAIL|DEADLINE) true;;
        *) false;;
    esac
}

# ---- 6. the reference: the same job, never signalled ----------------------------------------------------
ref=$(submit ref); jobs_submitted+=("$ref")
say "job $ref (reference) submitted"
wait_for 120 "reference job $ref to end" job_done "$ref"
job_state "$ref" COMPLETED || fail "reference job $ref ended $(job_field "$ref" JobState) (see $T/job_ref.out)"
[ -f "$T/ref/ct.pt" ] || fail "reference job $ref completed without $T/ref/ct.pt"
say "job $ref completed: $T/ref/ct.pt"

# ---- 7. the same job, signalled mid-run -----------------------------------------------------------------
run=$(submit run); jobs_submitted+=("$run")
say "job $run submitted"
logged_iter() {
    ! job_done "$run" || fail "job $run ended $(job_field "$run" JobState) before iteration $1 (see $T/job_run.out)"
    python3 -c "import json, sys
its = [json.loads(l).get('iter', 0) for l in open(sys.argv[1])]
sys.exit(0 if its and max(its) >= int(sys.argv[2]) else 1)" "$T/run/log.txt" "$1" 2>/dev/null
}
wait_for 120 "job $run to log iteration $SIGNAL_AT" logged_iter "$SIGNAL_AT"
# what --signal=B:USR1@120 does at the time limit: USR1 to the batch shell only (not to the job steps)
scancel --signal USR1 --batch "$run" || fail "scancel --signal USR1 --batch $run"
say "sent USR1 to job $run's batch shell (the log was at iteration >= $SIGNAL_AT of $MAX_ITERS)"
requeued() {
    if [ "$(job_field "$run" Restarts)" = 0 ] && job_done "$run"; then
        fail "job $run ended $(job_field "$run" JobState) without being requeued (see $T/job_run.out)"
    fi
    [ "$(job_field "$run" Restarts)" = 1 ] && { job_state "$run" PENDING || job_done "$run"; }
}
wait_for 90 "job $run to be requeued (Restarts=1, pending)" requeued
ckpts=("$T"/run/ckpt_*.pt)
[ -f "${ckpts[0]}" ] || fail "job $run was requeued without a checkpoint in $T/run"
say "job $run requeued ($(job_field "$run" JobState), $(job_field "$run" Reason))" \
    "after writing $(basename "${ckpts[-1]}")"
restarted() { [ "$(job_field "$run" Restarts)" = 1 ] && ! job_state "$run" PENDING; }
wait_for 60 "requeued job $run to start again" restarted
say "job $run started again by itself"
wait_for 120 "requeued job $run to end" job_done "$run"
job_state "$run" COMPLETED || fail "requeued job $run ended $(job_field "$run" JobState) (see $T/job_run.out)"
say "job $run completed (Restarts=$(job_field "$run" Restarts), ExitCode=$(job_field "$run" ExitCode))"

# ---- 8. what happened, from the job's own output and files -----------------------------------------------
out=$T/job_run.out
stopped=$(grep -ao "stopped by signal at iteration [0-9]*" "$out" | head -n 1 | grep -o "[0-9]*$" || true)
resumed=$(grep -ao "resuming from [^ ]* at iteration [0-9]*" "$out" | head -n 1 || true)
[ -n "$stopped" ] || fail "no 'stopped by signal at iteration N' in $out"
[ "$stopped" -ge "$SIGNAL_AT" ] && [ "$stopped" -le $((MAX_ITERS - LOG_INTERVAL)) ] \
    || fail "stopped at iteration $stopped, not mid-run ($SIGNAL_AT..$((MAX_ITERS - LOG_INTERVAL)))"
[ -n "$resumed" ] || fail "no 'resuming from ... at iteration N' in $out (the requeued job did not resume)"
[ "${resumed##* }" = "$stopped" ] || fail "stopped at iteration $stopped but $resumed"
say "job output: stopped by signal at iteration $stopped; ${resumed/$T\//}"
cat >"$T/compare.py" <<'EOF'
import sys
import torch
ref, run = (torch.load(p, map_location="cpu", weights_only=False) for p in sys.argv[1:])
n = 0
def same(a, b, path):
    global n
    if isinstance(a, torch.Tensor):
        n += 1
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(set(a) ^ set(b))}"
        for k in a:
            same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"
ref["args"].pop("out_dir"), run["args"].pop("out_dir")  # the one flag that differs
# the checkpoints each run wrote (its rotation list): the requeued run wrote one more, the one it resumed from
assert ref.pop("ckpts") == [] and run.pop("ckpts") != [], "ckpts: the reference wrote none, the requeued run one"
try:
    same(ref, run, "ct.pt")
except AssertionError as e:
    sys.exit(f"differs at {e}")
print(f"ct.pt after the requeue equals the reference's: {n} tensors bit-identical, iter_num {run['iter_num']}")
EOF
same=$(python3 "$T/compare.py" "$T/ref/ct.pt" "$T/run/ct.pt" 2>&1) \
    || fail "the requeued run's ct.pt differs from the reference's: $same"
say "$same"
say "PASSED in $((SECONDS - t_start))s"
