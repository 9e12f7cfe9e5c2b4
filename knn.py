"""
k-NN classification and k-means clustering of a frozen encoder's features. k-NN (DINO / MAE-CT protocol): the train
split is the bank, the val split the queries; centre-crop features, pooled, L2-normalised, cosine similarity; the k
nearest bank images vote for their class with weight exp(sim / T). --kmeans: k-means on the L2-normalised features of
one split (k-means++ starts, Lloyd's iterations), scored against the classes: ACC (clusters matched one-to-one to
classes, Hungarian), NMI (arithmetic mean normalisation) and ARI; several seeded runs, their mean and best.

    python knn.py --data_path DATA --init out/ct/ct.pt --pool mean --k 10 20
    python knn.py --data_path DATA --init out/ct/ct.pt --pool mean --kmeans --kmeans_runs 5
    torchrun --nproc_per_node 8 knn.py --data_path DATA --init ct.pt    # features in shares, the same result

--init takes any checkpoint vit.load_encoder reads: this project's mae.pt / ct.pt (--which ema|online),
facebookresearch/mae's, the MAE-CT releases, or a release by name (--init maect_base16: downloaded once into
torch hub's cache, see vit.py). Prints top-1 per k (or the clustering table); with --out_dir, appends a JSON line to
out_dir/log.txt; with --wandb PROJECT, the numbers are also a W&B run of their own. --show N (k-NN, with --out_dir):
out_dir/neighbours.png, N seeded val queries, each followed by its k nearest train images (k: the smallest --k),
those of another class framed red, the others green.
"""
import argparse
import atexit
import ctypes
import faulthandler
import fcntl
import functools
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
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

import vit

# -----------------------------------------------------------------------------
# the method: the k-NN vote and k-means on L2-normalised features (REFERENCE §5), their scores, the evaluation crop,
# the picture of the neighbours


def prepare_features(bank, queries, standardize=False):
    """Optionally standardise both with the bank's per-dimension mean and std, (x - mean) / (unbiased std
    + 1e-5) as the authors' code does, then L2-normalise every row: a dot product is the cosine similarity."""
    if standardize:
        mean, std = bank.mean(0), bank.std(0) + 1e-5
        bank, queries = (bank - mean) / std, (queries - mean) / std
    return F.normalize(bank, dim=1), F.normalize(queries, dim=1)


@torch.no_grad()
def knn_classify(bank, bank_labels, queries, ks, temperature, num_classes, chunk=1024, return_neighbours=False):
    """bank (Nb, D) and queries (Nq, D): L2-normalised, same dtype and device; bank_labels (Nb,) int64.
    Returns {k: predicted class (Nq,)}; with return_neighbours also the bank indices of every query's kmax nearest,
    (Nq, kmax) int64 in the order below (the k nearest are its first k columns). The (Nq, Nb) similarity matrix is
    never built: each block of `chunk` queries, (chunk, Nb), is reduced to its kmax nearest neighbours right away.

    Neighbour order: decreasing similarity, and among equal similarities increasing bank index (torch.topk
    leaves the order of ties unspecified, so ties at the kmax-th place are redone and the kept ones
    re-sorted; results then depend neither on the device nor on the chunk size). Vote: class c scores
    sum(exp(sim / T)) over the k nearest of class c; equal scores go to the lowest class index
    (argmax returns the first maximum)."""
    kmax = max(ks)
    if kmax > len(bank):
        raise ValueError(f"k = {kmax} is larger than the bank ({len(bank)} images)")
    preds, neighbours = {k: [] for k in ks}, []
    for s in range(0, len(queries), chunk):
        sim = queries[s:s + chunk] @ bank.T  # (c, Nb)
        vals, idx = sim.topk(kmax, dim=1)  # (c, kmax) each
        kth = vals[:, -1:]  # (c, 1)
        redo = ((sim == kth).sum(1) > (vals == kth).sum(1)).nonzero()[:, 0].tolist()
        for r in redo:  # rare: exact ties straddle the kmax-th place; keep the lowest bank indices
            above = (sim[r] > kth[r]).nonzero()[:, 0]
            tied = (sim[r] == kth[r]).nonzero()[:, 0][:kmax - len(above)]
            idx[r] = torch.cat([above, tied])
            vals[r] = sim[r, idx[r]]
        order = idx.argsort(dim=1, stable=True)  # by index, then (stable) by decreasing similarity
        idx, vals = idx.gather(1, order), vals.gather(1, order)
        order = vals.argsort(dim=1, descending=True, stable=True)
        idx, vals = idx.gather(1, order), vals.gather(1, order)
        neighbours.append(idx)
        labels, weights = bank_labels[idx], (vals / temperature).exp()  # (c, kmax) each
        for k in ks:
            votes = torch.zeros(len(sim), num_classes, dtype=weights.dtype, device=weights.device)
            votes.scatter_add_(1, labels[:, :k], weights[:, :k])  # (c, classes)
            preds[k].append(votes.argmax(dim=1))
    preds = {k: torch.cat(p) for k, p in preds.items()}
    return (preds, torch.cat(neighbours)) if return_neighbours else preds


def sq_dists_argmin(x, x_sq, centroids, chunk):
    """For every row of x (N, D) (x_sq: its squared norms), the nearest centroid (C, D) and its squared distance,
    chunk rows at a time: the (N, C) distance matrix is never built whole. -> (N,) int64, (N,) float32"""
    c_sq = centroids.square().sum(1)
    idx, d2 = torch.empty(len(x), dtype=torch.long, device=x.device), torch.empty(len(x), device=x.device)
    for s in range(0, len(x), chunk):
        best = (c_sq - 2 * x[s:s + chunk] @ centroids.T).min(dim=1)  # (c, C): ||x - c||^2 - ||x||^2
        idx[s:s + chunk], d2[s:s + chunk] = best.indices, (best.values + x_sq[s:s + chunk]).clamp_(min=0)
    return idx, d2


@torch.no_grad()
def kmeans(x, k, seed, max_iters=300, chunk=None):
    """k-means of x (N, D) float32: a k-means++ start (the first centre uniform, each next one drawn with probability
    proportional to the squared distance to the nearest centre so far; seeded), then Lloyd's iterations until no
    assignment changes, or max_iters. Centroids in float32, their sums in float64. A cluster left empty is re-seeded
    with the point farthest from its own centroid (the farthest ones, for several), as scikit-learn does.
    -> (assignment (N,) int64, centroids (k, D), inertia, iterations, converged)"""
    g = torch.Generator(device=x.device).manual_seed(seed)
    chunk = chunk or max(1, 2 ** 26 // k)  # rows per distance block: 2^26 floats (256 MB)
    x_sq = x.square().sum(1)

    def sq_dists_to(p):  # (N,) squared distances to one point p (1, D): one pass over x
        return (x_sq - 2 * (x @ p[0]) + p.square().sum()).clamp_(min=0).double()

    centroids = x[torch.randint(len(x), (1,), generator=g, device=x.device)]
    d2 = sq_dists_to(centroids)
    for _ in range(1, k):
        pick = torch.multinomial(d2 / d2.sum() if d2.sum() > 0 else torch.ones_like(d2), 1, generator=g)
        centroids = torch.cat([centroids, x[pick]])
        d2 = torch.minimum(d2, sq_dists_to(x[pick]))
    assign, converged = None, False
    for it in range(1, max_iters + 1):
        new, d2 = sq_dists_argmin(x, x_sq, centroids, chunk)
        if assign is not None and torch.equal(new, assign):
            converged = True
            break
        assign = new
        sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
        for s in range(0, len(x), chunk):
            sums.index_add_(0, assign[s:s + chunk], x[s:s + chunk].double())
        counts = torch.bincount(assign, minlength=k)
        centroids = (sums / counts.clamp(min=1)[:, None]).float()
        empty = (counts == 0).nonzero()[:, 0]
        if len(empty):
            centroids[empty] = x[d2.topk(len(empty)).indices]
    return assign, centroids, d2.double().sum().item(), it - converged, converged


def contingency(clusters, labels):
    """(clusters, classes) counts of the two labelings, int64 numpy."""
    c, y = np.unique(clusters, return_inverse=True)[1], np.unique(labels, return_inverse=True)[1]
    table = np.zeros((c.max() + 1, y.max() + 1), dtype=np.int64)
    np.add.at(table, (c, y), 1)
    return table


def cluster_scores(clusters, labels):
    """ACC, NMI and ARI (%) of a clustering against the classes. ACC: the clusters matched one-to-one to the classes
    so that the most images agree (the Hungarian algorithm: scipy's linear_sum_assignment), the fraction matched. NMI:
    mutual information / the arithmetic mean of the two entropies (scikit-learn's default). ARI: the Rand index
    adjusted for chance."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        fail("--kmeans needs scipy, for the matching of clusters to classes: pip install scipy")
    table = contingency(clusters, labels)
    n = table.sum()
    rows, cols = linear_sum_assignment(-table)
    acc = table[rows, cols].sum() / n
    p, a, b = table / n, table.sum(1) / n, table.sum(0) / n
    nz = p > 0
    mi = (p[nz] * np.log(p[nz] / np.outer(a, b)[nz])).sum()
    h = [-(q[q > 0] * np.log(q[q > 0])).sum() for q in (a, b)]
    nmi = 1.0 if h[0] == h[1] == 0 else mi / ((h[0] + h[1]) / 2)
    pairs = lambda m: (m * (m - 1) / 2).sum()  # noqa: E731  (pairs within the same group)
    both, pa, pb = pairs(table.astype(np.float64)), pairs(table.sum(1).astype(np.float64)), \
        pairs(table.sum(0).astype(np.float64))
    expected, top = pa * pb / (n * (n - 1) / 2), (pa + pb) / 2
    ari = 1.0 if top == expected else (both - expected) / (top - expected)
    return 100 * acc, 100 * nmi, 100 * ari


def centre_crop(rng, w, h, crop_pct):
    """The centre box of side crop_pct x the shorter side, resized to img_size (bicubic) in one resample: "resize
    the shorter side to img_size / crop_pct, centre crop img_size" without the intermediate rounding. With crop_pct
    1 and images of img_size pixels, the identity."""
    s = min(w, h) * crop_pct
    return [((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)]


SAME, OTHER, BACKGROUND = (40, 170, 40), (220, 30, 30), (255, 255, 255)  # frames: the query's class or not


def neighbour_picture(rows, same):
    """rows: per query, its crop then its k neighbours' (PIL RGB, S x S each, as the encoder saw them); same: per
    query, k bools (that neighbour is of the query's class). -> one PIL image, a row per query: the query, a gap, the
    neighbours in order, each framed green (same class) or red (another). Tiles are at least 64 px so that CIFAR's
    32 px stay visible (upscaled by a whole factor, NEAREST: every pixel as it is) and at most 128 px so that a
    224 px encoder's picture stays small (downscaled, bicubic). Every cell is tile + 2 b square (b: the frame), cells
    b apart, the neighbours another 3 b further from the query:
    width = cell + 4 b + k cell + (k - 1) b, height = rows cell + (rows - 1) b."""
    S, k = rows[0][0].size[0], len(rows[0]) - 1
    tile = min(128, S * -(-64 // S))  # S < 64: the smallest whole factor to 64 px or more
    b = max(2, tile // 16)
    cell, gap = tile + 2 * b, 4 * b
    out = Image.new("RGB", (cell + gap + k * cell + (k - 1) * b, len(rows) * cell + (len(rows) - 1) * b), BACKGROUND)
    draw = ImageDraw.Draw(out)
    for r, (crops, marks) in enumerate(zip(rows, same)):
        y = r * (cell + b)
        for i, crop in enumerate(crops):  # i = 0: the query, unframed
            x = 0 if i == 0 else cell + gap + (i - 1) * (cell + b)
            if i:
                draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=SAME if marks[i - 1] else OTHER)
            if tile != S:
                crop = crop.resize((tile, tile), Image.NEAREST if tile > S else Image.BICUBIC)
            out.paste(crop, (x + b, y + b))
    return out


# -----------------------------------------------------------------------------
# flags
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data_path", required=True, help="train/<class>/* (the bank) and val/<class>/* (the queries)")
parser.add_argument("--out_dir", default="", help="if given, append the result as a JSON line to out_dir/log.txt")
parser.add_argument("--init", required=True, help="encoder: mae.pt / ct.pt, facebookresearch/mae's, MAE-CT's file, "
                    "or a release name (maect_base16, ...: vit.RELEASES)")
parser.add_argument("--which", default="ema", choices=["ema", "online"], help="the encoder of a ct.pt to use")
parser.add_argument("--pool", default="cls", choices=["cls", "mean"], help="CLS token or mean of the patch tokens")
parser.add_argument("--img_size", type=int, default=0, help="0 = the encoder's own")
parser.add_argument("--heads", type=int, default=0, help="attention heads of a foreign --init of an unreleased width")
parser.add_argument("--crop_pct", type=float, default=0.875, help="centre crop of the shorter side (1.0: CIFAR)")
parser.add_argument("--k", type=int, nargs="+", default=[10, 20], help="neighbour counts (MAE-CT: 10, DINO: 20)")
parser.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(sim / T)")
parser.add_argument("--standardize", type=int, default=0, help="1: standardise with the bank's mean / std first")
parser.add_argument("--chunk", type=int, default=1024, help="queries per similarity block (chunk x bank x 4 bytes)")
parser.add_argument("--show", type=int, default=0,
                    help="k-NN: out_dir/neighbours.png, this many val queries (drawn with --seed) each followed by its "
                    "k nearest train images (k: the smallest --k), another class framed red (0: off)")
parser.add_argument("--kmeans", type=int, nargs="?", const=0, default=None,
                    help="cluster instead of k-NN: into this many clusters (no value: as many as classes)")
parser.add_argument("--split", default="val", choices=["val", "train"], help="k-means: the images to cluster")
parser.add_argument("--kmeans_runs", type=int, default=5, help="k-means: seeded runs (seeds seed, seed + 1, ...)")
parser.add_argument("--kmeans_iters", type=int, default=300, help="k-means: the cap on Lloyd's iterations")
parser.add_argument("--seed", type=int, default=0, help="k-means: the first run's seed; --show: the queries' draw")
parser.add_argument("--batch_size", type=int, default=256, help="images per feature-extraction step, all processes")
parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
parser.add_argument("--compile", type=int, default=0)
parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
parser.add_argument("--num_workers", type=int, default=8, help="data-loading processes per process")
parser.add_argument("--skip_bad_images", type=int, default=0, help="1: log unreadable images and use others")
parser.add_argument("--stall_timeout", type=float, default=300,
                    help="seconds without a batch and without CPU use before a loader counts as stalled (0: off)")
parser.add_argument("--wandb", default="", help="a W&B project: also log to Weights & Biases (pip install wandb)")
parser.add_argument("--wandb_run", default="", help="--wandb: the W&B run's name (default: W&B's own)")


# -----------------------------------------------------------------------------
def classify(args, bank, bank_labels, queries, labels, classes, info, sets):
    """Rank 0: the k-NN vote for every k at once, the top-1 table, --show's picture, the log line."""
    ks = sorted(set(args.k))
    preds, neighbours = knn_classify(bank, bank_labels, queries, ks, args.temperature, classes, args.chunk,
                                     return_neighbours=True)
    top1 = {k: 100.0 * (preds[k] == labels).double().mean().item() for k in ks}
    print(f"{'k':>5}  top-1 (%)")
    for k in ks:
        print(f"{k:>5}  {top1[k]:.2f}")
    shown = show_neighbours(args, neighbours, bank_labels, labels, sets) if args.show else {}
    log_result(args, "knn", dict(knn_top1={str(k): round(top1[k], 4) for k in ks}, temperature=args.temperature,
                                 standardize=args.standardize, bank=len(bank), queries=len(queries), **shown, **info))


def show_neighbours(args, neighbours, bank_labels, labels, sets):
    """Rank 0, --show N: N val queries (all if fewer) drawn with --seed, in val order, each with the k nearest bank
    images that voted for it (k: the smallest --k; knn_classify's neighbours, in its order), drawn into
    out_dir/neighbours.png. neighbours (Nq, kmax), bank_labels (Nb,), labels (Nq,). -> the log line's entries"""
    k, n = min(args.k), min(args.show, len(labels))
    picked = sorted(random.Random(args.seed).sample(range(len(labels)), n))
    entry = dict(show=args.show, show_k=k, show_queries=picked)
    if len(bank_labels) != len(sets[0]) or len(labels) != len(sets[1]):
        tqdm.write("warning: --show: no picture: unreadable images were left out, so the features no longer say which "
                   "file each one is", file=sys.stderr)
        return entry
    for ds in sets:  # the loaders are done: every crop resized in one resample, as the encoder saw it on the CPU
        ds.resize = True
    crop = lambda ds, j: ds.load(j, lambda w, h: ds.boxes(None, w, h))[0][0]  # noqa: E731  (a PIL image, S x S)
    near = neighbours[picked, :k]  # (n, k)
    rows = [[crop(sets[1], q)] + [crop(sets[0], j) for j in row] for q, row in zip(picked, near.tolist())]
    same = (bank_labels[near] == labels[picked][:, None]).tolist()  # (n, k)
    path = os.path.join(args.out_dir, "neighbours.png")
    save_atomic(neighbour_picture(rows, same), path)
    print(f"wrote {path}")
    return dict(entry, neighbours_png="neighbours.png")


def cluster(args, feats, labels, clusters, info):
    """Rank 0: --kmeans_runs seeded k-means runs on the features; per run and over the runs ACC, NMI, ARI."""
    runs = []
    for r in range(args.kmeans_runs):
        assign, _, inertia, iters, converged = kmeans(feats, clusters, args.seed + r, args.kmeans_iters)
        acc, nmi, ari = cluster_scores(assign.cpu().numpy(), labels.cpu().numpy())
        runs.append(dict(seed=args.seed + r, iters=iters, converged=converged, inertia=round(inertia, 4),
                         acc=round(acc, 4), nmi=round(nmi, 4), ari=round(ari, 4)))
    print(f"{'run':>5} {'seed':>5} {'iterations':>11} {'ACC':>7} {'NMI':>7} {'ARI':>7}   ({clusters} clusters of "
          f"{len(feats)} {args.split} images)")
    for i, r in enumerate(runs):
        its = f"{r['iters']}" + ("" if r["converged"] else " (cap)")
        print(f"{i:>5} {r['seed']:>5} {its:>11} {r['acc']:>7.2f} {r['nmi']:>7.2f} {r['ari']:>7.2f}")
    stats = {m: dict(mean=round(sum(r[m] for r in runs) / len(runs), 4), best=max(r[m] for r in runs))
             for m in ("acc", "nmi", "ari")}
    for row in ("mean", "best"):
        print(f"{row:>5} {'':>5} {'':>11} " + " ".join(f"{stats[m][row]:>7.2f}" for m in ("acc", "nmi", "ari")))
    log_result(args, "kmeans", dict(kmeans=dict(clusters=clusters, split=args.split, **stats, runs=runs),
                                    images=len(feats), **info))


def main(args):
    check_flags(args, [
        ("k batch_size chunk kmeans_runs kmeans_iters", ">= 1", lambda v: v >= 1),
        ("img_size heads show", ">= 0", lambda v: v >= 0),
        ("temperature", "> 0", lambda v: v > 0),
        ("crop_pct", "in (0, 1]", lambda v: 0 < v <= 1),
        ("standardize", "0 or 1", lambda v: v in (0, 1)),
    ] + [("kmeans", ">= 1 clusters (no value: as many as classes)", lambda v: v >= 0)] * (args.kmeans is not None))
    if args.show and (args.kmeans is not None or not args.out_dir):  # a k-NN picture, written to out_dir
        fail("--show draws k-NN neighbours: not with --kmeans" if args.kmeans is not None else
             "--show needs --out_dir (the picture is written to out_dir/neighbours.png)")
    ddp, ddp_rank, ddp_world_size, device, dtype, autocast = compute_init(args, tf32=False)  # exact similarities
    master_process = ddp_rank == 0
    if args.batch_size % ddp_world_size != 0:
        fail(f"--batch_size {args.batch_size} is not divisible by processes ({ddp_world_size})")
    if master_process and args.out_dir:  # a line appended to out_dir/log.txt at the end
        lock_out_dir(args.out_dir)
        claim_out_dir(args.out_dir, "knn" if args.kmeans is None else "kmeans", append=True)

    # encoder and data: every check before any feature is extracted
    try:
        encoder = vit.load_encoder(args.init, args.which, args.img_size or None, master_process, args.heads or None)
    except (ValueError, FileNotFoundError, KeyError) as e:
        fail(str(e))
    img_size, crop = encoder.args["img_size"], functools.partial(centre_crop, crop_pct=args.crop_pct)
    splits = ("train", "val") if args.kmeans is None else (args.split,)
    sets = [ImageFolder(os.path.join(args.data_path, s), img_size, crop, None, 0, args.skip_bad_images,
                        resize=device == "cpu", leave_out=True) for s in splits]
    classes = sets[0].classes
    if not classes or sets[-1].classes != classes:
        fail(f"{sets[0].root} holds no class folders" if not classes else
             f"train and val class folders differ: {sorted(set(classes) ^ set(sets[-1].classes))[:6]}")
    if args.kmeans is None and max(args.k) > len(sets[0]):
        fail(f"--k {max(args.k)} is larger than the bank ({len(sets[0])} train images)")
    clusters = args.kmeans or len(classes)
    if args.kmeans is not None and clusters > len(sets[0]):
        fail(f"--kmeans {clusters} clusters of {len(sets[0])} images: more clusters than images")
    encoder.to(device)
    if master_process:
        what = f"{len(sets[0])} bank / {len(sets[1])} query images" if args.kmeans is None else \
            f"k-means into {clusters} clusters of {len(sets[0])} {args.split} images, {args.kmeans_runs} runs"
        print(f"{'k-NN' if args.kmeans is None else 'clustering'}: encoder {encoder.args} from {args.init} "
              f"({args.pool} pooling, {dtype}), {what}, {len(classes)} classes, {ddp_world_size} process(es)")
    model = torch.compile(encoder) if args.compile else encoder
    descs = ("bank", "queries") if args.kmeans is None else splits
    feats = [extract_features(model, ds, args.pool, encoder.args["dim"], args.batch_size, args.num_workers, device,
                              autocast, desc) for ds, desc in zip(sets, descs)]
    info = dict(pool=args.pool, init=args.init, which=args.which, img_size=img_size, crop_pct=args.crop_pct)
    leave()  # the other ranks are done: none waits in a collective (which times out) while rank 0 computes
    if master_process:  # every rank holds all features; rank 0 computes (k-means of 1.28M into 1,000: minutes)
        if args.kmeans is None:
            bank, queries = prepare_features(feats[0][0], feats[1][0], standardize=bool(args.standardize))
            classify(args, bank, feats[0][1], queries, feats[1][1], len(classes), info, sets)
        else:
            cluster(args, F.normalize(feats[0][0], dim=1), feats[0][1], clusters, info)


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
