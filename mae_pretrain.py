"""
Stage 1 of MAE-CT: masked autoencoder pretraining of a ViT (He et al. 2021).

Single process (CPU or one GPU):
    python mae_pretrain.py --data_path DATA --out_dir out/mae
Several GPUs / nodes (the global --batch_size is split over the processes):
    torchrun --nproc_per_node 8 mae_pretrain.py --data_path DATA --model vit_b16

Writes out_dir/mae.pt (encoder + decoder + everything to resume), periodic
out_dir/ckpt_*.pt, out_dir/log.txt (JSON lines) and out_dir/recon_*.png.
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
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import vit

# -----------------------------------------------------------------------------
# flags
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data_path", required=True, help="image folder with train/<class>/* and val/<class>/*")
parser.add_argument("--out_dir", default="out/mae")
parser.add_argument("--init", default="", help="start from a checkpoint (this project's mae.pt or a facebookresearch/mae one)")
parser.add_argument("--resume", default="", help="a checkpoint to continue, or 'auto' for the newest in out_dir")
parser.add_argument("--model", default="vit_b16", help=f"preset: {', '.join(vit.PRESETS)}")
parser.add_argument("--img_size", type=int, default=224)
parser.add_argument("--patch_size", type=int, default=0, help="0 = the preset's")
parser.add_argument("--dim", type=int, default=0, help="0 = the preset's")
parser.add_argument("--depth", type=int, default=0, help="0 = the preset's")
parser.add_argument("--heads", type=int, default=0, help="0 = the preset's")
parser.add_argument("--dec_dim", type=int, default=512)
parser.add_argument("--dec_depth", type=int, default=8)
parser.add_argument("--dec_heads", type=int, default=16)
parser.add_argument("--mask_ratio", type=float, default=0.75)
parser.add_argument("--norm_pix_loss", type=int, default=1, help="1: per-patch normalised pixel targets")
parser.add_argument("--views", type=int, default=2, help="independent crops per image per step (authors: 2)")
parser.add_argument("--epochs", type=int, default=800)
parser.add_argument("--warmup_epochs", type=float, default=20)
parser.add_argument("--batch_size", type=int, default=1024, help="images per optimizer step, over all processes")
parser.add_argument("--grad_accum", type=int, default=1, help="split each process's batch into this many micro-batches")
parser.add_argument("--blr", type=float, default=1.5e-4, help="lr = blr * batch_size * views / 256")
parser.add_argument("--min_lr", type=float, default=0.0)
parser.add_argument("--weight_decay", type=float, default=0.05)
parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
parser.add_argument("--compile", type=int, default=0)
parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
parser.add_argument("--num_workers", type=int, default=8, help="data loader processes per GPU/process")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--log_interval", type=int, default=20, help="iterations")
parser.add_argument("--eval_interval", type=int, default=1000, help="iterations between val loss + picture")
parser.add_argument("--ckpt_interval", type=int, default=1000, help="iterations between checkpoints")
parser.add_argument("--keep_last", type=int, default=2, help="periodic checkpoints kept (0 = all)")
parser.add_argument("--skip_bad_images", type=int, default=0, help="1: log unreadable images and use another")
parser.add_argument("--max_iters", type=int, default=0, help="stop after this many iterations (0 = epochs)")

# flags a resumed run must share with the checkpoint it continues (the run's length may change)
RESUME_FLAGS = ("model", "img_size", "patch_size", "dim", "depth", "heads", "dec_dim", "dec_depth", "dec_heads",
                "mask_ratio", "norm_pix_loss", "views", "warmup_epochs", "batch_size", "blr", "min_lr", "weight_decay",
                "seed")


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


class UnreadableImage(RuntimeError):
    """A DataLoader worker's arrives as UnreadableImage(its traceback): keep the last line, the message."""

    def __init__(self, msg):
        super().__init__(msg.strip().splitlines()[-1].partition("UnreadableImage: ")[2] or msg)


class ImageFolder(torch.utils.data.Dataset):
    """Items are (epoch, index) pairs from the sampler, so each augmentation is a function of
    (seed, epoch, index) alone: any worker count, any restart, the same crops. resize=False: the crops
    leave the worker at their own size and are resized on the GPU (crops_to_batch), which takes a
    third of a worker's time off it at 224 px; on a CPU the workers resize, in parallel to training."""

    def __init__(self, root, img_size, views, train, seed=0, skip_bad=False, resize=True):
        self.samples, self.classes = scan_image_folder(root)
        self.img_size, self.views, self.train, self.seed, self.skip_bad = img_size, views, train, seed, skip_bad
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
        rng = random.Random((self.seed * 1_000_003 + epoch) * 1_000_003 + i)
        if self.train:  # RandomResizedCrop(scale 0.2-1, bicubic) + flip, per view
            crops, label = self.load(i, lambda w, h: [random_resized_crop(rng, w, h, (0.2, 1.0)) for _ in range(self.views)])
            crops = [c.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else c for c in crops]
        else:  # resize the shorter side to img_size, centre crop: the centre square, resized
            def centre(w, h):
                s = min(w, h)
                return [((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)]
            crops, label = self.load(i, centre)
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
# model: the ViT encoder plus the MAE decoder. A subclass of vit.ViT, so the state dict has
# facebookresearch/mae's names (encoder keys + mask_token / decoder_*) and its full checkpoints load.


class MAE(vit.ViT):
    def __init__(self, img_size, patch_size, dim, depth, heads, dec_dim=512, dec_depth=8, dec_heads=16, norm_pix_loss=True):
        super().__init__(img_size, patch_size, dim, depth, heads)
        self.dec_args = dict(dec_dim=dec_dim, dec_depth=dec_depth, dec_heads=dec_heads, norm_pix_loss=norm_pix_loss)
        self.norm_pix_loss = norm_pix_loss
        self.decoder_embed = nn.Linear(dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.register_buffer("decoder_pos_embed", vit.sincos_pos_embed(dec_dim, self.grid).unsqueeze(0))
        self.decoder_blocks = nn.ModuleList([vit.Block(dec_dim, dec_heads) for _ in range(dec_depth)])
        self.decoder_norm = nn.LayerNorm(dec_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dec_dim, patch_size ** 2 * 3)
        vit.init_weights(self.decoder_embed), vit.init_weights(self.decoder_blocks)
        vit.init_weights(self.decoder_norm), vit.init_weights(self.decoder_pred)
        nn.init.normal_(self.mask_token, std=0.02)

    def patchify(self, imgs):  # (B, 3, H, W) -> (B, N, P*P*3), (ph, pw, c) order inside a patch
        P, G = self.patch_embed.proj.kernel_size[0], self.grid
        x = imgs.reshape(imgs.shape[0], 3, G, P, G, P)
        return torch.einsum("bchpwq->bhwpqc", x).reshape(imgs.shape[0], G * G, P * P * 3)

    def unpatchify(self, x):  # inverse of patchify
        P, G = self.patch_embed.proj.kernel_size[0], self.grid
        x = x.reshape(x.shape[0], G, G, P, P, 3)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(x.shape[0], 3, G * P, G * P)

    def decode(self, latent, ids_restore):  # (B, 1+K, D) -> (B, N, P*P*3)
        x = self.decoder_embed(latent)
        B, N = ids_restore.shape
        mask_tokens = self.mask_token.expand(B, N + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # kept patches, then mask tokens (shuffled order)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed  # CLS output kept first
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # CLS dropped

    def target(self, imgs):
        target = self.patchify(imgs)
        if self.norm_pix_loss:  # per patch (x - mean) / sqrt(var + 1e-6), unbiased var
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        return target

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        """-> loss (scalar), pred (B, N, P*P*3), mask (B, N) with 1 = removed."""
        latent, mask, ids_restore = self.forward_masked(imgs, mask_ratio, noise)
        pred = self.decode(latent, ids_restore)
        loss = ((pred.float() - self.target(imgs.float())) ** 2).mean(dim=-1)  # (B, N) per-patch MSE
        return (loss * mask).sum() / mask.sum(), pred, mask


def split_state(sd):  # full MAE state dict -> (encoder keys, decoder keys)
    dec = {k: v for k, v in sd.items() if k.startswith("decoder") or k == "mask_token"}
    return {k: v for k, v in sd.items() if k not in dec}, dec


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
        ("epochs batch_size views grad_accum log_interval eval_interval ckpt_interval", ">= 1", lambda v: v >= 1),
        ("img_size dec_dim dec_depth dec_heads", ">= 1", lambda v: v >= 1),
        ("max_iters num_workers keep_last patch_size dim depth heads", ">= 0", lambda v: v >= 0),
        ("warmup_epochs blr min_lr weight_decay", ">= 0", lambda v: v >= 0),
        ("mask_ratio", "in (0, 1)", lambda v: 0 < v < 1),
        ("norm_pix_loss compile skip_bad_images", "0 or 1", lambda v: v in (0, 1)),
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
    out_dir = args.out_dir
    if master_process:
        lock_out_dir(out_dir)

    # data: every check before any training starts
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(args.data_path, split)):
            fail(f"missing split folder {os.path.join(args.data_path, split)} (expected train/ and val/)")
    train_set = ImageFolder(os.path.join(args.data_path, "train"), args.img_size, args.views, True, args.seed,
                            args.skip_bad_images, resize=not use_cuda)
    val_set = ImageFolder(os.path.join(args.data_path, "val"), args.img_size, 1, False, args.seed, args.skip_bad_images)
    if len(train_set) < args.batch_size:
        fail(f"--batch_size {args.batch_size} is larger than the training set ({len(train_set)} images)")
    sampler = ShardSampler(len(train_set), args.batch_size, ddp_rank, ddp_world_size, args.seed)
    loader = torch.utils.data.DataLoader(train_set, batch_size=micro_batch, sampler=sampler, num_workers=args.num_workers,
                                         pin_memory=use_cuda, persistent_workers=args.num_workers > 0,
                                         collate_fn=collate, worker_init_fn=ignore_stop_signals)
    steps_per_epoch = sampler.steps
    max_iters = args.max_iters or args.epochs * steps_per_epoch
    warmup_iters = round(args.warmup_epochs * steps_per_epoch)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1) * 255

    def to_input(flat, sizes):  # collate's crops -> (n, 3, S, S) float on the device, ImageNet mean/std
        return (crops_to_batch(flat, sizes, args.img_size, device) - mean) / std

    # model: fresh, from --init (encoder, + decoder where the file has one), or resumed
    try:
        resume_path, ckpt = find_resume(args.resume, out_dir, "mae.pt", "mae")
        for k in RESUME_FLAGS if ckpt is not None else ():
            if ckpt["args"].get(k) != getattr(args, k):
                fail(f"{resume_path} was made with --{k} {ckpt['args'].get(k)}, this run has --{k} {getattr(args, k)}")
        if ckpt is not None:
            model_args, dec_args = ckpt["model_args"], ckpt["dec_args"]
        else:
            model_args = vit.model_args_from_preset(args.model, args.img_size, args.patch_size, args.dim, args.depth, args.heads)
            dec_args = dict(dec_dim=args.dec_dim, dec_depth=args.dec_depth, dec_heads=args.dec_heads,
                            norm_pix_loss=bool(args.norm_pix_loss))
        model = MAE(**model_args, **dec_args)
        if ckpt is not None:
            model.load_state_dict({**ckpt["encoder"], **ckpt["decoder"]})
        elif args.init:
            init = vit.load_checkpoint(args.init)
            if init.get("stage", "mae") != "mae":
                raise ValueError(f"{args.init}: expected an MAE checkpoint, found a {init['stage']} checkpoint")
            enc, dec = split_state(init["model"] if "model" in init else {**init.get("encoder", {}), **init.get("decoder", {})})
            vit.load_state_strict(vit.ViT(**model_args), enc, args.init)  # names every key that does not fit
            if dec:
                vit.load_state_strict(model, {**enc, **dec}, args.init)
            else:
                model.load_state_dict(enc, strict=False)
                if master_process:
                    print(f"{args.init} has no decoder: the decoder starts from scratch", file=sys.stderr)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    model.to(device)

    # optimizer: AdamW (0.9, 0.95), no weight decay on biases / 1-D tensors; lr scales with images x views
    lr = args.blr * args.batch_size * args.views / 256
    groups = [{k: v for k, v in g.items() if k != "names"} for g in vit.param_groups(model, args.weight_decay)]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=use_cuda)
    scaler = torch.amp.GradScaler(enabled=dtype == "float16")
    iter_num = 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        iter_num = ckpt["iter_num"]
        if master_process:
            print(f"resuming from {resume_path} at iteration {iter_num}")
    ckpt = None  # free memory
    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[ddp_local_rank] if use_cuda else None)

    def checkpoint():
        enc, dec = split_state(raw_model.state_dict())
        return dict(stage="mae", model_args=model_args, dec_args=dec_args, encoder=enc, decoder=dec,
                    optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), iter_num=iter_num, args=vars(args))

    def log(entry):
        with open(os.path.join(out_dir, "log.txt"), "a") as f:
            f.write(json.dumps(entry) + "\n")

    @torch.no_grad()
    def evaluate():
        """Val loss on fixed images and masks, and a picture: original / masked / reconstruction."""
        raw_model.eval()
        n = min(len(val_set), 64)
        imgs = to_input(*collate([val_set[(0, i)] for i in range(n)])[:2])
        noise = torch.rand(n, raw_model.num_patches, generator=torch.Generator().manual_seed(0)).to(device)
        with autocast:
            loss, pred, mask = raw_model(imgs, args.mask_ratio, noise)
        if raw_model.norm_pix_loss:  # back to pixel space with each patch's own statistics
            t = raw_model.patchify(imgs)
            pred = pred.float() * (t.var(-1, keepdim=True) + 1e-6) ** 0.5 + t.mean(-1, keepdim=True)
        m = raw_model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, pred.shape[-1]))[:8]
        recon, imgs, gray = raw_model.unpatchify(pred.float())[:8], imgs[:8], (128 - mean) / std
        rows = [imgs, imgs * (1 - m) + gray * m, imgs * (1 - m) + recon * m]  # 3 x (k, 3, S, S)
        grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)  # (3, 3S, kS)
        grid = (grid * std[0] + mean[0]).clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy()
        up = max(1, 96 // args.img_size)  # small images are upscaled to be visible
        Image.fromarray(grid).resize((grid.shape[1] * up, grid.shape[0] * up), Image.NEAREST).save(
            os.path.join(out_dir, f"recon_{iter_num:08d}.png"))
        raw_model.train()
        return loss.item()

    # the loop reads device values (loss, stop flag) only at log steps: a read every step would make the
    # CPU wait for the GPU, and the GPU then for the CPU's next launches
    nonfinite_at = torch.tensor(-1, device=device)  # the first iteration with a non-finite loss

    def check_finite():  # every rank, at log steps and before each checkpoint write
        if nonfinite_at.item() >= 0:
            pbar.close()  # the error on its own line
            fail(f"non-finite loss at iteration {nonfinite_at.item()}; the last good checkpoint is in {out_dir}")

    def stop_requested():  # a signal to any rank stops every rank at the same step
        stop = torch.tensor(float(bool(stop_signal)), device=device)
        if ddp:
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        return bool(stop.item())

    def save(name):  # every rank checks, rank 0 writes; the newest keep_last periodic checkpoints are kept
        check_finite()
        if master_process:
            save_atomic(checkpoint(), os.path.join(out_dir, name))
            for old in sorted(glob.glob(os.path.join(out_dir, "ckpt_*.pt")))[:-args.keep_last]:
                os.remove(old)

    def validate():
        check_finite()  # every rank; no val loss or picture from non-finite weights
        if master_process:
            val_loss = evaluate()
            log(dict(iter=iter_num, val_loss=round(val_loss, 5)))
            pbar.write(f"iter {iter_num}: val loss {val_loss:.4f}")

    # training loop
    if master_process:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"MAE {model_args} decoder {dec_args}: {n_params / 1e6:.1f}M params, {len(train_set)} train images, "
              f"{steps_per_epoch} steps/epoch, {max_iters} iterations, lr {lr:.3g}, {dtype}, {ddp_world_size} process(es)")
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
            # masking noise for the whole global batch, a function of (seed, iteration) alone: resume needs
            # no RNG state, and each sample's mask is the same for any number of processes / micro-steps
            g = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + iter_num)
            noise = torch.rand(args.batch_size * args.views, raw_model.num_patches, device=device, generator=g)
            loss_sum = torch.zeros((), device=device)
            for micro in range(args.grad_accum):
                x = to_input(*next(batches)[:2])  # (b * V, 3, S, S): the V views of a sample are neighbours
                first = (ddp_rank * args.grad_accum + micro) * micro_batch * args.views  # position in the global batch
                if ddp:  # sync gradients on the last micro-step only
                    model.require_backward_grad_sync = micro == args.grad_accum - 1
                with autocast:
                    loss = model(x, args.mask_ratio, noise[first:first + x.shape[0]])[0]
                scaler.scale(loss / args.grad_accum).backward()
                loss_sum += loss.detach().float() / args.grad_accum
            nonfinite_at = torch.where((nonfinite_at < 0) & ~torch.isfinite(loss_sum), iter_num, nonfinite_at)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            iter_num += 1
            imgs_seen += args.batch_size
            pbar.update(1)
            at_log = iter_num % args.log_interval == 0 or iter_num == max_iters
            if at_log:
                check_finite()
                if ddp:  # log the loss of the global batch, not only rank 0's share
                    dist.all_reduce(loss_sum)
                loss_sum = loss_sum.item() / ddp_world_size
                dt = time.time() - t0
                entry = dict(iter=iter_num, epoch=round(iter_num / steps_per_epoch, 3), loss=round(loss_sum, 5),
                             lr=lr_now, img_per_s=round(imgs_seen / dt, 1))
                pbar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr_now:.2e}", img_s=f"{entry['img_per_s']:.0f}")
                if master_process:
                    log(entry)
                t0, imgs_seen = time.time(), 0
            # the one save-or-stop path: a stop is read at log steps before the last; the checkpoint due at a step
            # is written before its evaluation, so that a bad val image cannot cost the training
            stop = at_log and iter_num < max_iters and stop_requested()
            if iter_num < max_iters and (iter_num % args.ckpt_interval == 0 or stop):
                save(f"ckpt_{iter_num:08d}.pt")
            if iter_num < max_iters and iter_num % args.eval_interval == 0:
                validate()
            if stop:
                if master_process:
                    pbar.write(f"stopped by signal at iteration {iter_num}; to continue, run the same command with --resume auto")
                if ddp:
                    dist.barrier()  # rank 0 may still be writing; leave together (gloo aborts otherwise)
                    dist.destroy_process_group()
                sys.exit(0)
    pbar.close()
    save("mae.pt")  # the final file, then the last evaluation
    if master_process:
        print(f"wrote {os.path.join(out_dir, 'mae.pt')}")
    validate()
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
