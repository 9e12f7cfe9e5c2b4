"""
The whole MAE-CT pipeline in one command: MAE pretraining -> NNCLR head -> contrastive tuning ->
k-NN, linear probe and low-shot logistic regression of both the MAE and the MAE-CT encoder, ending
in a markdown table (out_dir/results.md). Every stage is the stage script itself, run as a
subprocess (under torchrun with --nproc > 1), and checkpoints pass between them by path, so each
stage's own output stays usable on its own.

    python pipeline.py                                   # a small generated image folder, tiny ViT, a few CPU minutes
    python pipeline.py --data_path ../shared/data/cifar10 --out_dir out/cifar10 ...  # README: the CIFAR-10 recipe
    python pipeline.py --data_path IMAGENET --model vit_b16 --nproc 8 ...             # one node of 8 GPUs

A stage whose final file exists is skipped, and training stages run with --resume auto, so running the
same command again after an interruption continues where it stopped.
"""
import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data_path", default="",
                    help="image folder (train/, val/); empty: generate a small one in out_dir/data")
parser.add_argument("--out_dir", default="out/pipeline")
parser.add_argument("--nproc", type=int, default=1, help="processes per stage; > 1 runs each stage under torchrun")
parser.add_argument("--model", default="vit_micro")
parser.add_argument("--img_size", type=int, default=32)
parser.add_argument("--patch_size", type=int, default=4)
parser.add_argument("--dim", type=int, default=0)
parser.add_argument("--depth", type=int, default=0)
parser.add_argument("--heads", type=int, default=0)
parser.add_argument("--dec_dim", type=int, default=64, help="MAE decoder width (the authors' 512 is for 224 px ViTs)")
parser.add_argument("--dec_depth", type=int, default=2)
parser.add_argument("--dec_heads", type=int, default=4)
parser.add_argument("--mask_ratio", type=float, default=0.75)
parser.add_argument("--pool", default="mean", choices=["cls", "mean"], help="pooling for head, CT and every evaluation")
parser.add_argument("--batch_size", type=int, default=64, help="images per step of the training stages")
parser.add_argument("--mae_epochs", type=int, default=40)
parser.add_argument("--head_epochs", type=int, default=20)
parser.add_argument("--ct_epochs", type=int, default=20)
parser.add_argument("--probe_epochs", type=int, default=30, help="linear probe on cached features")
parser.add_argument("--lowshot", type=int, default=5,
                    help="labelled images per class for the logistic regression (0: skip)")
parser.add_argument("--lowshot_splits", type=int, default=3,
                    help="low-shot: the mean over this many random class-balanced "
                    "subsets (seeds seed, seed+1, ...), as the papers average over 3 splits")
parser.add_argument("--crop_pct", type=float, default=1.0,
                    help="evaluation centre crop (1.0 for CIFAR-sized data, 0.875 for ImageNet)")
parser.add_argument("--num_workers", type=int, default=2)
parser.add_argument("--device", default="auto")
parser.add_argument("--seed", type=int, default=0)
for stage in ("mae", "head", "ct", "knn", "probe", "logreg"):
    parser.add_argument(f"--{stage}_args", default="", help=f"extra flags for the {stage} stage, e.g. \"--blr 1e-3\"")
args = parser.parse_args()
if args.lowshot < 0 or (args.lowshot and args.lowshot_splits < 1):
    sys.exit("error: --lowshot must be >= 0 and --lowshot_splits >= 1")


def make_image_folder(root, classes=4, per_class=128, val_per_class=64, size=32, seed=0):
    """Grey images of a textured surface behind flat clutter. The class is the texture (horizontal stripes,
    vertical stripes, checks, dots), which any two crops of an image share; its scale and phase, and where
    the clutter sits, its size and its grey, are random and carry no class, yet a pixel reconstruction must
    encode them all. Brightness and contrast are the same in every image: crops share them, so they would
    pull contrastive neighbours apart as much as MAE's. Drawn at `size` (the pipeline: twice the model's
    img_size, periods and clutter scaled with it), so that even RandomResizedCrop's smallest crops (8% of
    the area) hold a few periods of the texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(float)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            d = os.path.join(root, split, f"class_{c}")
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                p = rng.uniform(3.5, 9) * size / 32  # texture period (px)
                u, v = 2 * np.pi * (yy / p + rng.uniform()), 2 * np.pi * (xx / p + rng.uniform())
                texture = [np.sin(u), np.sin(v), np.sign(np.sin(u) * np.sin(v)),
                           2.0 * (np.cos(u) + np.cos(v) > 1) - 1][c]
                img = 128 + 60 * texture
                for _ in range(rng.integers(6, 16)):  # clutter: flat rectangles of random size, place and grey
                    h, w = (rng.integers(3, 13, 2) * size) // 32
                    y, x = rng.integers(0, size - h), rng.integers(0, size - w)
                    img[y:y + h, x:x + w] = rng.uniform(0, 255)
                img = img[..., None] + rng.normal(0, 6, (size, size, 3))
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(os.path.join(d, f"{i:04d}.png"))


def fail(msg):  # one clear line, as the stage scripts do
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def run(label, done, script, *flags):
    """Run one stage unless done() finds its output; its wall time goes into `times`. A stage that fails stops the
    pipeline, and so does one a signal stopped (it checkpoints and exits 0 without its output). SIGTERM / SIGUSR1
    sent to pipeline.py while a stage runs are passed on to the stage, so a signal to pipeline.py alone
    checkpoints too."""
    if done():
        return
    launcher = [sys.executable] if args.nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                          f"--nproc_per_node={args.nproc}"]
    cmd = launcher + [script, *[str(f) for f in flags]]
    print(f"\n=== {label}: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    t0, p, stopped = time.time(), None, []

    def stop(signum, frame):
        stopped.append(signum)
        if p is not None:
            p.send_signal(signum)

    handlers = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGUSR1)}
    p = subprocess.Popen(cmd, cwd=os.path.dirname(os.path.abspath(__file__)))
    rc = p.wait()
    for s, h in handlers.items():  # between stages a signal ends pipeline.py at once: no stage output is half-written
        signal.signal(s, h)
    if stopped or (rc == 0 and not done()):
        fail(f"stage {label} was interrupted; run the same command to continue")
    if rc != 0:
        fail(f"stage {label} failed (exit {rc}); run the same command to continue")
    times[label] = time.time() - t0


def last_entry(log_path, key):
    """The last JSON line of a stage's log.txt that has `key`, or None."""
    if not os.path.exists(log_path):
        return None
    found = [e for e in map(json.loads, open(log_path)) if key in e]
    return found[-1] if found else None


out = os.path.abspath(args.out_dir)
os.makedirs(out, exist_ok=True)
data = args.data_path
if not data:
    data = os.path.join(out, "data")
    if not os.path.isdir(os.path.join(data, "val")):
        print(f"generating a small image folder in {data}")
        make_image_folder(data, size=2 * args.img_size, seed=args.seed)  # twice the model's size: see the docstring
data = os.path.abspath(data)
common = ["--data_path", data, "--num_workers", args.num_workers, "--device", args.device]
seed = ["--seed", args.seed]  # knn.py draws nothing at random
model = ["--model", args.model, "--img_size", args.img_size, "--patch_size", args.patch_size, "--dim", args.dim,
         "--depth", args.depth, "--heads", args.heads]
extra = {s: shlex.split(getattr(args, f"{s}_args")) for s in ("mae", "head", "ct", "knn", "probe", "logreg")}
if not args.data_path:  # the generated folder's recipe: 512 images, a few hundred steps; --X_args come later and win
    for s, flags in (("mae", "--views 1 --blr 1e-3 --warmup_epochs 2"), ("head", "--queue_size 256 --blr 4e-4"),
                     ("ct", "--blr 8e-3 --head_blr 8e-3 --encoder_ema 0.9 --topk 1")):
        extra[s] = shlex.split(flags) + extra[s]
times = {}
t_start = time.time()

# 1-3: the three training stages, each skipped when its final file exists
mae_pt, head_pt, ct_pt = (os.path.join(out, d, f) for d, f in (("mae", "mae.pt"), ("head", "head.pt"), ("ct", "ct.pt")))
run("MAE pretraining", lambda: os.path.exists(mae_pt), "mae_pretrain.py", *common, *seed, *model,
    "--out_dir", os.path.dirname(mae_pt), "--dec_dim", args.dec_dim, "--dec_depth", args.dec_depth,
    "--dec_heads", args.dec_heads, "--mask_ratio", args.mask_ratio, "--epochs", args.mae_epochs,
    "--batch_size", args.batch_size, "--resume", "auto", *extra["mae"])
run("NNCLR head", lambda: os.path.exists(head_pt), "nnclr_head.py", *common, *seed, "--init", mae_pt,
    "--out_dir", os.path.dirname(head_pt), "--epochs", args.head_epochs, "--batch_size", args.batch_size,
    "--pool", args.pool, "--resume", "auto", *extra["head"])
run("contrastive tuning", lambda: os.path.exists(ct_pt), "contrastive_tune.py", *common, *seed, "--init", mae_pt,
    "--head", head_pt, "--out_dir", os.path.dirname(ct_pt), "--epochs", args.ct_epochs, "--batch_size", args.batch_size,
    "--pool", args.pool, "--resume", "auto", *extra["ct"])

# 4: the evaluations of both encoders, each skipped when its log holds its result
results = {}
for enc, ckpt in (("MAE", mae_pt), ("MAE-CT", ct_pt)):
    ev = os.path.join(out, f"eval_{enc.lower().replace('-', '')}")
    knn_log, probe_log = (os.path.join(ev, d, "log.txt") for d in ("knn", "probe"))
    logreg_logs = [os.path.join(ev, f"logreg_s{s}", "log.txt")
                   for s in range(args.seed, args.seed + args.lowshot_splits)]
    run(f"k-NN {enc}", lambda: last_entry(knn_log, "knn_top1"), "knn.py", *common, "--init", ckpt, "--pool", args.pool,
        "--crop_pct", args.crop_pct, "--out_dir", os.path.dirname(knn_log), *extra["knn"])
    run(f"linear probe {enc}", lambda: last_entry(probe_log, "best_top1"), "probe.py", *common, *seed, "--init", ckpt,
        "--pool", args.pool, "--crop_pct", args.crop_pct, "--cached", 1, "--epochs", args.probe_epochs,
        "--batch_size", args.batch_size, "--out_dir", os.path.dirname(probe_log), *extra["probe"])
    for split_seed, logreg_log in zip(range(args.seed, args.seed + args.lowshot_splits), logreg_logs):
        if args.lowshot:  # one random labelled subset per seed
            run(f"low-shot {enc}, split {split_seed}", lambda: last_entry(logreg_log, "logreg_top1"), "probe.py",
                *common, "--seed", split_seed, "--init", ckpt, "--pool", args.pool, "--crop_pct", args.crop_pct,
                "--logreg", 1, "--per_class", args.lowshot, "--out_dir", os.path.dirname(logreg_log), *extra["logreg"])
    knn = last_entry(knn_log, "knn_top1")["knn_top1"]
    lowshot = [last_entry(p, "logreg_top1")["logreg_top1"] for p in logreg_logs] if args.lowshot else []
    results[enc] = dict(knn10=knn.get("10"), knn20=knn.get("20"), probe=last_entry(probe_log, "best_top1")["best_top1"],
                        lowshot=sum(lowshot) / len(lowshot) if lowshot else None)


# 5: the table
def fmt(v):
    return "–" if v is None else f"{v:.1f}"


cols = [("knn10", "k-NN k=10"), ("knn20", "k-NN k=20"), ("probe", "linear probe"),
        ("lowshot", f"low-shot {args.lowshot}/class"
                    + (f" (mean of {args.lowshot_splits} splits)" if args.lowshot_splits > 1 else ""))]
lines = ["| encoder | " + " | ".join(c for _, c in cols) + " |", "|---|" + "---|" * len(cols)]
for enc in ("MAE", "MAE-CT"):
    lines.append(f"| {enc} | " + " | ".join(fmt(results[enc][k]) for k, _ in cols) + " |")
lines.append("| Δ | " + " | ".join(
    "–" if results["MAE"][k] is None else f"{results['MAE-CT'][k] - results['MAE'][k]:+.1f}" for k, _ in cols) + " |")
lines += ["", f"top-1 (%) on {data}/val; pooling {args.pool}; "
              f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}"]
if times:
    lines += ["", "| stage (this invocation) | wall time |", "|---|---|"]
    lines += [f"| {k} | {v / 60:.1f} min |" for k, v in times.items()]
    lines += [f"| total | {(time.time() - t_start) / 60:.1f} min |"]
table = "\n".join(lines)
with open(os.path.join(out, "results.md"), "w") as f:
    f.write(table + "\n")
print("\n" + table)
