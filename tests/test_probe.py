"""Tests for probe.py: independent heads, the head file, cached == streaming, resume and SIGTERM,
1 vs 2 processes, the logistic regression against float64 references, labelled-set selection, errors."""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from conftest import ROOT, make_image_folder, run_torchrun

sys.path.insert(0, ROOT)
import probe  # noqa: E402
import vit  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs like the subprocess ones (OMP_NUM_THREADS=1): tiny matmuls on a shared
    2-core machine are slower on two threads, and results then match the subprocess runs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def no_signal_handlers(monkeypatch):
    """probe.main runs in this process: keep pytest's own SIGTERM handling."""
    monkeypatch.setattr(signal, "signal", lambda *a: None)


@pytest.fixture
def setup(tmp_path):
    data = make_image_folder(tmp_path / "data")  # 3 classes, 24 train / 12 val images of 32 px
    torch.manual_seed(0)
    m = vit.ViT(img_size=32, patch_size=4, dim=96, depth=2, heads=3)
    enc = tmp_path / "enc.pt"
    torch.save(dict(stage="mae", model_args=m.args, encoder=m.state_dict()), enc)
    return tmp_path, data, str(enc)


def base(data, enc, out, *extra):
    return ["--data_path", data, "--init", enc, "--out_dir", out, "--crop_pct", 1, "--num_workers", 0,
            "--batch_size", 8, "--epochs", 3, "--log_interval", 1, "--device", "cpu", *extra]


def run_probe(*argv):
    probe.main(probe.parser.parse_args([str(a) for a in argv]))


def load(out, name="probe.pt"):
    return torch.load(os.path.join(out, name), map_location="cpu", weights_only=False)


def evals(out):  # the per-evaluation JSON lines
    lines = [json.loads(x) for x in open(os.path.join(out, "log.txt"))]
    return [e for e in lines if "top1" in e]


def error_line(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        run_probe(*argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ")
    return err[-1]


def folder_features(enc_path, split_dir, paths=None, pool="cls", heads=None):
    """CLS (or mean patch) features computed here: PIL decode (32 px images, crop_pct 1 is the identity),
    ImageNet normalisation, the encoder."""
    enc = vit.load_encoder(enc_path, verbose=False, heads=heads)
    classes = sorted(os.listdir(split_dir))
    if paths is None:
        paths = [f"{c}/{f}" for c in classes for f in sorted(os.listdir(os.path.join(split_dir, c)))]
    labels = np.array([classes.index(p.split("/")[0]) for p in paths])
    x = np.stack([np.asarray(Image.open(os.path.join(split_dir, p)).convert("RGB")) for p in paths]).astype(np.float32)
    x = (x - np.array([0.485, 0.456, 0.406], np.float32) * 255) / (np.array([0.229, 0.224, 0.225], np.float32) * 255)
    with torch.no_grad():
        t = enc(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
    f = t[:, 0] if pool == "cls" else t[:, 1:].mean(1)
    return f.double().numpy(), labels


# -----------------------------------------------------------------------------
# float64 reference for the logistic regression: damped Newton in numpy

def lr_objective(W, X, y, lam):
    Z = X @ W.T
    m = Z.max(1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(Z - m).sum(1)))
    return (lse - Z[np.arange(len(y)), y]).mean() + lam / 2 * (W ** 2).sum()


def lr_gradient(W, X, y, lam):
    Z = X @ W.T
    P = np.exp(Z - Z.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    P[np.arange(len(y)), y] -= 1
    return P.T @ X / len(y) + lam * W


def lr_newton(X, y, C, lam, iters=200):
    n, D = X.shape
    W = np.zeros((C, D))
    for _ in range(iters):
        g = lr_gradient(W, X, y, lam).ravel()
        Z = X @ W.T
        P = np.exp(Z - Z.max(1, keepdims=True))
        P /= P.sum(1, keepdims=True)
        Hs = sum(np.kron(np.diag(p) - np.outer(p, p), np.outer(x, x)) for p, x in zip(P, X)) / n
        step = np.linalg.solve(Hs + lam * np.eye(C * D), g).reshape(C, D)
        if g @ step.ravel() < 1e-24:  # Newton decrement: f(W) - min f is about half of it
            break
        t, f0 = 1.0, lr_objective(W, X, y, lam)
        while lr_objective(W - t * step, X, y, lam) > f0 - 1e-4 * t * (g @ step.ravel()) and t > 1e-10:
            t /= 2
        W = W - t * step
    return W


# -----------------------------------------------------------------------------
# the heads

def test_heads_are_independent_and_the_bn_has_no_parameters(setup):
    tmp, data, enc = setup
    run_probe(*base(data, enc, tmp / "both", "--cached", 1, "--blrs", 0.3, 0.02))
    run_probe(*base(data, enc, tmp / "a", "--cached", 1, "--blrs", 0.3))
    run_probe(*base(data, enc, tmp / "b", "--cached", 1, "--blrs", 0.02))
    both, a, b = load(tmp / "both")["heads"], load(tmp / "a")["heads"], load(tmp / "b")["heads"]
    for one, i in ((a, 0), (b, 1)):  # head i of the joint run is that head trained alone, bit for bit
        for k in ("weight", "bias"):
            assert torch.equal(both[f"linears.{i}.{k}"], one[f"linears.0.{k}"])
        for k in ("running_mean", "running_var"):
            assert torch.equal(both[f"norm.{k}"], one[f"norm.{k}"])
    assert not torch.allclose(both["linears.0.weight"], both["linears.1.weight"])  # the lrs did matter
    for e_both, e_a, e_b in zip(evals(tmp / "both"), evals(tmp / "a"), evals(tmp / "b")):
        assert e_both["top1"] == e_a["top1"] + e_b["top1"] and e_both["top5"] == e_a["top5"] + e_b["top5"]
    # the module: BatchNorm1d without affine parameters, one Linear per head, all from the same init
    heads = probe.LinearHeads(96, 3, 4, seed=0)
    assert [n for n, _ in heads.named_parameters()] == [f"linears.{i}.{k}" for i in range(4)
                                                        for k in ("weight", "bias")]
    assert heads.norm.weight is None and heads.norm.bias is None and not heads.norm.affine
    w = heads.linears[0].weight
    assert (all(torch.equal(lin.weight, w) for lin in heads.linears)
            and all((lin.bias == 0).all() for lin in heads.linears))
    assert not torch.equal(w, probe.LinearHeads(96, 3, 1, seed=1).linears[0].weight)
    # the authors' init: normal std 0.01 cut at +-2 absolute (200 std: uncut), so 4.55% lie beyond 2 std;
    # BatchNorm eps 1e-5 (torch's, theirs); their lr grid, ten heads
    big = probe.LinearHeads(256, 100, 1, seed=0)
    w = big.linears[0].weight
    assert 0.0098 < w.std().item() < 0.0102 and 0.040 < (w.abs() > 0.02).float().mean().item() < 0.051
    assert big.norm.eps == 1e-5 and big.head(0)[0].eps == 1e-5
    assert probe.parser.get_default("blrs") == [round(0.1 - 0.01 * i, 2) for i in range(10)]


def noise_folder(root, classes=3, per_class=8, val_per_class=8, seed=0):
    """Images whose class is unrelated to their pixels: val accuracy goes up and down over epochs."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f"class_{c}"))
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    os.path.join(root, split, f"class_{c}", f"{i}.png"))
    return str(root)


def test_head_file_holds_the_best_head(setup):
    tmp, _, enc = setup
    data = noise_folder(tmp / "noise")
    run_probe(*base(data, enc, tmp / "p", "--cached", 1, "--blrs", 0.05, 2.0, "--epochs", 6))
    ck = load(tmp / "p")
    assert ck["stage"] == "probe" and ck["pool"] == "cls" and ck["encoder_init"] == enc
    assert ck["classes"] == ["class_0", "class_1", "class_2"]
    assert set(ck["head"]) == {"0.running_mean", "0.running_var", "0.num_batches_tracked", "1.weight", "1.bias"}
    # the best over heads and evaluations, the first time it was reached: here before the last epoch
    ev = evals(tmp / "p")
    best = max(max(e["top1"]) for e in ev)
    first = next(e for e in ev if max(e["top1"]) == best)
    assert (ck["top1"], ck["epoch"], ck["blr"]) == (best, first["epoch"], [0.05, 2.0][first["top1"].index(best)])
    h = [0.05, 2.0].index(ck["blr"])
    assert ck["epoch"] < ev[-1]["epoch"] and ck["lr"] == ck["blr"] * 8 / 256
    assert not torch.equal(ck["head"]["1.weight"], ck["heads"][f"linears.{h}.weight"])  # a snapshot, not the last
    head = probe.make_head(**ck["head_args"])
    head.load_state_dict(ck["head"])  # strict
    head.eval()
    x, y = folder_features(enc, os.path.join(data, "val"))
    with torch.no_grad():
        pred = head(torch.from_numpy(x).float()).argmax(1).numpy()
    assert ck["top1"] == 100.0 * (pred == y).mean()
    # what the head's BatchNorm does in eval mode, as a formula
    bn = ((x - ck["head"]["0.running_mean"].double().numpy())
          / np.sqrt(ck["head"]["0.running_var"].double().numpy() + 1e-5))
    ref = bn @ ck["head"]["1.weight"].double().numpy().T + ck["head"]["1.bias"].double().numpy()
    np.testing.assert_array_equal(ref.argmax(1), pred)


def test_cached_equals_streaming_on_centre_crops(setup):
    tmp, data, enc = setup
    run_probe(*base(data, enc, tmp / "cached", "--cached", 1, "--blrs", 0.2, 0.05))
    run_probe(*base(data, enc, tmp / "stream", "--train_aug", 0, "--blrs", 0.2, 0.05))
    c, s = load(tmp / "cached")["heads"], load(tmp / "stream")["heads"]
    for k in c:
        torch.testing.assert_close(c[k], s[k], rtol=0, atol=1e-6)
    assert evals(tmp / "cached") == evals(tmp / "stream")
    # the augmented stream sees other crops: other heads
    run_probe(*base(data, enc, tmp / "aug", "--blrs", 0.2, 0.05))
    assert not torch.allclose(load(tmp / "aug")["heads"]["linears.0.weight"], c["linears.0.weight"], atol=1e-4)


def test_resume_is_bit_identical(setup):
    tmp, data, enc = setup
    args = base(data, enc, tmp / "full", "--blrs", 0.2, 0.05, "--epochs", 4)  # streaming, augmented: 12 steps
    run_probe(*args)
    cut = base(data, enc, tmp / "cut", "--blrs", 0.2, 0.05, "--epochs", 4, "--ckpt_interval", 5, "--keep_last", 0)
    run_probe(*cut)
    os.remove(tmp / "cut" / "probe.pt")
    os.remove(tmp / "cut" / "ckpt_00000010.pt")  # as if stopped at step 5
    run_probe(*cut, "--resume", "auto")
    full, resumed = load(tmp / "full"), load(tmp / "cut")
    assert resumed["iter_num"] == full["iter_num"] == 12
    for k in full["heads"]:
        assert torch.equal(full["heads"][k], resumed["heads"][k])
    for k in ("top1", "top5", "blr", "epoch", "head_best", "last"):
        assert full[k] == resumed[k]


def test_sigterm_checkpoints_and_resumes(setup):
    tmp, data, enc = setup
    args = [sys.executable, "probe.py", *map(str, base(data, enc, tmp / "s", "--blrs", 0.1, "--epochs", 100000))]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp / "s" / "log.txt"
    t0 = time.time()
    while not (log.exists() and len(log.read_text().splitlines()) >= 3) and time.time() - t0 < 60:
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0, out
    assert "stopped by signal at iteration" in out and "--resume auto" in out
    ckpts = sorted((tmp / "s").glob("ckpt_*.pt"))
    assert len(ckpts) == 1
    stopped = int(ckpts[0].stem.split("_")[1])
    assert stopped >= 3 and load(tmp / "s", ckpts[0].name)["iter_num"] == stopped
    # continue (with a shorter horizon) from exactly that step
    p = subprocess.run(args + ["--resume", "auto", "--max_iters", str(stopped + 2)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"at iteration {stopped}" in p.stdout and load(tmp / "s")["iter_num"] == stopped + 2


def test_torchrun_two_processes_match_one(setup):
    tmp, data, enc = setup
    args = base(data, enc, tmp / "one", "--cached", 1, "--blrs", 0.2, 0.05)
    run_probe(*args)
    run_torchrun(2, "probe.py", *map(str, base(data, enc, tmp / "two", "--cached", 1, "--blrs", 0.2, 0.05)))
    assert evals(tmp / "one") == evals(tmp / "two")
    one, two = load(tmp / "one"), load(tmp / "two")
    for k in one["heads"]:
        torch.testing.assert_close(one["heads"][k], two["heads"][k], rtol=0, atol=1e-6)
    assert one["top1"] == two["top1"] and one["blr"] == two["blr"]


# -----------------------------------------------------------------------------
# logistic regression

def test_logreg_known_optimum():
    # x = +1 (class 0), x = -1 (class 1): by symmetry W = [a, -a] with lam a (1 + e^(2a)) = 1
    lam = 0.05
    lo, hi = 0.0, 1.0 / lam
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if lam * mid * (1 + math.exp(2 * mid)) < 1 else (lo, mid)
    W, info = probe.fit_logreg(torch.tensor([[1.0], [-1.0]]), torch.tensor([0, 1]), 2, lam)
    assert abs(W[0, 0].item() - lo) < 1e-9 and abs(W[1, 0].item() + lo) < 1e-9
    assert info["gap"] <= 1e-6 * info["loss"]


@pytest.mark.parametrize("lam", [1e-2, 0.00025 / 40])
def test_logreg_matches_newton(lam):
    rng = np.random.default_rng(0)
    C, D, n = 4, 6, 40
    centres = rng.normal(size=(C, D)) * 3
    y = np.arange(n) % C
    X = centres[y] + rng.normal(size=(n, D))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    W, info = probe.fit_logreg(torch.from_numpy(X), torch.from_numpy(y), C, lam)
    W = W.numpy()
    ref = lr_newton(X, y, C, lam)
    f, f_ref = lr_objective(W, X, y, lam), lr_objective(ref, X, y, lam)
    assert abs(f - f_ref) <= 1e-9 * f_ref and abs(info["loss"] - f) < 1e-12
    assert np.linalg.norm(lr_gradient(W, X, y, lam)) < 1e-6
    # strong convexity: ||W - W*|| <= ||grad f(W)|| / lam
    assert np.linalg.norm(W - ref) <= np.linalg.norm(lr_gradient(W, X, y, lam)) / lam + 1e-9
    assert ((X @ W.T).argmax(1) == y).all()  # separable: the optimum classifies the training set


def test_logreg_script_and_train_selection(setup, capsys):
    tmp, data, enc = setup
    run_probe(*base(data, enc, tmp / "lr", "--logreg", 1, "--per_class", 2, "--seed", 1))
    ck = load(tmp / "lr", "logreg.pt")
    assert ck["stage"] == "logreg" and len(ck["train_files"]) == 6
    assert sorted(f.split("/")[0] for f in ck["train_files"]) == ["class_0"] * 2 + ["class_1"] * 2 + ["class_2"] * 2
    # the same classifier computed here: labelled-set mean, L2 norm, Newton, top-1 on val
    X, y = folder_features(enc, os.path.join(data, "train"), ck["train_files"])
    Xv, yv = folder_features(enc, os.path.join(data, "val"))
    mu = X.mean(0)
    X, Xv = X - mu, Xv - mu
    X, Xv = X / np.linalg.norm(X, axis=1, keepdims=True), Xv / np.linalg.norm(Xv, axis=1, keepdims=True)
    lam = 0.00025 / 6
    W = lr_newton(X, y, 3, lam)
    assert ck["top1"] == 100.0 * ((Xv @ W.T).argmax(1) == yv).mean()
    f = lr_objective(ck["weight"].numpy(), X, y, lam)
    assert abs(f - lr_objective(W, X, y, lam)) < 1e-6 * f
    entry = json.loads(open(tmp / "lr" / "log.txt").read().splitlines()[-1])
    assert entry["logreg_top1"] == round(ck["top1"], 4) and entry["n_train"] == 6
    # --train_list: exactly the listed images; class/name where names repeat across classes
    names = ["class_0/0001.jpg", "class_2/0003.png", "class_1/0005.jpg"]
    (tmp / "list.txt").write_text("\n".join(names) + "\n\n")
    run_probe(*base(data, enc, tmp / "lst", "--logreg", 1, "--train_list", tmp / "list.txt"))
    assert sorted(load(tmp / "lst", "logreg.pt")["train_files"]) == sorted(names)
    (tmp / "bad.txt").write_text("class_0/0001.jpg\nclass_1/9999.jpg\nmissing.jpg\n")
    line = error_line(capsys, *base(data, enc, tmp / "x", "--logreg", 1, "--train_list", tmp / "bad.txt"))
    assert "2 of 3 names" in line and "class_1/9999.jpg" in line and "missing.jpg" in line
    (tmp / "amb.txt").write_text("0001.jpg\n")  # in all three class folders
    line = error_line(capsys, *base(data, enc, tmp / "x", "--logreg", 1, "--train_list", tmp / "amb.txt"))
    assert "several class folders" in line and "0001.jpg" in line
    line = error_line(capsys, *base(data, enc, tmp / "x", "--logreg", 1, "--per_class", 9))
    assert "--per_class 9" in line and "only 8" in line


def test_errors(setup, capsys):
    tmp, data, enc = setup
    run_probe(*base(data, enc, tmp / "p", "--cached", 1, "--blrs", 0.1, "--epochs", 1))
    head = str(tmp / "p" / "probe.pt")  # a head file given as the encoder
    line = error_line(capsys, *base(data, head, tmp / "x", "--cached", 1))
    assert "probe checkpoint" in line and "holds no encoder" in line and enc in line
    line = error_line(capsys, *base(data, enc, tmp / "x", "--batch_size", 32))
    assert "--batch_size 32 is larger than the training set (24 images)" in line
    line = error_line(capsys, *base(data, enc, tmp / "p", "--cached", 1, "--blrs", 0.2, "--resume", "auto"))
    assert "--blrs" in line  # resuming with other heads than the checkpoint's
    # a diverging lr: caught at the next log step, naming the first bad iteration; no head file written
    line = error_line(capsys, *base(data, enc, tmp / "nan", "--cached", 1, "--blrs", 1e38, "--log_interval", 2))
    first = int(re.search(r"non-finite loss at iteration (\d+);", line).group(1))
    logged = [json.loads(x)["iter"] for x in open(tmp / "nan" / "log.txt") if '"loss"' in x]
    # caught at the next log step
    assert first >= 1 and max(logged) <= first and not (tmp / "nan" / "probe.pt").exists()
    (tmp / "data" / "val" / "class_2" / "zz.jpg").write_bytes(b"not a jpeg")
    line = error_line(capsys, *base(data, enc, tmp / "x", "--cached", 1))
    assert "unreadable image" in line and "zz.jpg" in line


# -----------------------------------------------------------------------------
# --eval_head: this project's probe.pt and the MAE-CT releases' two layouts

def release_head(path, head, layout="new", kind="mean_patch", **ctor):
    """An MAE-CT probes/<name>.th as their files hold it: head (BatchNorm, Linear) under layer.1 / layer.2
    (and norm.*, the same BatchNorm), or in older files layer.2 / layer.3."""
    bn, lin = ("layer.1", "layer.2") if layout == "new" else ("layer.2", "layer.3")
    sd = {f"{bn}.running_mean": head["0.running_mean"], f"{bn}.running_var": head["0.running_var"],
          f"{bn}.num_batches_tracked": torch.tensor(5005), f"{lin}.weight": head["1.weight"],
          f"{lin}.bias": head["1.bias"]}
    if layout == "new":
        sd.update({f"norm.{k.split('.')[-1]}": v.clone() for k, v in sd.items() if k.startswith(bn)})
    pooling = {} if kind is None else {"pooling": {"kind": kind}}
    torch.save({"state_dict": sd, "ctor_kwargs": {**pooling, "optim_ctor": {"kind": "sgd"}, **ctor}}, path)
    return str(path)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """7 classes x 3 val images (no train/ left); a width-96, 3-head encoder as an MAE-CT-style release
    (flat, pos_embed without the CLS row: needs --heads 3); a probe.pt trained on it with mean pooling; a
    head with some tiny running variances, where the BatchNorm's eps matters."""
    tmp = tmp_path_factory.mktemp("released")
    data = make_image_folder(tmp / "data", classes=7, per_class=1, val_per_class=3)
    torch.manual_seed(0)
    m = vit.ViT(img_size=32, patch_size=4, dim=96, depth=2, heads=3)
    own, foreign = str(tmp / "mae.pt"), str(tmp / "maect_micro.th")
    torch.save(dict(stage="mae", model_args=m.args, encoder=m.state_dict()), own)
    torch.save(dict(m.state_dict(), pos_embed=m.state_dict()["pos_embed"][:, 1:]), foreign)
    run_probe(*base(data, own, tmp / "p", "--cached", 1, "--batch_size", 7, "--epochs", 2, "--pool", "mean"))
    for f in os.listdir(os.path.join(data, "train")):
        for name in os.listdir(os.path.join(data, "train", f)):
            os.remove(os.path.join(data, "train", f, name))
        os.rmdir(os.path.join(data, "train", f))
    os.rmdir(os.path.join(data, "train"))
    g = torch.Generator().manual_seed(1)
    var = torch.rand(96, generator=g) + 0.5
    var[:6] = 1e-6  # eps 1e-5 vs 1e-6 changes these features 3-fold
    head = {"0.running_mean": torch.randn(96, generator=g) * 0.3, "0.running_var": var,
            "1.weight": torch.randn(7, 96, generator=g) * 0.05, "1.bias": torch.randn(7, generator=g) * 0.1}
    return dict(tmp=tmp, data=data, own=own, foreign=foreign, probe=str(tmp / "p" / "probe.pt"), head=head)


def reference(released, head, pool):
    """float64: the val features computed here, (x - mean) / sqrt(var + 1e-5) W^T + b; top-1 and top-5 (%)."""
    x, y = folder_features(released["own"], os.path.join(released["data"], "val"), pool=pool)
    h = {k: v.double().numpy() for k, v in head.items() if k != "0.num_batches_tracked"}
    logits = (x - h["0.running_mean"]) / np.sqrt(h["0.running_var"] + 1e-5) @ h["1.weight"].T + h["1.bias"]
    top5 = np.argsort(-logits, axis=1)[:, :5]
    return x, logits, 100.0 * (logits.argmax(1) == y).mean(), 100.0 * (top5 == y[:, None]).any(1).mean()


def eval_argv(released, head_file, out, *extra):
    return ["--data_path", released["data"], "--init", released["foreign"], "--heads", 3, "--eval_head", head_file,
            "--out_dir", out, "--crop_pct", 1, "--num_workers", 0, "--batch_size", 8, "--device", "cpu", *extra]


def test_eval_head_layouts_match_float64_reference(released, capsys, monkeypatch):
    tmp, head = released["tmp"], released["head"]
    trained = load(tmp / "p")
    cases = [("probe.pt", released["probe"], trained["head"], "mean", []),
             ("layer.1/2 + norm", release_head(tmp / "new.th", head, "new", "mean_patch"), head, "mean", []),
             ("layer.2/3", release_head(tmp / "old.th", head, "old", "class_token"), head, "cls", []),
             ("--pool over the file's", str(tmp / "new.th"), head, "cls", ["--pool", "cls"])]
    refs = []
    for i, (name, path, sd, pool, extra) in enumerate(cases):
        x, ref_logits, ref1, ref5 = reference(released, sd, pool)
        refs.append((ref1, ref5))
        module, file_pool, _, _ = probe.read_head(path, 96, (extra or [None])[-1])
        assert file_pool == pool and not module.training, name
        with torch.no_grad():
            logits = module(torch.from_numpy(x).float()).double().numpy()
        np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-4 * np.abs(ref_logits).max(), err_msg=name)
        capsys.readouterr()
        run_probe(*eval_argv(released, path, tmp / "e", *extra))
        out = capsys.readouterr().out
        assert f"top-1 {ref1:.2f}%, top-5 {ref5:.2f}%" in out and f"({pool} pooling" in out, (name, out)
        entry = json.loads(open(tmp / "e" / "log.txt").read().splitlines()[i])
        assert (entry["eval_top1"], entry["eval_top5"], entry["pool"]) == (round(ref1, 4), round(ref5, 4), pool), name
        assert entry["eval_head"] == path and entry["init"] == released["foreign"] and entry["val"] == 21
    assert len(set(refs)) == 3 and any(0 < r1 < r5 < 100 for r1, r5 in refs)  # not trivial, and they differ
    assert sorted(os.listdir(tmp / "e")) == ["lock", "log.txt"]  # nothing else (in-process runs: the lock until exit)
    # without --out_dir: the line is printed, nothing is written (not even the default out/probe)
    monkeypatch.chdir(tmp / "e")
    run_probe(*[a for a in eval_argv(released, str(tmp / "new.th"), "unused") if a not in ("--out_dir", "unused")])
    assert f"top-1 {refs[1][0]:.2f}%" in capsys.readouterr().out and sorted(os.listdir(".")) == ["lock", "log.txt"]
    assert len(open("log.txt").readlines()) == len(cases)  # no line added
    # 2 processes (11 + 10 images): the same numbers
    run_torchrun(2, "probe.py", *map(str, eval_argv(released, str(tmp / "new.th"), tmp / "e2")))
    two = json.loads(open(tmp / "e2" / "log.txt").read())
    one = json.loads(open(tmp / "e" / "log.txt").read().splitlines()[1])
    assert ({k: two[k] for k in ("eval_top1", "eval_top5", "pool")}
            == {k: one[k] for k in ("eval_top1", "eval_top5", "pool")})


def test_eval_head_errors(released, setup, capsys):
    tmp, head = released["tmp"], released["head"]
    new = release_head(tmp / "err_new.th", head)
    # 7-class head on a 3-class val folder: as a user runs it
    _, data3, enc3 = setup
    p = subprocess.run([sys.executable, "probe.py", "--data_path", data3, "--init", enc3, "--eval_head", new,
                        "--out_dir", str(tmp / "x3"), "--num_workers", "1", "--crop_pct", "1", "--device", "cpu"],
                       cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == \
        f"error: --eval_head {new} is a head for 7 classes, {os.path.join(data3, 'val')} has 3 class folders"
    assert not os.path.exists(tmp / "x3" / "log.txt")

    def line(head_file, *extra):
        return error_line(capsys, *eval_argv(released, head_file, tmp / "x", *extra))
    narrow = {k: v[..., :64] if k != "1.bias" else v for k, v in head.items()}
    assert "is a head for 64-dim features, the encoder's are 96-dim" in line(release_head(tmp / "w64.th", narrow))
    assert "no probe head" in line(released["foreign"]) and "found keys cls_token" in line(released["foreign"])
    assert "expected a trained probe head, found a mae checkpoint" in line(released["own"])
    assert "names no pooling: give --pool" in line(release_head(tmp / "nopool.th", head, kind=None))
    assert "pooling kind 'foo'" in line(release_head(tmp / "foo.th", head, kind="foo"))
    ck = torch.load(new, weights_only=False)
    ck["state_dict"]["norm.running_var"] = ck["state_dict"]["norm.running_var"] + 1
    torch.save(ck, tmp / "alias.th")
    assert "norm.* is not the same BatchNorm as layer.1.*" in line(str(tmp / "alias.th"))
    ck["state_dict"] = dict(torch.load(new, weights_only=False)["state_dict"], **{"layer.0.proj": torch.zeros(1)})
    torch.save(ck, tmp / "extra.th")
    assert "found keys layer.0.proj" in line(str(tmp / "extra.th"))
    assert "--eval_head evaluates a trained head" in line(new, "--cached", 1)
    empty = tmp / "empty"
    empty.mkdir(exist_ok=True)
    assert "missing split folder" in error_line(capsys, *eval_argv(dict(released, data=str(empty)), new, tmp / "x"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_probe_cuda(setup):
    tmp, data, enc = setup
    cuda = ["--device", "cuda", "--dtype", "bfloat16"]
    run_probe(*base(data, enc, tmp / "c", "--cached", 1, "--blrs", 0.5, 0.05), *cuda)
    run_probe(*base(data, enc, tmp / "s", "--blrs", 0.5, 0.05), *cuda)
    for out in ("c", "s"):
        ck = load(tmp / out)
        assert ck["iter_num"] == 9 and ck["top1"] == 100.0 and ck["head"]["1.weight"].device.type == "cpu"
    run_probe(*base(data, enc, tmp / "lg", "--logreg", 1, "--per_class", 3), *cuda)
    run_probe(*base(data, enc, tmp / "lc", "--logreg", 1, "--per_class", 3))
    g, c = load(tmp / "lg", "logreg.pt"), load(tmp / "lc", "logreg.pt")
    assert g["train_files"] == c["train_files"] and g["top1"] == c["top1"]


def test_eval_head_checks_the_class_names_and_leaves_bad_images_out(released, capsys, tmp_path):
    """A probe.pt records its classes: a val folder with as many classes but other names is refused in one line naming
    the first difference (before: top-1 0.00%, no warning); a file without names (the authors') takes the sorted
    folders, and says so. With --skip_bad_images 1 an unreadable val image is left out of the count, not replaced."""
    data = tmp_path / "renamed"
    shutil.copytree(os.path.join(released["data"], "val"), data / "val")
    os.rename(data / "val" / "class_3", data / "val" / "class_3b")
    line = error_line(capsys, *eval_argv(dict(released, data=str(data)), released["probe"], tmp_path / "o"))
    assert line == f"error: --eval_head {released['probe']} was trained on other classes than the folders of " \
        f"{data / 'val'}: class 3 is class_3 there, class_3b here"
    new = release_head(tmp_path / "authors.th", released["head"])
    run_probe(*eval_argv(dict(released, data=str(data)), new, tmp_path / "a"))
    assert "names no classes: class i is the i-th val folder in sorted order" in capsys.readouterr().out
    (data / "val" / "class_0" / "zz.jpg").write_bytes(b"not a jpeg")
    run_probe(*eval_argv(dict(released, data=str(data)), new, tmp_path / "b", "--skip_bad_images", 1))
    entry = json.loads((tmp_path / "b" / "log.txt").read_text())
    assert entry["val"] == 21 and entry["stage"] == "eval_head"
    assert "1 unreadable images of" in capsys.readouterr().err
