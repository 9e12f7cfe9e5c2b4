"""
Stage 2 of MAE-CT: an NNCLR head (projector, predictor, a queue of nearest neighbours) on the frozen encoder.

    python nnclr_head.py --data_path DATA --init out/mae/mae.pt --out_dir out/head
    torchrun --nproc_per_node 8 nnclr_head.py --data_path DATA --init mae.pt     # the global --batch_size is split

The encoder (mae.pt, ct.pt, a facebookresearch/mae or MAE-CT release) stays frozen, in eval mode and without
autograd; only the head trains, so that stage 3 (contrastive_tune.py) starts with a sensible contrastive signal.
Writes out_dir/head.pt (head, filled queue, the encoder's path and args), periodic out_dir/ckpt_*.pt and
out_dir/log.txt (JSON lines: loss, nearest-neighbour accuracy, img/s).
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
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import vit

# -----------------------------------------------------------------------------
# the method: the NNCLR head, its queue and loss, and the two views (REFERENCE §3-4). contrastive_tune.py keeps
# an identical copy (each script stands alone; tests/test_contrastive_tune.py keeps the copies equal).


class NNCLRHead(nn.Module):
    """Projector Linear-BN-ReLU-Linear-BN-ReLU-Linear-BN and predictor Linear-BN-ReLU-Linear, no biases, torch's
    default init (the authors'). Each view goes through on its own, so the BatchNorm statistics are per view."""

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

    def forward(self, x):
        """x (V, B, in_dim) pooled features of V views -> projections z, predictions p, both (V, B, proj_dim),
        not normalised."""
        z = [self.projector(v) for v in x]
        return torch.stack(z), torch.stack([self.predictor(v) for v in z])


class Queue:
    """FIFO memory of L2-normalised view-0 projections: vectors (Q, P), and per entry the dataset index of its
    sample (self-exclusion) and its label (the accuracy monitor; -1 = random init)."""

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
        """z (n, P) normalised, idx (n,) their dataset indices -> neighbours (n, P), their labels (n,). Cosine
        similarity; the sample's own entries get -1. topk 1: the argmax; else uniform over the top k."""
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
    """Concatenate x of every rank along dim, in rank order (= the order of the global batch). grad=True: the
    local slot is x itself, so the gradient flows to it (the other ranks' parts are constants here). A single
    process returns x."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x.contiguous()) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    if grad:
        parts[dist.get_rank()] = x
    return torch.cat(parts, dim=dim)


def nnclr_loss(nn0, nn1, p0, p1, temperature):
    """Symmetric NNCLR loss over the global batch. nn0, nn1 (B, P): queue neighbours of the two views' projections
    (no gradient); p0, p1 (B, P): normalised predictions. Row i of nn(z0) p1ᵀ / τ is sample i's neighbour against
    every prediction of view 1; its target is i."""
    target = torch.arange(p0.shape[0], device=p0.device)
    return 0.5 * (F.cross_entropy(nn0 @ p1.T / temperature, target) +
                  F.cross_entropy(nn1 @ p0.T / temperature, target))


def nnclr_step(z, p, idx, labels, queue, temperature, topk=1, generator=None):
    """The loss of one (micro-)step over the global batch. z (2, b, P): normalised projections of this rank's b
    samples (constants), p (2, b, P): normalised predictions, idx / labels (b,): dataset indices and labels.
    Every rank gathers the global batch (in sampler order) and computes the loss of all of it; p's gradient reaches
    only the local slot, so the ranks' gradients sum to the full gradient, and DDP averages them: the loss to call
    backward on is x world_size (the same gradient as an all-gather whose backward all-reduces). The queue gets
    view 0 after the loss. -> (loss for backward, loss value, nearest-neighbour accuracy of view 0, as the authors
    log it), tensors: the loop reads them at log steps only."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    z_all = all_gather(z.detach(), dim=1)  # (2, B, P)
    p_all = all_gather(p, dim=1, grad=True)  # (2, B, P)
    idx_all, labels_all = all_gather(idx), all_gather(labels)  # (B,)
    nn0, nn0_labels = queue.lookup(z_all[0], idx_all, topk, generator)
    nn1, _ = queue.lookup(z_all[1], idx_all, topk, generator)
    loss = nnclr_loss(nn0, nn1, p_all[0], p_all[1], temperature)
    queue.push(z_all[0], idx_all, labels_all)
    acc = (nn0_labels == labels_all).float().mean()
    return loss * world, loss.detach(), acc


def views_dataset(root, img_size, aug=False, seed=0, skip_bad=False, resize=True):
    """Two views of every image of root, from one decode: RandomResizedCrop(scale 0.08-1, bicubic) and a flip each;
    with aug (MAE-CT_aug) then strong_aug's colour operations, which work on the final pixels: the workers resize."""
    return ImageFolder(root, img_size, view_boxes, functools.partial(finish_views, aug=aug), seed, skip_bad,
                       resize=resize or bool(aug))


def view_boxes(rng, w, h):
    return [random_resized_crop(rng, w, h, (0.08, 1.0)) for _ in range(2)]


def finish_views(crops, rng, aug):
    crops = flip_each(crops, rng)
    return [strong_aug(c, rng, v) for v, c in enumerate(crops)] if aug else crops


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


# -----------------------------------------------------------------------------
# flags (defaults: the authors' ViT-B/16 MAE-CT recipe, REFERENCE §3)
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data_path", required=True, help="image folder with train/<class>/*")
parser.add_argument("--out_dir", default="out/head")
parser.add_argument("--init", default="", help="the encoder: mae.pt, ct.pt, a facebookresearch/mae or MAE-CT file, "
                    "or a release name (maect_base16, ...: vit.RELEASES)")
parser.add_argument("--resume", default="", help="a checkpoint to continue, or 'auto': the newest in out_dir")
parser.add_argument("--img_size", type=int, default=0, help="0 = the encoder's")
parser.add_argument("--heads", type=int, default=0, help="attention heads of a foreign --init of an unreleased width")
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
parser.add_argument("--grad_accum", type=int, default=1, help="micro-batches per process and step")
parser.add_argument("--blr", type=float, default=1e-4, help="lr = blr * batch_size * 2 views / 256")
parser.add_argument("--min_lr", type=float, default=0.0)
parser.add_argument("--weight_decay", type=float, default=1e-5)
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
parser.add_argument("--max_iters", type=int, default=0, help="stop after this many iterations (0 = epochs)")
parser.add_argument("--clip_grad", type=float, default=0.0, help="clip the gradient norm to this (0: off, authors')")
parser.add_argument("--tensorboard", type=int, default=0, help="1: also write TensorBoard events to out_dir/tb")
parser.add_argument("--wandb", default="", help="a W&B project: also log to Weights & Biases (pip install wandb)")
parser.add_argument("--wandb_run", default="", help="--wandb: the W&B run's name (default: W&B's own)")

# flags a resumed run must share with the checkpoint it continues (the run's length may change)
RESUME_FLAGS = ("img_size", "pool", "proj_hidden", "proj_dim", "pred_hidden", "queue_size", "temperature", "aug",
                "warmup_epochs", "batch_size", "blr", "min_lr", "weight_decay", "seed")


# -----------------------------------------------------------------------------
def main(args):
    check_flags(args, [
        ("epochs batch_size grad_accum log_interval ckpt_interval", ">= 1", lambda v: v >= 1),
        ("queue_size proj_hidden proj_dim pred_hidden", ">= 1", lambda v: v >= 1),
        ("max_iters keep_last img_size blr min_lr weight_decay heads clip_grad", ">= 0", lambda v: v >= 0),
        ("warmup_epochs", "-1 or >= 0", lambda v: v == -1 or v >= 0),
        ("temperature", "> 0", lambda v: v > 0),
        ("aug tensorboard", "0 or 1", lambda v: v in (0, 1)),
    ])
    ddp, ddp_rank, ddp_world_size, device, dtype, autocast = compute_init(args)
    master_process = ddp_rank == 0
    torch.manual_seed(args.seed)
    resume_path, ckpt = start_run(args, "nnclr_head", "head.pt", RESUME_FLAGS)  # out_dir locked
    out_dir = args.out_dir

    # the frozen encoder (always from its file) and the head: fresh, or resumed
    try:
        init = args.init or (ckpt["encoder_init"] if ckpt is not None else "")
        if not init:
            raise ValueError("--init (the encoder checkpoint, e.g. mae.pt) is required")
        want = ckpt["model_args"] if ckpt is not None else dict(img_size=args.img_size, heads=args.heads)
        encoder = vit.load_encoder(init, img_size=want["img_size"] or None, verbose=master_process,
                                   heads=want["heads"] or None)
        model_args = encoder.args
        if ckpt is not None and model_args != ckpt["model_args"]:
            raise ValueError(f"{init} holds a {model_args} encoder, the resumed head was trained on "
                             f"{ckpt['model_args']}")
        pool = ckpt["pool"] if ckpt is not None else args.pool
        head_args = ckpt["head_args"] if ckpt is not None else dict(
            in_dim=model_args["dim"], proj_hidden=args.proj_hidden, proj_dim=args.proj_dim,
            pred_hidden=args.pred_hidden)
        head = NNCLRHead(**head_args)
        if ckpt is not None:
            vit.load_state_strict(head, ckpt["head"], resume_path)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    encoder.requires_grad_(False)
    encoder.eval().to(device)
    head.to(device)
    queue = Queue.from_state(ckpt["queue"], device) if ckpt is not None else \
        Queue(args.queue_size, head_args["proj_dim"], args.seed, device)
    img_size = model_args["img_size"]

    # data: two views of every image
    train_set = views_dataset(os.path.join(args.data_path, "train"), img_size, args.aug, args.seed,
                              args.skip_bad_images, resize=device == "cpu")
    loader = train_loader(train_set, args, device)
    if loader.batch_size < 2:
        fail(f"{loader.batch_size} image(s) per process and micro-step: BatchNorm needs at least 2")
    steps_per_epoch = loader.sampler.steps
    max_iters = args.max_iters or args.epochs * steps_per_epoch
    warmup_iters = int(0.2 * max_iters) if args.warmup_epochs < 0 else round(args.warmup_epochs * steps_per_epoch)

    # optimizer: AdamW (0.9, 0.95) on the head, no weight decay on 1-D tensors; the lr scales with images x 2 views
    lr = args.blr * args.batch_size * 2 / 256
    groups = [{k: v for k, v in g.items() if k != "names"} for g in vit.param_groups(head, args.weight_decay)]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device != "cpu")
    scaler = torch.amp.GradScaler(enabled=dtype == "float16")
    iter_num = 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        iter_num = ckpt["iter_num"]
    if ddp and device != "cpu":  # BatchNorm statistics over the global batch (per view); not available on CPU
        head = nn.SyncBatchNorm.convert_sync_batchnorm(head)
    raw_model = model = head
    if args.compile:
        encoder = torch.compile(encoder)  # the encoder's forward is the cost of this stage
    if ddp:
        model = DDP(model, device_ids=[device] if device != "cpu" else None)

    def checkpoint():
        return dict(stage="nnclr_head", head=raw_model.state_dict(), head_args=head_args, queue=queue.state_dict(),
                    encoder_init=vit.encoder_source(init), model_args=model_args, pool=pool,
                    optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), iter_num=iter_num, args=vars(args))

    # training loop
    if master_process:
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(f"NNCLR head {head_args} ({n_params / 1e6:.1f}M params) on the frozen {model_args} encoder from "
              f"{init}, {pool} pooling, queue {tuple(queue.vectors.shape)}; {len(train_set)} train images, "
              f"{steps_per_epoch} steps/epoch, {max_iters} iterations, lr {lr:.3g}, {dtype}, "
              f"{ddp_world_size} process(es)")
    run = Run(args, "nnclr_head", resume_path, ckpt, iter_num, max_iters, steps_per_epoch, [train_set], device,
              nn_acc=True)
    ckpt = None  # free memory
    batches = train_batches(loader, iter_num)
    model.train()
    while iter_num < max_iters:
        lr_now = get_lr(iter_num, lr, args.min_lr, warmup_iters, max_iters)
        for g in optimizer.param_groups:
            g["lr"] = lr_now * g["lr_scale"]
        loss_sum, acc = torch.zeros((), device=device), torch.zeros((), device=device)
        for micro in range(args.grad_accum):
            flat, sizes, labels, idx = next(batches)  # b images x 2 crops, (b,), (b,)
            b = idx.shape[0]
            x = vit.normalize(crops_to_batch(flat, sizes, img_size, device))  # (2b, 3, S, S), the sample's views
            x = x.unflatten(0, (b, 2)).transpose(0, 1).flatten(0, 1)  # view 0 of every sample, then view 1
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
        grad_norm = clip_grad(model.parameters(), args.clip_grad, scaler, optimizer)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        run.step(iter_num, loss_sum, lr=lr_now, acc=acc, grad_norm=grad_norm)  # at log steps the log line
        run.save_or_stop(iter_num, checkpoint)
    run.finish("head.pt", checkpoint)


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
