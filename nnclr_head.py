"""
Stage 2 of MAE-CT: train an NNCLR head (projector, predictor, queue) on the frozen encoder.

The encoder of stage 1 (this project's mae.pt, a facebookresearch/mae or MAE-CT release, or a
ct.pt) stays frozen: eval mode, no autograd. Only the head trains. Stage 3 (contrastive_tune.py)
starts from the encoder and this head, so that its first steps get a sensible contrastive signal.

Single process (CPU or one GPU):
    python nnclr_head.py --data_path DATA --init out/mae/mae.pt --out_dir out/head
Several GPUs (the global --batch_size is split over the processes):
    torchrun --nproc_per_node 8 nnclr_head.py --data_path DATA --init mae.pt

Writes out_dir/head.pt (head + filled queue + the encoder's path and args), periodic
out_dir/ckpt_*.pt and out_dir/log.txt (JSON lines: loss, nearest-neighbour accuracy, img/s).
"""
import argparse
import atexit
import fcntl
import glob
import json
import math
import multiprocessing
import os
import random
import re
import signal
import socket
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import vit

# -----------------------------------------------------------------------------
# flags (defaults: the authors' ViT-B/16 MAE-CT recipe, REFERENCE §3)
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data_path", required=True, help="image folder with train/<class>/*")
parser.add_argument("--out_dir", default="out/head")
parser.add_argument("--init", default="", help="the encoder: mae.pt, ct.pt, a facebookresearch/mae or MAE-CT release")
parser.add_argument("--resume", default="", help="a checkpoint to continue, or 'auto' for the newest in out_dir")
parser.add_argument("--img_size", type=int, default=0, help="0 = the encoder's")
parser.add_argument("--heads", type=int, default=0,
                    help="attention heads of a foreign --init whose width is not 192/384/768/1024/1280 (0: from the width)")
parser.add_argument("--pool", default="mean", choices=["cls", "mean"], help="authors: mean for B/16 MAE-CT, else cls")
parser.add_argument("--proj_hidden", type=int, default=2048)
parser.add_argument("--proj_dim", type=int, default=256)
parser.add_argument("--pred_hidden", type=int, default=4096)
parser.add_argument("--queue_size", type=int, default=65536)
parser.add_argument("--temperature", type=float, default=0.15)
parser.add_argument("--aug", type=int, default=0, help="1: MAE-CT_aug views (colour jitter, blur, grayscale, solarize)")
parser.add_argument("--epochs", type=int, default=20)
parser.add_argument("--warmup_epochs", type=float, default=-1, help="-1 = 20%% of the run")
parser.add_argument("--batch_size", type=int, default=1024, help="images per optimizer step, over all processes")
parser.add_argument("--grad_accum", type=int, default=1, help="split each process's batch into this many micro-batches")
parser.add_argument("--blr", type=float, default=1e-4, help="lr = blr * batch_size * 2 views / 256")
parser.add_argument("--min_lr", type=float, default=0.0)
parser.add_argument("--weight_decay", type=float, default=1e-5)
parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
parser.add_argument("--compile", type=int, default=0)
parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
parser.add_argument("--num_workers", type=int, default=8, help="data loader processes per GPU/process")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--log_interval", type=int, default=20, help="iterations")
parser.add_argument("--ckpt_interval", type=int, default=1000, help="iterations between checkpoints")
parser.add_argument("--keep_last", type=int, default=2, help="periodic checkpoints kept (0 = all)")
parser.add_argument("--skip_bad_images", type=int, default=0, help="1: log unreadable images and use another")
parser.add_argument("--max_iters", type=int, default=0, help="stop after this many iterations (0 = epochs)")

# flags a resumed run must share with the checkpoint it continues (the run's length may change)
RESUME_FLAGS = ("img_size", "pool", "proj_hidden", "proj_dim", "pred_hidden", "queue_size", "temperature", "aug",
                "warmup_epochs", "batch_size", "blr", "min_lr", "weight_decay", "seed")


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
# data: image folder -> two uint8 views per image (normalised on the device)
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


def random_resized_crop(rng, w, h, scale, ratio=(3 / 4, 4 / 3)):
    """Crop box (left, top, right, bottom) of RandomResizedCrop, drawn with `rng`."""
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


def adjust_hue(img, shift):
    """Rotate the hue by `shift` of a full turn (|shift| <= 0.5), in PIL's 8-bit HSV space."""
    h, s, v = img.convert("HSV").split()
    h = Image.fromarray(((np.asarray(h).astype(np.int16) + round(shift * 255)) % 256).astype(np.uint8))
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def color_jitter(img, rng, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1):
    """ColorJitter: the four adjustments in random order, each factor uniform around 1 (hue around 0)."""
    ops = [0, 1, 2, 3]
    rng.shuffle(ops)
    for op in ops:
        if op == 0:
            img = ImageEnhance.Brightness(img).enhance(rng.uniform(1 - brightness, 1 + brightness))
        elif op == 1:
            img = ImageEnhance.Contrast(img).enhance(rng.uniform(1 - contrast, 1 + contrast))
        elif op == 2:
            img = ImageEnhance.Color(img).enhance(rng.uniform(1 - saturation, 1 + saturation))
        else:
            img = adjust_hue(img, rng.uniform(-hue, hue))
    return img


# MAE-CT_aug (BYOL's asymmetric pair): (blur probability, solarize probability) of view 0 and view 1
AUG_VIEWS = ((1.0, 0.0), (0.1, 0.2))


def strong_aug(img, rng, view):
    """Colour jitter p 0.8, grayscale p 0.2, Gaussian blur (sigma 0.1-2), solarize (threshold 128)."""
    p_blur, p_solarize = AUG_VIEWS[view]
    if rng.random() < 0.8:
        img = color_jitter(img, rng)
    if rng.random() < 0.2:
        img = img.convert("L").convert("RGB")
    if rng.random() < p_blur:
        img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
    if rng.random() < p_solarize:
        img = ImageOps.solarize(img, threshold=128)
    return img


class UnreadableImage(RuntimeError):
    """A DataLoader worker's arrives as UnreadableImage(its traceback): keep the last line, the message."""

    def __init__(self, msg):
        super().__init__(msg.strip().splitlines()[-1].partition("UnreadableImage: ")[2] or msg)


class ImageFolder(torch.utils.data.Dataset):
    """Items are (epoch, index) pairs from the sampler, so each augmentation is a function of
    (seed, epoch, index) alone: any worker count, any restart, the same views. resize=False: the crops
    leave the worker at their own size and are resized on the GPU (crops_to_batch), which takes a
    third of a worker's time off it at 224 px; on a CPU, and for the colour augmentations (which work
    on the final pixels), the workers resize."""

    def __init__(self, root, img_size, views, train, seed=0, skip_bad=False, aug=False, resize=True):
        self.samples, self.classes = scan_image_folder(root)
        self.img_size, self.views, self.train, self.seed, self.skip_bad = img_size, views, train, seed, skip_bad
        self.aug, self.resize, self.bad = aug, resize or aug, 0

    def __len__(self):
        return len(self.samples)

    def load(self, i, boxes_fn):
        """Decode image i and cut the boxes that boxes_fn(w, h) returns. JPEGs are decoded at reduced
        size (PIL draft: DCT scaling) when even the smallest crop stays at least twice img_size.
        Returns (crops, label, index of the image actually used)."""
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
                img = to_rgb(img)
                S = self.img_size
                if self.resize:  # crop + bicubic resize in one resample
                    return [img.resize((S, S), Image.BICUBIC, box=tuple(v / k for v in b)) for b in boxes], self.samples[j][1], j
                return [img.crop(tuple(min(round(v / k), s) for v, s in zip(b, img.size * 2))) for b in boxes], self.samples[j][1], j
            except (OSError, Image.DecompressionBombError) as e:  # the bomb: over twice Image.MAX_IMAGE_PIXELS
                if not self.skip_bad:
                    raise UnreadableImage(f"unreadable image {path}: {e} "
                                          "(use --skip_bad_images 1 to skip such files)") from None
                self.bad += 1
                print(f"warning: skipping unreadable image {path} ({e}); {self.bad} skipped in this worker", file=sys.stderr)
        raise UnreadableImage("no readable image in the dataset")

    def __getitem__(self, item):
        epoch, i = item
        rng = random.Random((self.seed * 1_000_003 + epoch) * 1_000_003 + i)
        # MAE-CT views: RandomResizedCrop(scale 0.08-1, bicubic) + flip, from one decode
        crops, label, i = self.load(i, lambda w, h: [random_resized_crop(rng, w, h, (0.08, 1.0)) for _ in range(self.views)])
        crops = [c.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else c for c in crops]
        if self.aug:
            crops = [strong_aug(c, rng, v) for v, c in enumerate(crops)]
        return [torch.from_numpy(np.array(c)) for c in crops], label, i  # V x (h, w, 3) uint8


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


class ShardSampler(torch.utils.data.Sampler):
    """Epoch-seeded permutation; step s of the epoch takes the global batch perm[s*B:(s+1)*B] and
    this rank its slice, so the global batch does not depend on the number of processes.
    Drops the last incomplete batch. start_step skips steps already done (resume)."""

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


# -----------------------------------------------------------------------------
# the NNCLR head, its queue and loss (REFERENCE §3). contrastive_tune.py keeps an identical copy.

class NNCLRHead(nn.Module):
    """Projector Linear-BN-ReLU-Linear-BN-ReLU-Linear-BN and predictor Linear-BN-ReLU-Linear, no
    biases. Each view goes through on its own, so the BatchNorm statistics are per view."""

    def __init__(self, in_dim, proj_hidden=2048, proj_dim=256, pred_hidden=4096):
        super().__init__()
        self.args = dict(in_dim=in_dim, proj_hidden=proj_hidden, proj_dim=proj_dim, pred_hidden=pred_hidden)
        self.projector = nn.Sequential(
            nn.Linear(in_dim, proj_hidden, bias=False), nn.BatchNorm1d(proj_hidden), nn.ReLU(inplace=True),
            nn.Linear(proj_hidden, proj_hidden, bias=False), nn.BatchNorm1d(proj_hidden), nn.ReLU(inplace=True),
            nn.Linear(proj_hidden, proj_dim, bias=False), nn.BatchNorm1d(proj_dim))
        self.predictor = nn.Sequential(
            nn.Linear(proj_dim, pred_hidden, bias=False), nn.BatchNorm1d(pred_hidden), nn.ReLU(inplace=True),
            nn.Linear(pred_hidden, proj_dim, bias=False))
        # torch's default init (Linear: kaiming-uniform, bound 1/sqrt(fan_in)), as in the authors' code: no xavier

    def forward(self, x):
        """x (V, B, in_dim) pooled features of V views -> projections z, predictions p, both
        (V, B, proj_dim), not normalised."""
        z = [self.projector(v) for v in x]
        return torch.stack(z), torch.stack([self.predictor(v) for v in z])


class Queue:
    """FIFO memory of L2-normalised view-0 projections: vectors (Q, P), and per entry the dataset
    index of its sample (self-exclusion) and its label (the accuracy monitor; -1 = random init)."""

    def __init__(self, size, dim, seed=0, device="cpu"):
        g = torch.Generator().manual_seed(seed)
        self.vectors = F.normalize(torch.randn(size, dim, generator=g), dim=1).to(device)
        self.indices = torch.full((size,), -1, dtype=torch.long, device=device)
        self.labels = torch.full((size,), -1, dtype=torch.long, device=device)
        self.ptr = 0  # next slot to write

    def state_dict(self):
        return dict(vectors=self.vectors.cpu(), indices=self.indices.cpu(), labels=self.labels.cpu(), ptr=self.ptr)

    @classmethod
    def from_state(cls, sd, device="cpu"):
        q = cls.__new__(cls)
        q.vectors, q.indices, q.labels = (sd[k].to(device) for k in ("vectors", "indices", "labels"))
        q.ptr = int(sd["ptr"])
        return q

    @torch.no_grad()
    def lookup(self, z, idx, topk=1, generator=None):
        """z (n, P) normalised, idx (n,) their dataset indices -> neighbours (n, P), their labels (n,).
        Cosine similarity; the sample's own entries get -1. topk 1: the argmax; else uniform over the top k."""
        sim = z.to(self.vectors.dtype) @ self.vectors.T  # (n, Q)
        sim = sim.masked_fill(idx[:, None] == self.indices[None, :], -1.0)
        if topk == 1:
            j = sim.argmax(dim=1)
        else:
            top = sim.topk(topk, dim=1).indices  # (n, k)
            pick = torch.randint(topk, (z.shape[0], 1), device=z.device, generator=generator)
            j = top.gather(1, pick).squeeze(1)
        return self.vectors[j], self.labels[j]

    @torch.no_grad()
    def push(self, z, idx, labels):
        """Write n entries first in first out from ptr, wrapping around; n > Q keeps the last Q."""
        n, size = z.shape[0], self.vectors.shape[0]
        skip = max(0, n - size)
        pos = (self.ptr + skip + torch.arange(n - skip, device=self.vectors.device)) % size
        self.vectors[pos] = z[skip:].to(self.vectors.dtype)
        self.indices[pos], self.labels[pos] = idx[skip:], labels[skip:]
        self.ptr = (self.ptr + n) % size


def all_gather(x, dim=0, grad=False):
    """Concatenate x of every rank along dim, in rank order (= the order of the global batch).
    grad=True: the local slot is x itself, so the gradient flows to it (the other ranks' parts are
    constants here). A single process returns x."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x.contiguous()) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    if grad:
        parts[dist.get_rank()] = x
    return torch.cat(parts, dim=dim)


def nnclr_loss(nn0, nn1, p0, p1, temperature):
    """Symmetric NNCLR loss over the global batch. nn0, nn1 (B, P): queue neighbours of the two
    views' projections (no gradient); p0, p1 (B, P): normalised predictions. Row i of
    nn(z0) p1ᵀ / τ is sample i's neighbour against every prediction of view 1; its target is i."""
    target = torch.arange(p0.shape[0], device=p0.device)
    return 0.5 * (F.cross_entropy(nn0 @ p1.T / temperature, target) + F.cross_entropy(nn1 @ p0.T / temperature, target))


def nnclr_step(z, p, idx, labels, queue, temperature, topk=1, generator=None):
    """The loss of one (micro-)step over the global batch. z (2, b, P): normalised projections of this
    rank's b samples (constants), p (2, b, P): normalised predictions, idx / labels (b,): dataset
    indices and labels. Every rank gathers the global batch (in sampler order) and computes the
    loss of all of it; p's gradient reaches only the local slot, so the ranks' gradients sum to
    the full gradient, and DDP averages them: the loss to call backward on is x world_size (the
    same gradient as an all-gather whose backward all-reduces). The queue gets view 0 after the
    loss. -> (loss for backward, loss value, nearest-neighbour accuracy of view 0, as the authors log it)"""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    z_all = all_gather(z.detach(), dim=1)  # (2, B, P)
    p_all = all_gather(p, dim=1, grad=True)  # (2, B, P)
    idx_all, labels_all = all_gather(idx), all_gather(labels)  # (B,)
    nn0, nn0_labels = queue.lookup(z_all[0], idx_all, topk, generator)
    nn1, _ = queue.lookup(z_all[1], idx_all, topk, generator)
    loss = nnclr_loss(nn0, nn1, p_all[0], p_all[1], temperature)
    queue.push(z_all[0], idx_all, labels_all)
    acc = (nn0_labels == labels_all).float().mean()
    return loss * world, loss.detach(), acc  # tensors: the loop reads them at log steps (no sync per step)


def build_encoder(path, img_size=0, heads=0):
    """The frozen encoder from any encoder checkpoint (this project's mae.pt / ct.pt (its EMA encoder),
    facebookresearch/mae, MAE-CT releases) -> (ViT, model_args). img_size: another resolution
    (the fixed sin-cos position embedding is recomputed). heads: a foreign file's, where its width does not tell."""
    ckpt = vit.load_checkpoint(path)
    if ckpt.get("stage", "mae") not in ("mae", "ct"):
        raise ValueError(f"--init {path} is a {ckpt['stage']} checkpoint; --init takes an encoder checkpoint "
                         f"(mae.pt, ct.pt, a facebookresearch/mae or MAE-CT release)")
    sd, model_args, note = vit.encoder_state(ckpt, path)
    if note and int(os.environ.get("RANK", 0)) == 0:
        print(note, file=sys.stderr)
    model_args = model_args or vit.infer_model_args(sd, path, heads or None)
    if img_size and img_size != model_args["img_size"]:
        model_args = dict(model_args, img_size=img_size)
        sd["pos_embed"] = vit.sincos_pos_embed(model_args["dim"], img_size // model_args["patch_size"]).unsqueeze(0)
    return vit.load_state_strict(vit.ViT(**model_args), sd, path), model_args


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
# small helpers shared in shape by every stage script

def get_lr(it, lr, min_lr, warmup_iters, max_iters):
    """Per optimizer step: linear warmup, lr * (it + 1) / (warmup_iters + 1) at step it < warmup_iters (the
    authors' schedule: the first step does not run at lr 0), then cosine from lr at warmup_iters to min_lr."""
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    progress = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def save_atomic(obj, path):
    """Write to a temp file, flush it to the disk, then rename: a crash or a full disk mid-write leaves the
    previous file intact; a failed write (no space left, a quota) removes the temp file, one line."""
    try:
        with open(path + ".tmp", "wb") as f:
            torch.save(obj, f)
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


def find_resume(resume, out_dir, final_name, stage):
    """-> (path, checkpoint) to continue, or ("", None). --resume auto: the finished run's file, else the newest
    periodic checkpoint; one that does not read (truncated, another stage's) gives way to the one before it."""
    if resume != "auto":
        return resume, vit.load_checkpoint(resume, expect=stage) if resume else None
    final = os.path.join(out_dir, final_name)
    paths = [final] * os.path.exists(final) + sorted(glob.glob(os.path.join(out_dir, "ckpt_*.pt")))[::-1]
    for path, previous in zip(paths, paths[1:] + [None]):
        try:
            return path, vit.load_checkpoint(path, expect=stage)
        except ValueError as e:
            if previous is None:
                raise
            if int(os.environ.get("RANK", 0)) == 0:
                print(f"warning: {e}; resuming from the previous checkpoint {previous}", file=sys.stderr)
    return "", None

# -----------------------------------------------------------------------------
def main(args):
    # preemption: SLURM and most schedulers send SIGTERM or SIGUSR1; stop at the next log step and checkpoint
    stop_signal = []
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, lambda signum, frame: stop_signal.append(signum))
    check_flags(args, [  # every flag's range, before anything runs: (flags, wanted, test)
        ("epochs batch_size grad_accum log_interval ckpt_interval", ">= 1", lambda v: v >= 1),
        ("queue_size proj_hidden proj_dim pred_hidden", ">= 1", lambda v: v >= 1),
        ("max_iters num_workers keep_last img_size blr min_lr weight_decay heads", ">= 0", lambda v: v >= 0),
        ("warmup_epochs", "-1 or >= 0", lambda v: v == -1 or v >= 0),
        ("temperature", "> 0", lambda v: v > 0),
        ("aug compile skip_bad_images", "0 or 1", lambda v: v in (0, 1)),
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
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = args.dtype if args.dtype != "auto" else "bfloat16" if use_cuda and torch.cuda.is_bf16_supported() else "float32"
    autocast = nullcontext() if dtype == "float32" else torch.autocast(device.split(":")[0], dtype=getattr(torch, dtype))
    torch.manual_seed(args.seed)
    if args.batch_size % (ddp_world_size * args.grad_accum) != 0:
        fail(f"--batch_size {args.batch_size} is not divisible by processes ({ddp_world_size}) x --grad_accum ({args.grad_accum})")
    micro_batch = args.batch_size // ddp_world_size // args.grad_accum
    if micro_batch < 2:
        fail(f"{micro_batch} image(s) per process and micro-step: BatchNorm needs at least 2")
    out_dir = args.out_dir
    if master_process:
        lock_out_dir(out_dir)

    # encoder (frozen) and head: fresh from --init, or resumed (the encoder always comes from its file)
    try:
        resume_path, ckpt = find_resume(args.resume, out_dir, "head.pt", "nnclr_head")
        for k in RESUME_FLAGS if ckpt is not None else ():
            if ckpt["args"].get(k) != getattr(args, k):
                fail(f"{resume_path} was made with --{k} {ckpt['args'].get(k)}, this run has --{k} {getattr(args, k)}")
        init = args.init or (ckpt["encoder_init"] if ckpt is not None else "")
        if not init:
            raise ValueError("--init (the encoder checkpoint, e.g. mae.pt) is required")
        want = ckpt["model_args"] if ckpt is not None else dict(img_size=args.img_size, heads=args.heads)  # resumed: its own
        encoder, model_args = build_encoder(init, want["img_size"], want["heads"])
        if ckpt is not None and model_args != ckpt["model_args"]:
            raise ValueError(f"{init} holds a {model_args} encoder, the resumed head was trained on {ckpt['model_args']}")
        pool = ckpt["pool"] if ckpt is not None else args.pool
        head_args = ckpt["head_args"] if ckpt is not None else dict(
            in_dim=model_args["dim"], proj_hidden=args.proj_hidden, proj_dim=args.proj_dim, pred_hidden=args.pred_hidden)
        head = NNCLRHead(**head_args)
        if ckpt is not None:
            vit.load_state_strict(head, ckpt["head"], resume_path)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    encoder.requires_grad_(False)
    encoder.eval().to(device)
    head.to(device)
    queue = Queue.from_state(ckpt["queue"], device) if ckpt is not None else Queue(args.queue_size, head_args["proj_dim"], args.seed, device)
    img_size = model_args["img_size"]

    # data: every check before any training starts
    if not os.path.isdir(os.path.join(args.data_path, "train")):
        fail(f"missing split folder {os.path.join(args.data_path, 'train')} (expected train/<class>/*)")
    train_set = ImageFolder(os.path.join(args.data_path, "train"), img_size, 2, True, args.seed, args.skip_bad_images,
                            args.aug, resize=not use_cuda)
    if len(train_set) < args.batch_size:
        fail(f"--batch_size {args.batch_size} is larger than the training set ({len(train_set)} images)")
    sampler = ShardSampler(len(train_set), args.batch_size, ddp_rank, ddp_world_size, args.seed)
    loader = torch.utils.data.DataLoader(train_set, batch_size=micro_batch, sampler=sampler, num_workers=args.num_workers,
                                         pin_memory=use_cuda, persistent_workers=args.num_workers > 0,
                                         collate_fn=collate, worker_init_fn=ignore_stop_signals)
    steps_per_epoch = sampler.steps
    max_iters = args.max_iters or args.epochs * steps_per_epoch
    warmup_iters = int(0.2 * max_iters) if args.warmup_epochs < 0 else round(args.warmup_epochs * steps_per_epoch)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1) * 255

    def to_input(flat, sizes):  # collate's crops -> (n, 3, S, S) float on the device, ImageNet mean/std
        return (crops_to_batch(flat, sizes, img_size, device) - mean) / std

    # optimizer: AdamW (0.9, 0.95) on the head, no weight decay on 1-D tensors; lr scales with images x 2 views
    lr = args.blr * args.batch_size * 2 / 256
    groups = [{k: v for k, v in g.items() if k != "names"} for g in vit.param_groups(head, args.weight_decay)]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=use_cuda)
    scaler = torch.amp.GradScaler(enabled=dtype == "float16")
    iter_num = 0
    monitor = dict(epoch=-1, correct=0.0, count=0)  # nearest-neighbour accuracy over the current epoch
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        iter_num, monitor = ckpt["iter_num"], ckpt["monitor"]
        if master_process:
            print(f"resuming from {resume_path} at iteration {iter_num}")
    ckpt = None  # free memory
    raw_model = head
    if ddp and use_cuda:  # BatchNorm statistics over the global batch (per view); not available on CPU
        head = nn.SyncBatchNorm.convert_sync_batchnorm(head)
        raw_model = head
    model = head
    if args.compile:
        encoder = torch.compile(encoder)  # the encoder's forward is the cost of this stage
    if ddp:
        model = DDP(model, device_ids=[ddp_local_rank] if use_cuda else None)

    def checkpoint():
        return dict(stage="nnclr_head", head=raw_model.state_dict(), head_args=head_args, queue=queue.state_dict(),
                    encoder_init=os.path.abspath(init), model_args=model_args, pool=pool,
                    optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), iter_num=iter_num,
                    monitor=dict(monitor), args=vars(args))

    def log(entry):
        with open(os.path.join(out_dir, "log.txt"), "a") as f:
            f.write(json.dumps(entry) + "\n")

    # the loop reads device values (loss, accuracy, stop flag) only at log steps, epoch ends and checkpoints:
    # a read every step would make the CPU wait for the GPU, and the GPU then for the CPU's next launches
    nonfinite_at = torch.tensor(-1, device=device)  # the first iteration with a non-finite loss
    pending, window = [], []  # nearest-neighbour accuracies per step: still on the device / since the last log

    def check_finite():  # every rank, at log steps and before each checkpoint write
        if nonfinite_at.item() >= 0:
            pbar.close()  # the error on its own line
            fail(f"non-finite loss at iteration {nonfinite_at.item()}; the last good checkpoint is in {out_dir}")

    def flush_acc():  # pending -> window and the epoch's monitor, in one device read
        vals = torch.stack(pending).tolist() if pending else []
        pending.clear()
        window.extend(vals)
        monitor["correct"] += sum(vals)
        monitor["count"] += len(vals)

    def stop_requested():  # a signal to any rank stops every rank at the same step
        stop = torch.tensor(float(bool(stop_signal)), device=device)
        if ddp:
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        return bool(stop.item())

    def save(name):  # every rank checks, rank 0 writes; the newest keep_last periodic checkpoints are kept
        check_finite()
        flush_acc()
        if master_process:
            save_atomic(checkpoint(), os.path.join(out_dir, name))
            for old in sorted(glob.glob(os.path.join(out_dir, "ckpt_*.pt")))[:-args.keep_last]:
                os.remove(old)

    # training loop
    if master_process:
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(f"NNCLR head {head_args} ({n_params / 1e6:.1f}M params) on the frozen {model_args} encoder from {init}, "
              f"{pool} pooling, queue {tuple(queue.vectors.shape)}; {len(train_set)} train images, {steps_per_epoch} steps/epoch, "
              f"{max_iters} iterations, lr {lr:.3g}, {dtype}, {ddp_world_size} process(es)")
    pbar = tqdm(total=max_iters, initial=iter_num, disable=not master_process, dynamic_ncols=True)
    model.train()
    t0, imgs_seen = time.time(), 0
    while iter_num < max_iters:
        sampler.set_epoch(iter_num // steps_per_epoch, start_step=iter_num % steps_per_epoch)
        batches = start_workers(loader)
        for _ in range(iter_num % steps_per_epoch, min(steps_per_epoch, iter_num % steps_per_epoch + max_iters - iter_num)):
            lr_now = get_lr(iter_num, lr, args.min_lr, warmup_iters, max_iters)
            for g in optimizer.param_groups:
                g["lr"] = lr_now * g["lr_scale"]
            if monitor["epoch"] != iter_num // steps_per_epoch:
                monitor = dict(epoch=iter_num // steps_per_epoch, correct=0.0, count=0)
            loss_sum, acc = torch.zeros((), device=device), torch.zeros((), device=device)
            for micro in range(args.grad_accum):
                flat, sizes, labels, idx = next(batches)  # b images x 2 crops, (b,), (b,)
                b = idx.shape[0]
                x = to_input(flat, sizes).unflatten(0, (b, 2)).transpose(0, 1).flatten(0, 1)  # (2b, 3, S, S): view 0, then view 1
                with torch.no_grad(), autocast:  # the frozen encoder: no autograd
                    feats = vit.pool(encoder(x), pool)  # (2b, D)
                feats = feats.float().view(2, b, -1)
                if ddp:  # sync gradients on the last micro-step only
                    model.require_backward_grad_sync = micro == args.grad_accum - 1
                with autocast:
                    z, p = model(feats)  # (2, b, P) each
                z, p = F.normalize(z.float().detach(), dim=-1), F.normalize(p.float(), dim=-1)
                loss, loss_value, micro_acc = nnclr_step(z, p, idx.to(device), labels.to(device), queue, args.temperature)
                scaler.scale(loss / args.grad_accum).backward()
                loss_sum += loss_value / args.grad_accum
                acc += micro_acc / args.grad_accum
            nonfinite_at = torch.where((nonfinite_at < 0) & ~torch.isfinite(loss_sum), iter_num, nonfinite_at)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            iter_num += 1
            imgs_seen += args.batch_size
            pending.append(acc)
            pbar.update(1)
            at_log = iter_num % args.log_interval == 0 or iter_num == max_iters
            if at_log:
                check_finite()
                flush_acc()
                dt, loss_sum = time.time() - t0, loss_sum.item()
                entry = dict(iter=iter_num, epoch=round(iter_num / steps_per_epoch, 3), loss=round(loss_sum, 5),
                             nn_acc=round(sum(window) / len(window), 4), lr=lr_now, img_per_s=round(imgs_seen / dt, 1))
                pbar.set_postfix(loss=f"{loss_sum:.4f}", nn_acc=f"{entry['nn_acc']:.3f}", lr=f"{lr_now:.2e}",
                                 img_s=f"{entry['img_per_s']:.0f}")
                if master_process:
                    log(entry)
                t0, imgs_seen = time.time(), 0
                window.clear()
            if iter_num % steps_per_epoch == 0:  # end of an epoch: the accuracy over all its steps
                flush_acc()
                nn_acc_epoch = monitor["correct"] / max(1, monitor["count"])
                if master_process:
                    log(dict(iter=iter_num, epoch=iter_num // steps_per_epoch, nn_acc_epoch=round(nn_acc_epoch, 4)))
                    pbar.write(f"epoch {iter_num // steps_per_epoch}: nearest-neighbour accuracy {nn_acc_epoch:.4f}")
            # the one save-or-stop path: a stop is read at log steps before the last (the last writes the final file)
            stop = at_log and iter_num < max_iters and stop_requested()
            if iter_num < max_iters and (iter_num % args.ckpt_interval == 0 or stop):
                save(f"ckpt_{iter_num:08d}.pt")
            if stop:
                if master_process:
                    pbar.write(f"stopped by signal at iteration {iter_num}; to continue, run the same command with --resume auto")
                if ddp:
                    dist.barrier()  # rank 0 may still be writing; leave together (gloo aborts otherwise)
                    dist.destroy_process_group()
                sys.exit(0)
    pbar.close()
    save("head.pt")
    if master_process:
        print(f"wrote {os.path.join(out_dir, 'head.pt')}")
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
