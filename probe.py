"""
Linear probing of a frozen encoder (MAE / MAE-CT protocol) and MSN's low-shot logistic regression.

    python probe.py --data_path DATA --init out/ct/ct.pt --pool mean           # linear probe, augmented crops
    python probe.py --data_path DATA --init ct.pt --cached 1 --epochs 100       # on features encoded once
    python probe.py --data_path DATA --init ct.pt --logreg 1 --per_class 5      # low-shot logistic regression
    python probe.py --data_path IMAGENET --init maect_base16 --eval_head probes/maect_base16.th
    torchrun --nproc_per_node 8 probe.py --data_path DATA --init ct.pt          # the same result on N processes

Linear probe: one BatchNorm1d(affine=False) + Linear head per --blrs entry, all trained at once (SGD momentum 0.9,
warmup + cosine), on RandomResizedCrop(0.08-1) + flip crops (--train_aug 0: centre crops; --cached 1: features of
the centre crops encoded once); reported is the best val top-1 over heads and evaluations. --logreg 1: multinomial
logistic regression (L2 penalty, no intercept, L-BFGS in float64) on centred, L2-normalised features. --eval_head
FILE: top-1 / top-5 of a trained head (probe.pt, or an MAE-CT release's probes/<name>.th) on val/ only.
--train_list FILE / --per_class N pick the labelled images; val images are centre-cropped (--crop_pct).
--init takes any checkpoint (or release name: maect_base16, ...) vit.load_encoder reads. Writes out_dir/probe.pt
(the best head, and the state to resume), periodic out_dir/ckpt_*.pt and out_dir/log.txt; --logreg out_dir/logreg.pt;
--eval_head a log line, with --out_dir. --wandb PROJECT: the numbers of log.txt in W&B too.
"""
import argparse
import atexit
import ctypes
import faulthandler
import fcntl
import functools
import glob
import hashlib
import json
import math
import multiprocessing.resource_tracker
import os
import random
import re
import signal
import socket
import sys
import threading
import time
from contextlib import nullcontext

if __name__ == "__mp_main__" and sys.platform == "linux":  # a data-loading worker: it ends with its parent even
    ctypes.CDLL(None).prctl(1, 9)  # while it imports torch (PR_SET_PDEATHSIG = 1, SIGKILL = 9), and at once if
    if os.getppid() != int(os.environ.get("MAECT_PARENT", os.getppid())): os._exit(0)  # that has ended

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import vit

# -----------------------------------------------------------------------------
# the method: the probe heads and their evaluation, the low-shot classifier, the labelled images, the crops
# (REFERENCE §5)


def make_head(dim, classes):
    """One probe head; probe.pt's "head" is this module's state dict. BatchNorm eps: torch's 1e-5, the authors'."""
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, classes))


class LinearHeads(nn.Module):
    """n probe heads on the same features. The BatchNorm1d(affine=False) has no parameters, so its
    batch statistics and running averages are the same for every head: one is shared. Each head is a
    Linear(D, C) of its own (its own optimizer group and lr), and all start from the same weights
    (normal std 0.01 truncated at +-2, absolute: in effect not truncated, as the authors' and
    facebookresearch/mae's trunc_normal_ calls; bias 0; drawn from `seed`): head i trained here is head i
    trained alone, bit for bit."""

    def __init__(self, dim, classes, n, seed=0):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.linears = nn.ModuleList(nn.Linear(dim, classes) for _ in range(n))
        w = nn.init.trunc_normal_(torch.empty(classes, dim), std=0.01, a=-2.0, b=2.0,
                                  generator=torch.Generator().manual_seed(seed))
        for lin in self.linears:
            lin.weight.data.copy_(w)
            nn.init.zeros_(lin.bias)

    def forward(self, x):  # (B, D) -> n x (B, C)
        x = self.norm(x)
        return [lin(x) for lin in self.linears]

    def head(self, i):  # head i alone, as make_head() builds it
        h = make_head(self.norm.num_features, self.linears[i].out_features)
        h[0].load_state_dict(self.norm.state_dict())
        h[1].load_state_dict(self.linears[i].state_dict())
        return h


def read_head(path, dim, pool=None):
    """A trained head to evaluate: this project's probe.pt, or an MAE-CT release (probes/<name>.th:
    {"state_dict": ..., "ctor_kwargs": {"pooling": {"kind": "mean_patch" | "class_token"}, ...}}, the
    BatchNorm at layer.1 and the Linear at layer.2, in older files layer.2 and layer.3; the BatchNorm also
    as norm.*, the same tensors). -> (make_head module in eval mode, pooling: `pool` or else the file's,
    the layout found, the class names the file records or None). Anything else raises one line naming what was
    expected and found."""
    ckpt = vit.load_checkpoint(path)
    if "stage" in ckpt:  # this project's file
        if ckpt["stage"] != "probe" or ckpt.get("head") is None:
            found = "a probe.pt of a run that never evaluated" if ckpt["stage"] == "probe" else \
                f"a {ckpt['stage']} checkpoint"
            raise ValueError(f"--eval_head {path}: expected a trained probe head, found {found}")
        sd, file_pool, layout, classes = dict(ckpt["head"]), ckpt["pool"], "probe.pt", ckpt.get("classes")
    else:  # the authors' keys -> make_head's ("0." BatchNorm, "1." Linear)
        sd = ckpt["state_dict"] if isinstance(ckpt.get("state_dict"), dict) else ckpt
        kind = ((ckpt.get("ctor_kwargs") or {}).get("pooling") or {}).get("kind")
        if kind not in (None, "mean_patch", "class_token"):
            raise ValueError(f"--eval_head {path}: pooling kind {kind!r}, expected mean_patch or class_token")
        file_pool, classes = {"mean_patch": "mean", "class_token": "cls"}.get(kind), None
        bn, lin = ("layer.1", "layer.2") if "layer.1.running_mean" in sd else ("layer.2", "layer.3")
        layout = f"MAE-CT release: BatchNorm {bn}, Linear {lin}"
        alias = [k for k in sd if k in ("norm.running_mean", "norm.running_var", "norm.num_batches_tracked")]
        if any(not torch.equal(sd[k], sd.get(f"{bn}.{k[5:]}", torch.empty(0))) for k in alias):
            raise ValueError(f"--eval_head {path}: norm.* is not the same BatchNorm as {bn}.*")
        keys = list(sd)
        other = [k for k in keys if k not in alias and not k.startswith((bn + ".", lin + "."))]
        sd = {("0." if k.startswith(bn) else "1.") + k.split(".", 2)[2]: v for k, v in sd.items()
              if k.startswith((bn + ".", lin + "."))}
        if other or not {"0.running_mean", "0.running_var", "1.weight", "1.bias"} <= set(sd):
            raise ValueError(f"--eval_head {path} is no probe head: expected probe.pt, or layer.1.running_mean/_var + "
                             f"layer.2.weight/.bias (older files: layer.2 / layer.3), found keys "
                             f"{', '.join((other or keys)[:8])}")
    C, width = sd["1.weight"].shape if sd["1.weight"].ndim == 2 else (0, 0)
    shapes = {k: tuple(sd[k].shape) for k in ("0.running_mean", "0.running_var", "1.weight", "1.bias")}
    if shapes != {"0.running_mean": (width,), "0.running_var": (width,), "1.weight": (C, width), "1.bias": (C,)}:
        raise ValueError(f"--eval_head {path}: the head's shapes do not fit together: {shapes}")
    if width != dim:
        raise ValueError(f"--eval_head {path} is a head for {width}-dim features, the encoder's are {dim}-dim")
    if not (pool or file_pool):
        raise ValueError(f"--eval_head {path} names no pooling: give --pool cls or --pool mean")
    head = make_head(width, C)
    head.load_state_dict({"0.num_batches_tracked": torch.tensor(0), **sd})  # strict
    return head.eval(), pool or file_pool, layout, classes


def fit_logreg(x, y, num_classes, lam, rtol=1e-6, max_iter=10000):
    """MSN's low-shot classifier, cyanure's MultiClassifier(loss="multiclass-logistic", penalty="l2",
    fit_intercept=False). Its objective, with cyanure's definition of the l2 penalty (lambd/2 ||w||^2):
        f(W) = (1/n) sum_i CE(W x_i, y_i) + (lam / 2) ||W||_F^2,   W (classes, D), no intercept,
    and MSN passes lam = 0.00025 / n. f is lam-strongly convex, so f(W) - min f <= ||grad f(W)||^2 / (2 lam):
    full-batch L-BFGS (strong-Wolfe line search) in float64 runs until that certified bound is below
    rtol * f(W) (cyanure stops at a duality gap of 1e-3 f), or max_iter iterations.
    x (n, D), y (n,) int64. Returns W (classes, D) float64 and {"iters", "loss", "grad", "gap"}."""
    x = x.double()
    W = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([W], lr=1, max_iter=100, tolerance_grad=0, tolerance_change=0, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        f = F.cross_entropy(x @ W.T, y) + lam / 2 * W.square().sum()
        f.backward()
        return f

    while True:  # rounds of up to 100 iterations; L-BFGS keeps its history between rounds
        f = closure().item()
        gap = W.grad.square().sum().item() / (2 * lam)
        done = opt.state[W].get("n_iter", 0)
        if gap <= rtol * f or done >= max_iter:
            break
        opt.step(closure)
        if opt.state[W]["n_iter"] == done:  # no step possible: float64 precision reached
            break
    return W.detach(), dict(iters=opt.state[W].get("n_iter", 0), loss=f, grad=W.grad.abs().max().item(), gap=gap)


def select_train(samples, classes, train_list, per_class, seed):
    """Indices (sorted) of the labelled train images. train_list: one name per line, either a file's
    base name (the format of lowshot_subsets.py and of the SimCLR / MSN split files) or class/name
    where base names repeat across classes; per_class: N images of every class, chosen by `seed`."""
    if train_list:
        try:
            with open(train_list, encoding="utf-8-sig") as f:
                names = [line.strip() for line in f if line.strip()]
        except OSError as e:
            fail(f"cannot read --train_list {train_list}: {e.strerror}")
        if not names:
            fail(f"--train_list {train_list} holds no names")
        if len(set(names)) != len(names):
            fail(f"--train_list {train_list} repeats names: {sorted(n for n in set(names) if names.count(n) > 1)[:5]}")
        by_base, by_rel = {}, {}
        for i, (path, c) in enumerate(samples):
            by_base.setdefault(os.path.basename(path), []).append(i)
            by_rel[f"{classes[c]}/{os.path.basename(path)}"] = i
        chosen, missing, ambiguous = [], [], []
        for name in names:
            if name in by_rel:
                chosen.append(by_rel[name])
            elif len(by_base.get(name, ())) == 1:
                chosen.append(by_base[name][0])
            else:
                (ambiguous if name in by_base else missing).append(name)
        if missing:
            fail(f"{len(missing)} of {len(names)} names in --train_list {train_list} are not in the train folder: "
                 f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}")
        if ambiguous:
            fail(f"names in --train_list {train_list} are in several class folders (write class/name): "
                 f"{', '.join(ambiguous[:5])}")
        if len(set(chosen)) != len(chosen):
            fail(f"--train_list {train_list} names some images twice (as name and as class/name)")
        return sorted(chosen)
    by_class = {}  # per class the files with the smallest sha256(seed/class/name): lowshot_subsets.py's rule, so
    for i, (path, c) in enumerate(samples):  # its --per_class N --seed S lists the same images
        by_class.setdefault(c, []).append(i)
    chosen = []
    for c in sorted(by_class):
        if len(by_class[c]) < per_class:
            fail(f"--per_class {per_class}: class {classes[c]} has only {len(by_class[c])} train images")
        name = {i: os.path.basename(samples[i][0]) for i in by_class[c]}
        chosen += sorted(by_class[c], key=lambda i: (hashlib.sha256(f"{seed}/{classes[c]}/{name[i]}".encode())
                                                     .digest(), name[i]))[:per_class]
    return sorted(chosen)


@torch.no_grad()
def evaluate_heads(heads, feats, labels, classes, chunk=8192):
    """Val top-1 and top-5 (%) of every head: two lists of floats."""
    heads.eval()
    hit1, hit5 = (torch.zeros(len(heads.linears), dtype=torch.float64, device=feats.device) for _ in range(2))
    for s in range(0, len(feats), chunk):
        y = labels[s:s + chunk]
        for h, z in enumerate(heads(feats[s:s + chunk])):  # (b, C)
            hit1[h] += (z.argmax(1) == y).sum()
            hit5[h] += (z.topk(min(5, classes), dim=1).indices == y[:, None]).any(1).sum()
    heads.train()
    return (100.0 * hit1 / len(feats)).tolist(), (100.0 * hit5 / len(feats)).tolist()


def train_box(rng, w, h):  # RandomResizedCrop(scale 0.08-1, bicubic), flipped by flip_each
    return [random_resized_crop(rng, w, h, (0.08, 1.0))]


def centre_crop(rng, w, h, crop_pct):
    """The centre box of side crop_pct x the shorter side, resized to img_size (bicubic) in one resample: "resize
    the shorter side to img_size / crop_pct, centre crop img_size" without the intermediate rounding. With crop_pct
    1 and images of img_size pixels, the identity."""
    s = min(w, h) * crop_pct
    return [((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)]


# -----------------------------------------------------------------------------
# flags (defaults: the authors' protocol, REFERENCE §5)
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data_path", required=True, help="image folder with train/<class>/* and val/<class>/*")
parser.add_argument("--out_dir", default="", help="default out/probe; --eval_head: a log line only when given")
parser.add_argument("--init", required=True, help="encoder: mae.pt / ct.pt, facebookresearch/mae's, MAE-CT's file, "
                    "or a release name (maect_base16, ...: vit.RELEASES)")
parser.add_argument("--which", default="ema", choices=["ema", "online"], help="the encoder of a ct.pt to use")
parser.add_argument("--resume", default="", help="a checkpoint to continue, or 'auto': the newest in out_dir")
parser.add_argument("--pool", default=None, choices=["cls", "mean"], help="default cls; --eval_head: the file's")
parser.add_argument("--img_size", type=int, default=0, help="0 = the encoder's own")
parser.add_argument("--heads", type=int, default=0, help="attention heads of a foreign --init of an unreleased width")
parser.add_argument("--crop_pct", type=float, default=0.875, help="eval: centre crop of the shorter side (1.0: CIFAR)")
parser.add_argument("--epochs", type=int, default=50)
parser.add_argument("--warmup_epochs", type=float, default=-1, help="-1 = 10%% of --epochs")
parser.add_argument("--batch_size", type=int, default=1024, help="images per optimizer step, over all processes")
parser.add_argument("--blrs", type=float, nargs="+", default=[round(0.1 - 0.01 * i, 2) for i in range(10)],
                    help="one head per base lr, lr = blr * batch / 256 (the authors' ten: 0.1, 0.09, ..., 0.01)")
parser.add_argument("--min_lr", type=float, default=0.0)
parser.add_argument("--weight_decay", type=float, default=0.0)
parser.add_argument("--eval_every", type=int, default=1, help="epochs between val evaluations (and at the end)")
parser.add_argument("--cached", type=int, default=0, help="1: train on features of the centre crops, encoded once")
parser.add_argument("--train_aug", type=int, default=1, help="streaming: 0 = centre crops (--cached 1 image by image)")
parser.add_argument("--logreg", type=int, default=0, help="1: low-shot logistic regression instead of SGD heads")
parser.add_argument("--lambd", type=float, default=0.00025, help="logreg: L2 penalty = lambd / n_train (MSN)")
parser.add_argument("--center", default="train", choices=["train", "sample"],
                    help="logreg: subtract the labelled set's mean (train) or each vector's own mean (sample: MSN)")
parser.add_argument("--train_list", default="", help="labelled images: one file name (or class/name) per line")
parser.add_argument("--per_class", type=int, default=0, help="labelled images: N per class, drawn with --seed")
parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
parser.add_argument("--compile", type=int, default=0)
parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
parser.add_argument("--num_workers", type=int, default=8, help="data-loading processes per process")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--log_interval", type=int, default=20, help="iterations")
parser.add_argument("--ckpt_interval", type=int, default=1000, help="iterations between checkpoints")
parser.add_argument("--keep_last", type=int, default=2, help="periodic checkpoints kept (0 = all)")
parser.add_argument("--skip_bad_images", type=int, default=0, help="1: log unreadable images and use others")
parser.add_argument("--stall_timeout", type=float, default=300,
                    help="seconds without a batch and without CPU use before a loader counts as stalled (0: off)")
parser.add_argument("--wandb", default="", help="a W&B project: also log to Weights & Biases (pip install wandb)")
parser.add_argument("--wandb_run", default="", help="--wandb: the W&B run's name (default: W&B's own)")
parser.add_argument("--max_iters", type=int, default=0, help="stop after this many iterations (0 = epochs)")
parser.add_argument("--eval_head", default="", help="evaluate this trained head on val, no training: probe.pt or "
                    "an MAE-CT release's probes/<name>.th; DATA needs only val/")

# flags a resumed run must share with the checkpoint it continues
RESUME_FLAGS = ("init", "which", "pool", "img_size", "crop_pct", "batch_size", "blrs", "cached", "train_aug",
                "train_list", "per_class", "seed")


# -----------------------------------------------------------------------------
# the three modes: a trained head evaluated, the low-shot logistic regression, the linear probe

def check_head_classes(path, head, classes, val_set, master_process):
    """A head fits the val folders: as many classes, and where the file records their names (this project's
    probe.pt), the same names in the same order; the authors' probes record none: the sorted folders, said so."""
    if head[1].out_features != len(val_set.classes):
        fail(f"--eval_head {path} is a head for {head[1].out_features} classes, {val_set.root} has "
             f"{len(val_set.classes)} class folders")
    if classes is not None and classes != val_set.classes:
        i = next(i for i, (a, b) in enumerate(zip(classes, val_set.classes)) if a != b)
        fail(f"--eval_head {path} was trained on other classes than the folders of {val_set.root}: class {i} is "
             f"{classes[i]} there, {val_set.classes[i]} here")
    if classes is None and master_process:
        print(f"note: {path} names no classes: class i is the i-th val folder in sorted order (ImageNet's wnids, as "
              f"the authors' probes expect)")


def evaluate_head(args, encoder, model_args, head, layout, val_set, device, autocast):
    """--eval_head: a trained head on the val centre crops (every rank encodes its share; features gathered)."""
    master_process, C = int(os.environ.get("RANK", 0)) == 0, len(val_set.classes)
    with torch.no_grad():
        feats, y = extract_features(encoder, val_set, args.pool, model_args["dim"], args.batch_size,
                                    args.num_workers, device, autocast, "val")
        logits = head.to(device)(feats)  # (N, C)
    top1 = 100.0 * (logits.argmax(1) == y).double().mean().item()
    top5 = 100.0 * (logits.topk(min(5, C), dim=1).indices == y[:, None]).any(1).double().mean().item()
    if master_process:
        print(f"top-1 {top1:.2f}%, top-5 {top5:.2f}%")
        log_result(args, "eval_head", dict(
            eval_top1=round(top1, 4), eval_top5=round(top5, 4), init=args.init, which=args.which,
            eval_head=args.eval_head, pool=args.pool, val=len(y), img_size=model_args["img_size"],
            crop_pct=args.crop_pct))


def logistic_regression(args, encoder, model_args, train_set, val_set, device, autocast):
    """--logreg: features once, one convex fit (identical on every rank), top-1 on val."""
    master_process, C = int(os.environ.get("RANK", 0)) == 0, len(val_set.classes)
    (x, y), (xv, yv) = (extract_features(encoder, ds, args.pool, model_args["dim"], args.batch_size, args.num_workers,
                                         device, autocast, desc)
                        for ds, desc in ((train_set, "train"), (val_set, "val")))
    n_train = len(x)
    if args.center == "train":  # the labelled set's mean feature
        mu = x.mean(0)
        x, xv = x - mu, xv - mu
    else:  # each feature vector's own mean over its dimensions (cyanure.preprocess(columns=False, centering=True))
        x, xv = x - x.mean(1, keepdim=True), xv - xv.mean(1, keepdim=True)
    x, xv = F.normalize(x, dim=1), F.normalize(xv, dim=1)
    lam = args.lambd / n_train
    W, info = fit_logreg(x, y, C, lam)
    logits = xv.double() @ W.T  # (Nv, C)
    top1 = 100.0 * (logits.argmax(1) == yv).double().mean().item()
    top5 = 100.0 * (logits.topk(min(5, C), dim=1).indices == yv[:, None]).any(1).double().mean().item()
    if master_process:
        print(f"logistic regression on {n_train} labelled images, lambda {args.lambd} / {n_train} = {lam:.3g}: "
              f"val top-1 {top1:.2f}%, top-5 {top5:.2f}% (L-BFGS {info['iters']} iterations, objective "
              f"{info['loss']:.6g}, within {info['gap']:.1e} of the minimum)")
        if info["gap"] > 1e-6 * info["loss"]:
            print(f"warning: L-BFGS stopped {info['gap']:.1e} from the minimum (objective {info['loss']:.3g}): "
                  f"not converged", file=sys.stderr)
        log_result(args, "logreg", dict(logreg_top1=round(top1, 4), logreg_top5=round(top5, 4), n_train=n_train,
                                        lambd=args.lambd, center=args.center, **info))
        train_files = [f"{train_set.classes[c]}/{os.path.basename(p)}" for p, c in train_set.samples]
        save_atomic(dict(stage="logreg", weight=W.cpu(), center=args.center,
                         mean=mu.cpu() if args.center == "train" else None, lambd=args.lambd, top1=top1, top5=top5,
                         pool=args.pool, classes=train_set.classes, encoder_init=args.init, which=args.which,
                         model_args=model_args, img_size=model_args["img_size"], crop_pct=args.crop_pct,
                         train_files=train_files, args=vars(args)), os.path.join(args.out_dir, "logreg.pt"))
        print(f"wrote {os.path.join(args.out_dir, 'logreg.pt')}")


def train_heads(args, encoder, model_args, resume_path, ckpt, train_set, val_set, device, autocast):
    """The linear probe: every head takes the same step on the global batch on every rank (no DDP needed), so the
    result does not depend on the number of processes."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    D, C, H = model_args["dim"], len(val_set.classes), len(args.blrs)
    heads = LinearHeads(D, C, H, args.seed).to(device)
    # one group per head: its own lr; SGD momentum 0.9, weight decay 0 (authors)
    optimizer = torch.optim.SGD([dict(params=list(lin.parameters())) for lin in heads.linears], lr=0.0,
                                momentum=0.9, weight_decay=args.weight_decay)
    lrs = [blr * args.batch_size / 256 for blr in args.blrs]
    best = dict(head=None, blr=None, lr=None, top1=-1.0, top5=-1.0, epoch=None)  # over heads and evaluations
    iter_num, head_best, last = 0, [-1.0] * H, None  # each head's best top-1; the last evaluation
    if ckpt is not None:
        heads.load_state_dict(ckpt["heads"])
        optimizer.load_state_dict(ckpt["optimizer"])
        iter_num, head_best, last = ckpt["iter_num"], ckpt["head_best"], ckpt["last"]
        best = {k: ckpt[k] for k in best}
    # val features once (the encoder is frozen); cached mode: the train features too
    features = functools.partial(extract_features, encoder, how=args.pool, dim=D, batch_size=args.batch_size,
                                 num_workers=args.num_workers, device=device, autocast=autocast)
    val_feats, val_labels = features(val_set, desc="val")
    if args.cached:
        train_feats, train_labels = features(train_set, desc="train")
    n = len(train_feats) if args.cached else len(train_set)  # (cached: unreadable images left out)
    sampler = ShardSampler(n, args.batch_size, *((0, 1) if args.cached else (rank, world)), args.seed)
    steps_per_epoch = sampler.steps
    max_iters = args.max_iters or args.epochs * steps_per_epoch
    warmup_iters = round((0.1 * args.epochs if args.warmup_epochs < 0 else args.warmup_epochs) * steps_per_epoch)
    eval_iters = args.eval_every * steps_per_epoch
    loader = None if args.cached else make_loader(train_set, args.batch_size // world, sampler, args.num_workers,
                                                  device)

    def global_batches():
        """(features (B, D) float32, labels (B,)) of the global batch of every step from iter_num on, the same on
        every rank."""
        for _ in epochs(sampler, iter_num):
            if args.cached:
                order = torch.tensor([i for _, i in sampler], device=device)
                for s in range(0, len(order), args.batch_size):
                    idx = order[s:s + args.batch_size]
                    yield train_feats[idx], train_labels[idx]
                continue
            for flat, sizes, y, _ in start_workers(loader, "train"):
                with torch.no_grad(), autocast:
                    f = vit.pool(encoder(vit.normalize(crops_to_batch(flat, sizes, train_set.img_size, device))),
                                 args.pool)
                f, y = f.float().contiguous(), y.to(device)  # pooled rows are strided views; BN sums in memory order
                yield (all_gather_cat(f), all_gather_cat(y)) if world > 1 else (f, y)

    def checkpoint():  # the best head so far (stage "probe"), and everything to resume
        return dict(stage="probe", **best, head_args=dict(dim=D, classes=C), pool=args.pool, classes=train_set.classes,
                    encoder_init=args.init, which=args.which, model_args=model_args, img_size=model_args["img_size"],
                    crop_pct=args.crop_pct, heads=heads.state_dict(), optimizer=optimizer.state_dict(),
                    iter_num=iter_num, head_best=head_best, last=last, args=vars(args))

    def report():  # rank 0, after the final file: every head's last and best top-1, the best head
        if rank == 0 and last is not None:
            print(f"{'blr':>7} {'lr':>8} {'top-1':>7} {'top-5':>7} {'best top-1':>10}   (last evaluation: epoch "
                  f"{last['epoch']:g})")
            for h in range(H):
                print(f"{args.blrs[h]:>7g} {lrs[h]:>8.3g} {last['top1'][h]:>7.2f} {last['top5'][h]:>7.2f} "
                      f"{head_best[h]:>10.2f}")
            print(f"best: top-1 {best['top1']:.2f}%, top-5 {best['top5']:.2f}% (blr {best['blr']:g}, lr "
                  f"{best['lr']:.3g}, epoch {best['epoch']:g})")
            run.log(dict(final=True, best_top1=best["top1"], best_top5=best["top5"], best_blr=best["blr"],
                         best_epoch=best["epoch"], head_best=head_best, blrs=args.blrs))

    # training loop
    if rank == 0:
        print(f"{H} heads, blrs {args.blrs} (lr {', '.join(f'{lr:.3g}' for lr in lrs)}), batch {args.batch_size}, "
              f"{steps_per_epoch} steps/epoch, {max_iters} iterations")
    run = Run(args, "probe", resume_path, ckpt, iter_num, max_iters, steps_per_epoch, [train_set, val_set], device)
    batches = global_batches()
    heads.train()
    while iter_num < max_iters:
        for g, lr in zip(optimizer.param_groups, lrs):
            g["lr"] = get_lr(iter_num, lr, args.min_lr, warmup_iters, max_iters)
        f, y = next(batches)  # (B, D), (B,): the global batch
        losses = torch.stack([F.cross_entropy(z, y) for z in heads(f)])  # (H,)
        losses.sum().backward()  # the heads share no parameter: each gets exactly its own gradient
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        run.step(iter_num, losses)  # progress; at log steps the log line and the non-finite check
        if iter_num % eval_iters == 0 or iter_num == max_iters:  # before the checkpoint: it holds the result
            run.check_finite()
            top1, top5 = evaluate_heads(heads, val_feats, val_labels, C)
            last = dict(top1=top1, top5=top5, epoch=round(iter_num / steps_per_epoch, 3))
            head_best = [max(a, b) for a, b in zip(head_best, top1)]
            h = max(range(H), key=lambda i: top1[i])  # first best head
            if top1[h] > best["top1"]:
                best = dict(head=heads.head(h).state_dict(), blr=args.blrs[h], lr=lrs[h], top1=top1[h], top5=top5[h],
                            epoch=last["epoch"])
            run.log(dict(iter=iter_num, **last, best_top1=best["top1"], best_blr=best["blr"]))
            if rank == 0:
                run.pbar.write(f"epoch {last['epoch']:g}: top-1 " + " ".join(f"{v:.2f}" for v in top1) +
                               f" (blrs {' '.join(f'{b:g}' for b in args.blrs)}); best {best['top1']:.2f} "
                               f"(blr {best['blr']:g})")
        run.save_or_stop(iter_num, checkpoint)  # evaluation comes first here: it reads no image
    run.finish("probe.pt", checkpoint, report)


def all_gather_cat(t):  # this rank's rows -> all ranks' rows in rank order, i.e. the global batch order
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts)


# -----------------------------------------------------------------------------
def main(args):
    check_flags(args, [
        ("epochs batch_size eval_every log_interval ckpt_interval", ">= 1", lambda v: v >= 1),
        ("max_iters keep_last img_size per_class min_lr weight_decay heads", ">= 0", lambda v: v >= 0),
        ("warmup_epochs", "-1 or >= 0", lambda v: v == -1 or v >= 0),
        ("blrs lambd", "> 0", lambda v: v > 0),
        ("crop_pct", "in (0, 1]", lambda v: 0 < v <= 1),
        ("cached train_aug logreg", "0 or 1", lambda v: v in (0, 1)),
    ])
    ddp, ddp_rank, ddp_world_size, device, dtype, autocast = compute_init(args)
    master_process = ddp_rank == 0
    torch.manual_seed(args.seed)
    if args.batch_size % ddp_world_size != 0:
        fail(f"--batch_size {args.batch_size} is not divisible by processes ({ddp_world_size})")
    if args.logreg and args.cached:
        fail("--logreg 1 and --cached 1 are two different classifiers; choose one")
    if args.train_list and args.per_class:
        fail("--train_list and --per_class both pick the labelled images; choose one")
    if args.eval_head and (args.logreg or args.cached or args.resume or args.train_list or args.per_class):
        fail("--eval_head evaluates a trained head; --logreg, --cached, --resume, --train_list, --per_class train one")
    args.out_dir = args.out_dir or ("" if args.eval_head else "out/probe")  # --eval_head: only a given out_dir
    args.pool = args.pool or ("" if args.eval_head else "cls")  # --eval_head: the file's pooling unless --pool
    resume_path, ckpt = "", None
    if not (args.eval_head or args.logreg):  # the linear probe: lock out_dir, find the checkpoint to continue
        resume_path, ckpt = start_run(args, "probe", "probe.pt", RESUME_FLAGS)
    elif master_process and args.out_dir:  # the evaluations append a line to their log.txt
        lock_out_dir(args.out_dir)
        claim_out_dir(args.out_dir, "eval_head" if args.eval_head else "logreg", append=True)

    # encoder and data: every check before any feature is extracted
    try:
        encoder = vit.load_encoder(args.init, args.which, args.img_size or None, master_process, args.heads or None)
        head, args.pool, layout, head_classes = read_head(args.eval_head, encoder.args["dim"], args.pool or None) \
            if args.eval_head else (None, args.pool, None, None)
    except (ValueError, FileNotFoundError, KeyError) as e:
        fail(str(e))
    model_args = encoder.args
    img_size = model_args["img_size"]
    crop = functools.partial(centre_crop, crop_pct=args.crop_pct)
    val_set = ImageFolder(os.path.join(args.data_path, "val"), img_size, crop, None, args.seed, args.skip_bad_images,
                          resize=device == "cpu", leave_out=True)  # evaluations leave unreadable images out
    C = len(val_set.classes)
    if head is not None:
        check_head_classes(args.eval_head, head, head_classes, val_set, master_process)
    augment = not args.cached and not args.logreg and bool(args.train_aug)
    if not args.eval_head:
        train_set = ImageFolder(os.path.join(args.data_path, "train"), img_size, train_box if augment else crop,
                                flip_each if augment else None, args.seed, args.skip_bad_images,
                                resize=device == "cpu", leave_out=not augment)
        if train_set.classes != val_set.classes:
            fail(f"train and val class folders differ: {sorted(set(train_set.classes) ^ set(val_set.classes))[:6]}")
        if args.train_list or args.per_class:
            train_set.samples = [train_set.samples[i] for i in select_train(
                train_set.samples, train_set.classes, args.train_list, args.per_class, args.seed)]
        if not args.logreg and len(train_set) < args.batch_size:
            fail(f"--batch_size {args.batch_size} is larger than the training set ({len(train_set)} images)")
    encoder.to(device)
    model = torch.compile(encoder) if args.compile else encoder
    if master_process:
        mode = f"evaluation of {args.eval_head} ({layout})" if args.eval_head else "logistic regression" \
            if args.logreg else "cached features" if args.cached else "streaming, augmented" if augment else \
            "streaming, centre crops"
        train = "" if args.eval_head else f"{len(train_set)} train / "
        print(f"probe ({mode}): encoder {model_args} from {args.init} ({args.pool} pooling, {dtype}), {train}"
              f"{len(val_set)} val images, {C} classes, {ddp_world_size} process(es)")
    if args.eval_head:
        evaluate_head(args, model, model_args, head, layout, val_set, device, autocast)
    elif args.logreg:
        logistic_regression(args, model, model_args, train_set, val_set, device, autocast)
    else:
        train_heads(args, model, model_args, resume_path, ckpt, train_set, val_set, device, autocast)
        return  # train_heads left together with every rank
    leave()


# ==== plumbing: the same in every stage script below this line ====
# Each stage script is meant to be copied alone with vit.py, so each carries this block. tests/test_layout.py keeps
# the copies equal (knn.py's without the training-only part); scripts/sync_plumbing.py copies an edit to all.

def fail(msg):  # the one line of every failure (on a line of its own under a progress bar), exit status 2
    tqdm.write(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def check_flags(args, rules):
    """rules: (flags, wanted, test) rows, plus those of the flags every script has. One line per flag out of its range
    (a list flag: any entry), then exit 2, before anything runs."""
    bad = []
    for flags, wanted, ok in rules + [("num_workers", ">= 0", lambda v: v >= 0),
                                      ("compile skip_bad_images", "0 or 1", lambda v: v in (0, 1)),
                                      ("stall_timeout", ">= 0 seconds", lambda v: v >= 0),
                                      ("device", "auto, cpu, cuda or cuda:N",
                                       lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v))]:
        for flag in flags.split():
            v = getattr(args, flag)
            if not all(ok(x) for x in (v if isinstance(v, list) else [v])):
                bad.append(f"error: --{flag} {' '.join(map(str, v)) if isinstance(v, list) else v} must be {wanted}")
    if args.wandb_run and not args.wandb:
        bad.append(f"error: --wandb_run {args.wandb_run} names a W&B run: it needs --wandb PROJECT")
    if bad:
        print("\n".join(bad), file=sys.stderr)
        sys.exit(2)
    if args.wandb and int(os.environ.get("RANK", 0)) == 0:  # rank 0 logs; a missing package is said now, not
        try:  # after the data is read and the model built
            import wandb  # noqa: F401 (optional: imported only with --wandb)
        except ImportError:
            fail("--wandb needs the wandb package: pip install wandb")


def compute_init(args, tf32=True):
    """Stop signals, DDP (torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; NCCL on GPUs, gloo on CPU), the device, the
    autocast dtype (bfloat16 where the GPU has it). -> ddp, ddp_rank, ddp_world_size, device, dtype, autocast"""
    for s in STOP_SIGNALS:
        signal.signal(s, on_stop)
    use_cuda = torch.cuda.is_available() if args.device == "auto" else args.device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        fail(f"--device {args.device}: torch finds no CUDA GPU on this machine (use --device cpu)")
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp and "TORCHELASTIC_RUN_ID" in os.environ:
        end_with_launcher()
    if ddp:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    WATCHDOG.start(args.stall_timeout)
    ddp_rank, ddp_world_size = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu"
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = True
    dtype = args.dtype if args.dtype != "auto" else "bfloat16" if use_cuda and torch.cuda.is_bf16_supported() \
        else "float32"
    autocast = nullcontext() if dtype == "float32" else torch.autocast(device.split(":")[0], getattr(torch, dtype))
    return ddp, ddp_rank, ddp_world_size, device, dtype, autocast


# SLURM and most schedulers warn with SIGTERM or SIGUSR1, a terminal with SIGINT (Ctrl-C): the run stops at its
# next log step (a feature extraction at its next batches), checkpointed, exit 0. A second Ctrl-C stops at once.
STOP_SIGNALS, STOP = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT), []


def on_stop(signum, frame):
    if signum == signal.SIGINT and signal.SIGINT in STOP:
        raise KeyboardInterrupt
    if signum == signal.SIGINT and int(os.environ.get("RANK", 0)) == 0:  # os.write: safe in a signal handler
        os.write(2, b"\nstopping (Ctrl-C again: at once)\n")
    STOP.append(signum)


class Stop(Exception):
    """A stop signal during a feature extraction: every rank leaves with the message, exit 0."""


def stop_requested(device):
    """A stop signal to any rank stops every rank at the same step (one process: no device read)."""
    if not dist.is_initialized():
        return bool(STOP)
    stop = torch.tensor(float(bool(STOP)), device=device)
    dist.all_reduce(stop, op=dist.ReduceOp.MAX)
    return bool(stop.item())


def leave(msg=""):
    """Every rank together (rank 0 may still be writing; gloo aborts otherwise), after the message."""
    if msg and int(os.environ.get("RANK", 0)) == 0:
        tqdm.write(msg)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# no wait without end, no process left behind

def cpu_seconds(pid, tid=""):
    """User + system CPU seconds a process (or one of its threads) has used (Linux /proc); None once it is gone, or
    without /proc."""
    try:
        with open(f"/proc/{pid}/{f'task/{tid}/' if tid else ''}stat") as f:
            fields = f.read().rpartition(")")[2].split()  # after the name, which may hold spaces
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def children(pid):
    """{pid: what} of the live processes pid started: data-loading workers and multiprocessing's resource tracker (not
    W&B's service: the stall watchdog neither counts its CPU as a loader's nor kills it)."""
    kids = {}
    for d in os.listdir("/proc") if os.path.isdir("/proc") else ():
        try:
            if d.isdigit() and int(open(f"/proc/{d}/stat").read().rpartition(")")[2].split()[1]) == pid:
                cmd = open(f"/proc/{d}/cmdline", "rb").read()
                if b"wandb-core" not in cmd:  # W&B's service (--wandb) samples system stats: no worker's work
                    kids[int(d)] = "resource tracker" if b"resource_tracker" in cmd else "worker"
        except (OSError, ValueError, IndexError):  # it ended while being read
            pass
    return kids


class Watchdog:
    """--stall_timeout S: a thread that watches every wait for a data loader's batch, its workers' start-up included.
    No batch for S seconds while the process or its workers compute (over 1% of a core) is a slow start: one note,
    and the wait goes on. No batch for S seconds and no CPU used is a stall (a worker blocked on a dead file system,
    a lock no one will release): one line naming the loader, the rank and the workers alive, then the Python stack of
    every thread of the process and of its workers (faulthandler), then exit 3, instead of waiting forever."""

    def __init__(self):
        self.timeout, self.where, self.since, self.waits, self.thread = 0, "", None, 0, None

    def start(self, timeout):
        self.timeout = timeout
        if timeout and self.thread is None:
            self.thread = threading.Thread(target=self.watch, daemon=True)
            self.thread.start()

    def batches(self, it, where):  # it's items, each wait for one watched
        while True:
            self.where, self.since, self.waits = where, time.monotonic(), self.waits + 1
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                self.since = None
            yield item

    def watch(self):
        tick, base, noted = min(5.0, self.timeout / 10), None, None
        while True:
            time.sleep(tick)
            waits, since, where = self.waits, self.since, self.where
            if since is None:
                continue
            procs = {os.getpid(): "main", **children(os.getpid())}  # the main thread only: not this one
            cpu, now = {p: cpu_seconds(p, p if what == "main" else "") for p, what in procs.items()}, time.monotonic()
            if base is None or base[0] != waits:  # a new wait: CPU counted from here
                base = (waits, now, cpu)
                continue
            if now - base[1] < self.timeout - tick:
                continue
            used = sum(max(0.0, c - base[2].get(p, 0.0)) for p, c in cpu.items() if c is not None)
            rank, waited = int(os.environ.get("RANK", 0)), now - since
            workers = sorted(p for p, what in procs.items() if what == "worker")
            if used <= 0.01 * (now - base[1]):
                self.stall(rank, where, waited, workers)
            if noted != waits:
                tqdm.write(f"note: rank {rank} has waited {waited:.0f} s for a batch of the {where} loader; its "
                           f"processes are computing ({used:.1f} CPU s in the last {now - base[1]:.0f} s): slow, not "
                           f"stalled, waiting on", file=sys.stderr)
                noted = waits
            base = (waits, now, cpu)

    def stall(self, rank, where, waited, workers):
        tqdm.write(f"error: stalled: rank {rank} has waited {waited:.0f} s for a batch of the {where} loader, and "
                   f"neither it nor its workers used any CPU for {self.timeout:g} s (--stall_timeout); workers alive: "
                   f"{' '.join(map(str, workers)) or 'none'}; the Python stacks follow", file=sys.stderr)
        sys.stderr.write(f"--- the main process, pid {os.getpid()} (the current thread is this watchdog's):\n")
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        for sig in (signal.SIGUSR2, signal.SIGKILL):  # each worker dumps its stack (quiet_worker registered SIGUSR2
            for p in workers:  # for that), then is killed
                if sig == signal.SIGUSR2:
                    sys.stderr.write(f"--- worker pid {p}:\n")
                    sys.stderr.flush()
                try:
                    os.kill(p, sig)
                except ProcessLookupError:  # it ended meanwhile: this thread must still reach the exit
                    continue
                time.sleep(0.5 if sig == signal.SIGUSR2 else 0)
        os._exit(3)


WATCHDOG = Watchdog()


def end_with_launcher():
    """torchrun starts each rank in a session of its own: a SIGKILL to torchrun would leave its ranks (and their
    workers) running. A thread ends this rank when torchrun is gone, however it ended."""
    launcher = os.getppid()

    def watch():
        while os.getppid() == launcher:
            time.sleep(1)
        os.write(2, f"error: torchrun (pid {launcher}) has ended; rank {os.environ['RANK']} ends with it\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()


# -----------------------------------------------------------------------------
# data: an image folder -> uint8 crops, cut and flipped by data-loading workers, resized and normalised on the GPU
IMG_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif")


def scan_image_folder(root):
    """[(path, class index)], classes: subfolders in string order ("0", "10", "2"), the images directly in each; names
    starting with "." (macOS ._* files, .ipynb_checkpoints) are not read. Images directly in root: unlabelled (-1)."""
    if not os.path.isdir(root):
        fail(f"missing split folder {root} (expected {root}/<class>/<image>)")
    entries = sorted((e.name, e.is_dir()) for e in os.scandir(root) if not e.name.startswith("."))
    classes = [name for name, is_dir in entries if is_dir]
    images = [name for name, is_dir in entries if not is_dir and name.lower().endswith(IMG_EXTS)]
    if images and classes:
        fail(f"{root} holds images and folders: put every image in a class folder, or all directly in {root}")
    if not classes:
        if not images:
            fail(f"no class folders or images in {root} (expected {root}/<class>/<image>)")
        return [(os.path.join(root, f), -1) for f in images], []
    samples = []
    for c, name in enumerate(classes):
        files = sorted(f for f in os.listdir(os.path.join(root, name)) if f.lower().endswith(IMG_EXTS) and f[0] != ".")
        if not files:
            fail(f"class folder {os.path.join(root, name)} holds no images ({', '.join(IMG_EXTS)})")
        samples += [(os.path.join(root, name, f), c) for f in files]
    return samples, classes


def to_rgb(img):
    """Any PIL image -> 8-bit RGB. convert("RGB") clips 16- and 32-bit integers at 255 and takes floats as 0-255: those
    are scaled (integers by 255 / 65535, floats by 255), or refused out of 0-65535 / [0, 1], as are modes it gets
    wrong (LAB): OSError, an unreadable image."""
    if img.mode in ("RGB", "1", "L", "P", "PA", "LA", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "HSV"):
        return img if img.mode == "RGB" else img.convert("RGB")
    if img.mode not in ("I", "F") and not img.mode.startswith("I;16"):
        raise OSError(f"image mode {img.mode} is not supported (save it as RGB)")
    a, (hi, scale) = np.asarray(img, dtype=np.float64), (1, 255) if img.mode == "F" else (65535, 255 / 65535)
    if not 0 <= a.min() <= a.max() <= hi:  # NaN fails too
        raise OSError(f"mode {img.mode} values span [{a.min():g}, {a.max():g}], outside [0, {hi}] (save it as RGB)")
    return Image.fromarray(np.rint(a * scale).astype(np.uint8)).convert("RGB")


class UnreadableImage(RuntimeError):
    """A DataLoader worker's arrives as UnreadableImage(its traceback): keep the last line, the message."""

    def __init__(self, msg):
        super().__init__(msg.strip().splitlines()[-1].partition("UnreadableImage: ")[2] or msg)


class ImageFolder(torch.utils.data.Dataset):
    """Items are (epoch, index) pairs, and every random draw of an item is a function of (seed, epoch, index) alone:
    any number of workers, any restart, the same crops. The stage's augmentation: boxes(rng, w, h) -> crop boxes,
    finish(crops, rng) -> the crops flipped, coloured. resize=False: crops leave the worker at their own size and
    crops_to_batch resizes them on the GPU (a third of a worker's time at 224 px). With skip_bad an unreadable image
    is replaced by the next one in training, left out in evaluations (leave_out: label -2, dropped)."""

    def __init__(self, root, img_size, boxes, finish=None, seed=0, skip_bad=False, resize=True, leave_out=False):
        self.samples, self.classes = scan_image_folder(root)
        self.root, self.img_size, self.boxes, self.finish, self.seed = root, img_size, boxes, finish, seed
        self.skip_bad, self.resize, self.leave_out, self.bad = skip_bad, resize, leave_out, 0

    def __len__(self):
        return len(self.samples)

    def fingerprint(self):  # the image list, wherever the folder is: its count and the names relative to root
        names = "\n".join(os.path.relpath(p, self.root) for p, _ in self.samples)
        return dict(images=len(self.samples), names_sha256=hashlib.sha256(names.encode()).hexdigest())

    def load(self, i, boxes_fn):
        """Decode image i, cut boxes_fn(w, h) -> (crops, label, index of the image used). JPEGs are decoded at reduced
        size (PIL draft: DCT scaling) when even the smallest crop stays at least twice img_size."""
        for attempt in range(len(self.samples)):
            j = (i + attempt) % len(self.samples)
            path = self.samples[j][0]
            try:
                img = Image.open(path)
                w, h = img.size
                boxes = boxes_fn(w, h)
                f = min(min(b[2] - b[0], b[3] - b[1]) for b in boxes) / self.img_size
                if f >= 2:
                    img.draft(None, (math.ceil(w / f), math.ceil(h / f)))
                k = round(w / img.size[0])  # the draft's DCT scale (1, 2, 4 or 8); it rounds sides up
                img, S = to_rgb(img), self.img_size
                if self.resize:  # crop + bicubic resize in one resample
                    crops = [img.resize((S, S), Image.BICUBIC, box=tuple(v / k for v in b)) for b in boxes]
                else:
                    crops = [img.crop(tuple(min(round(v / k), s) for v, s in zip(b, img.size * 2))) for b in boxes]
                return crops, self.samples[j][1], j
            except (OSError, Image.DecompressionBombError) as e:  # the bomb: over twice Image.MAX_IMAGE_PIXELS
                if not self.skip_bad:
                    raise UnreadableImage(f"unreadable image {path}: {e} "
                                          "(use --skip_bad_images 1 to skip such files)") from None
                self.bad += 1
                print(f"warning: skipping unreadable image {path} ({e}); {self.bad} skipped in this worker",
                      file=sys.stderr)
                if self.leave_out:
                    return [Image.new("RGB", (self.img_size, self.img_size))], -2, i
        raise UnreadableImage("no readable image in the dataset")

    def __getitem__(self, item):
        epoch, i = item
        rng = random.Random((self.seed * 1_000_003 + epoch) * 1_000_003 + i)
        crops, label, j = self.load(i, lambda w, h: self.boxes(rng, w, h))
        crops = self.finish(crops, rng) if self.finish and label != -2 else crops
        return [torch.from_numpy(np.array(c)) for c in crops], label, j  # V x (h, w, 3) uint8


def collate(batch):
    """Crops differ in size: one flat uint8 tensor (one shared-memory block per batch) and their (h, w), sample 0's
    views first. -> flat, sizes (n, 2), labels (b,), indices (b,)"""
    crops = [c for item in batch for c in item[0]]
    return (torch.cat([c.flatten() for c in crops]), torch.tensor([c.shape[:2] for c in crops]),
            torch.tensor([item[1] for item in batch]), torch.tensor([item[2] for item in batch]))


def crops_to_batch(flat, sizes, img_size, device):
    """collate's crops -> (n, 3, S, S) float in [0, 255] on the device, resized (bicubic, antialiased, as PIL)."""
    flat, out, o = flat.to(device, non_blocking=True).float(), [], 0  # one copy and one cast per batch
    for h, w in sizes.tolist():
        x = flat[o:o + h * w * 3].view(1, h, w, 3).permute(0, 3, 1, 2)  # (1, 3, h, w), a view
        o += h * w * 3
        out.append(x if (h, w) == (img_size, img_size) else
                   F.interpolate(x, size=(img_size, img_size), mode="bicubic", antialias=True))
    return torch.cat(out).clamp_(0, 255)  # bicubic overshoots at edges; PIL clamps too


def quiet_worker(worker_id):
    """worker_init_fn: stop signals are the main process's (timeout, SLURM, Ctrl-C signal every process of the job;
    start_workers blocks them until here). A worker dies with its main process."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if sys.platform == "linux":  # PR_SET_PDEATHSIG = 1: SIGKILL when the parent ends, however it ends
        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))
    faulthandler.register(signal.SIGUSR2, all_threads=True)  # the stall watchdog asks for this worker's stack
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # the parent ended while this worker started
        os._exit(0)


def make_loader(dataset, batch_size, sampler, num_workers, device, persistent=True):
    """Workers are started fresh ("spawn"), never forked: a fork while another thread starts or ends can leave the
    new worker waiting forever on a lock held at the fork (CPython gh-112275). Each is a new Python that imports torch
    (seconds of CPU), so no more start than there are batches, or CPUs for this process (its share of the node's)."""
    total = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    cpus = max(1, total // local)
    if num_workers > cpus and not NOTED_CPUS and int(os.environ.get("RANK", 0)) == 0:
        print(f"note: {cpus} data-loading worker(s) per process, not --num_workers {num_workers}: this machine has "
              f"{total} CPU(s) for {local} process(es)", file=sys.stderr)
        NOTED_CPUS.append(cpus)
    num_workers = min(num_workers, cpus, -(-len(sampler) // batch_size))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                       pin_memory=device != "cpu", persistent_workers=persistent and num_workers > 0,
                                       collate_fn=collate, worker_init_fn=quiet_worker,
                                       multiprocessing_context="spawn" if num_workers else None)


NOTED_CPUS = []  # the note on the workers' count: once per process


def start_workers(loader, where):
    """The loader's batches, each wait for one watched by the stall watchdog. The stop signals are held back while
    iter(loader) starts workers (they inherit the mask): one would die of them before ignoring them. Spawn's resource
    tracker is started first: starting, it unblocks SIGINT and SIGTERM."""
    if loader.num_workers:
        multiprocessing.resource_tracker.ensure_running()
        os.environ["MAECT_PARENT"] = str(os.getpid())  # a worker that starts after this process ended leaves at once

    def batches():
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            it = iter(loader)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        yield from it
    return WATCHDOG.batches(batches(), where)  # the workers start in the first wait


def shut_down():
    """Every way out (__main__'s finally): stop signals ignored (the exit restores their default action, which would
    kill the process mid-exit); the workers, which ignore the loader's SIGTERM, killed; torch's SIGCHLD handler off."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for p in multiprocessing.active_children():
        p.kill()
        p.join()


@torch.no_grad()
def extract_features(encoder, dataset, how, dim, batch_size, num_workers, device, autocast, desc="features",
                     loader=None):
    """Pooled features (N, dim) float32 and labels (N,) of dataset on every rank, in dataset order, unreadable images
    left out. Rank r encodes images r, r + world, ...; gathered in order, so any number of processes gives the same
    result. A stop signal ends it within a few batches, every rank together: Stop."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    n, b = len(dataset), max(1, batch_size // world)
    per = -(-n // world)  # images per rank; the short ranks' last row stays padding
    loader = loader or make_loader(dataset, b, [(0, i) for i in range(rank, n, world)], num_workers, device, False)
    feats, labels = torch.zeros(per, dim, device=device), torch.full((per,), -3, dtype=torch.long, device=device)
    together, j = -(-(n // world) // b), 0  # batches every rank has: where they agree on a stop
    try:
        for s, (flat, sizes, y, _) in enumerate(tqdm(start_workers(loader, desc), total=len(loader), desc=desc,
                                                     disable=rank != 0, dynamic_ncols=True, leave=False)):
            if s < together and (s % 8 == 0 or world == 1) and stop_requested(device):
                raise Stop(f"stopped by signal while extracting the {desc} features ({j * world} of {n} images)")
            with autocast:
                f = vit.pool(encoder(vit.normalize(crops_to_batch(flat, sizes, dataset.img_size, device))), how)
            feats[j:j + len(f)], labels[j:j + len(f)] = f.float(), y.to(device)
            j += len(f)
    except UnreadableImage as e:  # from a worker or not: one line (main() may run in the caller's process)
        fail(str(e))
    if world > 1:  # gathered: (per, world, ...), row q * world + r is image q * world + r
        parts = [[torch.empty_like(t) for _ in range(world)] for t in (feats, labels)]
        for part, t in zip(parts, (feats, labels)):
            dist.all_gather(part, t)
        feats, labels = (torch.stack(part, dim=1).flatten(0, 1) for part in parts)
    feats, labels = feats[:n], labels[:n]
    keep = labels != -2
    if not keep.all() and rank == 0:
        tqdm.write(f"warning: {(~keep).sum().item()} unreadable images of {dataset.root} left out", file=sys.stderr)
    return feats[keep], labels[keep]


# -----------------------------------------------------------------------------
# out_dir: one run at a time, files written whole, no run writes into another's files
RUN_FILES = re.compile(r"(ckpt_\d+|mae|head|ct|probe|logreg)\.pt|recon_\d+\.png|log\.txt|tb")


def lock_out_dir(out_dir):
    """Rank 0: out_dir created and locked until this process ends: a second run into it is refused before it writes.
    A kernel lock (fcntl), dropped when the process dies however it dies; the file names the holder."""
    path, pid = os.path.join(out_dir, "lock"), os.getpid()
    me = f"pid {pid} on host {socket.gethostname()}"
    try:
        os.makedirs(out_dir, exist_ok=True)
        if not os.access(out_dir, os.W_OK):
            fail(f"cannot write to --out_dir {out_dir}: permission denied")
        while True:  # until the file locked is the one at path: a holder removes it as it ends
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except (BlockingIOError, PermissionError):  # held by a live process
                holder = os.read(fd, 200).decode(errors="replace").strip() or "a run that is starting"
                fail(f"--out_dir {out_dir} is in use by another run ({holder}): wait for it, use another out_dir, "
                     f"or if that run is gone (its node died), delete {path}")
            except OSError as e:  # a file system without locks: run, but say so
                print(f"warning: cannot lock {path} ({e.strerror}): a second run would not be stopped", file=sys.stderr)
            if os.path.exists(path) and os.path.samestat(os.fstat(fd), os.stat(path)):
                break
            os.close(fd)
        stale = os.read(fd, 200).decode(errors="replace").strip()
        if stale and stale != me:  # (me: main() called again in one process)
            print(f"warning: taking over the lock {path} of {stale}, which ended without releasing it", file=sys.stderr)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{me}\n".encode(), 0)
    except OSError as e:  # FileExistsError: out_dir is a file
        fail(f"cannot write to --out_dir {out_dir}: "
             f"{'it is a file' if isinstance(e, FileExistsError) else e.strerror}")
    atexit.register(lambda: os.getpid() == pid and os.path.exists(path) and os.remove(path))  # not in the workers


def claim_out_dir(out_dir, stage, append=False, resume="", ckpt_path=""):
    """Rank 0, before the first write: a run never deletes, overwrites or appends to another run's files. Continuing a
    checkpoint of out_dir, it owns them; appending to a log (an evaluation, or --resume auto after a run of its stage
    that stopped before a checkpoint), it takes a log.txt whose lines are all of its stage."""
    found = sorted(f for f in os.listdir(out_dir) if RUN_FILES.fullmatch(f))
    if not found or ckpt_path and os.path.samefile(os.path.dirname(os.path.abspath(ckpt_path)), out_dir):
        return
    path = os.path.join(out_dir, "log.txt")
    try:
        stages = {json.loads(line).get("stage") for line in open(path)} if os.path.exists(path) else set()
    except (ValueError, AttributeError):
        stages = {None}
    logs_only = not [f for f in found if f.endswith(".pt")] and (append or resume == "auto")
    if not (logs_only and stages == {stage}):
        fail(f"--out_dir {out_dir} holds another run's files ({', '.join(found[:3])}{', ...' * (len(found) > 3)}): "
             + ("continue that run with --resume auto, or use another --out_dir" if not append else
                "use another --out_dir"))


def log_line(out_dir, stage, entry):
    """Rank 0: a JSON line, the stage first, appended to out_dir/log.txt; a full disk: one line, the file as it was."""
    path, line = os.path.join(out_dir, "log.txt"), (json.dumps(dict(stage=stage, **entry)) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    size = os.fstat(fd).st_size
    try:
        if os.write(fd, line) != len(line):
            raise OSError(28, os.strerror(28))  # ENOSPC, after a partial write
    except OSError as e:
        os.ftruncate(fd, size)
        fail(f"cannot write {path}: {e.strerror} (its earlier lines and every checkpoint are intact)")
    finally:
        os.close(fd)


def scalars(entry, prefix=""):
    """The numbers of a log line, flat as TensorBoard and W&B take them: lists and dicts by position or key (loss/0,
    knn_top1/10); strings left out (they are flags, in the W&B run's config). -> (name, number) pairs"""
    for k, v in entry.items():
        if isinstance(v, (list, dict)):
            yield from scalars({str(i): x for i, x in (v.items() if isinstance(v, dict) else enumerate(v))},
                               f"{prefix}{k}/")
        elif isinstance(v, (int, float)):
            yield prefix + k, v


def start_wandb(args, stage, run_id=None):
    """--wandb PROJECT, rank 0: a W&B run (run_id: that run continued, as a resumed run does), the flags as its config,
    its files in out_dir/wandb (WANDB_MODE=offline: there until `wandb sync`). -> the run, or None"""
    if not args.wandb or int(os.environ.get("RANK", 0)) != 0:
        return None
    import wandb  # check_flags found it
    try:
        return wandb.init(project=args.wandb, name=args.wandb_run or None, id=run_id, resume="allow",
                          config=vars(args), dir=args.out_dir or None, job_type=stage)
    except wandb.Error as e:  # not logged in, no network: one line, as every failure
        fail(f"--wandb {args.wandb}: {e}")


def log_result(args, stage, entry):
    """Rank 0: an evaluation's result, a line of out_dir/log.txt (given an out_dir) and with --wandb a W&B run of its
    own holding its numbers."""
    if args.out_dir:
        log_line(args.out_dir, stage, entry)
    run = start_wandb(args, stage)
    if run is not None:
        run.log(dict(scalars(entry)))
        run.finish()


def save_atomic(obj, path):
    """torch.save (a PIL image: PNG) to a temp file, flushed, renamed: a crash or a full disk leaves the previous file
    intact, and a failed write (no space, a quota) removes the temp file."""
    try:
        with open(path + ".tmp", "wb") as f:
            obj.save(f, format="PNG") if isinstance(obj, Image.Image) else torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:  # torch.save's zip writer can turn a failed write into a RuntimeError
        os_error = e if isinstance(e, OSError) else e.__context__
        if not isinstance(os_error, OSError):
            raise
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        fail(f"cannot write {path}: {os_error.strerror or os_error} (earlier checkpoints are intact)")


# ---- training only: the rest of the block up to the end of training only (knn.py trains nothing) ----

def get_lr(it, lr, min_lr, warmup_iters, max_iters):
    """Per optimizer step: linear warmup, lr * (it + 1) / (warmup_iters + 1) at step it < warmup_iters (the authors'
    schedule: the first step does not run at lr 0), then cosine from lr at warmup_iters to min_lr."""
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    progress = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def random_resized_crop(rng, w, h, scale, ratio=(3 / 4, 4 / 3)):
    """Crop box (left, top, right, bottom) of RandomResizedCrop, drawn with rng."""
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return x, y, x + cw, y + ch
    aspect = min(max(w / h, ratio[0]), ratio[1])  # fall back to a centre crop
    cw, ch = (w, round(w / aspect)) if w / h < aspect else (round(h * aspect), h)
    cw, ch = min(cw, w), min(ch, h)
    return (w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch


def flip_each(crops, rng):  # horizontal flip, p 0.5 per crop
    return [c.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else c for c in crops]


def centre_square(rng, w, h):  # the centre square of the image: the k-NN monitor's crop
    s = min(w, h)
    return [((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)]


class ShardSampler(torch.utils.data.Sampler):
    """An epoch-seeded permutation; step s takes the global batch perm[s*B:(s+1)*B], this rank its slice, so the
    global batch does not depend on the number of processes. The last incomplete batch dropped; start_step: resume."""

    def __init__(self, n, batch_size, rank, world, seed):
        self.n, self.batch_size, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.steps = n // batch_size
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)[: self.steps * self.batch_size]
        per_rank = perm.view(self.steps, self.world, -1)[self.start_step:, self.rank].reshape(-1)
        return iter([(self.epoch, int(i)) for i in per_rank])

    def __len__(self):
        return (self.steps - self.start_step) * (self.batch_size // self.world)


def train_loader(dataset, args, device):
    """The training loader: each process takes its share of the global batch, in --grad_accum micro-batches."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    accum = getattr(args, "grad_accum", 1)
    if args.batch_size % (world * accum):
        fail(f"--batch_size {args.batch_size} is not divisible by processes ({world})" +
             (f" x --grad_accum ({accum})" if hasattr(args, "grad_accum") else ""))
    if len(dataset) < args.batch_size:
        fail(f"--batch_size {args.batch_size} is larger than the training set ({len(dataset)} images)")
    sampler = ShardSampler(len(dataset), args.batch_size, rank, world, args.seed)
    return make_loader(dataset, args.batch_size // world // accum, sampler, args.num_workers, device)


def epochs(sampler, iter_num):
    """Sets the sampler to each epoch from step iter_num on: a resumed run starts mid-epoch where it stopped."""
    while True:
        sampler.set_epoch(iter_num // sampler.steps, start_step=iter_num % sampler.steps)
        yield
        iter_num = (iter_num // sampler.steps + 1) * sampler.steps


def train_batches(loader, iter_num):
    """The loader's (micro-)batches from step iter_num on, epoch after epoch."""
    for _ in epochs(loader.sampler, iter_num):
        yield from start_workers(loader, "training")


def start_run(args, stage, final_name, resume_flags):
    """Rank 0 locks out_dir; every rank finds the checkpoint to continue (--resume PATH, or auto: the final file, else
    the newest checkpoint; a truncated one gives way to the one before), made with the same resume_flags."""
    if int(os.environ.get("RANK", 0)) == 0:
        lock_out_dir(args.out_dir)
    path, ckpt, final = args.resume, None, os.path.join(args.out_dir, final_name)
    try:
        if args.resume and args.resume != "auto":
            ckpt = vit.load_checkpoint(path, expect=stage)
        paths = [final] * os.path.exists(final) + sorted(glob.glob(os.path.join(args.out_dir, "ckpt_*.pt")))[::-1]
        for path, previous in zip(paths, paths[1:] + [None]) if args.resume == "auto" else ():
            try:
                ckpt = vit.load_checkpoint(path)
            except ValueError as e:
                if previous is None:
                    raise
                if int(os.environ.get("RANK", 0)) == 0:
                    print(f"warning: {e}; resuming from the previous checkpoint {previous}", file=sys.stderr)
                continue
            if ckpt.get("stage") != stage:
                raise ValueError(f"--out_dir {args.out_dir} holds another stage's files ({path} is a "
                                 f"{ckpt.get('stage', 'foreign')} checkpoint): use another --out_dir")
            break
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    for k in resume_flags if ckpt is not None else ():
        if ckpt["args"].get(k) != getattr(args, k):
            fail(f"{path} was made with --{k} {ckpt['args'].get(k)}, this run has --{k} {getattr(args, k)}")
    if ckpt is not None and int(os.environ.get("RANK", 0)) == 0:
        print(f"resuming from {path} at iteration {ckpt['iter_num']}")
    return (path, ckpt) if ckpt is not None else ("", None)


class Run:
    """A training loop's bookkeeping, so that the loop shows the method: out_dir's ownership, the data it continues on,
    progress bar, log line, TensorBoard and W&B, a non-finite check and stop signals read at log steps only (a read
    every step makes the CPU wait for the GPU), stages 2-3's nearest-neighbour accuracy, the one save-or-stop path."""

    def __init__(self, args, stage, resume_path, ckpt, iter_num, max_iters, steps_per_epoch, data, device,
                 nn_acc=False):
        self.args, self.stage, self.out_dir, self.max_iters = args, stage, args.out_dir, max_iters
        self.steps_per_epoch, self.device, self.master = steps_per_epoch, device, int(os.environ.get("RANK", 0)) == 0
        self.data = [d.fingerprint() for d in data]
        if ckpt is not None and ckpt.get("data", self.data) != self.data:
            counts = [" + ".join(str(d["images"]) for d in x) for x in (ckpt["data"], self.data)]
            fail(f"{resume_path} was made on other images than --data_path {args.data_path} holds ({counts[0]} "
                 f"images then, {counts[1]} now, or other names): resume on those images, or start a new run in "
                 f"another --out_dir")
        if self.master:
            claim_out_dir(self.out_dir, stage, resume=args.resume, ckpt_path=resume_path)
        own = ckpt is not None and os.path.samefile(os.path.dirname(os.path.abspath(resume_path)), self.out_dir)
        self.ckpts = list(ckpt.get("ckpts", [os.path.basename(resume_path)] * ("ckpt_" in resume_path))) if own else []
        self.written = ckpt is not None  # a good checkpoint to point to
        self.nn_acc = nn_acc and all(d.classes for d in data)  # without labels there is nothing to count
        if nn_acc and not self.nn_acc and self.master:
            print(f"no class folders in {data[0].root}: the nearest-neighbour accuracy monitor is off")
        self.monitor = dict(ckpt["monitor"]) if ckpt and nn_acc else dict(epoch=-1, correct=0.0, count=0)
        self.pending, self.window = [], []  # accuracies per step: still on the device / since the last log line
        self.nonfinite_at = torch.tensor(-1, device=device)  # the first iteration with a non-finite loss
        self.tb = tensorboard(self.out_dir, iter_num) if getattr(args, "tensorboard", 0) and self.master else None
        # the W&B run of this out_dir's checkpoints, continued on resume; its id is kept by a run without --wandb too,
        # so that a later one with it still continues that W&B run (a checkpoint of another out_dir: a new W&B run)
        self.wandb_id = ckpt.get("wandb_id") if own else None
        self.wandb = start_wandb(args, stage, self.wandb_id)
        self.wandb_id = self.wandb.id if self.wandb is not None else self.wandb_id
        self.pbar = tqdm(total=max_iters, initial=iter_num, disable=not self.master, dynamic_ncols=True)
        self.t0, self.images, self.at_log, self.postfix, self.knn_top1 = time.time(), 0, False, {}, None

    def log(self, entry, image=None):  # rank 0: a log line (and its numbers, an image, to TensorBoard and W&B)
        if self.master:
            log_line(self.out_dir, self.stage, entry)
        numbers = [(k, x) for k, x in scalars(entry) if k not in ("iter", "epoch")]  # the step: iter
        if self.tb is not None:
            for k, x in numbers:
                self.tb.add_scalar(k, x, entry["iter"])
            if image is not None:
                self.tb.add_image(image[0], np.asarray(image[1]), entry["iter"], dataformats="HWC")
            self.tb.flush()
        if self.wandb is not None:  # a line without iter (the probe's final summary): W&B's own step
            import wandb
            self.wandb.log(dict(numbers, **({image[0]: wandb.Image(image[1])} if image is not None else {})),
                           step=entry.get("iter"))

    def check_finite(self):  # every rank, at log steps and before each checkpoint or evaluation
        if self.nonfinite_at.item() >= 0:
            self.pbar.close()  # the error on its own line
            fail(f"non-finite loss at iteration {self.nonfinite_at.item()}; " + (
                f"the last good checkpoint is in {self.out_dir}" if self.written else "no checkpoint was written yet"))

    def flush_acc(self):  # pending -> the log window and the epoch's monitor, in one device read
        vals = torch.stack(self.pending).tolist() if self.pending else []
        self.pending.clear()
        self.window.extend(vals)
        self.monitor["correct"] += sum(vals)
        self.monitor["count"] += len(vals)

    def step(self, iter_num, loss, lr=None, acc=None, grad_norm=None):
        """After each optimizer step: its loss (a device scalar or vector), lr, nearest-neighbour accuracy, gradient
        norm; at log steps the log line."""
        self.nonfinite_at = torch.where((self.nonfinite_at < 0) & ~torch.isfinite(loss).all(), iter_num - 1,
                                        self.nonfinite_at)
        self.images += self.args.batch_size
        self.pbar.update(1)
        if self.nn_acc:
            if self.monitor["epoch"] != (iter_num - 1) // self.steps_per_epoch:
                self.monitor = dict(epoch=(iter_num - 1) // self.steps_per_epoch, correct=0.0, count=0)
            self.pending.append(acc)
        self.at_log = iter_num % self.args.log_interval == 0 or iter_num == self.max_iters
        if self.at_log:
            self.check_finite()
            world = dist.get_world_size() if dist.is_initialized() else 1
            if world > 1:  # the loss of the global batch, not only rank 0's share
                loss = loss.clone()
                dist.all_reduce(loss)
            loss = [v / world for v in loss.tolist()] if loss.ndim else loss.item() / world
            entry = dict(iter=iter_num, epoch=round(iter_num / self.steps_per_epoch, 3),
                         loss=[round(v, 5) for v in loss] if isinstance(loss, list) else round(loss, 5))
            if self.nn_acc:
                self.flush_acc()
                entry["nn_acc"] = round(sum(self.window) / len(self.window), 4)
                self.window.clear()
            entry.update({} if lr is None else dict(lr=lr), img_per_s=round(self.images / (time.time() - self.t0), 1),
                         **({} if grad_norm is None else dict(grad_norm=round(grad_norm.item(), 5))))
            self.postfix.update(loss=f"{min(loss) if isinstance(loss, list) else loss:.4f}",
                                **{k: f"{entry[k]:.3f}" for k in ("nn_acc",) if k in entry},
                                **({"lr": f"{lr:.2e}"} if lr is not None else {}), img_s=f"{entry['img_per_s']:.0f}")
            self.pbar.set_postfix(self.postfix)
            self.log(entry)
            self.t0, self.images = time.time(), 0

    def show(self, msg, **postfix):  # rank 0: a line above the progress bar, and numbers in it
        self.postfix.update(postfix)
        if self.master:
            self.pbar.write(msg)
            self.pbar.set_postfix(self.postfix)

    def save(self, name, checkpoint):
        """Every rank checks, rank 0 writes checkpoint() and the run's state; of the periodic checkpoints this run
        wrote, the newest keep_last stay."""
        self.check_finite()
        self.flush_acc()
        ckpts = self.ckpts + [name] * (name.startswith("ckpt_") and name not in self.ckpts)
        keep = ckpts[-self.args.keep_last:] if self.args.keep_last else ckpts
        if self.master:
            ckpt = dict(checkpoint(), data=self.data, ckpts=keep)
            if self.wandb_id:  # the W&B run that resuming from this file continues
                ckpt["wandb_id"] = self.wandb_id
            if self.nn_acc:
                ckpt["monitor"] = dict(self.monitor)
            save_atomic(ckpt, os.path.join(self.out_dir, name))
            for old in ckpts[:len(ckpts) - len(keep)]:
                if os.path.exists(os.path.join(self.out_dir, old)):
                    os.remove(os.path.join(self.out_dir, old))
        self.ckpts, self.written = keep, True

    def save_or_stop(self, iter_num, checkpoint, evaluate=None):
        """After step(): a stop is read at log steps before the last (the last writes the final file). The checkpoint
        due, or before an evaluation that reads images (a bad val image cannot cost the training), the evaluation,
        the epoch's accuracy, the stop: every rank leaves, exit 0."""
        stop = self.at_log and iter_num < self.max_iters and stop_requested(self.device)
        if iter_num < self.max_iters and (iter_num % self.args.ckpt_interval == 0 or stop or evaluate is not None):
            self.save(f"ckpt_{iter_num:08d}.pt", checkpoint)
        if evaluate is not None and iter_num < self.max_iters and not stop:
            self.evaluate(evaluate, iter_num)
        if self.nn_acc and iter_num % self.steps_per_epoch == 0:  # an epoch's end: the accuracy of all its steps
            self.flush_acc()
            acc, epoch = self.monitor["correct"] / max(1, self.monitor["count"]), iter_num // self.steps_per_epoch
            self.log(dict(iter=iter_num, epoch=epoch, nn_acc_epoch=round(acc, 4)))
            self.show(f"epoch {epoch}: nearest-neighbour accuracy {acc:.4f}" +
                      (f", k-NN top-1 {self.knn_top1:.2f}" if self.knn_top1 is not None else ""))
        if stop:
            leave(f"stopped by signal at iteration {iter_num}; to continue, run the same command with --resume auto")
            sys.exit(0)

    def evaluate(self, evaluate, iter_num):
        self.check_finite()  # every rank; nothing is evaluated from non-finite weights
        try:
            evaluate()
        except Stop as e:  # in an evaluation's feature extraction: the checkpoint of this step is written
            raise Stop(f"{e} at iteration {iter_num}; to continue, run the same command with --resume auto") from None

    def finish(self, final_name, checkpoint, after=None):
        """The final file, then after() (the last evaluation, a summary), then every rank leaves."""
        self.pbar.close()
        self.save(final_name, checkpoint)
        if self.master:
            print(f"wrote {os.path.join(self.out_dir, final_name)}")
        if after is not None:
            self.evaluate(after, self.max_iters)
        if self.wandb is not None:  # (a stop or an error: wandb ends its run as the process exits)
            self.wandb.finish()
        leave()


def tensorboard(out_dir, iter_num):  # --tensorboard: event files in out_dir/tb (a resumed run drops later steps)
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        fail("--tensorboard 1 needs the tensorboard package: pip install tensorboard")
    return SummaryWriter(os.path.join(out_dir, "tb"), purge_step=iter_num or None)


def clip_grad(params, max_norm, scaler, optimizer):
    """--clip_grad: the total gradient norm clipped to max_norm (after the fp16 scaler's unscale) -> the norm before,
    on the device, or None when off."""
    if not max_norm:
        return None
    scaler.unscale_(optimizer)
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def due(iter_num, *evaluations):
    """(interval, fn) pairs -> one callable of the evaluations due at this step, or None (interval 0, fn None: off)."""
    fns = [fn for interval, fn in evaluations if interval and fn and iter_num % interval == 0]
    return (lambda: [fn() for fn in fns]) if fns else None


class KnnMonitor:
    """--knn_interval: k-NN top-1 (k 10, weights exp(sim / 0.07): knn.py's rule, ties aside) of an encoder on fixed,
    seeded subsets of train (the bank) and val (the queries), centre squares; any number of processes, one number."""

    def __init__(self, args, img_size, device, autocast):
        self.args, self.device, self.autocast, self.sets, self.loaders = args, device, autocast, [], []
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        for split, size in (("train", args.knn_bank), ("val", args.knn_queries)):
            ds = ImageFolder(os.path.join(args.data_path, split), img_size, centre_square, None, 0,
                             args.skip_bad_images, resize=device == "cpu", leave_out=True)
            if not ds.classes:
                fail(f"--knn_interval needs class folders in {ds.root}: the monitor counts labels")
            ds.samples = [ds.samples[i] for i in sorted(random.Random(args.seed).sample(range(len(ds)),
                                                                                         min(size, len(ds))))]
            self.sets.append(ds)
            self.loaders.append(make_loader(ds, max(1, 256 // world), [(0, i) for i in range(rank, len(ds), world)],
                                            args.num_workers, device))
        if self.sets[0].classes != self.sets[1].classes:
            fail(f"train and val class folders differ: {sorted(set(self.sets[0].classes) ^ set(self.sets[1].classes))}")

    @torch.no_grad()
    def __call__(self, encode, dim, pool):
        """encode: images -> tokens (B, 1+N, D). -> top-1 (%); its cost in seconds -> self.seconds"""
        t0 = time.time()
        (bank, bank_labels), (queries, labels) = (
            extract_features(encode, ds, pool, dim, 256, 0, self.device, self.autocast, desc, loader)
            for ds, loader, desc in zip(self.sets, self.loaders, ("k-NN bank", "k-NN queries")))
        bank, queries = F.normalize(bank, dim=1), F.normalize(queries, dim=1)
        votes = torch.zeros(len(queries), len(self.sets[0].classes), device=self.device)
        for s in range(0, len(queries), 1024):  # (c, bank) similarities, block by block
            sim, idx = (queries[s:s + 1024] @ bank.T).topk(min(10, len(bank)), dim=1)
            votes[s:s + 1024].scatter_add_(1, bank_labels[idx], (sim / 0.07).exp())
        top1 = 100.0 * (votes.argmax(1) == labels).double().mean().item()
        self.seconds = time.time() - t0
        return top1

# ---- end of training only ----


if __name__ == "__main__":
    try:
        main(parser.parse_args())
    except UnreadableImage as e:  # one line, as for every bad input
        fail(str(e))
    except Stop as e:  # stopped in a feature extraction: nothing half-written
        leave(str(e))
        sys.exit(0)
    except RuntimeError as e:  # a collective whose peer has ended: one line here, that rank's error is above
        if not (dist.is_initialized() and re.search(r"(closed|reset) by peer|remote process exited", str(e))):
            raise
        fail(f"rank {dist.get_rank()} lost another rank ({str(e).split('] ')[-1].split('. ')[0]}): its error is above")
    except KeyboardInterrupt:  # the second Ctrl-C
        tqdm.write("stopped at once by a second Ctrl-C; what the last checkpoint holds is kept", file=sys.stderr)
        sys.exit(130)
    finally:
        shut_down()
