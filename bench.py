"""
Speed of MAE-CT's training steps, feature extraction and input pipeline, on synthetic inputs.

    python bench.py                                  # CPU: vit_tiny, 64 px, patch 8, batch 8, 1 thread (< 1 min)
    python bench.py --device cuda --compile 0,1      # one GPU: vit_b16, 224 px, batch 256, bf16 autocast
    python bench.py --stages data                    # images/s per data-loading worker, ours vs the standard pipeline
    python bench.py --json 1                         # one JSON object (env, rows, wins) instead of the tables
    python bench.py --stages kmeans                  # knn.py --kmeans at ImageNet size (1.28M x 1024, 1000 clusters)
    python bench.py --stages workers                 # time to a loader's first batch: workers forked vs spawned

Stages (--stages): mae = stage-1 step (encoder on the 25% kept patches + decoder, fwd + bwd + AdamW),
head = stage-2 step (frozen encoder without autograd, 2 views, NNCLR head fwd + bwd + AdamW, queue),
ct = stage-3 step (lower half of the blocks without autograd, upper half + head trained, 2 views, EMA
updates), extract = eval forward + pooling, data = the training input pipeline (see bench_data), kmeans = one
k-means++ centre and one Lloyd iteration of knn.py --kmeans (see bench_kmeans), workers = the start-up of a
loader's workers (see bench_workers).
"images" are dataset images: an MAE step sees one crop per image (the unit of REFERENCE §8), a head or
CT step two views per image; FLOPs and MFU count all views.

One run puts side by side the attention backends (--attn) and torch.compile off / on (--compile), each
varied from the first value of the other, and the known wins as row pairs: frozen blocks without vs with
autograd (head, ct), and on CUDA bf16 autocast vs float32 (TF32 matmuls) and fused vs foreach AdamW.
"""
import argparse
import copy
import functools
import gc
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import mae_pretrain
import vit

# -----------------------------------------------------------------------------
# flags; 0 / "" / "auto" = the device's default (CPU: small enough for a 2-core laptop, CUDA: the paper's B/16)
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--stages", default="mae,head,ct,extract,data",
                    help="comma list of mae, head, ct, extract, data, kmeans, workers")
parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
parser.add_argument("--model", default="",
                    help=f"preset: {', '.join(vit.PRESETS)} (default: vit_b16 on CUDA, vit_tiny on CPU)")
parser.add_argument("--img_size", type=int, default=0, help="0 = 224 on CUDA, 64 on CPU")
parser.add_argument("--patch_size", type=int, default=0, help="0 = the preset's on CUDA, 8 on CPU")
parser.add_argument("--dim", type=int, default=0, help="0 = the preset's")
parser.add_argument("--depth", type=int, default=0, help="0 = the preset's")
parser.add_argument("--heads", type=int, default=0, help="0 = the preset's")
parser.add_argument("--dec_dim", type=int, default=512)
parser.add_argument("--dec_depth", type=int, default=8)
parser.add_argument("--dec_heads", type=int, default=16)
parser.add_argument("--batch_size", type=int, default=0, help="images per step; 0 = 256 on CUDA, 8 on CPU")
parser.add_argument("--warmup", type=int, default=0, help="untimed steps first; 0 = 3 on CUDA, 1 on CPU")
parser.add_argument("--iters", type=int, default=0, help="timed steps; 0 = 10 on CUDA, 3 on CPU")
parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                    help="autocast dtype; auto = bfloat16 on CUDA, float32 on CPU")
parser.add_argument("--attn", default="auto",
                    help="comma list of sdpa, math, flash_attn; auto = sdpa,math (+flash_attn where installed)")
parser.add_argument("--compile", default="0", help="comma list of 0 / 1 (torch.compile off / on)")
parser.add_argument("--wins", type=int, default=1, help="1: also measure the known wins as row pairs")
parser.add_argument("--peak_tflops", type=float, default=0,
                    help="dense peak for MFU; 0 = by GPU name (H100/H200 989 bf16, A100 312)")
parser.add_argument("--queue_size", type=int, default=65536, help="NNCLR queue length (head, ct)")
parser.add_argument("--data_images", type=int, default=200, help="JPEGs generated for --stages data")
parser.add_argument("--data_img_size", type=int, default=224,
                    help="crop size of the data stage (the training resolution)")
parser.add_argument("--kmeans_n", type=int, default=0, help="k-means features; 0 = 1.28M on CUDA, 128k on CPU")
parser.add_argument("--kmeans_dim", type=int, default=1024, help="k-means feature width")
parser.add_argument("--kmeans_clusters", type=int, default=1000, help="k-means clusters")
parser.add_argument("--json", type=int, default=0, help="1: print one JSON object instead of markdown tables")
parser.add_argument("--profile", type=int, default=0, help="N > 0: after each row's timing, profile one step and print "
                    "its N most expensive ops (device time on CUDA) to stderr")
parser.add_argument("--threads", type=int, default=0,
                    help="torch's CPU threads; 0 = 1 on CPU (per-core numbers, steady on a "
                    "machine shared with other jobs, where several threads stall each other), torch's default on CUDA")
parser.add_argument("--seed", type=int, default=0)


def fail(msg):  # one clear line
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


MEAN, STD = vit.IMAGENET_MEAN, vit.IMAGENET_STD  # what vit.normalize uses
PEAKS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 TFLOP/s per GPU (vendor datasheets)

# -----------------------------------------------------------------------------
# FLOPs per image. Convention: matmul FLOPs only, 2 per multiply-add, as vit.flops_per_image (norms,
# softmax, GELU, the optimizer and the EMAs are a few % of a ViT and left out). A matmul run without autograd
# costs 1x its forward; a trained one 3x (forward, gradient to its input, gradient to its weights), except
# where its input needs no gradient: the patch embedding on images, the head's first layer on features of a
# frozen encoder, and the loss logits against the queue's constant neighbours cost 2x. This is exactly what
# torch.utils.flop_counter counts for the step (tests/test_bench.py checks it), and the usual MFU convention
# (PaLM, nanoGPT: 6 x params x tokens for training). Only useful work counts: the "autograd" twin of frozen
# blocks does more arithmetic for the same step, so it shows as lower MFU, not as more FLOPs.


def linear_flops(module):
    """Forward FLOPs of one row through every nn.Linear of `module` (2 * in * out each)."""
    return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear))


def blocks_flops(dim, depth, tokens):
    """Forward FLOPs of `depth` transformer blocks of width `dim` on `tokens` tokens."""
    return vit.flops_per_image(dict(dim=dim, depth=depth, patch_size=1, img_size=0), tokens=tokens)


def mae_flops(model_args, dec_args, mask_ratio=0.75):
    """One MAE training step per image: encoder on 1+K tokens (patch embedding on all N patches),
    decoder_embed on 1+K, decoder blocks + decoder_pred on 1+N; everything trained."""
    N = (model_args["img_size"] // model_args["patch_size"]) ** 2
    K, D, Dd = int(N * (1 - mask_ratio)), model_args["dim"], dec_args["dec_dim"]
    fwd = (vit.flops_per_image(model_args, tokens=1 + K) + 2 * (1 + K) * D * Dd
           + blocks_flops(Dd, dec_args["dec_depth"], 1 + N) + 2 * (1 + N) * Dd * 3 * model_args["patch_size"] ** 2)
    return 3 * fwd - vit.flops_per_image(dict(model_args, depth=0))  # the patch embedding: 2x (images need no gradient)


def encoder_flops(model_args, no_grad_blocks):
    """A training step's encoder FLOPs per view on the full 1+N tokens: the patch embedding and the
    lower `no_grad_blocks` blocks 1x, the blocks above 3x (no_grad_blocks = depth: the whole encoder 1x)."""
    L = model_args["depth"]
    frozen = vit.flops_per_image(dict(model_args, depth=no_grad_blocks))  # includes the patch embedding
    trained = (vit.flops_per_image(dict(model_args, depth=L - no_grad_blocks))
               - vit.flops_per_image(dict(model_args, depth=0)))
    return frozen + 3 * trained


def nnclr_flops(model_args, head, queue_size, batch, freeze):
    """A stage-2 (freeze None: the whole encoder without autograd) or stage-3 step per image, 2 views:
    encoder, head (projector + predictor) trained, queue lookup (cosine similarity to every entry) 1x;
    stage 3 also runs the EMA target projector 1x. The loss: two (B, P) x (P, B) logit matmuls, 2x."""
    P = head.args["proj_dim"]
    if freeze is None:  # stage 2: the head's first layer gets no input gradient
        per_view = (vit.flops_per_image(model_args) + 3 * linear_flops(head)
                    - 2 * head.args["in_dim"] * head.args["proj_hidden"])
    else:
        per_view = encoder_flops(model_args, freeze) + 3 * linear_flops(head) + linear_flops(head.projector)
    return 2 * (per_view + 2 * P * queue_size) + 2 * 2 * (2 * batch * P)

# -----------------------------------------------------------------------------
# the steps. Each builder returns (step, FLOPs per image, views): step() runs one full training step on a
# fixed synthetic uint8 batch that is normalised on the device each step, as the stage scripts do.


class Bench:
    def __init__(self, args, device):
        self.args, self.device, self.cuda = args, device, device.startswith("cuda")
        self.model_args = vit.model_args_from_preset(args.model, args.img_size, args.patch_size,
                                                     args.dim, args.depth, args.heads)
        self.dec_args = dict(dec_dim=args.dec_dim, dec_depth=args.dec_depth, dec_heads=args.dec_heads,
                             norm_pix_loss=True)
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255

    def images(self, n):  # (n, 3, S, S) uint8 on the device, like a batch from the loader
        g = torch.Generator().manual_seed(self.args.seed)
        S = self.model_args["img_size"]
        return torch.randint(0, 256, (n, 3, S, S), dtype=torch.uint8, generator=g).to(self.device)

    def normalize(self, x):
        return (x.float() - self.mean) / self.std

    def autocast(self, cfg):
        return (nullcontext() if cfg["dtype"] == "float32"
                else torch.autocast(self.device.split(":")[0], dtype=getattr(torch, cfg["dtype"])))

    def adamw(self, groups, cfg, lr=1e-4):
        """AdamW as the stage scripts build it: fused on CUDA (cfg "foreach": the multi-tensor kernels)."""
        groups = [{k: v for k, v in g.items() if k != "names"} for g in groups]
        fused = self.cuda and cfg["optim"] == "fused"
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=fused, foreach=None if fused else True)

    def mae(self, cfg):
        model = mae_pretrain.MAE(**self.model_args, **self.dec_args).to(self.device).train()
        opt = self.adamw(vit.param_groups(model, 0.05), cfg)
        fwd = torch.compile(model) if cfg["compile"] else model
        x8 = self.images(self.args.batch_size)

        def step():
            with self.autocast(cfg):
                loss = fwd(self.normalize(x8), 0.75)[0]
            loss.backward()  # the script reads the loss at log steps only: no device sync here
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step, mae_flops(self.model_args, self.dec_args), 1

    def head(self, cfg):
        """Stage 2 as nnclr_head.py's loop runs it on one process (all_gather is then the identity)."""
        import nnclr_head as s2
        encoder = vit.ViT(**self.model_args).to(self.device).eval()
        # the win: the frozen encoder under no_grad. Its "autograd" twin leaves the encoder's parameters
        # requiring grad (frozen only by not being in the optimizer), so the backward runs through it.
        encoder.requires_grad_(cfg["frozen"] == "autograd")
        head = s2.NNCLRHead(self.model_args["dim"]).to(self.device).train()
        queue = s2.Queue(self.args.queue_size, head.args["proj_dim"], self.args.seed, self.device)
        opt = self.adamw(vit.param_groups(head, 1e-5), cfg)
        enc = torch.compile(encoder) if cfg["compile"] else encoder  # what nnclr_head.py compiles
        B = self.args.batch_size
        x8, idx = self.images(2 * B), torch.arange(B, device=self.device)  # (2B, 3, S, S): view 0, then view 1

        def step():
            with torch.no_grad() if cfg["frozen"] == "no_grad" else nullcontext(), self.autocast(cfg):
                feats = vit.pool(enc(self.normalize(x8)), "mean")  # (2B, D)
            with self.autocast(cfg):
                z, p = head(feats.float().view(2, B, -1))  # (2, B, P) each
            z, p = F.normalize(z.float().detach(), dim=-1), F.normalize(p.float(), dim=-1)
            loss = s2.nnclr_step(z, p, idx, idx, queue, 0.15)[0]  # lookup, loss, queue push (no device sync)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            encoder.zero_grad(set_to_none=True)
        return step, nnclr_flops(self.model_args, head, self.args.queue_size, B, None), 2

    def ct(self, cfg):
        """Stage 3 as contrastive_tune.py's loop runs it on one process: lower half frozen, upper half +
        head trained, EMA target projector for the queue, top-k neighbour, EMAs after the step."""
        import contrastive_tune as s3
        encoder = vit.ViT(**self.model_args).to(self.device)
        head = s3.NNCLRHead(self.model_args["dim"]).to(self.device)
        freeze = self.model_args["depth"] // 2
        model = s3.ContrastiveModel(encoder, head, "mean", freeze).train()
        target = copy.deepcopy(head.projector).requires_grad_(False).train()
        encoder_ema = copy.deepcopy(encoder).requires_grad_(False).eval()
        queue = s3.Queue(self.args.queue_size, head.args["proj_dim"], self.args.seed, self.device)
        groups = vit.param_groups(encoder, 0.05, 0.65) + vit.param_groups(head, 1e-5)  # the trained parameters only
        opt = self.adamw(groups, cfg)
        if cfg["frozen"] == "autograd":  # the twin: frozen parts still require grad and run with autograd
            encoder.requires_grad_(True)
            model.freeze_blocks = 0
        fwd = torch.compile(model) if cfg["compile"] else model  # what contrastive_tune.py compiles
        B = self.args.batch_size
        x8, idx = self.images(2 * B), torch.arange(B, device=self.device)

        def step():
            with self.autocast(cfg):
                f, _, p = fwd(self.normalize(x8))  # (2, B, D), (2, B, P)
            with torch.no_grad(), self.autocast(cfg):
                zt = torch.stack([target(v) for v in f.detach()])  # (2, B, P)
            zt, p = F.normalize(zt.float(), dim=-1), F.normalize(p.float(), dim=-1)
            g = torch.Generator(device=self.device).manual_seed(self.args.seed)
            loss = s3.nnclr_step(zt, p, idx, idx, queue, 0.15, 20, g)[0]  # top-20 neighbour
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            encoder.zero_grad(set_to_none=True)
            s3.ema_update(target, head.projector, 0.99)
            s3.ema_update(encoder_ema, encoder, 0.9999)
        return step, nnclr_flops(self.model_args, head, self.args.queue_size, B, freeze), 2

    def extract(self, cfg):
        model = vit.ViT(**self.model_args).to(self.device).eval()
        fwd = torch.compile(model) if cfg["compile"] else model
        x8 = self.images(self.args.batch_size)

        @torch.no_grad()
        def step():
            with self.autocast(cfg):
                vit.pool(fwd(self.normalize(x8)), "mean")
        return step, vit.flops_per_image(self.model_args), 1

# -----------------------------------------------------------------------------
# the data stage: the MAE train transform of mae_pretrain.ImageFolder against the standard pipeline


def make_jpegs(root, n, seed=0, size=(500, 375)):
    """n ImageNet-sized JPEGs (quality 90) in root/class_0/ with the structure of photos: smooth colour
    fields, hard-edged shapes and fine grain, so the JPEG coder works as hard as on real images."""
    os.makedirs(os.path.join(root, "class_0"), exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(n):
        field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        img = np.asarray(field, dtype=np.float32).copy()
        for _ in range(12):  # rectangles of another colour, with soft shading inside
            x0, y0 = rng.integers(0, w - 40), rng.integers(0, h - 40)
            x1, y1 = x0 + rng.integers(20, w // 2), y0 + rng.integers(20, h // 2)
            img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * 0.4 + rng.uniform(0, 255, 3) * 0.6
        img += rng.normal(0, 12, (h, w, 1)) + rng.normal(0, 4, (h, w, 3))  # grain
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(os.path.join(root, "class_0", f"{i:05d}.jpg"),
                                                                quality=90)
    return root


def crop_rng(seed, epoch, i):  # the per-sample RNG of mae_pretrain.ImageFolder, so both pipelines cut the same crops
    return random.Random((seed * 1_000_003 + epoch) * 1_000_003 + i)


def standard_sample(path, img_size, rng):
    """The torchvision way, all on the CPU worker: full decode, RandomResizedCrop (crop, then resize,
    scale 0.2-1, bicubic), flip, ToTensor (float32 in [0, 1]), Normalize. -> (3, S, S) float32."""
    img = Image.open(path).convert("RGB")
    img = (img.crop(mae_pretrain.random_resized_crop(rng, *img.size, (0.2, 1.0)))
           .resize((img_size, img_size), Image.BICUBIC))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous().float().div(255)
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def bench_data(args, device):
    """Images/s of one worker (one process, one thread, like a DataLoader worker) for each pipeline,
    best of 3 passes over the same images and crops. Ours leaves the resize and normalisation to the
    device: its last row times that part (crops_to_batch on batches of --batch_size crops) on `device`,
    where it runs in the training process, not in a worker."""
    root = tempfile.mkdtemp(prefix="bench_jpegs_")
    try:
        make_jpegs(root, args.data_images, args.seed)
        views = functools.partial(mae_pretrain.train_boxes, views=1)  # one RandomResizedCrop(0.2-1) + flip
        ds = mae_pretrain.ImageFolder(root, args.data_img_size, views, mae_pretrain.flip_each, args.seed,
                                      resize=False)  # as on a GPU
        ds_cpu = mae_pretrain.ImageFolder(root, args.data_img_size, views, mae_pretrain.flip_each, args.seed)
        paths = [p for p, _ in ds.samples]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        pipelines = {
            "ours: mae_pretrain.ImageFolder + collate (draft decode, crop, uint8 at the crop's size)":
                lambda e, i: mae_pretrain.collate([ds[(e, i)]]),
            "ours as on a CPU (resize=True): the worker resizes too, in one resample with the crop":
                lambda e, i: mae_pretrain.collate([ds_cpu[(e, i)]]),
            "standard: full decode, crop, resize, float32, normalise on CPU":
                lambda e, i: standard_sample(paths[i], args.data_img_size, crop_rng(args.seed, e, i)),
            "for scale: the full-size JPEG decode alone": lambda e, i: Image.open(paths[i]).convert("RGB")}
        best = dict.fromkeys(pipelines, math.inf)
        for epoch in range(3):  # interleaved passes, so that a busy neighbour hurts every pipeline alike
            for name, sample in pipelines.items():
                t0 = time.perf_counter()
                for i in range(len(paths)):
                    sample(epoch, i)
                best[name] = min(best[name], time.perf_counter() - t0)
        torch.set_num_threads(threads)
        # the device's share of ours: resize + normalise of real crops, in batches as in training
        n = min(args.batch_size, len(paths))
        batches = [mae_pretrain.collate([ds[(e, i)] for i in range(n)]) for e in range(3)]
        mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) * 255 for v in (MEAN, STD))
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        dev = math.inf
        for rep in range(4):  # the first pass warms the device up
            sync()
            t0 = time.perf_counter()
            for flat, sizes, _, _ in batches:
                (mae_pretrain.crops_to_batch(flat, sizes, args.data_img_size, device) - mean) / std
            sync()
            dev = min(dev, time.perf_counter() - t0) if rep else dev
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = [dict(stage="data", variant=name, img_s=len(paths) / t, ms_per_img=1e3 * t / len(paths),
                 img_size=args.data_img_size, images=len(paths)) for name, t in best.items()]
    for r in rows[:2]:
        r["speedup"] = r["img_s"] / rows[2]["img_s"]
    rows.append(dict(stage="data", variant=f"ours, the {device} part: crops_to_batch + normalise, batches of {n}",
                     img_s=3 * n / dev, ms_per_img=1e3 * dev / (3 * n), img_size=args.data_img_size, images=3 * n))
    return rows

def bench_workers(args):
    """The time to the first batch of the stage scripts' loader (2 and 8 workers, 64 images of 32 px a batch) when
    its workers are forked and when they are spawned (what the stage scripts do: see make_loader), median of 3."""
    root = tempfile.mkdtemp(prefix="bench_workers_")
    rows = []
    try:
        make_jpegs(root, 256, args.seed, size=(64, 64))
        ds = mae_pretrain.ImageFolder(root, 32, mae_pretrain.val_box)
        for workers in (2, 8):
            for ctx in ("fork", "spawn"):
                times = []
                for _ in range(3):
                    loader = torch.utils.data.DataLoader(
                        ds, batch_size=64, sampler=[(0, i) for i in range(256)], num_workers=workers,
                        collate_fn=mae_pretrain.collate, worker_init_fn=mae_pretrain.quiet_worker,
                        multiprocessing_context=ctx)
                    t0 = time.perf_counter()
                    it = iter(loader)
                    next(it)
                    times.append(time.perf_counter() - t0)
                    del it, loader
                rows.append(dict(stage="workers", variant=f"{workers} workers, {ctx}", workers=workers,
                                 start=ctx, first_batch_s=sorted(times)[1]))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


def bench_kmeans(args, device):
    """knn.py --kmeans on random L2-normalised features (N x D, float32, on device), C clusters: the time of one
    k-means++ centre (a distance pass over every feature and a draw) and of one Lloyd iteration (every feature's
    nearest centroid, in chunks, and the float64 sums), each the median of a few; and what they make at ImageNet size
    (N = 1,281,167), scaled linearly in N where N is smaller (both are O(N) for fixed D and C)."""
    import knn
    n = args.kmeans_n or (1_281_167 if device.startswith("cuda") else 128_000)
    d, c = args.kmeans_dim, args.kmeans_clusters
    g = torch.Generator(device=device).manual_seed(args.seed)
    x = F.normalize(torch.randn(n, d, device=device, generator=g), dim=1)
    chunk = max(1, 2 ** 26 // c)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    x_sq = x.square().sum(1)

    def centre():  # one k-means++ step, as knn.kmeans takes it: distances to the newest centre, a draw
        d2 = (x_sq - 2 * (x @ x[0]) + x[0].square().sum()).clamp_(min=0).double()
        torch.multinomial(d2 / d2.sum(), 1, generator=g)

    centroids = x[torch.randperm(n, generator=g, device=device)[:c]]

    def iteration():  # one Lloyd iteration: the assignment, then the float64 sums of the update
        assign = knn.sq_dists_argmin(x, x_sq, centroids, chunk)[0]
        sums = torch.zeros(c, d, dtype=torch.float64, device=device)
        for s in range(0, n, chunk):
            sums.index_add_(0, assign[s:s + chunk], x[s:s + chunk].double())
        torch.bincount(assign, minlength=c)

    times = {}
    for name, fn, reps in (("centre", centre, 10), ("iteration", iteration, 3)):
        fn()  # warm-up
        ts = []
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        times[name] = sorted(ts)[len(ts) // 2]
    scale = 1_281_167 / n
    return [dict(stage="kmeans", variant=f"{n} x {d} features, {c} clusters", n=n, dim=d, clusters=c,
                 ms_centre=1e3 * times["centre"], s_iteration=times["iteration"],
                 imagenet_init_s=c * times["centre"] * scale, imagenet_iteration_s=times["iteration"] * scale,
                 scaled=scale != 1)]

# -----------------------------------------------------------------------------
# running and printing


def measure(bench, stage, cfg):
    """Build the stage's step for cfg, warm up, time --iters steps. -> one row (a dict)."""
    args = bench.args
    row = dict(stage=stage, **cfg, batch=args.batch_size)
    vit.set_attn_backend(cfg["attn"])
    torch._dynamo.reset()  # a fresh compile per row: no guards or caches shared between configurations
    gc.collect()
    if bench.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        step, flops, views = getattr(bench, stage)(cfg)
        for _ in range(args.warmup):  # the first steps compile, autotune and allocate
            step()
        if bench.cuda:  # the mean over back-to-back steps: the GPU's queue stays full, as in training
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.iters):
                step()
            torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / args.iters
        else:  # the median step: robust to other processes on a shared CPU
            times = []
            for _ in range(args.iters):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            dt = sorted(times)[len(times) // 2]
        if args.profile:  # where one step's time goes, op by op (kernels generated by compile show by name)
            acts = ([torch.profiler.ProfilerActivity.CPU]
                    + ([torch.profiler.ProfilerActivity.CUDA] if bench.cuda else []))
            with torch.profiler.profile(activities=acts) as prof:
                step()
                if bench.cuda:
                    torch.cuda.synchronize()
            key = "self_device_time_total" if bench.cuda else "self_cpu_time_total"
            print(f"profile of one {stage} step, {cfg}:\n"
                  + prof.key_averages().table(sort_by=key, row_limit=args.profile), file=sys.stderr)
    except Exception as e:  # one failing configuration (out of memory, a compile error) does not end the run
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
        print(f"{stage} {cfg}: {row['error']}", file=sys.stderr)
        return row
    finally:
        step = None
    row.update(views=views, img_s=args.batch_size / dt, ms_step=dt * 1e3, gflop_img=flops / 1e9,
               tflops=flops * args.batch_size / dt / 1e12)
    if args.peak_tflops:
        row["mfu"] = row["tflops"] / args.peak_tflops
    if bench.cuda:
        row["mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    print(f"{stage:7s} {cfg}: {row['img_s']:.1f} img/s, {row['tflops']:.3g} TFLOP/s"
          + (f", {row['mem_gib']:.1f} GiB" if bench.cuda else ""), file=sys.stderr)
    return row


def configs(args, stage, cuda):
    """Rows for one stage: the attention x compile grid, then the known wins, each a change of the base
    row (first attention backend, first compile value). -> [(cfg, name of the win or None)]"""
    attns, compiles = args.attn.split(","), [int(c) for c in args.compile.split(",")]
    base = dict(attn=attns[0], compile=compiles[0], dtype=args.dtype, optim="fused" if cuda else "foreach",
                frozen="no_grad")
    grid = [(a, compiles[0]) for a in attns] + [(attns[0], c) for c in compiles[1:]]  # one factor at a time
    out = [(dict(base, attn=a, compile=c), None) for a, c in grid]
    if args.wins and stage in ("head", "ct"):
        out.append((dict(base, frozen="autograd"), "frozen blocks without autograd"))
    if args.wins and cuda and stage != "extract" and args.dtype != "float32":
        out.append((dict(base, dtype="float32"), f"{args.dtype} autocast instead of float32 (TF32 matmuls)"))
    if args.wins and cuda and stage != "extract":
        out.append((dict(base, optim="foreach"), "fused AdamW instead of foreach"))
    if stage == "extract":
        for cfg, _ in out:
            cfg.update(optim="-", frozen="-")
    return out


def fmt(v, nd=1):
    return "-" if v is None else f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def markdown(rows, cols):
    """cols: [(header, key, digits)] -> a markdown table."""
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(k), nd) if not (k == "img_s" and "error" in r) else r["error"]
                                       for _, k, nd in cols) + " |")
    return "\n".join(lines)


def main(args):
    use_cuda = torch.cuda.is_available() if args.device == "auto" else args.device.startswith("cuda")
    device = "cuda" if use_cuda else "cpu"
    if use_cuda:  # as the stage scripts
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # device defaults: the paper's B/16 on a GPU; on a CPU a size whose whole default run takes < 1 minute
    args.model = args.model or ("vit_b16" if use_cuda else "vit_tiny")
    args.img_size = args.img_size or (224 if use_cuda else 64)
    args.patch_size = args.patch_size or (0 if use_cuda else 8)
    args.batch_size = args.batch_size or (256 if use_cuda else 8)
    args.warmup = args.warmup or (3 if use_cuda else 1)
    args.iters = args.iters or (10 if use_cuda else 3)
    if args.dtype == "auto":
        args.dtype = "bfloat16" if use_cuda else "float32"
    if args.attn == "auto":
        args.attn = "sdpa,math" + (",flash_attn" if use_cuda and vit.flash_attn_qkvpacked_func is not None else "")
    gpu = torch.cuda.get_device_name() if use_cuda else ""
    if not args.peak_tflops and use_cuda:
        args.peak_tflops = next((v for k, v in PEAKS.items() if k in gpu), 0.0)
    stages = args.stages.split(",")
    if any(s not in ("mae", "head", "ct", "extract", "data", "kmeans", "workers") for s in stages):
        fail(f"--stages {args.stages}: choose from mae, head, ct, extract, data, kmeans, workers")
    if any(a not in ("sdpa", "math", "flash_attn") for a in args.attn.split(",")):
        fail(f"--attn {args.attn}: choose from sdpa, math, flash_attn")
    if "flash_attn" in args.attn and (not use_cuda or vit.flash_attn_qkvpacked_func is None):
        fail("--attn flash_attn needs CUDA and the flash-attn package")
    if any(c not in ("0", "1") for c in args.compile.split(",")):
        fail(f"--compile {args.compile}: a comma list of 0 and 1")
    if args.threads or not use_cuda:
        torch.set_num_threads(args.threads or 1)
    torch.manual_seed(args.seed)
    try:
        bench = Bench(args, device)
    except ValueError as e:  # an unknown preset, an image size not divisible by the patch, ...
        fail(str(e))
    env = dict(device=gpu or f"cpu ({torch.get_num_threads()} threads)", torch=torch.__version__, model=args.model,
               model_args=bench.model_args, dec_args=bench.dec_args, batch_size=args.batch_size, warmup=args.warmup,
               iters=args.iters, peak_tflops=args.peak_tflops or None)
    rows, wins = [], []
    for stage in stages:
        if stage in ("data", "kmeans", "workers"):
            rows += dict(data=lambda: bench_data(args, device), kmeans=lambda: bench_kmeans(args, device),
                         workers=lambda: bench_workers(args))[stage]()
            continue
        base = None
        for cfg, win in configs(args, stage, use_cuda):
            row = measure(bench, stage, cfg)
            rows.append(row)
            base = base or row
            if win:
                wins.append(dict(stage=stage, win=win, img_s=base.get("img_s"), img_s_without=row.get("img_s"),
                                 speedup=base["img_s"] / row["img_s"] if "img_s" in base and "img_s" in row else None))
    if args.json:
        print(json.dumps(dict(env=env, rows=rows, wins=wins)))
        return
    steps = [r for r in rows if r["stage"] not in ("data", "kmeans", "workers")]
    if steps:
        print(f"{env['device']}, torch {env['torch']}, {args.model} {bench.model_args}, batch {args.batch_size}, "
              f"{args.warmup} warm-up + {args.iters} timed steps"
              + (f", MFU vs {args.peak_tflops:g} TFLOP/s" if args.peak_tflops else ""))
        cols = [("stage", "stage", 0), ("attn", "attn", 0), ("compile", "compile", 0), ("dtype", "dtype", 0),
                ("AdamW", "optim", 0), ("frozen", "frozen", 0), ("views", "views", 0), ("img/s", "img_s", 1),
                ("ms/step", "ms_step", 1), ("GFLOP/img", "gflop_img", 2), ("TFLOP/s", "tflops", 3)]
        if args.peak_tflops:
            cols.append(("MFU", "mfu", 3))
        if use_cuda:
            cols.append(("peak GiB", "mem_gib", 1))
        print("\n" + markdown(steps, cols))
    if wins:
        print("\nknown wins (base row vs the same step without the win):\n")
        print(markdown(wins, [("stage", "stage", 0), ("win", "win", 0), ("img/s with", "img_s", 1),
                              ("img/s without", "img_s_without", 1), ("speedup", "speedup", 2)]))
    data = [r for r in rows if r["stage"] == "data"]
    if data:
        print(f"\ninput pipeline, one worker, {data[0]['images']} JPEGs 500x375 q90 -> "
              f"{args.data_img_size} px crops:\n")
        print(markdown(data, [("pipeline", "variant", 0), ("img/s", "img_s", 1), ("ms/img", "ms_per_img", 2),
                              ("speedup", "speedup", 2)]))
    ws = [r for r in rows if r["stage"] == "workers"]
    if ws:
        print(f"\nloader start-up ({os.cpu_count()} CPUs): time to the first batch, median of 3:\n")
        print(markdown(ws, [("workers", "variant", 0), ("first batch, s", "first_batch_s", 2)]))
    km = [r for r in rows if r["stage"] == "kmeans"]
    if km:
        print(f"\nk-means ({env['device']}): one k-means++ centre, one Lloyd iteration, and at ImageNet size "
              f"(1,281,167 features; {'scaled linearly in N' if km[0]['scaled'] else 'measured'}):\n")
        print(markdown(km, [("features", "variant", 0), ("ms / centre", "ms_centre", 1),
                            ("s / iteration", "s_iteration", 2), ("ImageNet: k-means++ start, s", "imagenet_init_s", 0),
                            ("ImageNet: s / iteration", "imagenet_iteration_s", 1)]))


if __name__ == "__main__":
    main(parser.parse_args())
