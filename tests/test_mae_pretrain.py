"""Stage 1: MAE pieces against references written here, and the script run end to end
(single process, 2-process torchrun on gloo, SIGTERM + resume, bad inputs)."""
import errno
import functools
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import mae_pretrain
import vit
from conftest import ROOT, make_image_folder, run_script, run_torchrun

TINY = ["--model", "vit_micro", "--img_size", "32", "--patch_size", "4", "--dec_dim", "32", "--dec_depth", "1",
        "--dec_heads", "2", "--num_workers", "0", "--warmup_epochs", "1", "--log_interval", "1"]


def train_set(root, seed=0, resize=True, views=2):  # the stage's training crops, as main builds them
    return mae_pretrain.ImageFolder(root, 32, functools.partial(mae_pretrain.train_boxes, views=views),
                                    mae_pretrain.flip_each, seed=seed, resize=resize)


def tiny_mae(seed=0):
    torch.manual_seed(seed)
    return mae_pretrain.MAE(img_size=16, patch_size=4, dim=48, depth=2, heads=3, dec_dim=32, dec_depth=1, dec_heads=2)


def test_patchify_order_and_round_trip():
    m = tiny_mae()
    imgs = torch.randn(2, 3, 16, 16)
    p = m.patchify(imgs)
    assert p.shape == (2, 16, 4 * 4 * 3)
    # patch n = (row, col) in row-major order; inside it (ph, pw, c) with the channel last
    for n, (r, c) in enumerate((r, c) for r in range(4) for c in range(4)):
        ref = imgs[:, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4].permute(0, 2, 3, 1).reshape(2, -1)
        assert torch.equal(p[:, n], ref)
    assert torch.equal(m.unpatchify(p), imgs)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_against_float64_formula(norm_pix):
    m = tiny_mae()
    m.norm_pix_loss = norm_pix
    imgs = torch.randn(3, 3, 16, 16)
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(3))
    loss, pred, mask = m(imgs, 0.75, noise)
    # reference: patchify by hand, unbiased per-patch variance, MSE per patch, mean over removed patches
    x = imgs.double().numpy().reshape(3, 3, 4, 4, 4, 4).transpose(0, 2, 4, 3, 5, 1).reshape(3, 16, 48)
    if norm_pix:
        x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, ddof=1, keepdims=True) + 1e-6)
    per_patch = ((pred.double().detach().numpy() - x) ** 2).mean(-1)
    removed = np.zeros((3, 16))
    for b in range(3):
        removed[b, np.argsort(noise[b].numpy())[4:]] = 1  # 12 of 16 removed
    assert np.array_equal(mask.numpy(), removed)
    ref = (per_patch * removed).sum() / removed.sum()
    assert abs(loss.item() - ref) < 1e-5


def test_decoder_names_are_facebooks():
    keys = set(tiny_mae().state_dict())
    for k in ("mask_token", "decoder_embed.weight", "decoder_pos_embed", "decoder_blocks.0.attn.qkv.weight",
              "decoder_norm.weight", "decoder_pred.weight", "cls_token", "blocks.1.mlp.fc2.bias", "norm.bias"):
        assert k in keys, k


def test_random_resized_crop_boxes():
    import random
    rng = random.Random(0)
    for _ in range(500):
        w, h = rng.randint(20, 600), rng.randint(20, 600)
        x0, y0, x1, y1 = mae_pretrain.random_resized_crop(rng, w, h, (0.2, 1.0))
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        area = (x1 - x0) * (y1 - y0) / (w * h)
        ratio = (x1 - x0) / (y1 - y0)
        # either a sampled crop (area in scale, ratio in 3/4..4/3 up to rounding) or the centre fallback
        assert area <= 1.0 + 1e-9 and (0.15 < area or ratio <= 4 / 3 + 0.1)


def test_shard_sampler_global_batch_independent_of_world():
    n, B = 37, 8
    one = list(mae_pretrain.ShardSampler(n, B, 0, 1, seed=5))
    two = [list(mae_pretrain.ShardSampler(n, B, r, 2, seed=5)) for r in range(2)]
    assert len(one) == (n // B) * B
    for s in range(n // B):  # step s: rank 0 takes the first half of the global batch, rank 1 the second
        assert one[s * B:(s + 1) * B] == two[0][s * 4:(s + 1) * 4] + two[1][s * 4:(s + 1) * 4]
    sampler = mae_pretrain.ShardSampler(n, B, 0, 1, seed=5)
    sampler.set_epoch(0, start_step=2)
    assert list(sampler) == one[2 * B:]
    sampler.set_epoch(1)
    assert list(sampler) != one and all(e == 1 for e, _ in sampler)


def test_image_folder_crops_are_deterministic(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=2, per_class=4, size=48)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (375, 500, 3), np.uint8)).save(
        os.path.join(root, "train", "class_0", "big.jpg"))  # large enough for reduced-size decoding
    ds = train_set(os.path.join(root, "train"), seed=1, resize=False)
    assert ds.classes == ["class_0", "class_1"] and len(ds) == 9
    for i in range(len(ds)):
        crops, label, idx = ds[(3, i)]
        assert len(crops) == 2 and idx == i and label == (0 if i < 5 else 1)
        for c, again in zip(crops, ds[(3, i)][0]):  # a function of (seed, epoch, index)
            assert c.dtype == torch.uint8 and c.ndim == 3 and c.shape[2] == 3 and torch.equal(c, again)
    assert not all(torch.equal(a, b) for a, b in zip(ds[(3, 0)][0], ds[(4, 0)][0]))
    big = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("big.jpg")][0]
    sides = []
    for epoch in range(200):  # crops at the edges of a reduced-size decode stay inside the image
        for c in ds[(epoch, big)][0]:
            assert 0 < c.shape[0] <= 375 and 0 < c.shape[1] <= 500
            sides.append(min(c.shape[:2]))
    assert min(sides) < 64 <= max(sides)  # scale 0.2-1: small crops at full size, large ones drafted
    val = mae_pretrain.ImageFolder(os.path.join(root, "val"), 32, mae_pretrain.val_box, resize=False)
    (c,), _, _ = val[(0, 0)]
    assert c.shape == (48, 48, 3)  # the centre square, resized on the device
    # resize=True (CPU training): the workers resize, to S x S
    ds = train_set(os.path.join(root, "train"), seed=1)
    assert all(c.shape == (32, 32, 3) for e in range(20) for c in ds[(e, big)][0])


def test_device_resize_matches_worker_resize(tmp_path):
    # the GPU path (crops at their own size, resized by crops_to_batch) gives the images that the CPU
    # path (PIL resizes in the worker) gives: same crops, same flips, the same resample up to rounding
    root = make_image_folder(tmp_path / "d", classes=2, per_class=3, size=40)
    a = train_set(os.path.join(root, "train"), seed=3)
    b = train_set(os.path.join(root, "train"), seed=3, resize=False)
    items = [(e, i) for e in range(4) for i in range(len(a))]
    xa = mae_pretrain.crops_to_batch(*mae_pretrain.collate([a[it] for it in items])[:2], 32, "cpu")
    xb = mae_pretrain.crops_to_batch(*mae_pretrain.collate([b[it] for it in items])[:2], 32, "cpu")
    assert xa.shape == xb.shape == (2 * len(items), 3, 32, 32)
    diff = (xa - xb).abs().flatten(1)
    assert diff.mean() < 1.0 and diff.mean(1).max() < 2.0, (diff.mean(), diff.mean(1).max())
    other = mae_pretrain.crops_to_batch(*mae_pretrain.collate([b[(e + 9, i)] for e, i in items])[:2], 32, "cpu")
    assert (xa - other).abs().mean() > 5  # other crops differ by far more than the rounding


def test_collate_and_device_resize_match_pil(tmp_path):
    # crops of several sizes (down- and upsampling) packed by collate, resized by crops_to_batch:
    # close to PIL's bicubic resize of the same crop, in the same order
    rng = np.random.default_rng(0)
    smooth = lambda h, w: np.array(Image.fromarray(rng.integers(0, 256, (6, 6, 3), np.uint8))
                                   .resize((w, h), Image.BILINEAR))
    crops = [smooth(h, w) for h, w in ((70, 50), (32, 32), (20, 27), (100, 90))]
    batch = [([torch.from_numpy(crops[0]), torch.from_numpy(crops[1])], 4, 7),
             ([torch.from_numpy(crops[2]), torch.from_numpy(crops[3])], 5, 9)]
    flat, sizes, labels, idx = mae_pretrain.collate(batch)
    assert flat.dtype == torch.uint8 and flat.numel() == sum(c.size for c in crops)
    assert sizes.tolist() == [[70, 50], [32, 32], [20, 27], [100, 90]]
    assert labels.tolist() == [4, 5] and idx.tolist() == [7, 9]
    x = mae_pretrain.crops_to_batch(flat, sizes, 32, "cpu")
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 255
    for k, c in enumerate(crops):
        ref = torch.from_numpy(np.array(Image.fromarray(c).resize((32, 32), Image.BICUBIC))).permute(2, 0, 1).float()
        assert (x[k] - ref).abs().max() <= 2.0, k  # PIL rounds to uint8 between its two passes
    assert torch.equal(x[1], torch.from_numpy(crops[1]).permute(2, 0, 1).float())  # already 32 x 32: untouched


def test_save_atomic_keeps_previous_file_when_the_write_fails(tmp_path, monkeypatch, capsys):
    path = str(tmp_path / "ckpt.pt")
    mae_pretrain.save_atomic({"iter_num": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(SystemExit) as e:
        mae_pretrain.save_atomic({"iter_num": 2}, path)
    monkeypatch.undo()
    assert e.value.code == 2 and f"error: cannot write {path}: No space left on device" in capsys.readouterr().err
    assert torch.load(path)["iter_num"] == 1 and os.listdir(tmp_path) == ["ckpt.pt"]  # the partial .tmp is removed


def test_lr_schedule():
    """The authors' warmup: step s < W runs at lr (s + 1) / (W + 1), never at 0; from s = W the cosine
    starts at lr and ends at min_lr (every script's get_lr is this copy: test_data_copies_agree)."""
    W, T, lr, min_lr = 10, 110, 2.0, 0.1
    ref = [lr * (s + 1) / (W + 1) if s < W
           else min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (s - W) / (T - W)))
           for s in range(T + 1)]
    lrs = [mae_pretrain.get_lr(s, lr, min_lr, W, T) for s in range(T + 1)]
    assert lrs == pytest.approx(ref, rel=1e-12)
    assert lrs[0] == pytest.approx(lr / 11) and lrs[W - 1] == pytest.approx(lr * 10 / 11) and lrs[W] == lr
    assert lrs[60] == pytest.approx((lr + min_lr) / 2) and lrs[T] == pytest.approx(min_lr)
    assert mae_pretrain.get_lr(0, lr, 0.0, 0, T) == lr  # no warmup: the first step at lr


# ---------------------------------------------------------------- the script end to end

def read_log(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "log.txt"))]


def test_train_two_epochs_then_load_and_continue(tmp_path, image_folder):
    out = str(tmp_path / "mae")
    run_script("mae_pretrain.py", "--data_path", image_folder, "--out_dir", out, *TINY, "--batch_size", "8",
               "--epochs", "2", "--eval_interval", "3", "--blr", "1e-3")
    log = [e for e in read_log(out) if "loss" in e]
    assert [e["iter"] for e in log] == list(range(1, 7)) and all(np.isfinite(e["loss"]) for e in log)
    assert os.path.exists(os.path.join(out, "recon_00000006.png"))
    ckpt = torch.load(os.path.join(out, "mae.pt"), weights_only=False)
    assert ckpt["stage"] == "mae" and ckpt["iter_num"] == 6 and "mask_token" in ckpt["decoder"]
    enc = vit.load_encoder(os.path.join(out, "mae.pt"))
    assert enc(torch.zeros(1, 3, 32, 32)).shape == (1, 65, 96)
    # a facebookresearch/mae-style full checkpoint ({"model": encoder + decoder}) as --init
    fb = str(tmp_path / "fb_full.pth")
    torch.save({"model": {**ckpt["encoder"], **ckpt["decoder"]}}, fb)
    out2 = str(tmp_path / "mae2")
    run_script("mae_pretrain.py", "--data_path", image_folder, "--out_dir", out2, *TINY, "--batch_size", "8",
               "--max_iters", "1", "--blr", "0", "--warmup_epochs", "0")
    init = torch.load(os.path.join(out2, "mae.pt"), weights_only=False)
    p = run_script("mae_pretrain.py", "--data_path", image_folder, "--out_dir", str(tmp_path / "mae3"), *TINY,
                   "--batch_size", "8", "--max_iters", "1", "--blr", "0", "--init", fb)
    after = torch.load(str(tmp_path / "mae3" / "mae.pt"), weights_only=False)
    for k in ckpt["decoder"]:  # lr 0: the weights are exactly the file's
        assert torch.equal(after["decoder"][k], ckpt["decoder"][k]), k
    assert not torch.equal(init["encoder"]["blocks.0.attn.qkv.weight"], after["encoder"]["blocks.0.attn.qkv.weight"])


def test_torchrun_two_processes_matches_one(tmp_path, image_folder):
    args = ["--data_path", image_folder, *TINY, "--batch_size", "8", "--epochs", "2", "--eval_interval", "100"]
    run_script("mae_pretrain.py", *args, "--out_dir", str(tmp_path / "one"))
    run_torchrun(2, "mae_pretrain.py", *args, "--out_dir", str(tmp_path / "two"))
    one = torch.load(str(tmp_path / "one" / "mae.pt"), weights_only=False)
    two = torch.load(str(tmp_path / "two" / "mae.pt"), weights_only=False)
    # same global batches and masks, gradients averaged over ranks: equal up to float rounding
    for k in one["encoder"]:
        torch.testing.assert_close(two["encoder"][k], one["encoder"][k], atol=2e-5, rtol=1e-4)
    l1 = [e["loss"] for e in read_log(str(tmp_path / "one")) if "loss" in e]
    l2 = [e["loss"] for e in read_log(str(tmp_path / "two")) if "loss" in e]
    np.testing.assert_allclose(l2, l1, atol=1e-4)


def test_sigterm_then_resume_auto_is_bit_identical(tmp_path, image_folder):
    args = ["mae_pretrain.py", "--data_path", image_folder, *TINY, "--batch_size", "8", "--epochs", "40",
            "--eval_interval", "1000", "--ckpt_interval", "1000", "--blr", "1e-3"]
    run_script(*args, "--out_dir", str(tmp_path / "full"))
    out = str(tmp_path / "cut")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # with a data-loader worker, and the signal sent to the whole process group as timeout and SLURM do
    p = subprocess.Popen([sys.executable, *args, "--out_dir", out, "--num_workers", "1"], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log = os.path.join(out, "log.txt")
    while p.poll() is None and not (os.path.exists(log) and len(open(log).readlines()) >= 5):
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGTERM)
    stdout = p.communicate(timeout=120)[0]
    assert p.returncode == 0, stdout
    assert "stopped by signal" in stdout and "--resume auto" in stdout
    assert not os.path.exists(os.path.join(out, "mae.pt"))
    stopped_at = torch.load(sorted(f for f in os.scandir(out) if f.name.startswith("ckpt_"))[-1].path,
                            weights_only=False)["iter_num"]
    assert 5 <= stopped_at < 120
    run_script(*args, "--out_dir", out, "--resume", "auto")
    full = torch.load(str(tmp_path / "full" / "mae.pt"), weights_only=False)
    cut = torch.load(os.path.join(out, "mae.pt"), weights_only=False)
    for part in ("encoder", "decoder"):
        for k in full[part]:
            assert torch.equal(full[part][k], cut[part][k]), k
    full_log = [e for e in read_log(str(tmp_path / "full")) if "loss" in e]
    cut_log = [e for e in read_log(out) if "loss" in e]
    assert [e["loss"] for e in cut_log] == [e["loss"] for e in full_log]  # the curve continues exactly


def fails_with(tmp_path, data, *extra, match):
    p = run_script("mae_pretrain.py", "--data_path", data, "--out_dir", str(tmp_path / "o"), *TINY,
                   "--batch_size", "8", "--epochs", "1", *extra, check=False)
    assert p.returncode != 0, p.stdout
    assert match in p.stderr, p.stderr[-2000:]
    return p


def test_truncated_image_names_the_file_or_is_skipped(tmp_path, image_folder):
    bad = os.path.join(image_folder, "train", "class_1", "0002.jpg")
    data = open(bad, "rb").read()
    open(bad, "wb").write(data[: len(data) // 3])
    fails_with(tmp_path, image_folder, match=bad)
    p = run_script("mae_pretrain.py", "--data_path", image_folder, "--out_dir", str(tmp_path / "skip"), *TINY,
                   "--batch_size", "8", "--epochs", "1", "--skip_bad_images", "1")
    assert f"skipping unreadable image {bad}" in p.stderr


def test_bad_layouts_fail_before_training(tmp_path):
    data = make_image_folder(tmp_path / "d", classes=2, per_class=4)
    os.makedirs(os.path.join(data, "train", "empty_class"))
    fails_with(tmp_path, data, match="empty_class holds no images")
    os.rmdir(os.path.join(data, "train", "empty_class"))
    fails_with(tmp_path, str(tmp_path / "nowhere"), match="missing split folder")
    # val/ is optional: without it, no val loss and no picture, said in the start line
    os.rename(os.path.join(data, "val"), os.path.join(data, "valid"))
    p = run_script("mae_pretrain.py", "--data_path", data, "--out_dir", str(tmp_path / "noval"), *TINY,
                   "--batch_size", "8", "--epochs", "1", "--eval_interval", "1")
    assert "no val/: no val loss or reconstructions" in p.stdout
    assert not [f for f in os.listdir(tmp_path / "noval") if f.startswith("recon_")]
    assert not [e for e in read_log(str(tmp_path / "noval")) if "val_loss" in e]


def test_bad_flags_and_checkpoints(tmp_path, image_folder):
    fails_with(tmp_path, image_folder, "--img_size", "30", match="not divisible by patch size 4")
    fails_with(tmp_path, image_folder, "--grad_accum", "3", match="not divisible by processes")
    fails_with(tmp_path, image_folder, "--batch_size", "100", match="larger than the training set")
    fails_with(tmp_path, image_folder, "--blr", "1e38", "--warmup_epochs", "0", match="non-finite loss")
    head = str(tmp_path / "head.pt")
    torch.save(dict(stage="nnclr_head", head={}), head)
    fails_with(tmp_path, image_folder, "--init", head, match="expected an MAE checkpoint, found a nnclr_head")
    fails_with(tmp_path, image_folder, "--resume", head, match="expected a mae checkpoint, found nnclr_head")
    trunc = str(tmp_path / "trunc.pt")
    open(trunc, "wb").write(b"PK\x03\x04 not really")
    fails_with(tmp_path, image_folder, "--init", trunc, match="truncated or not a torch file")
    wrong = str(tmp_path / "wrong.pt")
    torch.save({"model": vit.ViT(32, 4, 192, 2, 3).state_dict()}, wrong)
    p = fails_with(tmp_path, image_folder, "--init", wrong, match="does not fit the model")
    assert "missing keys: blocks.2." in p.stderr and "mis-shaped: cls_token" in p.stderr
