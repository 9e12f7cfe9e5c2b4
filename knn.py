"""
k-NN classification with a frozen encoder (DINO / MAE-CT protocol): the train split is the bank,
the val split the queries; centre-crop features, pooled, L2-normalised, cosine similarity; the k
nearest bank images vote for their class with weight exp(sim / T).

Single process (CPU or one GPU):
    python knn.py --data_path DATA --init out/ct/ct.pt
Several GPUs (every process extracts its share of the features, then all are gathered):
    torchrun --nproc_per_node 8 knn.py --data_path DATA --init ct.pt --pool mean --k 10 20

--init takes any checkpoint vit.load_encoder reads: this project's mae.pt / ct.pt (--which ema|online),
facebookresearch/mae's, the MAE-CT releases. Prints top-1 per k; with --out_dir, appends a JSON line
to out_dir/log.txt.
"""
import argparse
import atexit
import fcntl
import json
import math
import multiprocessing
import os
import re
import signal
import socket
import sys
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import vit

# -----------------------------------------------------------------------------
# flags
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data_path", required=True, help="image folder with train/<class>/* (the bank) and val/<class>/* (the queries)")
parser.add_argument("--out_dir", default="", help="if given, append the result as a JSON line to out_dir/log.txt")
parser.add_argument("--init", required=True, help="encoder checkpoint: this project's mae.pt / ct.pt, facebookresearch/mae's, MAE-CT's")
parser.add_argument("--which", default="ema", choices=["ema", "online"], help="which encoder of a contrastive-tuning checkpoint")
parser.add_argument("--pool", default="cls", choices=["cls", "mean"], help="CLS token or mean of the patch tokens (authors: mean for B/16 MAE-CT)")
parser.add_argument("--img_size", type=int, default=0, help="0 = the encoder's own")
parser.add_argument("--heads", type=int, default=0,
                    help="attention heads of a foreign --init whose width is not 192/384/768/1024/1280 (0: from the width)")
parser.add_argument("--crop_pct", type=float, default=0.875, help="centre crop = shorter side x crop_pct, resized to img_size (1.0: whole image, e.g. CIFAR)")
parser.add_argument("--k", type=int, nargs="+", default=[10, 20], help="neighbour counts, all computed at once (MAE-CT: 10, DINO: 20)")
parser.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(sim / T)")
parser.add_argument("--standardize", type=int, default=0, help="1: (x - mean) / (std + 1e-5) with the bank's mean / unbiased std, before L2-normalising")
parser.add_argument("--chunk", type=int, default=1024, help="queries per similarity block (memory: chunk x bank x 4 bytes)")
parser.add_argument("--batch_size", type=int, default=256, help="images per feature-extraction step, over all processes")
parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
parser.add_argument("--compile", type=int, default=0)
parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
parser.add_argument("--num_workers", type=int, default=8, help="data loader processes per GPU/process")
parser.add_argument("--skip_bad_images", type=int, default=0, help="1: log unreadable images and use another")


def fail(msg):  # one clear line (on a line of its own under a progress bar), every rank stops
    tqdm.write(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def check_flags(args, rules):
    """rules: rows (flags, wanted, test). One line per flag out of its range (a list flag: any entry), then exit 2,
    before anything runs."""
    bad = []
    for flags, wanted, ok in rules:
        for flag in flags.split():
            v = getattr(args, flag)
            if not all(ok(x) for x in (v if isinstance(v, list) else [v])):
                bad.append(f"error: --{flag} {' '.join(map(str, v)) if isinstance(v, list) else v} must be {wanted}")
    if bad:
        print("\n".join(bad), file=sys.stderr)
        sys.exit(2)


# -----------------------------------------------------------------------------
# data: image folder -> uint8 crops (normalised on the device, which is cheaper than on the CPU)
IMG_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif")


def scan_image_folder(root):
    """[(path, class_index)], classes: subfolder names in string order ("0", "10", "2"); the images directly in each
    (not in nested folders); names starting with "." (macOS ._* files, .ipynb_checkpoints) are not read. Fails loudly
    on an empty layout."""
    if not os.path.isdir(root):
        fail(f"image folder not found: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        fail(f"no class folders in {root} (expected {root}/<class>/<image>)")
    samples = []
    for c, name in enumerate(classes):
        files = sorted(f for f in os.listdir(os.path.join(root, name)) if f.lower().endswith(IMG_EXTS) and f[0] != ".")
        if not files:
            fail(f"class folder {os.path.join(root, name)} holds no images ({', '.join(IMG_EXTS)})")
        samples += [(os.path.join(root, name, f), c) for f in files]
    return samples, classes


def to_rgb(img):
    """Any PIL image -> 8-bit RGB. convert("RGB") clips 16- and 32-bit integers at 255 (near white) and takes floats
    as 0-255 (near black), so those are scaled here: integers (I;16*, I) by 255 / 65535, values outside 0-65535
    refused; floats (F) by 255, values outside [0, 1] refused (torchvision's float range). Refusals and modes
    convert("RGB") gets wrong (LAB) raise OSError: an unreadable image."""
    if img.mode in ("RGB", "1", "L", "P", "PA", "LA", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "HSV"):
        return img if img.mode == "RGB" else img.convert("RGB")
    if img.mode not in ("I", "F") and not img.mode.startswith("I;16"):
        raise OSError(f"image mode {img.mode} is not supported (save it as RGB)")
    a, (hi, scale) = np.asarray(img, dtype=np.float64), (1, 255) if img.mode == "F" else (65535, 255 / 65535)  # (h, w)
    if not 0 <= a.min() <= a.max() <= hi:  # NaN fails too
        raise OSError(f"mode {img.mode} values span [{a.min():g}, {a.max():g}], outside [0, {hi}] (save it as RGB)")
    return Image.fromarray(np.rint(a * scale).astype(np.uint8)).convert("RGB")

class UnreadableImage(RuntimeError):
    """A DataLoader worker's arrives as UnreadableImage(its traceback): keep the last line, the message."""

    def __init__(self, msg):
        super().__init__(msg.strip().splitlines()[-1].partition("UnreadableImage: ")[2] or msg)


class ImageFolder(torch.utils.data.Dataset):
    """Items are (epoch, index) pairs, as in every stage script. Evaluation only: the centre box of
    side crop_pct x the shorter side, resized to img_size (bicubic) in one resample; that is
    "resize the shorter side to img_size / crop_pct, centre crop img_size" without the intermediate
    rounding. With crop_pct 1 and images of img_size pixels it is the identity. resize=False: the crops
    leave the worker at their own size and are resized on the GPU (crops_to_batch)."""

    def __init__(self, root, img_size, crop_pct=0.875, skip_bad=False, resize=True):
        self.samples, self.classes = scan_image_folder(root)
        self.img_size, self.crop_pct, self.skip_bad = img_size, crop_pct, skip_bad
        self.resize, self.bad = resize, 0

    def __len__(self):
        return len(self.samples)

    def load(self, i, boxes_fn):
        """Decode image i and cut the boxes that boxes_fn(w, h) returns. JPEGs are decoded at reduced
        size (PIL draft: DCT scaling) when even the smallest crop stays at least twice img_size."""
        for attempt in range(len(self.samples)):
            path = self.samples[(i + attempt) % len(self.samples)][0]
            try:
                img = Image.open(path)
                w, h = img.size
                boxes = boxes_fn(w, h)
                f = min(min(b[2] - b[0], b[3] - b[1]) for b in boxes) / self.img_size
                if f >= 2:
                    img.draft(None, (math.ceil(w / f), math.ceil(h / f)))
                k = round(w / img.size[0])  # the draft's DCT scale (1, 2, 4 or 8); it rounds sides up
                img = to_rgb(img)
                S, label = self.img_size, self.samples[(i + attempt) % len(self.samples)][1]
                if self.resize:  # crop + bicubic resize in one resample
                    return [img.resize((S, S), Image.BICUBIC, box=tuple(v / k for v in b)) for b in boxes], label
                return [img.crop(tuple(min(round(v / k), s) for v, s in zip(b, img.size * 2))) for b in boxes], label
            except (OSError, Image.DecompressionBombError) as e:  # the bomb: over twice Image.MAX_IMAGE_PIXELS
                if not self.skip_bad:
                    raise UnreadableImage(f"unreadable image {path}: {e} "
                                          "(use --skip_bad_images 1 to skip such files)") from None
                self.bad += 1
                print(f"warning: skipping unreadable image {path} ({e}); {self.bad} skipped in this worker", file=sys.stderr)
        raise UnreadableImage("no readable image in the dataset")

    def __getitem__(self, item):
        epoch, i = item

        def centre(w, h):
            s = min(w, h) * self.crop_pct
            return [((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)]
        crops, label = self.load(i, centre)
        return [torch.from_numpy(np.array(crops[0]))], label, i  # 1 x (h, w, 3) uint8


def collate(batch):
    """Crops differ in size: one flat uint8 tensor (one shared-memory block per batch, not one per crop)
    and their (h, w), sample 0's views first. -> flat, sizes (n, 2), labels (b,), indices (b,)"""
    crops = [c for item in batch for c in item[0]]
    return (torch.cat([c.flatten() for c in crops]), torch.tensor([c.shape[:2] for c in crops]),
            torch.tensor([item[1] for item in batch]), torch.tensor([item[2] for item in batch]))


def crops_to_batch(flat, sizes, img_size, device):
    """collate's crops -> (n, 3, S, S) float in [0, 255] on the device; crops not yet S x S get the
    bicubic resize of RandomResizedCrop here (antialiased, as PIL's)."""
    flat, out, o = flat.to(device, non_blocking=True).float(), [], 0  # one copy and one cast per batch
    for h, w in sizes.tolist():
        x = flat[o:o + h * w * 3].view(1, h, w, 3).permute(0, 3, 1, 2)  # (1, 3, h, w), a view
        o += h * w * 3
        out.append(x if (h, w) == (img_size, img_size) else
                   F.interpolate(x, size=(img_size, img_size), mode="bicubic", antialias=True))
    return torch.cat(out).clamp_(0, 255)  # bicubic overshoots at edges; PIL clamps too


@torch.no_grad()
def extract_features(encoder, dataset, how, dim, batch_size, ddp_rank, ddp_world_size, device, autocast, to_input,
                     num_workers, desc="features"):
    """Pooled features of every image of `dataset`: (len(dataset), dim) float32 on `device`, on every
    rank, in dataset order. Rank r encodes images r, r + world, r + 2 world, ...; the all_gather puts
    them back in order, so the result does not depend on the number of processes."""
    n = len(dataset)
    per = -(-n // ddp_world_size)  # images per rank; the short ranks' last row stays zero (padding)
    shard = [(0, i) for i in range(ddp_rank, n, ddp_world_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_size=max(1, batch_size // ddp_world_size), sampler=shard,
                                         num_workers=num_workers, pin_memory=device != "cpu", collate_fn=collate,
                                         worker_init_fn=ignore_stop_signals)
    feats, j = torch.zeros(per, dim, device=device), 0
    for flat, sizes, _, _ in tqdm(start_workers(loader), total=len(loader), desc=desc, disable=ddp_rank != 0,
                                  dynamic_ncols=True, leave=False):
        with autocast:
            f = vit.pool(encoder(to_input(flat, sizes)), how)  # (b, dim)
        feats[j:j + len(f)] = f.float()
        j += len(f)
    if ddp_world_size > 1:
        parts = [torch.empty_like(feats) for _ in range(ddp_world_size)]
        dist.all_gather(parts, feats)
        feats = torch.stack(parts, dim=1).flatten(0, 1)  # (per, world, dim): row q*world + r is image q*world + r
    return feats[:n]


# -----------------------------------------------------------------------------
# k-NN

def prepare_features(bank, queries, standardize=False):
    """Optionally standardise both with the bank's per-dimension mean and std, (x - mean) / (unbiased std
    + 1e-5) as the authors' code does, then L2-normalise every row: a dot product is the cosine similarity."""
    if standardize:
        mean, std = bank.mean(0), bank.std(0) + 1e-5
        bank, queries = (bank - mean) / std, (queries - mean) / std
    return F.normalize(bank, dim=1), F.normalize(queries, dim=1)


@torch.no_grad()
def knn_classify(bank, bank_labels, queries, ks, temperature, num_classes, chunk=1024):
    """bank (Nb, D) and queries (Nq, D): L2-normalised, same dtype and device; bank_labels (Nb,) int64.
    Returns {k: predicted class (Nq,)}. The (Nq, Nb) similarity matrix is never built: each block of
    `chunk` queries, (chunk, Nb), is reduced to its kmax nearest neighbours right away.

    Neighbour order: decreasing similarity, and among equal similarities increasing bank index (torch.topk
    leaves the order of ties unspecified, so ties at the kmax-th place are redone and the kept ones
    re-sorted; results then depend neither on the device nor on the chunk size). Vote: class c scores
    sum(exp(sim / T)) over the k nearest of class c; equal scores go to the lowest class index
    (argmax returns the first maximum)."""
    kmax = max(ks)
    if kmax > len(bank):
        raise ValueError(f"k = {kmax} is larger than the bank ({len(bank)} images)")
    preds = {k: [] for k in ks}
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
        labels, weights = bank_labels[idx], (vals / temperature).exp()  # (c, kmax) each
        for k in ks:
            votes = torch.zeros(len(sim), num_classes, dtype=weights.dtype, device=weights.device)
            votes.scatter_add_(1, labels[:, :k], weights[:, :k])  # (c, classes)
            preds[k].append(votes.argmax(dim=1))
    return {k: torch.cat(p) for k, p in preds.items()}


def lock_out_dir(out_dir):
    """Rank 0: create out_dir and lock it until this process ends, so a second run into it is refused before it writes
    anything. A kernel lock (fcntl), dropped when the process dies however it dies; the file names the holder."""
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
        fail(f"cannot write to --out_dir {out_dir}: {'it is a file' if isinstance(e, FileExistsError) else e.strerror}")
    atexit.register(lambda: os.getpid() == pid and os.path.exists(path) and os.remove(path))  # not in forked workers


# -----------------------------------------------------------------------------
# small helpers shared in shape by every stage script

def ignore_stop_signals(worker_id):
    """worker_init_fn: SIGTERM / SIGUSR1 are the main process's to handle. timeout and SLURM signal
    every process of the job; torch's own worker handler dies on a SIGTERM that is not from its
    parent, and the main process would then crash instead of checkpointing. start_workers blocks them until here."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGUSR1})


def start_workers(loader):
    """iter(loader), SIGTERM / SIGUSR1 held back while it forks workers: one would die of them before ignoring them."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1})
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGUSR1})


def shut_down():
    """Every way out (__main__'s finally). The workers ignore SIGTERM, which the loader's and multiprocessing's exit
    send before joining them: SIGKILL them, torch's SIGCHLD handler off (it would raise). A stop signal is ignored
    from now on: during the exit the interpreter restores its default action, which would kill the process."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for p in multiprocessing.active_children():
        p.kill()
        p.join()


# -----------------------------------------------------------------------------
def main(args):
    check_flags(args, [  # every flag's range, before anything runs: (flags, wanted, test)
        ("k batch_size chunk", ">= 1", lambda v: v >= 1),
        ("num_workers img_size heads", ">= 0", lambda v: v >= 0),
        ("temperature", "> 0", lambda v: v > 0),
        ("crop_pct", "in (0, 1]", lambda v: 0 < v <= 1),
        ("standardize compile skip_bad_images", "0 or 1", lambda v: v in (0, 1)),
        ("device", "auto, cpu, cuda or cuda:N", lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v)),
    ])
    # DDP: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; NCCL on GPUs, gloo on CPU
    ddp = int(os.environ.get("RANK", -1)) != -1
    use_cuda = torch.cuda.is_available() if args.device == "auto" else args.device.startswith("cuda")
    if ddp:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        ddp_rank, ddp_local_rank, ddp_world_size = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
    else:
        ddp_rank, ddp_local_rank, ddp_world_size = 0, 0, 1
    master_process = ddp_rank == 0
    device = f"cuda:{ddp_local_rank}" if use_cuda else "cpu"
    if use_cuda:
        torch.cuda.set_device(device)
        # similarities in full fp32: TF32's 10-bit mantissa would reorder close neighbours
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = True
    dtype = args.dtype if args.dtype != "auto" else "bfloat16" if use_cuda and torch.cuda.is_bf16_supported() else "float32"
    autocast = nullcontext() if dtype == "float32" else torch.autocast(device.split(":")[0], dtype=getattr(torch, dtype))
    if args.batch_size % ddp_world_size != 0:
        fail(f"--batch_size {args.batch_size} is not divisible by processes ({ddp_world_size})")
    if master_process and args.out_dir:
        lock_out_dir(args.out_dir)

    # encoder and data: every check before any feature is extracted
    try:
        encoder = vit.load_encoder(args.init, args.which, args.img_size or None, master_process, args.heads or None)
    except (ValueError, FileNotFoundError, KeyError) as e:
        fail(str(e))
    model_args = encoder.args
    img_size = model_args["img_size"]
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(args.data_path, split)):
            fail(f"missing split folder {os.path.join(args.data_path, split)} (expected train/ and val/)")
    bank_set = ImageFolder(os.path.join(args.data_path, "train"), img_size, args.crop_pct, args.skip_bad_images, not use_cuda)
    query_set = ImageFolder(os.path.join(args.data_path, "val"), img_size, args.crop_pct, args.skip_bad_images, not use_cuda)
    if bank_set.classes != query_set.classes:
        fail(f"train and val class folders differ: {sorted(set(bank_set.classes) ^ set(query_set.classes))[:6]}")
    if max(args.k) > len(bank_set):
        fail(f"--k {max(args.k)} is larger than the bank ({len(bank_set)} train images)")
    encoder.to(device)
    if args.compile:
        encoder = torch.compile(encoder)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1) * 255

    def to_input(flat, sizes):  # collate's crops -> (n, 3, S, S) float on the device, ImageNet mean/std
        return (crops_to_batch(flat, sizes, img_size, device) - mean) / std

    if master_process:
        print(f"k-NN: encoder {model_args} from {args.init} ({args.pool} pooling, {dtype}), "
              f"{len(bank_set)} bank / {len(query_set)} query images, {len(bank_set.classes)} classes, "
              f"{ddp_world_size} process(es)")
    try:
        feats = [extract_features(encoder, ds, args.pool, model_args["dim"], args.batch_size, ddp_rank, ddp_world_size,
                                  device, autocast, to_input, args.num_workers, desc)
                 for ds, desc in ((bank_set, "bank"), (query_set, "queries"))]
    except UnreadableImage as e:
        fail(str(e))
    bank, queries = prepare_features(*feats, standardize=bool(args.standardize))
    bank_labels = torch.tensor([c for _, c in bank_set.samples], device=device)
    query_labels = torch.tensor([c for _, c in query_set.samples], device=device)
    # every rank holds all features; rank 0 classifies (the similarity pass is cheap next to extraction)
    if master_process:
        ks = sorted(set(args.k))
        preds = knn_classify(bank, bank_labels, queries, ks, args.temperature, len(bank_set.classes), args.chunk)
        top1 = {k: 100.0 * (preds[k] == query_labels).double().mean().item() for k in ks}
        print(f"{'k':>5}  top-1 (%)")
        for k in ks:
            print(f"{k:>5}  {top1[k]:.2f}")
        if args.out_dir:
            entry = dict(knn_top1={str(k): round(top1[k], 4) for k in ks}, temperature=args.temperature,
                         pool=args.pool, standardize=args.standardize, init=args.init, which=args.which,
                         bank=len(bank_set), queries=len(query_set), img_size=img_size, crop_pct=args.crop_pct)
            with open(os.path.join(args.out_dir, "log.txt"), "a") as f:
                f.write(json.dumps(entry) + "\n")
    if ddp:
        dist.barrier()  # rank 0 may still be writing; leave together (gloo aborts otherwise)
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(parser.parse_args())
    except UnreadableImage as e:  # one line, as for every bad input
        fail(str(e))
    finally:
        shut_down()
