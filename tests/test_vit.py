"""vit.py against references written here: sin-cos values, masking invariants, attention backends,
key names and shapes, the three checkpoint formats, clear errors, optimizer groups."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vit

ARGS = dict(img_size=32, patch_size=8, dim=192, depth=4, heads=3)  # 16 patches; heads follow from dim in foreign files


def small_vit(seed=0):
    torch.manual_seed(seed)
    return vit.ViT(**ARGS).eval()


def test_sincos_matches_float64_formula():
    D, G = 48, 4
    emb = vit.sincos_pos_embed(D, G).numpy()
    assert emb.shape == (1 + G * G, D)
    assert np.all(emb[0] == 0)  # CLS row
    ref = np.zeros((G * G, D))
    for r in range(G):
        for c in range(G):
            n = r * G + c  # row-major patch order, as the conv flattens
            for i in range(D // 4):
                w = 1.0 / 10000 ** (i / (D / 4))
                ref[n, i] = math.sin(c * w)              # first half: column
                ref[n, D // 4 + i] = math.cos(c * w)
                ref[n, D // 2 + i] = math.sin(r * w)     # second half: row
                ref[n, 3 * D // 4 + i] = math.cos(r * w)
    np.testing.assert_allclose(emb[1:], ref, atol=1e-6)


def test_patch_embed_equals_the_conv_and_a_float64_patch_matmul():
    # the matmul form of the patch embedding gives the conv's result with the conv's weights (the
    # checkpoint key and shape stay timm's / facebookresearch/mae's), in row-major patch order
    m = small_vit()
    imgs = torch.randn(2, 3, 32, 32)
    conv = m.patch_embed.proj(imgs).flatten(2).transpose(1, 2)  # (2, 16, D)
    torch.testing.assert_close(m.patch_embed(imgs), conv, atol=1e-5, rtol=1e-5)
    w, bias, P = m.patch_embed.proj.weight.double(), m.patch_embed.proj.bias.double(), 8
    for r, c in ((0, 0), (1, 2), (3, 3)):
        patch = imgs[1, :, r * P:(r + 1) * P, c * P:(c + 1) * P].double()
        ref = (w * patch).sum((1, 2, 3)) + bias
        torch.testing.assert_close(m.patch_embed(imgs)[1, r * 4 + c].double(), ref, atol=1e-5, rtol=1e-5)


def test_random_masking_invariants():
    B, L, D, r = 3, 16, 5, 0.75
    x = torch.randn(B, L, D)
    noise = torch.rand(B, L, generator=torch.Generator().manual_seed(1))
    kept, mask, ids_restore = vit.random_masking(x, r, noise)
    K = int(L * (1 - r))
    assert kept.shape == (B, K, D)
    assert mask.shape == (B, L) and torch.all(mask.sum(1) == L - K)
    for b in range(B):
        keep_ids = torch.argsort(noise[b])[:K]  # the K smallest noise values are kept, in that order
        assert torch.equal(kept[b], x[b, keep_ids])
        assert set(torch.nonzero(mask[b] == 0).flatten().tolist()) == set(keep_ids.tolist())
        shuffle = torch.argsort(noise[b])
        assert torch.equal(shuffle[ids_restore[b]], torch.arange(L))  # ids_restore inverts the shuffle
    # deterministic for a given noise, and 49 of 196 at r = 0.75
    assert torch.equal(vit.random_masking(x, r, noise)[0], kept)
    assert vit.random_masking(torch.zeros(1, 196, 1), 0.75)[0].shape[1] == 49


def test_masked_forward_keeps_the_right_tokens():
    m = small_vit()
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    tokens, mask, _ = m.forward_masked(imgs, 0.75, noise)
    assert tokens.shape == (2, 1 + 4, 192)
    # the same result as running the blocks by hand on the kept patches
    x = m.patch_embed(imgs) + m.pos_embed[:, 1:]
    keep = torch.argsort(noise, dim=1)[:, :4]
    x = torch.stack([x[b, keep[b]] for b in range(2)])
    x = torch.cat([(m.cls_token + m.pos_embed[:, :1]).expand(2, -1, -1), x], dim=1)
    for blk in m.blocks:
        x = blk(x)
    torch.testing.assert_close(tokens, m.norm(x))


def reference_attention(qkv):  # float64 softmax(q k^T / sqrt(hd)) v on (B, N, 3, H, hd)
    q, k, v = qkv.double().permute(2, 0, 3, 1, 4)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (att @ v).transpose(1, 2).flatten(2)


def test_attention_backends_agree_with_reference(monkeypatch):
    qkv = torch.randn(2, 7, 3, 3, 16)
    ref = reference_attention(qkv)
    for backend in ("sdpa", "math"):
        monkeypatch.setattr(vit, "ATTN_BACKEND", backend)
        torch.testing.assert_close(vit.attention(qkv).double(), ref, atol=1e-5, rtol=1e-5)


def test_flash_attn_glue_with_stand_in(monkeypatch):
    """flash_attn_qkvpacked_func takes (B, N, 3, H, hd) and returns (B, N, H, hd): a stand-in with that
    contract must give the SDPA path's output through the whole model."""
    calls = []

    def stand_in(qkv, dropout_p=0.0, softmax_scale=None, causal=False):
        calls.append(qkv.shape)
        assert qkv.dim() == 5 and qkv.shape[2] == 3
        B, N, _, H, hd = qkv.shape
        return reference_attention(qkv).view(B, N, H, hd).to(qkv.dtype)

    m, imgs = small_vit(), torch.randn(2, 3, 32, 32)
    monkeypatch.setattr(vit, "ATTN_BACKEND", "sdpa")
    out_sdpa = m(imgs)
    monkeypatch.setattr(vit, "flash_attn_qkvpacked_func", stand_in)
    vit.set_attn_backend("flash_attn")
    out_flash = m(imgs)
    assert len(calls) == ARGS["depth"] and calls[0] == (2, 17, 3, 3, 64)
    torch.testing.assert_close(out_flash, out_sdpa, atol=1e-5, rtol=1e-5)
    # "auto" picks flash only for CUDA half-precision inputs
    monkeypatch.setattr(vit, "ATTN_BACKEND", "auto")
    calls.clear()
    m(imgs)
    assert calls == []


def test_flash_backend_refused_when_not_installed(monkeypatch):
    monkeypatch.setattr(vit, "flash_attn_qkvpacked_func", None)
    with pytest.raises(ValueError, match="not installed"):
        vit.set_attn_backend("flash_attn")


TIMM_KEYS = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"] + [
    f"blocks.{i}.{k}" for i in range(4) for k in (
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
        "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")
] + ["norm.weight", "norm.bias"]


def test_key_names_and_shapes_are_timms():
    sd = small_vit().state_dict()
    assert sorted(sd) == sorted(TIMM_KEYS)
    D, P = 192, 8
    assert sd["cls_token"].shape == (1, 1, D)
    assert sd["pos_embed"].shape == (1, 17, D) and torch.all(sd["pos_embed"][0, 0] == 0)
    assert sd["patch_embed.proj.weight"].shape == (D, 3, P, P)
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * D, D)
    assert sd["blocks.0.mlp.fc1.weight"].shape == (4 * D, D)
    assert sd["blocks.0.mlp.fc2.weight"].shape == (D, 4 * D)
    assert not any(p.requires_grad is False for p in vit.ViT(**ARGS).parameters())
    assert "pos_embed" not in dict(vit.ViT(**ARGS).named_parameters())  # fixed, not learned


def test_init():
    m = vit.ViT(img_size=32, patch_size=8, dim=192, depth=2, heads=3)
    w = m.blocks[0].attn.qkv.weight
    bound = math.sqrt(6 / (192 + 3 * 192))  # xavier_uniform on (3D, D)
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    pw = m.patch_embed.proj.weight
    bound = math.sqrt(6 / (192 + 3 * 8 * 8))  # xavier on the (D, 3*P*P) view
    assert pw.abs().max() <= bound and pw.abs().max() > 0.9 * bound
    assert torch.all(m.blocks[0].attn.qkv.bias == 0) and torch.all(m.norm.weight == 1)
    assert 0.015 < m.cls_token.std().item() < 0.025


def test_pool():
    t = torch.randn(2, 5, 4)
    assert torch.equal(vit.pool(t, "cls"), t[:, 0])
    torch.testing.assert_close(vit.pool(t, "mean"), t[:, 1:].mean(1))
    with pytest.raises(ValueError):
        vit.pool(t, "max")


def test_presets_and_arg_checks():
    a = vit.model_args_from_preset("vit_b16")
    assert a == dict(img_size=224, patch_size=16, dim=768, depth=12, heads=12)
    assert vit.model_args_from_preset("vit_h14")["patch_size"] == 14
    with pytest.raises(ValueError, match="not divisible by patch size"):
        vit.model_args_from_preset("vit_tiny", img_size=30, patch_size=4)
    with pytest.raises(ValueError, match="unknown --model"):
        vit.model_args_from_preset("vit_giant")
    assert abs(sum(p.numel() for p in vit.ViT().parameters()) / 1e6 - 85.6) < 0.5  # B/16: 86M


# ---------------------------------------------------------------- checkpoint formats

def save(obj, tmp_path, name):
    path = str(tmp_path / name)
    torch.save(obj, path)
    return path


def check_same(model, path, **kw):
    imgs = torch.randn(2, 3, 32, 32)
    enc = vit.load_encoder(path, **kw)
    assert not enc.training
    assert enc.args == ARGS
    torch.testing.assert_close(enc(imgs), model(imgs))
    return enc


def test_load_this_projects_checkpoint(tmp_path):
    m = small_vit()
    path = save(dict(stage="mae", model_args=ARGS, encoder=m.state_dict(), decoder={}), tmp_path, "mae.pt")
    check_same(m, path)


def test_load_ct_checkpoint_ema_and_online(tmp_path):
    online, ema = small_vit(0), small_vit(1)
    path = save(dict(stage="ct", model_args=ARGS, encoder=online.state_dict(), encoder_ema=ema.state_dict()),
                tmp_path, "ct.pt")
    check_same(ema, path)  # default: the EMA encoder
    check_same(online, path, which="online")


def test_load_facebook_mae_release_ignores_decoder(tmp_path, capsys):
    m = small_vit()
    sd = dict(m.state_dict())
    sd["mask_token"] = torch.zeros(1, 1, 16)
    sd["decoder_embed.weight"] = torch.zeros(16, 192)
    sd["decoder_pos_embed"] = torch.zeros(1, 17, 16)
    path = save({"model": sd}, tmp_path, "mae_pretrain_vit.pth")
    check_same(m, path)
    assert "ignoring 3 decoder keys" in capsys.readouterr().err


@pytest.mark.parametrize("wrapped", [False, True])
def test_load_maect_release_without_cls_row(tmp_path, wrapped):
    m = small_vit()
    sd = dict(m.state_dict())
    sd["pos_embed"] = sd["pos_embed"][:, 1:]  # (1, N, D): no CLS row
    path = save({"state_dict": sd} if wrapped else sd, tmp_path, "maect.th")
    check_same(m, path)


def test_infer_args_for_released_sizes():
    for D, depth, heads, P, N in ((768, 12, 12, 16, 196), (1024, 24, 16, 16, 196), (1280, 32, 16, 14, 256)):
        sd = {"cls_token": torch.zeros(1, 1, D), "patch_embed.proj.weight": torch.zeros(D, 3, P, P),
              "pos_embed": torch.zeros(1, N, D), **{f"blocks.{i}.norm1.weight": torch.zeros(D) for i in range(depth)}}
        assert vit.infer_model_args(sd) == dict(img_size=224, patch_size=P, dim=D, depth=depth, heads=heads)


def test_foreign_file_of_another_width_needs_heads(tmp_path):
    """No tensor holds the head count: a foreign width-96 encoder with 3 heads (not 96 // 64 = 1) is refused
    in one line without heads=, and loads exactly with it."""
    args = dict(img_size=32, patch_size=8, dim=96, depth=2, heads=3)
    torch.manual_seed(0)
    m = vit.ViT(**args).eval()
    sd = dict(m.state_dict(), pos_embed=m.state_dict()["pos_embed"][:, 1:])  # an MAE-CT-style release
    path = save(sd, tmp_path, "w96.th")
    with pytest.raises(ValueError) as e:
        vit.load_encoder(path)
    assert str(e.value).count("\n") == 0 and "width 96" in str(e.value) and "--heads" in str(e.value)
    enc = vit.load_encoder(path, heads=3)
    imgs = torch.randn(2, 3, 32, 32)
    assert enc.args == args and torch.equal(enc(imgs), m(imgs))
    with pytest.raises(ValueError, match="not divisible by 5 heads"):
        vit.load_encoder(path, heads=5)
    own = save(dict(stage="mae", model_args=args, encoder=m.state_dict()), tmp_path, "mae.pt")
    assert vit.load_encoder(own, heads=3).args == args  # this project's files hold their own
    with pytest.raises(ValueError, match="3-head encoder, heads=4"):
        vit.load_encoder(own, heads=4)


@pytest.mark.parametrize("script", ["knn.py", "probe.py", "nnclr_head.py", "contrastive_tune.py"])
def test_scripts_take_heads_for_foreign_widths(tmp_path, script, capsys, monkeypatch):
    """Every script that reads a foreign --init refuses a width-96 file in one line and takes --heads
    (knn.py and probe.py as subprocesses, run to the end with it; the training stages in this process)."""
    import signal
    from conftest import make_image_folder, run_script
    data = make_image_folder(tmp_path / "data", per_class=2, val_per_class=2)
    torch.manual_seed(0)
    m = vit.ViT(img_size=32, patch_size=8, dim=96, depth=1, heads=3)
    path = save(dict(m.state_dict()), tmp_path, "w96.th")
    head = save(dict(stage="nnclr_head", model_args=m.args, head_args={}, head={}, pool="mean", queue={},
                     encoder_init=path), tmp_path, "head.pt")  # only read after the encoder
    argv = [script, "--data_path", data, "--init", path, "--out_dir", str(tmp_path / "o"), "--num_workers", "0",
            "--device", "cpu", *(["--head", head] if script == "contrastive_tune.py" else [])]
    if script in ("knn.py", "probe.py"):
        p = run_script(*argv, check=False)
        code, err = p.returncode, p.stderr
    else:
        mod = __import__(script[:-3])
        monkeypatch.setattr(signal, "signal", lambda *a: None)  # keep pytest's handlers
        with pytest.raises(SystemExit) as e:
            mod.main(mod.parser.parse_args(argv[1:]))
        code, err = e.value.code, capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith(f"error: {path}: width 96 is none of") and "--heads" in last
    if script in ("knn.py", "probe.py"):  # with --heads, to the end
        extra = ["--k", "2"] if script == "knn.py" else ["--cached", "1", "--batch_size", "2", "--epochs", "1"]
        assert "top-1" in run_script(*argv, "--crop_pct", "1", "--heads", "3", *extra).stdout
    else:  # the training stages' encoder builder, with the head count
        enc = vit.load_encoder(path, heads=3)
        imgs = torch.randn(1, 3, 32, 32)
        assert enc.args == m.args and torch.equal(enc.eval()(imgs), m.eval()(imgs))


def test_errors_name_the_keys(tmp_path):
    sd = dict(small_vit().state_dict())
    del sd["blocks.1.attn.qkv.weight"]
    sd["blocks.0.extra"] = torch.zeros(1)
    sd["norm.weight"] = torch.zeros(7)
    path = save(dict(stage="mae", model_args=ARGS, encoder=sd), tmp_path, "bad.pt")
    with pytest.raises(ValueError) as e:
        vit.load_encoder(path)
    msg = str(e.value)
    assert "missing keys: blocks.1.attn.qkv.weight" in msg
    assert "unexpected keys: blocks.0.extra" in msg
    assert "norm.weight: file (7,) vs model (192,)" in msg


def test_errors_for_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        vit.load_encoder(str(tmp_path / "nope.pt"))
    good = save(dict(stage="mae", model_args=ARGS, encoder=small_vit().state_dict()), tmp_path, "good.pt")
    data = open(good, "rb").read()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        vit.load_encoder(str(trunc))
    head = save(dict(stage="nnclr_head", head={}, encoder_init="/x/mae.pt"), tmp_path, "head.pt")
    with pytest.raises(ValueError, match="nnclr_head checkpoint and holds no encoder"):
        vit.load_encoder(head)
    with pytest.raises(ValueError, match="expected a mae checkpoint, found nnclr_head"):
        vit.load_checkpoint(head, expect="mae")
    other = save({"weights": torch.zeros(3)}, tmp_path, "other.pt")
    with pytest.raises(ValueError, match="not a ViT checkpoint"):
        vit.load_encoder(other)


def test_load_encoder_at_another_resolution(tmp_path):
    m = small_vit()
    path = save(dict(stage="mae", model_args=ARGS, encoder=m.state_dict()), tmp_path, "mae.pt")
    enc = vit.load_encoder(path, img_size=48)
    assert enc(torch.randn(1, 3, 48, 48)).shape == (1, 1 + 36, 192)
    torch.testing.assert_close(enc.blocks[0].attn.qkv.weight, m.blocks[0].attn.qkv.weight)


# ---------------------------------------------------------------- optimizer groups

def test_param_groups_weight_decay_and_layer_decay():
    m = vit.ViT(**ARGS)
    groups = vit.param_groups(m, weight_decay=0.05, layer_decay=0.65)
    by_name = {n: g for g in groups for n in g["names"]}
    assert set(by_name) == {n for n, _ in m.named_parameters()}
    for n, p in m.named_parameters():
        g = by_name[n]
        assert g["weight_decay"] == (0.0 if p.ndim <= 1 or n.endswith(".bias") else 0.05), n
    d = ARGS["depth"]
    for b in range(d):
        assert by_name[f"blocks.{b}.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.65 ** (d - b))
    assert by_name["patch_embed.proj.weight"]["lr_scale"] == pytest.approx(0.65 ** (d + 1))
    assert by_name["cls_token"]["lr_scale"] == pytest.approx(0.65 ** (d + 1))
    assert by_name["norm.weight"]["lr_scale"] == 1.0
    # frozen parameters are left out
    m.blocks[0].requires_grad_(False)
    assert not any(n.startswith("blocks.0.") for g in vit.param_groups(m, 0.05, 0.65) for n in g["names"])


def test_no_grad_blocks_stores_no_graph_below():
    m = vit.ViT(**ARGS)
    out = m(torch.randn(2, 3, 32, 32), no_grad_blocks=2)
    out.sum().backward()
    assert m.blocks[1].attn.qkv.weight.grad is None and m.patch_embed.proj.weight.grad is None
    assert m.blocks[2].attn.qkv.weight.grad is not None
    ref = vit.ViT(**ARGS)
    ref.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(torch.ones(1, 3, 32, 32), no_grad_blocks=2), ref(torch.ones(1, 3, 32, 32)))


def test_flops_hand_count():
    a = dict(img_size=32, patch_size=8, dim=48, depth=4, heads=3)
    T, D, N = 17, 48, 16
    per_block = 2 * (T * D * 3 * D + T * D * D + 2 * T * D * 4 * D) + 2 * 2 * T * T * D
    assert vit.flops_per_image(a) == 4 * per_block + 2 * N * D * 3 * 8 * 8
