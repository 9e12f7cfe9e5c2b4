"""CUDA-only tests: mixed precision against float32, which attention kernel really runs,
torch.compile against eager, and a 1-process NCCL start under torchrun. Every test is skipped
where there is no GPU; on one they take seconds each (small models)."""
import json
import math
import os

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

import mae_pretrain
import vit
from conftest import make_image_folder, run_torchrun

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# 64 px, patch 8: 64 patches + CLS; heads of 64 channels, as in the real models
VIT_ARGS = dict(img_size=64, patch_size=8, dim=192, depth=4, heads=3)
DEC_ARGS = dict(dec_dim=128, dec_depth=2, dec_heads=4)
# relative error bounds against float32: (outputs, each parameter's gradient).
# bf16 keeps 8 mantissa bits (~4e-3 per rounding), fp16 11 bits (~5e-4)
TOL = {torch.bfloat16: (2e-2, 5e-2), torch.float16: (5e-3, 1e-2)}
SDPA_OPS = {"aten::_scaled_dot_product_flash_attention": "flash",
            "aten::_scaled_dot_product_cudnn_attention": "cudnn",
            "aten::_scaled_dot_product_efficient_attention": "efficient",
            "aten::_scaled_dot_product_attention_math": "math"}


@pytest.fixture(autouse=True)
def keep_backend(monkeypatch):
    """Each test may change vit's attention backend; this puts the old one back afterwards."""
    monkeypatch.setattr(vit, "ATTN_BACKEND", vit.ATTN_BACKEND)


@pytest.fixture
def exact_fp32():
    """float32 references without TF32 (the stage scripts turn it on; it rounds matmul inputs to 10 bits)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def small_vit(seed=0, depth=VIT_ARGS["depth"]):
    torch.manual_seed(seed)
    return vit.ViT(**dict(VIT_ARGS, depth=depth)).cuda()


def small_mae(seed=0, depth=VIT_ARGS["depth"], dec_depth=DEC_ARGS["dec_depth"]):
    torch.manual_seed(seed)
    return mae_pretrain.MAE(**dict(VIT_ARGS, depth=depth), **dict(DEC_ARGS, dec_depth=dec_depth)).cuda()


def inputs(seed=1, batch=4):
    g = torch.Generator(device="cuda").manual_seed(seed)
    imgs = torch.randn(batch, 3, 64, 64, device="cuda", generator=g)
    noise = torch.rand(batch, 64, device="cuda", generator=g)
    # a fixed random direction for the ViT loss: the sum of squares of LayerNorm outputs would be
    # nearly constant and give next to no gradient
    proj = torch.randn(batch, 65, VIT_ARGS["dim"], device="cuda", generator=g)
    return imgs, noise, proj


def projected_loss(imgs, proj):
    """loss_of for fwd_bwd on a ViT: its tokens and their projection on the fixed direction proj."""
    def loss_of(fn):
        out = fn(imgs)
        return out, (out.float() * proj).sum()
    return loss_of


def fwd_bwd(module, fn, dtype, loss_of):
    """One forward (autocast to dtype unless float32) and backward of fn, whose parameters are
    module's (fn may be torch.compile(module)). -> (output as float32, {name: gradient})"""
    module.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        out, loss = loss_of(fn)
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in module.named_parameters()}
    return out.detach().float(), grads


def assert_grads_close(grads, ref, tol):
    assert grads.keys() == ref.keys()
    for name, g in grads.items():
        assert torch.isfinite(g).all(), name
        assert ref[name].norm() > 0, f"{name}: no gradient in the float32 reference"
        assert rel_err(g, ref[name]) < tol, (name, rel_err(g, ref[name]))


def op_and_kernel_names(prof):
    """Names the profiler saw: (CPU-side aten ops, CUDA kernels)."""
    events = prof.events()
    ops = [e.name for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    kernels = [e.name for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    return ops, kernels

# -----------------------------------------------------------------------------
# mixed precision against float32


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_vit_autocast_close_to_fp32(dtype, exact_fp32):
    model = small_vit()
    imgs, _, proj = inputs()
    loss_of = projected_loss(imgs, proj)

    ref_out, ref_grads = fwd_bwd(model, model, torch.float32, loss_of)
    seen = []  # the dtype the first qkv matmul really ran in: autocast must reach the blocks
    hook = model.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    out, grads = fwd_bwd(model, model, dtype, loss_of)
    hook.remove()
    assert seen == [dtype]
    assert out.shape == (4, 65, VIT_ARGS["dim"]) and torch.isfinite(out).all()
    assert rel_err(out, ref_out) < TOL[dtype][0], rel_err(out, ref_out)
    assert_grads_close(grads, ref_grads, TOL[dtype][1])


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_mae_autocast_close_to_fp32(dtype, exact_fp32):
    model = small_mae()
    imgs, noise, _ = inputs()
    results = {}

    def loss_of(fn):
        loss, pred, mask = fn(imgs, 0.75, noise)
        results[len(results)] = (loss.detach(), mask)
        # scaled as a GradScaler would: unscaled fp16 gradients of this mean-of-means loss underflow
        return pred, loss * 1024

    ref_pred, ref_grads = fwd_bwd(model, model, torch.float32, loss_of)
    pred, grads = fwd_bwd(model, model, dtype, loss_of)
    (ref_loss, ref_mask), (loss, mask) = results[0], results[1]
    assert torch.equal(mask, ref_mask) and mask.sum().item() == 4 * 48  # 48 of 64 patches removed
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())  # the loss is computed in float32
    assert abs(loss.item() - ref_loss.item()) < TOL[dtype][0] * ref_loss.item()
    assert pred.shape == (4, 64, 8 * 8 * 3) and torch.isfinite(pred).all()
    assert rel_err(pred, ref_pred) < TOL[dtype][0], rel_err(pred, ref_pred)
    assert_grads_close(grads, ref_grads, TOL[dtype][1])

# -----------------------------------------------------------------------------
# attention: which kernel runs


def b16_qkv(requires_grad=False):
    """(B, N, 3, H, hd) bf16 as in ViT-B/16 at 224 px: 197 tokens, 12 heads of 64."""
    torch.manual_seed(0)
    return torch.randn(4, 197, 3, 12, 64, device="cuda", dtype=torch.bfloat16).requires_grad_(requires_grad)


@cuda_only
def test_sdpa_backend_runs_the_flash_kernel(exact_fp32):
    """vit's "sdpa" backend with SDPA allowed nothing but its flash kernel (an error if flash could not
    take these inputs: the permuted q, k, v views, bf16, head dim 64): the flash op and a flash CUDA
    kernel run, and forward and backward match the plain formula in float32."""
    qkv = b16_qkv(requires_grad=True)
    vit.set_attn_backend("math")
    ref_in = qkv.detach().float().requires_grad_(True)
    ref = vit.attention(ref_in)
    grad_out = torch.randn(ref.shape, device="cuda").bfloat16()  # the same upstream gradient for both
    ref.backward(grad_out.float())

    vit.set_attn_backend("sdpa")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            out = vit.attention(qkv)
            out.backward(grad_out)
            torch.cuda.synchronize()
    ops, kernels = op_and_kernel_names(prof)
    assert "aten::_scaled_dot_product_flash_attention" in ops, sorted(set(ops))
    assert "aten::_scaled_dot_product_flash_attention_backward" in ops, sorted(set(ops))
    assert any("flash" in k.lower() for k in kernels), sorted(set(kernels))[:20]
    assert out.shape == (4, 197, 768) and out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 1e-2, rel_err(out, ref)
    assert torch.isfinite(qkv.grad).all()
    assert rel_err(qkv.grad, ref_in.grad) < 2e-2, rel_err(qkv.grad, ref_in.grad)


@cuda_only
def test_sdpa_default_choice_is_the_flash_kernel():
    """Left to itself, SDPA must pick its flash kernel for bf16 ViT shapes, for training and for
    inference: not cuDNN's attention (vit.py switches it off), nor the memory-efficient or the math
    fallback, which would mean vit hands it inputs it cannot fuse."""
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    vit.set_attn_backend("sdpa")
    for requires_grad in (True, False):
        qkv = b16_qkv(requires_grad)
        with torch.set_grad_enabled(requires_grad), profile(activities=[ProfilerActivity.CPU]) as prof:
            vit.attention(qkv)
        used = [SDPA_OPS[op] for op in op_and_kernel_names(prof)[0] if op in SDPA_OPS]
        print(f"SDPA picked {used} (requires_grad={requires_grad})")
        assert used and used[0] == "flash", used


@cuda_only
def test_auto_backend_picks_flash_attn_only_when_installed(monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)  # vit announces on rank 0 only
    monkeypatch.setattr(vit, "_announced", set())
    vit.set_attn_backend("auto")
    qkv = b16_qkv()
    vit.attention(qkv)
    expected = "sdpa" if vit.flash_attn_qkvpacked_func is None else "flash_attn"
    assert f"vit: attention backend = {expected}" in capsys.readouterr().err

    # the rule itself, with a stand-in for flash_attn_qkvpacked_func: flash-attn for CUDA fp16/bf16
    # inputs only; float32 and CPU inputs go to SDPA
    calls = []

    def stand_in(x):  # (B, N, 3, H, hd) -> (B, N, H, hd), the flash-attn interface
        calls.append(x.dtype)
        q, k, v = x.permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)

    monkeypatch.setattr(vit, "flash_attn_qkvpacked_func", stand_in)
    for x, goes_to_flash in ((qkv, True), (qkv.half(), True), (qkv.float(), False), (qkv.float().cpu(), False)):
        calls.clear()
        out = vit.attention(x)
        assert out.shape == (4, 197, 768) and out.dtype == x.dtype
        assert calls == ([x.dtype] if goes_to_flash else []), (x.dtype, x.device)


@cuda_only
def test_flash_attn_package_matches_math(exact_fp32):
    pytest.importorskip("flash_attn")
    qkv = b16_qkv()
    vit.set_attn_backend("math")
    ref = vit.attention(qkv.float())
    vit.set_attn_backend("flash_attn")
    out = vit.attention(qkv)
    assert out.shape == (4, 197, 768) and rel_err(out, ref) < 1e-2

# -----------------------------------------------------------------------------
# torch.compile against eager


@cuda_only
def test_compiled_vit_matches_eager():
    torch.compiler.reset()
    model = small_vit(depth=2)  # fewer blocks, less to compile
    imgs, _, proj = inputs()
    loss_of = projected_loss(imgs, proj)

    eager_out, eager_grads = fwd_bwd(model, model, torch.bfloat16, loss_of)
    compiled = torch.compile(model)
    out, grads = fwd_bwd(model, compiled, torch.bfloat16, loss_of)
    # both bf16: they differ only by where intermediate results are rounded (fused kernels keep float32)
    assert torch.isfinite(out).all()
    assert rel_err(out, eager_out) < 2e-2, rel_err(out, eager_out)
    assert_grads_close(grads, eager_grads, 5e-2)
    torch.compiler.reset()


@cuda_only
def test_compiled_mae_forward_matches_eager():
    torch.compiler.reset()
    model = small_mae(depth=2, dec_depth=1).eval()
    imgs, noise, _ = inputs()
    noise2 = inputs(seed=2)[1]
    compiled = torch.compile(model)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for nz in (noise, noise2):  # the second call: the noise is an input, not a constant of the graph
            loss, pred, mask = compiled(imgs, 0.75, nz)
            ref_loss, ref_pred, ref_mask = model(imgs, 0.75, nz)
            assert torch.equal(mask, ref_mask) and mask.sum().item() == 4 * 48
            assert math.isfinite(loss.item()) and abs(loss.item() - ref_loss.item()) < 1e-2 * ref_loss.item()
            assert rel_err(pred, ref_pred) < 2e-2, rel_err(pred, ref_pred)
    assert not torch.equal(model(imgs, 0.75, noise)[2], model(imgs, 0.75, noise2)[2])
    torch.compiler.reset()

# -----------------------------------------------------------------------------
# DDP on NCCL, one process


@cuda_only
def test_torchrun_nccl_one_process(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=2, per_class=8, val_per_class=2)
    out = tmp_path / "mae"
    tiny = ["--model", "vit_micro", "--img_size", "32", "--patch_size", "4", "--dec_dim", "32", "--dec_depth", "1",
            "--dec_heads", "2", "--num_workers", "0", "--warmup_epochs", "1", "--log_interval", "1"]
    # NCCL_DEBUG=INFO: NCCL's own log lines show that NCCL (not gloo) carried the collectives
    p = run_torchrun(1, "mae_pretrain.py", "--data_path", data, "--out_dir", str(out), *tiny, "--batch_size", "8",
                     "--max_iters", "3", "--eval_interval", "100", "--device", "cuda",
                     env={"NCCL_DEBUG": "INFO"}, timeout=300)
    assert "bfloat16, 1 process(es)" in p.stdout, p.stdout[-2000:]
    assert "NCCL" in p.stdout + p.stderr, (p.stdout + p.stderr)[-2000:]
    log = [json.loads(line) for line in open(out / "log.txt")]
    losses = [e["loss"] for e in log if "loss" in e]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses), log
    assert any(math.isfinite(e.get("val_loss", math.nan)) for e in log), log
    ckpt = torch.load(out / "mae.pt", weights_only=False)
    assert ckpt["stage"] == "mae" and ckpt["iter_num"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["encoder"].values())
    assert os.path.exists(out / "recon_00000003.png")
