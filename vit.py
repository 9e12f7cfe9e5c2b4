"""
The Vision Transformer shared by every stage of MAE-CT, and what belongs to it:
the input normalisation, blocks, random masking, pooling, the attention backend,
checkpoint loading (this project's, facebookresearch/mae's and the MAE-CT
releases') and the optimizer parameter groups (weight decay, layer-wise lr decay).

Parameter names are those of facebookresearch/mae and timm's VisionTransformer
(cls_token, pos_embed, patch_embed.proj, blocks.{i}.norm1/attn.qkv/attn.proj/
norm2/mlp.fc1/mlp.fc2, norm), so the encoder's state dict loads unchanged into
timm's model of the same size and back.

    import vit
    from vit import load_encoder, pool
    enc = load_encoder("ct.pt")          # eval mode, on CPU, built from the file alone
    tokens = enc(vit.normalize(images))  # images (B, 3, H, W) in [0, 255] -> (B, 1+N, D) after the final norm
    feats = pool(tokens, "mean")         # (B, D)
    enc = load_encoder("maect_base16")   # a released encoder by name (RELEASES), downloaded once

A name of RELEASES (the MAE-CT authors' encoders and facebookresearch/mae's H/14) is fetched the first time into
torch hub's cache, torch.hub.get_dir()/checkpoints/<file name> ($TORCH_HOME/hub, default ~/.cache/torch/hub), and
read from there afterwards; a file of that name in the working directory wins over the name. $MAECT_RELEASE_URL,
when set, is a base URL that replaces the hosts' folders (a mirror; the tests' local server). Without network, the
error is one line naming the URL and the path to put the file at by hand.
"""
import functools
import hashlib
import http.client
import math
import os
import socket
import sys
import urllib.error
import uuid
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # serialises downloads between the processes of one machine; Windows has no fcntl and downloads in each
    import fcntl
except ImportError:
    fcntl = None

try:  # flash-attn 2.x; optional. (The 1.x module name differs; we do not fall back to it silently.)
    from flash_attn import flash_attn_qkvpacked_func
except Exception:
    flash_attn_qkvpacked_func = None

# -----------------------------------------------------------------------------
# model sizes: name -> (dim, depth, heads, patch). Any field can be overridden.
PRESETS = {
    "vit_micro": (96, 6, 3, 16),     # for tests
    "vit_tiny": (192, 12, 3, 16),
    "vit_small": (384, 12, 6, 16),
    "vit_b16": (768, 12, 12, 16),
    "vit_l16": (1024, 24, 16, 16),
    "vit_h16": (1280, 32, 16, 16),
    "vit_h14": (1280, 32, 16, 14),
}
# depth and heads follow from the width for the released models
DEPTH_HEADS = {192: (12, 3), 384: (12, 6), 768: (12, 12), 1024: (24, 16), 1280: (32, 16)}


def model_args_from_preset(name, img_size=224, patch_size=None, dim=None, depth=None, heads=None):
    """The plain dict stored in every checkpoint, from which ViT(**args) rebuilds the model."""
    if name not in PRESETS:
        raise ValueError(f"unknown --model {name!r}; choose from {', '.join(PRESETS)}")
    d, L, h, p = PRESETS[name]
    args = dict(img_size=img_size, patch_size=patch_size or p, dim=dim or d, depth=depth or L,
                heads=heads or h)
    check_model_args(**args)
    return args


def check_model_args(img_size, patch_size, dim, depth, heads):
    if img_size % patch_size != 0:
        raise ValueError(f"image size {img_size} is not divisible by patch size {patch_size}")
    if dim % heads != 0:
        raise ValueError(f"dim {dim} is not divisible by heads {heads}")
    if dim % 4 != 0:
        raise ValueError(f"dim {dim} must be divisible by 4 for the 2-D sin-cos position embedding")

# -----------------------------------------------------------------------------
# fixed 2-D sin-cos position embedding (as in MAE)

def sincos_pos_embed(dim, grid_size, cls_token=True):
    """(1 + grid², dim) float32, first row zero for CLS. As in facebookresearch/mae, the first
    half of the channels encodes the column index, the second half the row index; each half is
    [sin(pos·ω), cos(pos·ω)] with ω_i = 1 / 10000^(i / (dim/4)), i = 0 .. dim/4 - 1."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    pos = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")  # (G, G) each, row-major token order

    def emb_1d(p):  # (G*G,) -> (G*G, dim/2)
        out = p.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    emb = torch.cat([emb_1d(cols), emb_1d(rows)], dim=1)  # (G*G, dim)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb], dim=0)
    return emb.float()

# -----------------------------------------------------------------------------
# attention backend: "auto" = flash-attn when installed and the input is CUDA fp16/bf16, else SDPA
# (which itself picks its flash / memory-efficient kernels on CUDA). "math" is the plain formula,
# for benchmarks and tests. Set with set_attn_backend().

ATTN_BACKEND = "auto"
_announced = set()
# SDPA's cuDNN kernel stays off in any process that imports this file, so SDPA runs its flash kernel on
# CUDA. cuDNN's is the default on Hopper in recent torch builds and has open silent-correctness reports
# upstream; the one H200 run here in which a compiled MAE disagreed with eager (35%) used it. With the
# flash kernel every CUDA test passes (README, Speed).
torch.backends.cuda.enable_cudnn_sdp(False)


def set_attn_backend(name):
    global ATTN_BACKEND
    if name not in ("auto", "flash_attn", "sdpa", "math"):
        raise ValueError(f"unknown attention backend {name!r}")
    if name == "flash_attn" and flash_attn_qkvpacked_func is None:
        raise ValueError("attention backend flash_attn asked for, but flash-attn is not installed")
    ATTN_BACKEND = name


def _announce(name):
    if name not in _announced and not torch.compiler.is_compiling():
        _announced.add(name)
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"vit: attention backend = {name}", file=sys.stderr)


def attention(qkv):
    """qkv: (B, N, 3, H, hd) -> (B, N, H*hd). softmax(q kᵀ / sqrt(hd)) v."""
    B, N, _, H, hd = qkv.shape
    backend = ATTN_BACKEND
    if backend == "auto":
        flash_ok = (flash_attn_qkvpacked_func is not None and qkv.is_cuda
                    and qkv.dtype in (torch.float16, torch.bfloat16))
        backend = "flash_attn" if flash_ok else "sdpa"
    _announce(backend)
    if backend == "flash_attn":
        return flash_attn_qkvpacked_func(qkv).reshape(B, N, H * hd)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, hd)
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v)
    else:  # math
        att = (q @ k.transpose(-2, -1)) * hd ** -0.5
        out = att.softmax(dim=-1) @ v
    return out.transpose(1, 2).reshape(B, N, H * hd)

# -----------------------------------------------------------------------------
# the input: pixels in [0, 255], normalised per channel with the ImageNet statistics that facebookresearch/mae,
# timm and the MAE-CT releases were trained with

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@functools.lru_cache
def _mean_std(device):  # built once per device: a fresh tensor per batch would be a host-to-device copy each time
    return (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255,
            torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255)


def normalize(x):
    """(B, 3, H, W) pixels in [0, 255] -> the encoder's input."""
    mean, std = _mean_std(x.device)
    return (x - mean) / std


def denormalize(x):
    """The inverse of normalize: the encoder's input -> pixels in [0, 255] (not clamped)."""
    mean, std = _mean_std(x.device)
    return x * std + mean

# -----------------------------------------------------------------------------
# the model

class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, C // self.heads)
        return self.proj(attention(qkv))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block, no LayerScale / drop-path / dropout."""

    def __init__(self, dim, heads, mlp_ratio=4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):  # (B, 3, H, W) -> (B, N, D), row-major patches
        # the conv as one matmul over flattened patches, with the conv's own weights (D, 3, P, P): cuDNN
        # runs a stride-P conv as a slow implicit GEMM (5% of an H200 MAE step), a plain matmul near peak
        B, C, H, W = x.shape
        P = self.proj.kernel_size[0]
        x = x.reshape(B, C, H // P, P, W // P, P).permute(0, 2, 4, 1, 3, 5)  # (B, H/P, W/P, C, P, P)
        return F.linear(x.reshape(B, (H // P) * (W // P), C * P * P), self.proj.weight.flatten(1), self.proj.bias)


def init_weights(module):
    """REFERENCE init: Linear xavier_uniform / bias 0, LayerNorm 1 / 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def random_masking(x, mask_ratio, noise=None):
    """Per-sample random masking by argsort of uniform noise (MAE).
    x: (B, L, D). Returns x_kept (B, K, D) with K = int(L * (1 - mask_ratio)),
    mask (B, L) with 1 = removed, 0 = kept (in the original patch order), and
    ids_restore (B, L) that puts the shuffled sequence back in order."""
    B, L, D = x.shape
    keep = int(L * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(B, L, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    mask = torch.ones(B, L, device=x.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_kept, mask, ids_restore


class ViT(nn.Module):
    def __init__(self, img_size=224, patch_size=16, dim=768, depth=12, heads=12):
        super().__init__()
        check_model_args(img_size, patch_size, dim, depth, heads)
        self.args = dict(img_size=img_size, patch_size=patch_size, dim=dim, depth=depth, heads=heads)
        self.depth = depth
        self.grid = img_size // patch_size
        self.num_patches = self.grid ** 2
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        # fixed, not learned; a persistent buffer so it is in the state dict as timm/MAE expect
        self.register_buffer("pos_embed", sincos_pos_embed(dim, self.grid).unsqueeze(0))  # (1, 1+N, D)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        init_weights(self)
        w = self.patch_embed.proj.weight.data  # xavier on the (D, 3*P*P) view, like a Linear
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)

    def forward_masked(self, imgs, mask_ratio=0.0, noise=None, no_grad_blocks=0):
        """imgs (B, 3, H, W) -> tokens (B, 1+K, D) after the final norm, mask (B, N) or None,
        ids_restore (B, N) or None. The patch embedding and the first `no_grad_blocks` blocks run
        without autograd: they are frozen, so storing their activations would be wasted memory."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and no_grad_blocks == 0):
            x = self.patch_embed(imgs) + self.pos_embed[:, 1:]  # position added before masking
            mask = ids_restore = None
            if mask_ratio > 0:
                x, mask, ids_restore = random_masking(x, mask_ratio, noise)
            cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], dim=1)  # (B, 1+K, D)
        for i, blk in enumerate(self.blocks):
            if i < no_grad_blocks:
                with torch.no_grad():
                    x = blk(x)
            else:
                x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward(self, imgs, no_grad_blocks=0):
        """imgs (B, 3, H, W) -> all tokens after the final norm, (B, 1+N, D)."""
        return self.forward_masked(imgs, 0.0, no_grad_blocks=no_grad_blocks)[0]


def pool(tokens, how):
    """(B, 1+N, D) -> (B, D): the CLS token, or the mean of the patch tokens."""
    if how == "cls":
        return tokens[:, 0]
    if how == "mean":
        return tokens[:, 1:].mean(dim=1)
    raise ValueError(f"unknown pooling {how!r}; use cls or mean")


def flops_per_image(args, tokens=None):
    """Forward matmul FLOPs (2 per multiply-add) of the encoder on `tokens` tokens (default 1+N)."""
    D, L, P = args["dim"], args["depth"], args["patch_size"]
    N = (args["img_size"] // P) ** 2
    T = 1 + N if tokens is None else tokens
    per_block = 2 * T * (12 * D * D) + 2 * 2 * T * T * D  # qkv+proj+mlp, then q@k and att@v
    return L * per_block + 2 * N * D * 3 * P * P

# -----------------------------------------------------------------------------
# optimizer groups: no weight decay on biases and 1-D tensors; layer-wise lr decay

def layer_id(name, depth):
    """0 for patch embedding / cls / pos, b+1 for blocks.b, depth+1 for everything above."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(model, weight_decay, layer_decay=1.0, prefix=""):
    """Parameter groups for AdamW; each group carries "lr_scale" (multiply the lr by it).
    With layer_decay d < 1, block b of a depth-L encoder gets d^(L - b), the patch embedding
    d^(L + 1), the final norm 1. Only parameters that require grad are included."""
    depth = getattr(model, "depth", 0)
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias")
        scale = layer_decay ** (depth + 1 - layer_id(name, depth)) if layer_decay != 1.0 else 1.0
        key = (no_decay, scale)
        if key not in groups:
            groups[key] = dict(params=[], names=[], weight_decay=0.0 if no_decay else weight_decay,
                               lr_scale=scale)
        groups[key]["params"].append(p)
        groups[key]["names"].append(prefix + name)
    return list(groups.values())

# -----------------------------------------------------------------------------
# checkpoints

def load_checkpoint(path, expect=None):
    """torch.load with one clear error line for a missing, truncated or foreign file.
    expect: a stage name ("mae", "nnclr_head", "ct", ...) that this project's file must have."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path} (truncated or not a torch file?): "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {path} holds a {type(ckpt).__name__}, expected a dict")
    if expect is not None:
        found = ckpt.get("stage", "a foreign (non-maect) file")
        if found not in ((expect,) if isinstance(expect, str) else tuple(expect)):
            raise ValueError(f"checkpoint {path}: expected a {expect} checkpoint, found {found}")
    return ckpt


def encoder_state(ckpt, path="checkpoint", which="ema"):
    """Find the encoder's state dict in any supported format. Returns (state_dict, model_args or
    None, note). Formats: this project's ({"stage": ..., "encoder": ..., "model_args": ...}, with
    "encoder_ema" after contrastive tuning), facebookresearch/mae ({"model": ...}, decoder keys
    dropped), MAE-CT releases (flat, or {"state_dict": ...}; pos_embed without the CLS row)."""
    note = None
    if "stage" in ckpt:
        if "encoder" not in ckpt:
            origin = ckpt.get("encoder_init", "?")
            raise ValueError(f"{path} is a {ckpt['stage']} checkpoint and holds no encoder "
                             f"(its encoder came from {origin}); pass an encoder checkpoint")
        if ckpt["stage"] not in ("mae", "ct"):
            raise ValueError(f"{path} is a {ckpt['stage']} checkpoint; an encoder checkpoint is mae.pt, ct.pt, "
                             f"a facebookresearch/mae or MAE-CT release")
        if which == "ema" and "encoder_ema" in ckpt:
            sd = ckpt["encoder_ema"]
        elif which in ("ema", "online"):
            sd = ckpt["encoder"]
        else:
            raise ValueError(f"which must be 'ema' or 'online', got {which!r}")
        return dict(sd), dict(ckpt["model_args"]), note
    if "model" in ckpt and isinstance(ckpt["model"], dict):
        sd = ckpt["model"]
    elif "state_dict" in ckpt and isinstance(ckpt["state_dict"], dict):
        sd = ckpt["state_dict"]
    else:
        sd = ckpt
    if "cls_token" not in sd or "patch_embed.proj.weight" not in sd:
        keys = ", ".join(list(sd)[:8])
        raise ValueError(f"{path} is not a ViT checkpoint: no cls_token / patch_embed.proj.weight "
                         f"(top-level keys: {keys}{', ...' if len(sd) > 8 else ''})")
    dropped = [k for k in sd if k.startswith("decoder") or k == "mask_token"]
    if dropped:
        note = f"{path}: ignoring {len(dropped)} decoder keys (MAE decoder)"
        sd = {k: v for k, v in sd.items() if k not in dropped}
    return dict(sd), None, note


def infer_model_args(sd, path="checkpoint", heads=None):
    """Model args from the shapes of a foreign state dict: D from cls_token, P from the patch
    conv, depth by counting blocks, heads from D for the released widths (REFERENCE: 768 → 12,
    1024/1280 → 16). No tensor holds the head count: any other width needs `heads`."""
    D = sd["cls_token"].shape[-1]
    P = sd["patch_embed.proj.weight"].shape[-1]
    depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    if heads is None and D not in DEPTH_HEADS:
        raise ValueError(f"{path}: width {D} is none of {', '.join(map(str, DEPTH_HEADS))}, so the number of "
                         f"attention heads cannot be told from the file; give it (--heads, or heads=)")
    heads = heads or DEPTH_HEADS[D][1]
    if D % heads:
        raise ValueError(f"{path}: width {D} is not divisible by {heads} heads")
    if "pos_embed" not in sd:
        raise ValueError(f"{path}: no pos_embed, cannot tell the image size")
    n = sd["pos_embed"].shape[1]
    grid = math.isqrt(n)
    if grid * grid != n:  # has a CLS row
        grid = math.isqrt(n - 1)
        if grid * grid != n - 1:
            raise ValueError(f"{path}: pos_embed has {n} rows, not a square grid (+1)")
    return dict(img_size=grid * P, patch_size=P, dim=D, depth=depth, heads=heads)


def load_state_strict(model, sd, path="checkpoint"):
    """load_state_dict(strict) that names every missing, unexpected or mis-shaped key.
    A pos_embed without the CLS row (MAE-CT releases) gets its zero row back first."""
    own = model.state_dict()
    pe = sd.get("pos_embed")
    if pe is not None and "pos_embed" in own and pe.shape[1] + 1 == own["pos_embed"].shape[1]:
        sd = dict(sd, pos_embed=torch.cat([torch.zeros_like(pe[:, :1]), pe], dim=1))
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def few(xs):
            return ", ".join(xs[:6]) + (f" (+{len(xs) - 6} more)" if len(xs) > 6 else "")
        parts = [f"missing keys: {few(missing)}" if missing else "",
                 f"unexpected keys: {few(unexpected)}" if unexpected else "",
                 f"mis-shaped: {few(shapes)}" if shapes else ""]
        raise ValueError(f"{path} does not fit the model: " + "; ".join(p for p in parts if p))
    model.load_state_dict(sd, strict=True)
    return model

# -----------------------------------------------------------------------------
# the released encoders by name

# The URLs are the links of the checkpoint tables in the ml-jku/MAE-CT README (MAE re-implementation, MAE-CT,
# MAE-CT_aug); the H/14 MAE there is facebookresearch/mae's own release, linked from that project's README. Neither
# README publishes a SHA-256 (facebookresearch/mae lists the first six digits of an md5), so no digest is recorded
# and none is checked; a SHA-256 put into the second field is checked after every download of that name.
MAECT_DOWNLOAD = "https://ml.jku.at/research/maect/download/"
RELEASES = {  # name -> (url, sha256 or None)
    "mae_reimpl_base16": (MAECT_DOWNLOAD + "mae_reimpl_base16.th", None),
    "mae_reimpl_large16": (MAECT_DOWNLOAD + "mae_reimpl_large16.th", None),
    "mae_reimpl_huge16": (MAECT_DOWNLOAD + "mae_reimpl_huge16.th", None),
    "mae_huge14": ("https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_huge.pth", None),
    "maect_base16": (MAECT_DOWNLOAD + "maect_base16.th", None),
    "maect_large16": (MAECT_DOWNLOAD + "maect_large16.th", None),
    "maect_huge16": (MAECT_DOWNLOAD + "maect_huge16.th", None),
    "maect_huge14": (MAECT_DOWNLOAD + "maect_huge14.th", None),
    "maectaug_base16": (MAECT_DOWNLOAD + "maectaug_base16.th", None),
    "maectaug_large16": (MAECT_DOWNLOAD + "maectaug_large16.th", None),
    "maectaug_huge16": (MAECT_DOWNLOAD + "maectaug_huge16.th", None),
    "maectaug_huge14": (MAECT_DOWNLOAD + "maectaug_huge14.th", None),
}
RELEASE_URL_ENV = "MAECT_RELEASE_URL"  # a base URL replacing the hosts' folders: a mirror, or a test server
DOWNLOAD_TIMEOUT_S = 60  # a server silent this long (connecting or mid-file) fails the download instead of hanging


def is_release_name(s):
    """A released encoder's name that is not also a file here (a file of that name wins)."""
    return s in RELEASES and not os.path.exists(s)


def release_url(name):
    """Where a released encoder is fetched from: its recorded URL, or its file name under $MAECT_RELEASE_URL."""
    url = RELEASES[name][0]
    base = os.environ.get(RELEASE_URL_ENV)
    return f"{base.rstrip('/')}/{url.rsplit('/', 1)[1]}" if base else url


def release_path(name):
    """Where a released encoder is kept: torch hub's cache, under the file name of its URL (where
    torch.hub.load_state_dict_from_url would put the same file)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", RELEASES[name][0].rsplit("/", 1)[1])


def encoder_source(path_or_name):
    """What a checkpoint records as its encoder's origin: a release name stays a name (it resolves again on any
    machine, into that machine's cache), a file becomes its absolute path."""
    return path_or_name if is_release_name(path_or_name) else os.path.abspath(path_or_name)


def release_file(name, verbose=True):
    """The local file of a released encoder: the cached one, or downloaded now. The download goes to a temporary name
    and is moved into place only when it is a whole torch file and, where a SHA-256 is recorded, matches it, so a
    failed or cut download never counts. Every failure is a one-line ValueError naming the URL and the path."""
    dst = release_path(name)
    if os.path.isfile(dst):
        return dst
    url, sha256 = release_url(name), RELEASES[name][1]
    by_hand = f"download it by hand to {dst}"
    try:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot download {name} from {url} ({_reason(e)}): {by_hand}") from None
    tmp = f"{dst}.{uuid.uuid4().hex}.download"
    lock = _lock_folder(os.path.dirname(dst))
    try:
        if os.path.isfile(dst):  # another process of this run fetched it while this one waited for the lock
            return dst
        if verbose:
            print(f"downloading {name} from {url} to {dst}", file=sys.stderr)
        timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # download_url_to_file takes no timeout of its own
        try:
            torch.hub.download_url_to_file(url, tmp, hash_prefix=None, progress=verbose)
        except (OSError, http.client.HTTPException, ValueError) as e:  # URLError, HTTPError, timeouts, bad URLs
            raise ValueError(f"cannot download {name} from {url} ({_reason(e)}): {by_hand}") from None
        finally:
            socket.setdefaulttimeout(timeout)
        if not _whole_torch_file(tmp):
            raise ValueError(f"cannot download {name} from {url} (the file arrived cut short or is not a torch file): "
                             f"{by_hand}")
        if sha256 is not None:
            digest = _sha256(tmp)
            if digest != sha256:
                raise ValueError(f"{name} from {url} has SHA-256 {digest}, not the recorded {sha256}: the file was "
                                 f"not kept ({dst})")
        os.replace(tmp, dst)
        return dst
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        if lock is not None:
            os.close(lock)  # releases the lock


def _lock_folder(folder):
    """An exclusive lock on the cache folder (its descriptor; closing it unlocks), so the processes of a multi-GPU
    run on one machine download a file once and the others wait for it. None where locking is unavailable (no
    fcntl, or a file system without flock): then each process downloads on its own, still safely."""
    if fcntl is None:
        return None
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        os.close(fd)
        return None
    return fd


def _reason(e):
    """One line for a download error: HTTPError's status, URLError's cause, or the exception itself."""
    r = e.reason if type(e) is urllib.error.URLError else e
    return (str(r) or type(r).__name__).splitlines()[0]


def _whole_torch_file(path):
    """download_url_to_file keeps whatever arrived when a server closes the connection early (it reads to the end
    of the stream and does not compare with Content-Length). torch.save's zip files end in their directory, so a
    cut one does not open as a zip; a file in torch's old format is read whole instead (slower, but certain)."""
    try:
        with zipfile.ZipFile(path):
            return True
    except (zipfile.BadZipFile, OSError):
        pass
    try:
        load_checkpoint(path)
        return True
    except ValueError:
        return False


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_encoder(path_or_name, verbose=True):
    """A file that exists, as given; a release name, its cached file (downloaded the first time). A missing path
    that looks like a name (no folder, no extension) is refused listing the names."""
    if is_release_name(path_or_name):
        return release_file(path_or_name, verbose)
    if not os.path.exists(path_or_name) and os.sep not in path_or_name and "." not in path_or_name:
        raise FileNotFoundError(f"checkpoint not found: {path_or_name}, and no released encoder has that name "
                                f"({', '.join(RELEASES)})")
    return path_or_name


def load_encoder(path, which="ema", img_size=None, verbose=True, heads=None):
    """Build the encoder from a checkpoint file alone: eval mode, on CPU, float32.
    path: a checkpoint file, or a released encoder's name (RELEASES; downloaded once into torch hub's cache, see
    release_file; a file of that name wins). which: for contrastive-tuning checkpoints, "ema" (default, what the
    authors evaluate) or "online". img_size: build for another resolution (the fixed sin-cos position embedding is
    recomputed; the file's own pos_embed is then not used). heads: the attention heads of a foreign
    file whose width is not a released one (this project's files hold their own)."""
    path = resolve_encoder(path, verbose)
    ckpt = load_checkpoint(path)
    sd, args, note = encoder_state(ckpt, path, which)
    if note and verbose:
        print(note, file=sys.stderr)
    if args is None:
        args = infer_model_args(sd, path, heads)
    elif heads and heads != args["heads"]:
        raise ValueError(f"{path} holds a {args['heads']}-head encoder, heads={heads} was asked for")
    if img_size is not None and img_size != args["img_size"]:
        args = dict(args, img_size=img_size)
        sd = {k: v for k, v in sd.items() if k != "pos_embed"}
        sd["pos_embed"] = sincos_pos_embed(args["dim"], img_size // args["patch_size"]).unsqueeze(0)
    model = ViT(**args)
    load_state_strict(model, sd, path)
    return model.eval()
