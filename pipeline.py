"""
The whole MAE-CT pipeline in one command: MAE pretraining -> NNCLR head -> contrastive tuning ->
k-NN, linear probe and low-shot logistic regression of both the MAE and the MAE-CT encoder, ending
in a markdown table (out_dir/results.md) and, side by side, each encoder's k-NN neighbours of the same val
images (knn.py --show). Every stage is the stage script itself, run as a subprocess (under torchrun with
--nproc > 1), and checkpoints pass between them by path, so each stage's own output stays usable on its own.

    python pipeline.py                                   # a small generated image folder, tiny ViT, a few CPU minutes
    python pipeline.py --data_path ../shared/data/cifar10 --out_dir out/cifar10 ...  # README: the CIFAR-10 recipe
    python pipeline.py --data_path IMAGENET --model vit_b16 --nproc 8 ...             # one node of 8 GPUs

A stage whose output exists is skipped, and the training stages and the probe run with --resume auto, so running
the same command again after an interruption continues where it stopped. out_dir/stages.json records the flags
each stage ran with: a stage whose recorded flags differ from the new command's is refused in one line, not skipped.
"""
import argparse
import ctypes
import json
import os
import shlex
import shutil
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
parser.add_argument("--num_workers", type=int, default=0,
                    help="data-loading workers per stage (0: the stage decodes, enough for small CPU runs; GPUs: 8)")
parser.add_argument("--device", default="auto")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--kmeans_runs", type=int, default=5, help="k-means clustering: seeded runs per encoder (0: skip)")
parser.add_argument("--show", type=int, default=8,
                    help="k-NN: val queries in each encoder's picture of neighbours (knn.py --show), the same images "
                    "for both, side by side in results.md (0: none)")
for stage in ("mae", "head", "ct", "knn", "probe", "logreg", "kmeans"):
    parser.add_argument(f"--{stage}_args", default="", help=f"extra flags for the {stage} stage, e.g. \"--blr 1e-3\"")
args = parser.parse_args()
if args.lowshot < 0 or (args.lowshot and args.lowshot_splits < 1) or args.kmeans_runs < 0 or args.show < 0:
    sys.exit("error: --lowshot, --kmeans_runs and --show must be >= 0, --lowshot_splits >= 1")


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


class Stopped(Exception):
    pass


def stop_between_stages(signum, frame):  # a signal while no stage runs ends pipeline.py; no stage is half-done
    raise Stopped


HERE = os.path.dirname(os.path.abspath(__file__))  # the stage scripts sit next to this one
IGNORED = {"--num_workers", "--device", "--resume", "--log_interval", "--ckpt_interval", "--keep_last",
           "--eval_interval", "--tensorboard", "--wandb", "--wandb_run", "--compile",
           "--show"}  # flags that do not change a stage's result


PATHS = {"--data_path", "--out_dir", "--init", "--head"}  # compared as the folders they name, however written


def flag_values(cmd):
    """A stage's command -> {flag: its values}, the last occurrence winning, as argparse reads it."""
    flags, key = {}, None
    for token in cmd:
        if token.startswith("--"):
            key = token
            flags[key] = []
        elif key is not None:
            flags[key].append(os.path.abspath(token) if key in PATHS else token)
    return {k: v for k, v in flags.items() if k not in IGNORED}


def end_with_parent(parent=os.getpid()):  # a stage's preexec_fn: PR_SET_PDEATHSIG = 1, SIGKILL when this process ends
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))
        if os.getppid() != parent:  # it ended before that
            os._exit(1)


def run(label, done, script, *flags):
    """Run one stage unless done() finds its output (then the flags it ran with must be this command's); its wall
    time goes into `times`. The stage runs in its own session: SIGTERM / SIGUSR1 / SIGINT sent to pipeline.py
    (alone or with its process group, as timeout, SLURM or a terminal's Ctrl-C send them) reach it once, passed on
    here. A stage that fails stops the pipeline, and so does one a signal stopped (it checkpoints and exits 0
    without its output)."""
    cmd = [os.path.relpath(os.path.join(HERE, script)), *[str(f) for f in flags]]
    if done():
        old = records.get(label)
        if old is None:
            print(f"note: stage {label} is done, with flags not recorded (out_dir/stages.json): kept as it is")
            return
        old, new = flag_values(old), flag_values(cmd)
        for k in [k for k in new if old.get(k) != new[k]] + [k for k in old if k not in new]:
            was, now = " ".join(old.get(k, ["(not given)"])), " ".join(new.get(k, ["(not given)"]))
            fail(f"stage {label} was run with {k} {was}, this command gives {k} {now}: use another --out_dir, "
                 f"or remove that stage's output to run it again")
        return
    launcher = [sys.executable] if args.nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                          f"--nproc_per_node={args.nproc}"]
    shown = ["torchrun", *launcher[3:]] if args.nproc > 1 else ["python"]  # not this machine's interpreter path
    print(f"\n=== {label}: {' '.join(shlex.quote(c) for c in shown + cmd)}", flush=True)
    t0, p, stopped = time.time(), None, []

    def stop(signum, frame):
        stopped.append(signum)
        if p is not None:
            p.send_signal(signum)

    handlers = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    # in the user's folder (the paths as given); in a session of its own (a signal reaches it once, passed on); and
    # ended with this process however it ends (PR_SET_PDEATHSIG): a SIGKILL to pipeline.py leaves no stage running
    p = subprocess.Popen(launcher + cmd, start_new_session=True, preexec_fn=end_with_parent)
    rc = p.wait()
    for s, h in handlers.items():
        signal.signal(s, h)
    if stopped or (rc == 0 and not done()):
        fail(f"stage {label} was interrupted; run the same command to continue")
    if rc != 0:
        fail(f"stage {label} failed (exit {rc}); run the same command to continue")
    times[label] = time.time() - t0
    records[label] = [os.path.abspath(t) if k in PATHS else t for k, t in zip([""] + cmd, cmd)]  # any cwd
    write_atomic(os.path.join(out, "stages.json"), json.dumps(records, indent=1) + "\n")


def write_atomic(path, text):  # a temp file renamed: a full disk leaves the previous file and says so in one line
    try:
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    except OSError as e:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        fail(f"cannot write {path}: {e.strerror} (the stages' outputs are intact)")


def knn_done(log_path, show):
    """A k-NN stage is done when its log holds its result and, with --show N, the picture of N queries: --show
    changes no number (it is not compared with the recorded flags), so another N runs the k-NN again."""
    entry = last_entry(log_path, "knn_top1")
    return entry is not None and (not show or entry.get("show") == show)


def last_value(flags, name, default):
    """A flag's value in a list of flags as argparse reads it: the last occurrence wins."""
    values = [v for f, v in zip(flags, flags[1:]) if f == name]
    return values[-1] if values else default


def last_entry(log_path, key):
    """The last JSON line of a stage's log.txt that has `key`, or None."""
    if not os.path.exists(log_path):
        return None
    found = [e for e in map(json.loads, open(log_path)) if key in e]
    return found[-1] if found else None


for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
    signal.signal(s, stop_between_stages)
out = os.path.abspath(args.out_dir)
os.makedirs(out, exist_ok=True)
records = json.load(open(os.path.join(out, "stages.json"))) if os.path.exists(os.path.join(out, "stages.json")) else {}
data = args.data_path or os.path.join(args.out_dir, "data")
try:
    if not args.data_path and not os.path.isdir(data):  # generated whole into a temp folder, then renamed
        print(f"generating a small image folder in {data}")
        for old in (f for f in os.listdir(out) if f.startswith("data.tmp-")):  # left by a run stopped mid-way
            shutil.rmtree(os.path.join(out, old))
        tmp = os.path.join(out, f"data.tmp-{os.getpid()}")
        make_image_folder(tmp, size=2 * args.img_size, seed=args.seed)  # twice the model's size: see the docstring
        os.rename(tmp, data)
except Stopped:
    fail("stopped by signal while generating the image folder; run the same command to continue")
except OSError as e:
    fail(f"cannot write {e.filename or data}: {e.strerror} (run the same command to continue)")
common = ["--data_path", data, "--num_workers", args.num_workers, "--device", args.device]
seed = ["--seed", args.seed]  # not given to knn.py: its --seed (k-means starts, --show's queries) keeps its default
model = ["--model", args.model, "--img_size", args.img_size, "--patch_size", args.patch_size, "--dim", args.dim,
         "--depth", args.depth, "--heads", args.heads]
extra = {s: shlex.split(getattr(args, f"{s}_args")) for s in ("mae", "head", "ct", "knn", "probe", "logreg", "kmeans")}
if not args.data_path:  # the generated folder's recipe: 512 images, a few hundred steps; --X_args come later and win
    for s, flags in (("mae", "--views 1 --blr 1e-3 --warmup_epochs 2"), ("head", "--queue_size 256 --blr 4e-4"),
                     ("ct", "--blr 8e-3 --head_blr 8e-3 --encoder_ema 0.9 --topk 1")):
        extra[s] = shlex.split(flags) + extra[s]
show = int(last_value(extra["knn"], "--show", args.show))  # what knn.py gets: --knn_args "--show N" wins
times = {}
t_start = time.time()

try:
    # 1-3: the three training stages, each skipped when its final file exists
    mae_pt, head_pt, ct_pt = (os.path.join(args.out_dir, d, f) for d, f in (("mae", "mae.pt"), ("head", "head.pt"),
                                                                    ("ct", "ct.pt")))
    run("MAE pretraining", lambda: os.path.exists(mae_pt), "mae_pretrain.py", *common, *seed, *model,
        "--out_dir", os.path.dirname(mae_pt), "--dec_dim", args.dec_dim, "--dec_depth", args.dec_depth,
        "--dec_heads", args.dec_heads, "--mask_ratio", args.mask_ratio, "--epochs", args.mae_epochs,
        "--batch_size", args.batch_size, "--pool", args.pool, "--resume", "auto", *extra["mae"])
    run("NNCLR head", lambda: os.path.exists(head_pt), "nnclr_head.py", *common, *seed, "--init", mae_pt,
        "--out_dir", os.path.dirname(head_pt), "--epochs", args.head_epochs, "--batch_size", args.batch_size,
        "--pool", args.pool, "--resume", "auto", *extra["head"])
    run("contrastive tuning", lambda: os.path.exists(ct_pt), "contrastive_tune.py", *common, *seed, "--init", mae_pt,
        "--head", head_pt, "--out_dir", os.path.dirname(ct_pt), "--epochs", args.ct_epochs,
        "--batch_size", args.batch_size, "--pool", args.pool, "--resume", "auto", *extra["ct"])

    # 4: the evaluations of both encoders, each skipped when its log holds its result
    results, pictures = {}, {}
    splits = range(args.seed, args.seed + args.lowshot_splits) if args.lowshot else ()
    for enc, ckpt in (("MAE", mae_pt), ("MAE-CT", ct_pt)):
        ev = os.path.join(args.out_dir, f"eval_{enc.lower().replace('-', '')}")
        knn_log, probe_log, kmeans_log = (os.path.join(ev, d, "log.txt") for d in ("knn", "probe", "kmeans"))
        logreg_logs = [os.path.join(ev, f"logreg_s{s}", "log.txt") for s in splits]
        evaluate = [*common, "--init", ckpt, "--pool", args.pool, "--crop_pct", args.crop_pct]
        run(f"k-NN {enc}", lambda: knn_done(knn_log, show), "knn.py", *evaluate, "--show", args.show,
            "--out_dir", os.path.dirname(knn_log), *extra["knn"])
        if args.kmeans_runs:
            run(f"k-means {enc}", lambda: last_entry(kmeans_log, "kmeans"), "knn.py", *evaluate, "--kmeans",
                "--kmeans_runs", args.kmeans_runs, "--out_dir", os.path.dirname(kmeans_log), *extra["kmeans"])
        run(f"linear probe {enc}", lambda: last_entry(probe_log, "best_top1"), "probe.py", *evaluate, *seed,
            "--cached", 1, "--epochs", args.probe_epochs, "--batch_size", args.batch_size,
            "--out_dir", os.path.dirname(probe_log), "--resume", "auto", *extra["probe"])
        for split_seed, logreg_log in zip(splits, logreg_logs):  # one labelled subset per seed
            run(f"low-shot {enc}, split {split_seed}", lambda: last_entry(logreg_log, "logreg_top1"), "probe.py",
                *evaluate, "--seed", split_seed, "--logreg", 1, "--per_class", args.lowshot,
                "--out_dir", os.path.dirname(logreg_log), *extra["logreg"])
        knn_entry = last_entry(knn_log, "knn_top1")
        knn = knn_entry["knn_top1"]
        if show and "neighbours_png" in knn_entry:  # the picture's path from results.md, and what it shows
            pictures[enc] = (os.path.relpath(os.path.join(os.path.dirname(knn_log), knn_entry["neighbours_png"]),
                                             args.out_dir), len(knn_entry["show_queries"]), knn_entry["show_k"])
        lowshot = [last_entry(p, "logreg_top1")["logreg_top1"] for p in logreg_logs]
        kmeans = last_entry(kmeans_log, "kmeans")["kmeans"] if args.kmeans_runs else {}
        results[enc] = dict(knn10=knn.get("10"), knn20=knn.get("20"),
                            probe=last_entry(probe_log, "best_top1")["best_top1"],
                            lowshot=sum(lowshot) / len(lowshot) if lowshot else None,
                            acc=kmeans.get("acc", {}).get("mean"), nmi=kmeans.get("nmi", {}).get("mean"))
except Stopped:
    fail("stopped by signal between two stages; run the same command to continue")


# 5: the table
def fmt(v):
    return "–" if v is None else f"{v:.1f}"


cols = [("knn10", "k-NN k=10"), ("knn20", "k-NN k=20"), ("probe", "linear probe"),
        ("lowshot", f"low-shot {args.lowshot}/class" + (f" (mean of {args.lowshot_splits} splits)"
                                                        if args.lowshot_splits > 1 else "")),
        ("acc", f"k-means ACC (mean of {args.kmeans_runs})"), ("nmi", f"k-means NMI (mean of {args.kmeans_runs})")]
lines = ["| encoder | " + " | ".join(c for _, c in cols) + " |", "|---|" + "---|" * len(cols)]
for enc in ("MAE", "MAE-CT"):
    lines.append(f"| {enc} | " + " | ".join(fmt(results[enc][k]) for k, _ in cols) + " |")
lines.append("| Δ | " + " | ".join(
    "–" if results["MAE"][k] is None else f"{results['MAE-CT'][k] - results['MAE'][k]:+.1f}" for k, _ in cols) + " |")
val = os.path.join(data, "val")  # as the user gave it
lines += ["", f"top-1, ACC and NMI (%) on {val}; pooling {args.pool}; command: python "
          f"{' '.join(shlex.quote(a) for a in sys.argv)}"]
if len(pictures) == 2:  # paths relative to results.md (in out_dir): the pictures show wherever out_dir is read
    (mae_png, n, k), (ct_png, _, _) = pictures["MAE"], pictures["MAE-CT"]
    lines += ["", f"k-NN neighbours: {n} val images (the same for both encoders), each followed by its {k} nearest "
              "train images, most similar first; a red frame: another class than the query's, green: the same", "",
              "| MAE encoder | MAE-CT encoder |", "|---|---|", f"| ![MAE]({mae_png}) | ![MAE-CT]({ct_png}) |"]
if times:
    lines += ["", "| stage (this invocation) | wall time |", "|---|---|"]
    lines += [f"| {k} | {v / 60:.1f} min |" for k, v in times.items()]
    lines += [f"| total | {(time.time() - t_start) / 60:.1f} min |"]
table = "\n".join(lines)
write_atomic(os.path.join(out, "results.md"), table + "\n")
print("\n" + table)
