"""Tests for contrastive_tune.py (stage 3): its head agrees with nnclr_head.py's, top-k sampling,
the EMA formula, a run (frozen part bit-identical, the rest trained, layer-wise lrs, EMAs, queue),
2 processes, resume after a real SIGTERM (bit-identical), and the error messages."""
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
import torch.nn.functional as F

from conftest import ROOT, make_image_folder, run_script, run_torchrun

sys.path.insert(0, ROOT)
import contrastive_tune as ct  # noqa: E402
import nnclr_head as nh  # noqa: E402
import vit  # noqa: E402

ITERS, BATCH, DEPTH, FROZEN = 40, 8, 6, 3  # vit_micro has 6 blocks; 3 frozen by default


def make_mae_ckpt(path, seed=0, **kw):
    torch.manual_seed(seed)
    args = vit.model_args_from_preset("vit_micro", 32, 4, **kw)
    torch.save(dict(stage="mae", model_args=args, encoder=vit.ViT(**args).state_dict()), path)
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny data, a stage-1 file and a head.pt written by nnclr_head.py."""
    d = tmp_path_factory.mktemp("ct")
    s = dict(data=make_image_folder(d / "data"), mae=make_mae_ckpt(d / "mae.pt"), dir=d)
    run_script("nnclr_head.py", "--data_path", s["data"], "--init", s["mae"], "--out_dir", str(d / "head"),
               "--batch_size", "8", "--max_iters", "6", "--queue_size", "64", "--num_workers", "0", "--device", "cpu",
               "--proj_hidden", "64", "--proj_dim", "16", "--pred_hidden", "64")
    s["head"] = str(d / "head" / "head.pt")
    return s


def ct_argv(s, out_dir, *extra, iters=ITERS):
    return ["contrastive_tune.py", "--data_path", s["data"], "--init", s["mae"], "--head", s["head"],
            "--out_dir", str(out_dir), "--batch_size", str(BATCH), "--max_iters", str(iters), "--topk", "5",
            "--blr", "1e-3", "--head_blr", "2e-3", "--num_workers", "0", "--log_interval", "1", "--device", "cpu",
            *extra]


@pytest.fixture(scope="module")
def ct_ref(setup):
    """One uninterrupted single-process run: the subject of several tests and the resume reference."""
    out = setup["dir"] / "ct_ref"
    run_script(*ct_argv(setup, out))
    return out


def assert_same(a, b, path="ckpt"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path} differs (max abs diff {(a.double() - b.double()).abs().max().item()})"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(set(a) ^ set(b))}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)  # a GPU run's tensors come back to the CPU


def log_entries(path):
    return [{k: v for k, v in json.loads(line).items() if k != "img_per_s"} for line in open(path)]


def sampler_order(n, batch, iters, seed=0):
    s, out, steps = ct.ShardSampler(n, batch, 0, 1, seed), [], n // batch
    for e in range((iters + steps - 1) // steps):
        s.set_epoch(e)
        out += [i for _, i in s]
    return out[: iters * batch]


def is_frozen(name):
    return name.startswith(("patch_embed", "cls_token", "pos_embed")) or (
        name.startswith("blocks.") and int(name.split(".")[1]) < FROZEN)


# -----------------------------------------------------------------------------
# units


def test_head_copies_agree(setup):
    """head.pt of nnclr_head.py loads strictly into contrastive_tune.py's class; both copies of the
    head, the queue and the loss give the same outputs."""
    ck = load(setup["head"])
    a, b = nh.NNCLRHead(**ck["head_args"]), ct.NNCLRHead(**ck["head_args"])
    a.load_state_dict(ck["head"], strict=True)
    b.load_state_dict(ck["head"], strict=True)
    assert list(a.state_dict()) == list(b.state_dict()) == list(ck["head"])
    x = torch.randn(2, 8, ck["head_args"]["in_dim"])
    for mode in (True, False):
        za, pa = a.train(mode)(x)
        zb, pb = b.train(mode)(x)
        assert torch.equal(za, zb) and torch.equal(pa, pb) and za.shape == (2, 8, 16)
    qa, qb = nh.Queue.from_state(ck["queue"]), ct.Queue.from_state(ck["queue"])
    z, idx = F.normalize(torch.randn(8, 16), dim=1), torch.arange(8)
    for k in (1, 5):
        ra = qa.lookup(z, idx, k, torch.Generator().manual_seed(1))
        rb = qb.lookup(z, idx, k, torch.Generator().manual_seed(1))
        assert torch.equal(ra[0], rb[0]) and torch.equal(ra[1], rb[1])
    p = F.normalize(torch.randn(4, 8, 16), dim=-1)
    assert torch.equal(nh.nnclr_loss(*p, 0.2), ct.nnclr_loss(*p, 0.2))


def test_topk_sampling_stays_within_topk():
    rng = np.random.default_rng(0)
    Q, P, k, n = 30, 6, 5, 2500
    vecs = rng.normal(size=(Q, P))
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    indices = np.arange(Q) + 100
    query = vecs[4] + 0.01 * rng.normal(size=P)  # closest to entry 4, which is the sample's own
    query /= np.linalg.norm(query)
    sims = vecs @ query
    sims[4] = -1.0  # self-exclusion
    ref_top = set(np.argsort(-sims)[:k].tolist())
    q = ct.Queue(Q, P)
    q.vectors, q.indices, q.labels = torch.tensor(vecs, dtype=torch.float32), torch.tensor(indices), torch.arange(Q)
    _, picked = q.lookup(torch.tensor(query, dtype=torch.float32).expand(n, P), torch.full((n,), 104), k,
                         torch.Generator().manual_seed(0))
    counts = np.bincount(picked.numpy(), minlength=Q)
    assert set(np.flatnonzero(counts).tolist()) == ref_top and counts[4] == 0
    assert all(abs(counts[j] - n / k) < 0.2 * n / k for j in ref_top), counts  # uniform over the top k
    # a function of the generator alone: same seed, same draws
    again = q.lookup(torch.tensor(query, dtype=torch.float32).expand(n, P), torch.full((n,), 104), k,
                     torch.Generator().manual_seed(0))[1]
    assert torch.equal(picked, again)


def test_ema_update_formula():
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).double()  # noqa: E731
    target, online = make(), make()
    with torch.no_grad():
        for m in (target, online):
            for t in list(m.parameters()) + [m[1].running_mean, m[1].running_var]:
                t.copy_(torch.randn_like(t))
        online[1].num_batches_tracked.fill_(17)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    ct.ema_update(target, online, 0.9)
    on = online.state_dict()
    for name, _ in target.named_parameters():
        ref = 0.9 * before[name] + 0.1 * on[name]
        torch.testing.assert_close(target.state_dict()[name], ref, rtol=0, atol=1e-14)
    for name, _ in target.named_buffers():  # BatchNorm statistics copied, not averaged
        assert torch.equal(target.state_dict()[name], on[name])
    # a frozen parameter (no grad in the online model) is left alone; it is equal in both in training
    a, b = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
    a_before, bias_before = a.weight.detach().clone(), a.bias.detach().clone()
    b.weight.requires_grad_(False)
    ct.ema_update(a, b, 0.9)
    assert torch.equal(a.weight, a_before)
    torch.testing.assert_close(a.bias, 0.9 * bias_before + 0.1 * b.bias)  # the trained bias moved


# -----------------------------------------------------------------------------
# a run


def test_run_freezes_lower_half_and_tunes_upper(setup, ct_ref):
    ck, mae, head = load(ct_ref / "ct.pt"), load(setup["mae"]), load(setup["head"])
    assert ck["stage"] == "ct" and ck["iter_num"] == ITERS and ck["freeze_blocks"] == FROZEN and ck["pool"] == "mean"
    assert ck["model_args"] == mae["model_args"] and ck["head_args"] == head["head_args"]
    assert ck["encoder_init"] == os.path.abspath(setup["mae"]) and ck["head_init"] == os.path.abspath(setup["head"])
    enc, ema, init = ck["encoder"], ck["encoder_ema"], mae["encoder"]
    ema_moved_any = False
    for name in init:
        if is_frozen(name):
            assert torch.equal(enc[name], init[name]) and torch.equal(ema[name], init[name]), name
        else:  # trained: every tensor moved; the EMA (0.9999) only a little of the way (float32
            # rounding can hold back tiny EMA steps of weights near 1, so only the sum must move)
            moved, ema_moved = (enc[name] - init[name]).norm(), (ema[name] - init[name]).norm()
            assert moved > 0, name
            assert ema_moved < 0.05 * moved, name
            ema_moved_any |= bool(ema_moved > 0)
    assert ema_moved_any
    # vit.load_encoder: the EMA encoder by default, the online one on request
    assert_same(vit.load_encoder(str(ct_ref / "ct.pt")).state_dict(), ema)
    assert_same(vit.load_encoder(str(ct_ref / "ct.pt"), which="online").state_dict(), enc)
    # head trained; target projector: an EMA of the projector (between the start and the online one),
    # BatchNorm buffers copied from the online projector
    h0, h1, tgt = head["head"], ck["head"], ck["target_projector"]
    for name, v in tgt.items():
        online, start = h1["projector." + name], h0["projector." + name]
        if "running" in name or "num_batches" in name:
            assert torch.equal(v, online), name
        elif v.is_floating_point():
            assert not torch.equal(v, online) and not torch.equal(v, start), name
    assert not torch.equal(h0["predictor.0.weight"], h1["predictor.0.weight"])
    # queue: started from head.pt's (ptr), the target's view-0 entries in sampler order
    q, q0 = ck["queue"], head["queue"]
    assert q["ptr"] == (q0["ptr"] + ITERS * BATCH) % 64
    order = sampler_order(24, BATCH, ITERS)
    pos = [(q["ptr"] - 64 + i) % 64 for i in range(64)]
    assert q["indices"][pos].tolist() == order[-64:]
    log = [json.loads(line) for line in open(ct_ref / "log.txt")]
    steps = [e for e in log if "loss" in e]
    assert len(steps) == ITERS and all(math.isfinite(e["loss"]) and 0 <= e["nn_acc"] <= 1 for e in steps)
    assert len([e for e in log if "nn_acc_epoch" in e]) == ITERS // 3


def test_layerwise_learning_rates(setup, ct_ref):
    """The optimizer's groups: exactly the trained parameters; block b of the depth-6 encoder at
    0.65^(6 - b) x the encoder lr, the final norm at 1 x, the head at its own lr; weight decay
    0.05 (encoder) / 1e-5 (head) on matrices, 0 on 1-D tensors."""
    ck = load(ct_ref / "ct.pt")
    it, warm = ITERS - 1, round(0.2 * ITERS)  # the lr of the last step, from the cosine after warmup
    sched = 0.5 * (1 + math.cos(math.pi * (it - warm) / (ITERS - warm)))
    enc_lr, head_lr = 1e-3 * BATCH * 2 / 256 * sched, 2e-3 * BATCH * 2 / 256 * sched
    names = []
    shapes = {**{"encoder." + k: v.shape for k, v in ck["encoder"].items()},
              **{"head." + k: v.shape for k, v in ck["head"].items()}}
    seen_blocks = set()
    for g in ck["optimizer"]["param_groups"]:
        names += g["names"]
        for n in g["names"]:
            one_d = len(shapes[n]) <= 1
            if n.startswith("head."):
                want_lr, want_wd = head_lr, 0.0 if one_d else 1e-5
            elif n.startswith("encoder.blocks."):
                b = int(n.split(".")[2])
                seen_blocks.add(b)
                want_lr, want_wd = enc_lr * 0.65 ** (DEPTH - b), 0.0 if one_d else 0.05
            else:
                assert n.startswith("encoder.norm."), n
                want_lr, want_wd = enc_lr, 0.0
            assert (abs(g["lr"] - want_lr) < 1e-12 * max(1.0, want_lr)
                    and g["weight_decay"] == want_wd), (n, g["lr"], want_lr)
    trained = ({"encoder." + k for k in ck["encoder"] if not is_frozen(k)}
               | {"head." + k for k in ck["head"] if "running" not in k and "num_batches" not in k})
    assert sorted(names) == sorted(trained) and seen_blocks == {3, 4, 5}
    assert abs(0.65 ** (DEPTH - 5) - 0.65) < 1e-15  # the top block gets 0.65


def test_two_processes(setup, tmp_path):
    run_torchrun(2, *ct_argv(setup, tmp_path / "c2", iters=6))
    ck, mae = load(tmp_path / "c2" / "ct.pt"), load(setup["mae"])
    for name, v in mae["encoder"].items():
        assert torch.equal(ck["encoder"][name], v) == is_frozen(name), name
    q = ck["queue"]
    pos = [(q["ptr"] - 48 + i) % 64 for i in range(48)]
    assert q["indices"][pos].tolist() == sampler_order(24, BATCH, 6)  # global batches, gathered in rank order


def test_resume_after_sigterm_is_bit_identical(setup, ct_ref, tmp_path):
    out = tmp_path / "int"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(tmp_path / "int.out", "w") as f:
        p = subprocess.Popen([sys.executable, *ct_argv(setup, out)], cwd=ROOT, env=env, stdout=f,
                             stderr=subprocess.STDOUT)
        t0 = time.time()
        while (p.poll() is None and time.time() - t0 < 180
               and not (os.path.exists(out / "log.txt") and os.path.getsize(out / "log.txt"))):
            time.sleep(0.005)
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=180)
    text = open(tmp_path / "int.out").read()
    assert p.returncode == 0 and "stopped by signal at iteration" in text and "--resume auto" in text, text[-2000:]
    assert not os.path.exists(out / "ct.pt")
    stopped = load(sorted(out.glob("ckpt_*.pt"))[-1])
    assert 0 < stopped["iter_num"] < ITERS
    r = run_script(*ct_argv(setup, out, "--resume", "auto"))
    assert f"at iteration {stopped['iter_num']}" in r.stdout
    a, b = load(ct_ref / "ct.pt"), load(out / "ct.pt")
    for k in ("encoder", "encoder_ema", "head", "target_projector", "queue", "optimizer", "scaler", "iter_num",
              "monitor"):
        assert_same(a[k], b[k], k)
    assert log_entries(ct_ref / "log.txt") == log_entries(out / "log.txt")


# -----------------------------------------------------------------------------
# errors: one clear line, exit 2


@pytest.fixture
def keep_signals():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def fails_with(capsys, argv):
    with pytest.raises(SystemExit) as e:
        ct.main(ct.parser.parse_args(argv))
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1
    return err[0]


def test_errors(setup, tmp_path, capsys, keep_signals):
    base = ["--data_path", setup["data"], "--out_dir", str(tmp_path / "o"), "--num_workers", "0", "--device", "cpu",
            "--batch_size", "8", "--max_iters", "2", "--topk", "5"]
    good = ["--init", setup["mae"], "--head", setup["head"]]
    msg = fails_with(capsys, base + ["--init", setup["mae"], "--head", setup["mae"]])
    assert f"--head {setup['mae']} is a mae checkpoint" in msg and "nnclr_head.py" in msg
    msg = fails_with(capsys, base + ["--init", setup["head"], "--head", setup["head"]])
    assert "nnclr_head checkpoint" in msg and "encoder" in msg
    assert "both required" in fails_with(capsys, base + ["--init", setup["mae"]])
    assert ("--freeze_blocks 7: the encoder has only 6 blocks"
            in fails_with(capsys, base + good + ["--freeze_blocks", "7"]))
    assert ("not divisible by processes (1) x --grad_accum (3)"
            in fails_with(capsys, base + good + ["--grad_accum", "3"]))
    assert "--topk 65 is larger than the queue (64" in fails_with(capsys, base + good + ["--topk", "65"])
    assert "expected a ct checkpoint, found mae" in fails_with(capsys, base + good + ["--resume", setup["mae"]])
    other = make_mae_ckpt(tmp_path / "deeper.pt", depth=4)
    assert "trained on a" in fails_with(capsys, base + ["--init", other, "--head", setup["head"]])
    msg = fails_with(capsys, base + good + ["--temperature", "1e-45"])  # > 0, but logits / 1e-45 overflow
    assert "non-finite loss" in msg and "iteration 0" in msg


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_run(setup, tmp_path):
    """bf16 autocast, fused AdamW, the top-k draw from a CUDA generator; frozen part still bit-identical."""
    run_script(*ct_argv(setup, tmp_path / "g", "--device", "cuda", "--dtype", "bfloat16", iters=6))
    ck, mae = load(tmp_path / "g" / "ct.pt"), load(setup["mae"])
    for name, v in mae["encoder"].items():
        assert torch.equal(ck["encoder"][name], v) == is_frozen(name), name
    assert all(math.isfinite(e["loss"]) for e in map(json.loads, open(tmp_path / "g" / "log.txt")) if "loss" in e)
