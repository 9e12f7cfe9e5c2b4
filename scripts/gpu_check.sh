#!/usr/bin/env bash
# A one-shot check of this repository on one GPU, most important part first:
#   a. the machine: GPU, python / torch / CUDA / cuDNN versions, which kernel SDPA picks for B/16 shapes
#   b. the CUDA tests: tests/test_cuda.py and the CUDA tests of the stage scripts
#   c. bench.py on ViT-B/16 (224 px, batch 256, bf16): MAE and CT compiled (with a profile of one step
#      in the log), every stage eager, the input pipeline, head and extraction compiled
#   d. the stage scripts end to end on a small generated 224 px image folder (eager):
#      mae_pretrain.py -> nnclr_head.py -> contrastive_tune.py -> knn.py, probe.py
#   e. with the time left: B/16 MAE and CT compiled at batch 512, then ViT-L/16 compiled
# then a markdown table of every step (status, wall time, key numbers), printed and written to $OUT/table.md.
#
#   OUT=/path/to/empty/folder bash scripts/gpu_check.sh     # on the GPU machine, from the repo root: < 9 minutes
#   GPU_CHECK_DRY=1 OUT=/tmp/o bash scripts/gpu_check.sh     # the same steps on the CPU with tiny settings
#   GPU_CHECK_SECONDS=N                                       # another total time limit (default 530; dry 900)
#
# Files in $OUT: gpu_check.log (all output of every step), bench_b16.json and bench_l16.json (the rows of
# every bench.py run of that model, merged: {"env", "rows", "runs"}), table.md.
# Every step runs under `timeout` within a fixed end time; a failed or slow step is recorded in the
# table and the next one still runs.
set -u
cd "$(dirname "$0")/.." || exit 1
: "${OUT:?set OUT to the output folder}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1
DRY=${GPU_CHECK_DRY:-0}
LOG=$OUT/gpu_check.log
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)  # scratch: data, stage outputs, raw bench output (not copied back)
START=$(date +%s)
MIN_STEP=10  # a step that would get less time than this is skipped

if [[ $DRY == 1 ]]; then
    # tiny CPU settings: the same steps, flags and table, in a few CPU minutes
    END=$((START + ${GPU_CHECK_SECONDS:-900}))
    DEV=cpu
    BUDGET_TESTS=120 BUDGET_B16=400 BUDGET_STAGES=200
    BENCH_B16=(--device cpu --model vit_micro --img_size 32 --patch_size 8 --dec_dim 32 --dec_depth 1 --dec_heads 2
               --batch_size 4 --warmup 1 --iters 1 --queue_size 64)
    BENCH_L16=("${BENCH_B16[@]}")
    BIG_BATCH=8
    DATA_ARGS=(2 16 4 64 48)  # classes, train and val images per class, width, height
    MAE_ARGS=(--model vit_micro --img_size 32 --patch_size 8 --dec_dim 32 --dec_depth 1 --dec_heads 2 --batch_size 8
              --max_iters 2 --num_workers 0 --compile 0 --log_interval 1)
    HEAD_ARGS=(--batch_size 8 --max_iters 2 --queue_size 32 --proj_hidden 64 --proj_dim 16 --pred_hidden 64
               --num_workers 0 --log_interval 1)
    CT_ARGS=(--batch_size 8 --max_iters 2 --num_workers 0 --log_interval 1)
    KNN_ARGS=(--k 1 5 --batch_size 8 --num_workers 0)
    PROBE_ARGS=(--cached 1 --epochs 2 --batch_size 8 --num_workers 0)
else
    END=$((START + ${GPU_CHECK_SECONDS:-530}))  # 9 minutes, less the margin of `timeout -k 5` and the table
    DEV=cuda
    BUDGET_TESTS=100 BUDGET_B16=270 BUDGET_STAGES=110
    BENCH_B16=(--device cuda --model vit_b16)  # bench.py's CUDA defaults: 224 px, batch 256, bf16
    BENCH_L16=(--device cuda --model vit_l16)
    BIG_BATCH=512
    DATA_ARGS=(2 64 16 500 375)
    # eager: compile is covered by the tests and the bench, and a B/16 compile costs a minute here
    MAE_ARGS=(--model vit_b16 --batch_size 64 --max_iters 20 --num_workers 8 --compile 0 --log_interval 5)
    # the queue of a 128-image folder: 128 entries (65536 would stay mostly random vectors)
    HEAD_ARGS=(--batch_size 64 --max_iters 10 --queue_size 128 --num_workers 8 --log_interval 5)
    CT_ARGS=(--batch_size 64 --max_iters 10 --num_workers 8 --log_interval 5)
    KNN_ARGS=(--k 10 20 --batch_size 64 --num_workers 8)
    PROBE_ARGS=(--cached 1 --epochs 10 --batch_size 64 --num_workers 8)
fi
PART_END=$END

say() {  # a progress line, to the terminal and the log
    echo "[$(date +%T) +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"
}

record() {  # key, status, wall seconds -> one line of $WORK/status.tsv, which the table reads
    printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$WORK/status.tsv"
}

time_left() {  # seconds to the end of the current part (never past the end of the whole run)
    local end=$PART_END
    (( end > END )) && end=$END
    echo $(( end - $(date +%s) ))
}

# step KEY LIMIT CMD...: run CMD for at most LIMIT seconds (less when the part's end is nearer), with
# its output appended to the log (stdout to the file $STDOUT_TO instead, when that is set). Records
# ok / FAIL / TIMEOUT and the wall time; returns CMD's exit status. Output goes to files, not a pipe,
# so a leftover child process (a compile worker) cannot hold the script open.
step() {
    local key=$1 limit=$2 left rc t0 wall status
    shift 2
    left=$(time_left)
    (( limit > left )) && limit=$left
    if (( limit < MIN_STEP )); then
        record "$key" "skipped (no time left)" 0
        say "--- $key: skipped, no time left"
        return 99
    fi
    say "--- $key (limit ${limit}s): $*"
    t0=$(date +%s.%N)
    if [[ -n ${STDOUT_TO:-} ]]; then
        timeout -k 5 "$limit" "$@" > "$STDOUT_TO" 2>> "$LOG"
    else
        timeout -k 5 "$limit" "$@" >> "$LOG" 2>&1
    fi
    rc=$?
    wall=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    status=ok
    if (( rc == 124 || rc == 137 )); then
        status="TIMEOUT (${limit}s)"
    elif (( rc != 0 )); then
        status="FAIL (exit $rc)"
    fi
    record "$key" "$status" "$wall"
    say "--- $key: $status, ${wall}s"
    return $rc
}

skip() {  # key, reason
    record "$1" "skipped ($2)" 0
    say "--- $1: skipped, $2"
}

# -----------------------------------------------------------------------------
# python helpers: environment, image folder, merging bench.py's JSON, the table
H=$WORK/helpers.py
cat > "$H" <<'PYEOF'
import json, os, platform, re, sys, time

sys.path.insert(0, os.getcwd())  # the repo root (vit.py)


def env(path):
    """Versions, the GPU, and which SDPA kernel runs for ViT-B/16 shapes (bf16, training and inference)."""
    import torch
    info = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    for mod in ("numpy", "PIL", "triton", "timm", "flash_attn"):
        try:
            info[mod] = getattr(__import__(mod), "__version__", "?")
        except Exception:
            info[mod] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_gib=round(p.total_memory / 2 ** 30, 1), capability=f"{p.major}.{p.minor}")
        import vit
        from torch.profiler import ProfilerActivity, profile
        vit.set_attn_backend("sdpa")
        for mode in ("train", "eval"):
            qkv = torch.randn(4, 197, 3, 12, 64, device="cuda", dtype=torch.bfloat16, requires_grad=mode == "train")
            with torch.set_grad_enabled(mode == "train"), profile(activities=[ProfilerActivity.CPU]) as prof:
                vit.attention(qkv)
            ops = [e.name for e in prof.events() if e.name.startswith("aten::_scaled_dot_product_")]
            info[f"sdpa_{mode}"] = ops[0].replace("aten::_scaled_dot_product_", "") if ops else "?"
    for k, v in info.items():
        print(f"{k}: {v}")
    json.dump(info, open(path, "w"))


def make_data(root, classes, train, val, width, height):
    """JPEGs of smooth coloured noise (a class tint): decode cost of photos, nothing to learn."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    classes, train, val, width, height = map(int, (classes, train, val, width, height))
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            d = os.path.join(root, split, f"class_{c}")
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
                small[..., c % 3] //= 2
                img = Image.fromarray(small).resize((width, height), Image.BICUBIC)
                noise = rng.normal(0, 8, (height, width, 3))
                img = Image.fromarray((np.asarray(img) + noise).clip(0, 255).astype(np.uint8))
                img.save(os.path.join(d, f"{i:04d}.jpg"), quality=90)
    print(f"{classes} classes x ({train} train + {val} val) JPEGs of {width}x{height} in {root}")


def merge(out, *files):
    """bench.py's JSON of several runs -> one {"env", "rows", "runs"}; a run that printed nothing
    (killed, crashed) is listed in "runs" with rows 0."""
    merged = dict(env=None, rows=[], runs=[])
    for f in files:
        try:
            d = json.load(open(f))
        except Exception:
            d = None
        merged["runs"].append(dict(run=os.path.basename(f).rsplit(".", 1)[0], rows=len(d["rows"]) if d else 0))
        if d:
            merged["env"] = merged["env"] or d.get("env")
            merged["rows"] += d.get("rows", [])
    json.dump(merged, open(out, "w"), indent=1)


def fmt(v, nd=1):
    return "-" if v is None else f"{v:.{nd}f}"


def bench_lines(path):
    """One table line per bench row: img/s, MFU, peak memory (or the row's error)."""
    try:
        rows = json.load(open(path))["rows"]
    except Exception:
        return []
    out = []
    for r in rows:
        what = f"{r.get('stage')} {r.get('attn')} {'compiled' if r.get('compile') else 'eager'}, batch {r.get('batch')}"
        if r.get("stage") == "data":  # the input pipeline: per worker, and the device's part
            what = r["variant"].split(":")[0]
            nums = f"{fmt(r.get('img_s'))} img/s" + (f", {r['speedup']:.2f}x the standard" if r.get("speedup") else "")
            out.append((what, nums))
            continue
        if "error" in r:
            nums = f"error: {r['error']}"
        else:
            nums = f"{fmt(r.get('img_s'))} img/s"
            if r.get("mfu") is not None:
                nums += f", MFU {100 * r['mfu']:.1f}%"
            if r.get("mem_gib") is not None:
                nums += f", peak {r['mem_gib']:.1f} GiB"
        out.append((what, nums))
    return out


def test_counts(path):
    """Counts from pytest -v's per-test lines (there even when pytest was killed), and the failures."""
    counts, failed = {}, []
    text = open(path).read() if os.path.exists(path) else ""
    for m in re.finditer(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", text, re.M):
        counts[m.group(2).lower()] = counts.get(m.group(2).lower(), 0) + 1
        if m.group(2) in ("FAILED", "ERROR"):
            failed.append(m.group(1).split("::", 1)[1])
    nums = ", ".join(f"{counts.get(k, 0)} {k}" for k in ("passed", "failed", "skipped")) + \
        "".join(f", {v} {k}" for k, v in counts.items() if k not in ("passed", "failed", "skipped"))
    return nums + (f" ({'; '.join(failed)})" if failed else "")


def log_entries(out_dir):
    path = os.path.join(out_dir, "log.txt")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def stage_numbers(name, out_dir):
    log = log_entries(out_dir)
    if name in ("mae", "head", "ct"):
        speed = [e for e in log if "img_per_s" in e]
        if not speed:
            return ""
        last = speed[-1]  # the first log interval includes compiling and the loader's start
        nums = (f"{last['img_per_s']:.0f} img/s "
                f"(iters {speed[-2]['iter'] if len(speed) > 1 else 0}-{last['iter']}), loss {last['loss']:.4f}")
        return nums + (f", nn_acc {last['nn_acc']:.2f}" if "nn_acc" in last else "")
    if name == "knn":
        top = [e["knn_top1"] for e in log if "knn_top1" in e]
        return ", ".join(f"k={k}: top-1 {v:.1f}%" for k, v in top[-1].items()) if top else ""
    if name == "probe":
        best = [e for e in log if e.get("final")]
        return f"best top-1 {best[-1]['best_top1']:.1f}%" if best else ""
    return ""


def table(work, out, start):
    labels = {"nvidia-smi": "a. nvidia-smi", "env": "a. environment", "tests": "b. CUDA tests",
              "data": "d. generate images"}
    steps = [line.rstrip("\n").split("\t") for line in open(os.path.join(work, "status.tsv"))]
    lines = ["| part | status | wall s | key numbers |", "|---|---|---|---|"]
    for key, status, wall in steps:
        nums, sub = "", []
        if key == "env" and os.path.exists(os.path.join(work, "env.json")):
            e = json.load(open(os.path.join(work, "env.json")))
            gpu = f"{e['gpu']} {e['gpu_gib']} GiB (sm {e['capability']})" if "gpu" in e else "no GPU"
            nums = f"{gpu}, python {e['python']}, torch {e['torch']}, CUDA {e['cuda']}, cuDNN {e['cudnn']}, " \
                   f"timm {e['timm'] or 'not installed'}, flash-attn {e['flash_attn'] or 'not installed'}"
            if "sdpa_train" in e:
                nums += f"; SDPA kernel for B/16 bf16: {e['sdpa_train']} (train), {e['sdpa_eval']} (eval)"
        elif key == "tests":
            nums = test_counts(os.path.join(work, "pytest.txt"))
        elif key.startswith(("b16:", "l16:")):
            model, run = key.split(":")
            label = (f"c. bench {'B/16' if model == 'b16' else 'L/16'} "
                     f"{run if run in ('eager', 'data') else run + ' compiled'}")
            labels[key] = label if model == "b16" else "e." + label[2:]
            sub = bench_lines(os.path.join(work, f"{model}_{run}.json"))
            if len(sub) == 1:  # one compiled stage per run: its numbers on the run's own line
                nums, sub = sub[0][1], []
        elif key.startswith("stage:"):
            name = key.split(":")[1]
            labels[key] = f"d. {name}"
            nums = stage_numbers(name, os.path.join(work, "run", name))
        lines.append(f"| {labels.get(key, key)} | {status} | {wall} | {nums} |")
        lines += [f"| &nbsp;&nbsp;{what} | | | {n} |" for what, n in sub]
    lines.append(f"| total | | {time.time() - float(start):.0f} | |")
    text = "\n".join(lines) + "\n"
    open(os.path.join(out, "table.md"), "w").write(text)
    print(text)


if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])
PYEOF

# -----------------------------------------------------------------------------
say "gpu_check: dry=$DRY, repo $(pwd), work $WORK, out $OUT"

# a. the machine
PART_END=$((START + 45))
if command -v nvidia-smi > /dev/null; then
    step nvidia-smi 20 nvidia-smi --query-gpu=name,memory.total --format=csv
else
    skip nvidia-smi "not found"
fi
step env 30 python "$H" env "$WORK/env.json"

# b. the CUDA tests (-v: one line per test, so the counts survive a timeout)
PART_END=$(( $(date +%s) + BUDGET_TESTS ))
STDOUT_TO=$WORK/pytest.txt step tests "$BUDGET_TESTS" python -m pytest -v -rs --durations=15 tests/test_cuda.py \
    tests/test_contrastive_tune.py::test_cuda_bf16_run tests/test_knn.py::test_knn_cuda_matches_cpu \
    tests/test_nnclr_head.py::test_cuda_bf16_run tests/test_probe.py::test_probe_cuda
cat "$WORK/pytest.txt" >> "$LOG"

# c. bench.py on B/16: the two steps with targets (MAE, CT) compiled first, each with a profile of one
# step in the log; then every stage eager in one run, the input pipeline (workers on this host's CPU,
# the resize on the GPU), the other compiled stages, and MAE at batch 512. One run per compiled stage,
# so that a slow compile costs only its own row.
PART_END=$(( $(date +%s) + BUDGET_B16 ))
BENCH_COMMON=(--attn sdpa --wins 0 --json 1)
for s in mae ct; do
    STDOUT_TO=$WORK/b16_$s.json step "b16:$s" "$BUDGET_B16" python bench.py "${BENCH_B16[@]}" --stages "$s" \
        --compile 1 --profile 15 "${BENCH_COMMON[@]}"
done
STDOUT_TO=$WORK/b16_eager.json step b16:eager 90 python bench.py "${BENCH_B16[@]}" --stages mae,head,ct,extract \
    --compile 0 "${BENCH_COMMON[@]}"
STDOUT_TO=$WORK/b16_data.json step b16:data 60 python bench.py "${BENCH_B16[@]}" --stages data "${BENCH_COMMON[@]}"
for s in head extract; do
    STDOUT_TO=$WORK/b16_$s.json step "b16:$s" "$BUDGET_B16" python bench.py "${BENCH_B16[@]}" --stages "$s" \
        --compile 1 "${BENCH_COMMON[@]}"
done
python "$H" merge "$OUT/bench_b16.json" "$WORK"/b16_{mae,ct,eager,data,head,extract}.json

# d. the stage scripts end to end, each on the previous one's checkpoint
PART_END=$(( $(date +%s) + BUDGET_STAGES ))
DATA=$WORK/data
R=$WORK/run
COMMON=(--data_path "$DATA" --device "$DEV")
step data 30 python "$H" make_data "$DATA" "${DATA_ARGS[@]}"
step stage:mae "$BUDGET_STAGES" python mae_pretrain.py "${COMMON[@]}" --out_dir "$R/mae" "${MAE_ARGS[@]}"
if [[ -f $R/mae/mae.pt ]]; then
    step stage:head "$BUDGET_STAGES" python nnclr_head.py "${COMMON[@]}" --init "$R/mae/mae.pt" --out_dir "$R/head" \
        --pool mean "${HEAD_ARGS[@]}"
else
    skip stage:head "no mae.pt"
fi
if [[ -f $R/head/head.pt ]]; then
    step stage:ct "$BUDGET_STAGES" python contrastive_tune.py "${COMMON[@]}" --init "$R/mae/mae.pt" \
        --head "$R/head/head.pt" --out_dir "$R/ct" "${CT_ARGS[@]}"
else
    skip stage:ct "no head.pt"
fi
if [[ -f $R/ct/ct.pt ]]; then
    step stage:knn "$BUDGET_STAGES" python knn.py "${COMMON[@]}" --init "$R/ct/ct.pt" --pool mean --out_dir "$R/knn" \
        "${KNN_ARGS[@]}"
    step stage:probe "$BUDGET_STAGES" python probe.py "${COMMON[@]}" --init "$R/ct/ct.pt" --pool mean \
        --out_dir "$R/probe" "${PROBE_ARGS[@]}"
else
    skip stage:knn "no ct.pt"
    skip stage:probe "no ct.pt"
fi

# e. with the time that is left: B/16 MAE and CT at batch 512 (per-GPU batch of a 1024 step on 2 GPUs),
# then L/16 compiled (a compile of L/16 takes about a minute)
PART_END=$END
if (( $(time_left) >= 50 )); then
    for s in mae ct; do
        STDOUT_TO=$WORK/b16_${s}512.json step "b16:${s}512" "$(time_left)" python bench.py "${BENCH_B16[@]}" \
            --stages "$s" --compile 1 --batch_size "$BIG_BATCH" "${BENCH_COMMON[@]}"
    done
    python "$H" merge "$OUT/bench_b16.json" "$WORK"/b16_{mae,ct,eager,data,head,extract,mae512,ct512}.json
fi
if (( $(time_left) >= 60 )); then
    for s in mae ct; do
        STDOUT_TO=$WORK/l16_$s.json step "l16:$s" "$(time_left)" python bench.py "${BENCH_L16[@]}" --stages "$s" \
            --compile 1 "${BENCH_COMMON[@]}"
    done
    python "$H" merge "$OUT/bench_l16.json" "$WORK"/l16_{mae,ct}.json
else
    skip l16:mae "under 60 s left"
fi

# the table (the raw step list when the table itself fails)
say "done in $(( $(date +%s) - START ))s"
if ! python "$H" table "$WORK" "$OUT" "$START" >> "$LOG" 2>&1; then
    {
        echo "| step | status | wall s |"
        echo "|---|---|---|"
        sed 's/\t/ | /g; s/^/| /; s/$/ |/' "$WORK/status.tsv"
    } > "$OUT/table.md"
fi
cat "$OUT/table.md"
