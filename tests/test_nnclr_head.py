"""Tests for nnclr_head.py (stage 2): the loss and the queue against float64 / plain-Python
references, the all-gather on 2 gloo processes, the augmentations, runs of the script (1 and 2
processes), resume after a real SIGTERM (bit-identical), and the error messages."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, as_views, make_image_folder, run_script, run_torchrun

sys.path.insert(0, ROOT)
import nnclr_head as nh  # noqa: E402
import vit  # noqa: E402

TINY_HEAD = ["--proj_hidden", "64", "--proj_dim", "16", "--pred_hidden", "64"]


def make_mae_ckpt(path, seed=0):
    """A stage-1 checkpoint as mae_pretrain.py writes it (encoder part), vit_micro at 32 px / patch 4."""
    torch.manual_seed(seed)
    args = vit.model_args_from_preset("vit_micro", 32, 4)
    torch.save(dict(stage="mae", model_args=args, encoder=vit.ViT(**args).state_dict()), path)
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("nnclr")
    return dict(data=make_image_folder(d / "data"), mae=make_mae_ckpt(d / "mae.pt"), dir=d)


def head_argv(s, out_dir, *extra, iters=6):
    return ["nnclr_head.py", "--data_path", s["data"], "--init", s["mae"], "--out_dir", str(out_dir),
            "--batch_size", "8", "--max_iters", str(iters), "--queue_size", "64", "--num_workers", "0",
            "--log_interval", "1", "--device", "cpu", *TINY_HEAD, *extra]


def sampler_order(n, batch, iters, seed=0):
    """Dataset indices of the global batches of the first `iters` steps, from the sampler itself."""
    s, out, steps = nh.ShardSampler(n, batch, 0, 1, seed), [], n // batch
    for e in range((iters + steps - 1) // steps):
        s.set_epoch(e)
        out += [i for _, i in s]
    return out[: iters * batch]


def assert_same(a, b, path="ckpt"):
    """Exact equality of nested checkpoint contents (tensors bit for bit)."""
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


def run_until_sigterm(argv, out_dir, timeout=180, group=False):
    """Start a script, send SIGTERM once its log.txt shows progress, return (returncode, stdout+stderr).
    group: to every process of its group (DataLoader workers too), as timeout and SLURM do."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log_path, out_path = os.path.join(out_dir, "log.txt"), os.path.join(str(out_dir) + ".out")
    with open(out_path, "w") as out:
        p = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=group)
        t0 = time.time()
        while p.poll() is None and time.time() - t0 < timeout:
            if os.path.exists(log_path) and os.path.getsize(log_path) > 0:
                break
            time.sleep(0.005)
        if group:
            os.killpg(p.pid, signal.SIGTERM)
        else:
            p.send_signal(signal.SIGTERM)
        p.wait(timeout=timeout)
    return p.returncode, open(out_path).read()


def log_entries(path):
    """log.txt without the timings: what an exact resume must reproduce line by line."""
    return [{k: v for k, v in json.loads(line).items() if k != "img_per_s"} for line in open(path)]


@pytest.fixture
def keep_signals():
    """main() run in-process installs SIGTERM/SIGUSR1 handlers; put pytest's back afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


# -----------------------------------------------------------------------------
# loss and queue against references


def reference_neighbour(z, idx, vectors, indices):
    """Brute force in float64: the queue entry of highest cosine similarity, the sample's own entries at -1."""
    best = []
    for zi, ii in zip(z, idx):
        sims = [(-1.0 if indices[q] == ii else float(np.dot(zi, vectors[q]))) for q in range(len(vectors))]
        best.append(int(np.argmax(sims)))
    return vectors[best]


def reference_loss(nn0, nn1, p0, p1, tau):
    """-1/B sum_i log softmax_j(nn_i . p_j / tau)[i], averaged over the two directions, float64."""
    def ce(a, b):
        s = a @ b.T / tau
        return float(np.mean([np.log(np.exp(s[i] - s[i].max()).sum()) + s[i].max() - s[i, i] for i in range(len(s))]))
    return 0.5 * (ce(nn0, p1) + ce(nn1, p0))


def test_loss_matches_float64_reference():
    rng = np.random.default_rng(0)
    Q, B, P, tau = 20, 6, 8, 0.15
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    vectors = unit(rng.normal(size=(Q, P)))
    indices = rng.integers(0, 10, Q)
    z0, z1, p0, p1 = (unit(rng.normal(size=(B, P))) for _ in range(4))
    idx = np.arange(B) + 3
    indices[2], z0[0] = idx[0], vectors[2]  # sample 0's own entry is its closest: it must be excluded

    q = nh.Queue(Q, P)
    q.vectors, q.indices = torch.tensor(vectors, dtype=torch.float32), torch.tensor(indices)
    t = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    nn0, _ = q.lookup(t(z0), torch.tensor(idx))
    nn1, _ = q.lookup(t(z1), torch.tensor(idx))
    ref0, ref1 = reference_neighbour(z0, idx, vectors, indices), reference_neighbour(z1, idx, vectors, indices)
    np.testing.assert_allclose(nn0.numpy(), ref0, atol=1e-6)
    np.testing.assert_allclose(nn1.numpy(), ref1, atol=1e-6)
    loss = nh.nnclr_loss(nn0, nn1, t(p0), t(p1), tau).item()
    assert abs(loss - reference_loss(ref0, ref1, p0, p1, tau)) < 1e-5
    # the two directions are not interchangeable: swapping the predictions changes the loss
    assert abs(nh.nnclr_loss(nn0, nn1, t(p1), t(p0), tau).item() - loss) > 1e-3


def test_queue_fifo_wraparound_and_self_exclusion():
    Q, P = 5, 3
    q = nh.Queue(Q, P, seed=1)
    init = q.vectors.clone()
    ref_v, ref_i, ref_l, ref_ptr = [init[k] for k in range(Q)], [-1] * Q, [-1] * Q, 0

    def push(n, start):
        nonlocal ref_ptr
        z = F.normalize(torch.randn(n, P), dim=1)
        idx, lab = torch.arange(start, start + n), torch.arange(start, start + n) % 3
        q.push(z, idx, lab)
        for k in range(n):  # one entry at a time, first in first out
            ref_v[ref_ptr], ref_i[ref_ptr], ref_l[ref_ptr] = z[k], int(idx[k]), int(lab[k])
            ref_ptr = (ref_ptr + 1) % Q
        assert torch.equal(q.vectors, torch.stack(ref_v)) and q.indices.tolist() == ref_i
        assert q.labels.tolist() == ref_l and q.ptr == ref_ptr

    push(3, 0)
    assert q.indices.tolist() == [0, 1, 2, -1, -1] and torch.equal(q.vectors[3:], init[3:])
    push(4, 3)  # wraps: slots 3, 4, 0, 1
    assert q.indices.tolist() == [5, 6, 2, 3, 4] and q.ptr == 2
    push(12, 7)  # more than the queue holds: the last 5 survive
    assert sorted(q.indices.tolist()) == [14, 15, 16, 17, 18]

    # self-exclusion: a query equal to its own entry gets the best *other* entry
    q2 = nh.Queue(4, 2)
    q2.vectors = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]]), dim=1)
    q2.indices, q2.labels = torch.tensor([7, 8, 9, 10]), torch.tensor([0, 1, 2, 3])
    nn, lab = q2.lookup(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([7, 99]))
    assert lab.tolist() == [1, 0]
    nn, lab = q2.lookup(torch.tensor([[1.0, 0.0]]), torch.tensor([8]))
    assert lab.tolist() == [0] and torch.equal(nn, q2.vectors[:1])


@pytest.mark.parametrize("script", ["nnclr_head", "contrastive_tune"])
def test_head_init_is_torchs_default_and_nn_acc_is_view_0(script):
    """Both copies of the head start at torch's default init, as the authors' (the same draws as plain
    Linear / BatchNorm1d layers built in the same order); the accuracy monitor is view 0's."""
    mod = __import__(script)
    torch.manual_seed(3)
    head = mod.NNCLRHead(40, proj_hidden=64, proj_dim=16, pred_hidden=32)
    torch.manual_seed(3)
    ref = [torch.nn.Linear(i, o, bias=False) for i, o in ((40, 64), (64, 64), (64, 16), (16, 32), (32, 16))]
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 5 and all(torch.equal(a.weight, b.weight) for a, b in zip(linears, ref))
    assert all((m.weight == 1).all() and (m.bias == 0).all()
               for m in head.modules() if isinstance(m, torch.nn.BatchNorm1d))
    # queue: the 4 unit vectors, labels 0-3; view 0's neighbours are right for 3 of 4 samples, view 1's for 1
    q = mod.Queue(4, 4)
    q.vectors, q.indices, q.labels = torch.eye(4), torch.arange(100, 104), torch.arange(4)
    e = torch.eye(4)
    z = torch.stack([e[[0, 1, 2, 0]], e[[0, 0, 0, 0]]])  # (2, 4, 4)
    _, _, acc = mod.nnclr_step(z, z.clone(), torch.arange(4), torch.arange(4), q, 0.2)
    assert acc.item() == 0.75


def _step_problem(g):
    """A tiny float64 problem: a linear "head" on 2 views of 6 samples, a partly filled queue that
    holds entries of some of the batch's own samples."""
    B, IN, P = 6, 5, 4
    x = torch.randn(2, B, IN, generator=g, dtype=torch.float64)
    z = F.normalize(torch.randn(2, B, P, generator=g, dtype=torch.float64), dim=-1)
    lin = torch.nn.Linear(IN, P, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(P, IN, generator=g, dtype=torch.float64))
    q = nh.Queue(16, P, seed=3)
    q.vectors = q.vectors.double()
    q.push(F.normalize(torch.randn(8, P, generator=g, dtype=torch.float64), dim=1), torch.arange(8) * 2,
           torch.arange(8) % 3)
    return x, z, lin, q, torch.arange(B), torch.arange(B) % 3


def _step_worker(rank, world, port, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, z, lin, q, idx, labels = _step_problem(torch.Generator().manual_seed(0))
        model = torch.nn.parallel.DistributedDataParallel(lin)
        b = x.shape[1] // world
        sl = slice(rank * b, (rank + 1) * b)
        # the autograd-aware gather: the global batch in rank order, gradient to the local slot
        p_local = F.normalize(model(x[:, sl]), dim=-1)
        p_all = nh.all_gather(p_local, dim=1, grad=True)
        torch.testing.assert_close(p_all.detach(), F.normalize(lin(x), dim=-1).detach(), rtol=0, atol=1e-12)
        assert p_all.requires_grad
        gen = torch.Generator().manual_seed(7)
        loss, value, acc = nh.nnclr_step(z[:, sl], p_local, idx[sl], labels[sl], q, 0.2, topk=3, generator=gen)
        loss.backward()  # DDP averages the weight gradient over the 2 ranks
        torch.save(dict(grad=lin.weight.grad, value=value, acc=acc, queue=q.state_dict()),
                   os.path.join(result_dir, f"rank{rank}.pt"))
        torch.distributed.barrier()  # neither rank tears down gloo while the other still talks
    finally:
        torch.distributed.destroy_process_group()


def test_global_batch_step_on_two_processes(tmp_path):
    """2 gloo processes with DDP: each computes the loss of the global batch (gathered in rank order),
    and the averaged gradient, the loss, the accuracy and both ranks' queues (gathered view-0 entries)
    equal those of one process on the whole batch."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_step_worker, args=(2, port, str(tmp_path)), nprocs=2)
    r = [torch.load(tmp_path / f"rank{k}.pt") for k in range(2)]
    x, z, lin, q, idx, labels = _step_problem(torch.Generator().manual_seed(0))
    loss, value, acc = nh.nnclr_step(z, F.normalize(lin(x), dim=-1), idx, labels, q, 0.2, topk=3,
                                     generator=torch.Generator().manual_seed(7))
    loss.backward()
    for k in range(2):
        torch.testing.assert_close(r[k]["grad"], lin.weight.grad, rtol=0, atol=1e-12)
        assert abs(r[k]["value"] - value) < 1e-12 and r[k]["acc"] == acc
        assert_same(r[k]["queue"], q.state_dict())
    assert r[0]["queue"]["indices"].tolist() == [0, 2, 4, 6, 8, 10, 12, 14, 0, 1, 2, 3, 4, 5, -1, -1]
    assert r[0]["queue"]["ptr"] == 14
    assert torch.equal(r[0]["queue"]["vectors"][8:14], z[0])  # view 0, not view 1


# -----------------------------------------------------------------------------
# augmentations


def test_aug_views_deterministic_and_asymmetric(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=3, per_class=4, val_per_class=1)
    plain = nh.views_dataset(os.path.join(root, "train"), 32, seed=0)
    aug = nh.views_dataset(os.path.join(root, "train"), 32, seed=0, aug=True)
    crops, label, i = aug[(0, 5)]
    x = as_views(crops)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.uint8 and (label, i) == (1, 5)
    assert torch.equal(x, as_views(aug[(0, 5)][0]))  # a pure function of (seed, epoch, index)
    assert not torch.equal(x, as_views(aug[(1, 5)][0]))
    # same crops as without --aug (the crop and flip draws come first), then colour operations
    assert not torch.equal(x, as_views(plain[(0, 5)][0]))
    # --aug resizes in the worker even where the GPU would (colour operations need the final pixels)
    assert nh.views_dataset(os.path.join(root, "train"), 32, aug=True, resize=False)[(0, 5)][0][0].shape == (32, 32, 3)
    gray = np.zeros(2)
    n = 300
    for e in range(n):
        v = as_views(aug[(e, e % len(aug))][0]).int()
        gray += [(bool((v[k, 0] == v[k, 1]).all() and (v[k, 1] == v[k, 2]).all())) for k in range(2)]
    assert np.all(np.abs(gray / n - 0.2) < 0.07), gray / n  # grayscale p 0.2 in both views


# -----------------------------------------------------------------------------
# runs of the script


def test_run_queue_holds_view0_in_sampler_order(setup, tmp_path):
    """--blr 0 keeps the head fixed, so the pushed projections can be recomputed: the queue holds,
    FIFO, one entry per sample per step (view 0, not view 1), in the sampler's global order."""
    iters = 4
    run_script(*head_argv(setup, tmp_path / "h", "--blr", "0", iters=iters))
    ck = torch.load(tmp_path / "h" / "head.pt", weights_only=False)
    assert ck["stage"] == "nnclr_head" and ck["encoder_init"] == os.path.abspath(setup["mae"])
    assert ck["pool"] == "mean" and ck["model_args"]["dim"] == 96 and ck["iter_num"] == iters
    assert ck["head_args"] == dict(in_dim=96, proj_hidden=64, proj_dim=16, pred_hidden=64)
    q = ck["queue"]
    order = sampler_order(24, 8, iters)
    assert q["ptr"] == (iters * 8) % 64 and q["indices"][: iters * 8].tolist() == order
    assert (q["indices"][iters * 8:] == -1).all()
    ds = nh.views_dataset(os.path.join(setup["data"], "train"), 32, seed=0)
    assert q["labels"][: iters * 8].tolist() == [ds.samples[i][1] for i in order]
    # recompute the last step's projections with the (unchanged) head, batch statistics per view
    enc = vit.load_encoder(setup["mae"])
    head = nh.NNCLRHead(**ck["head_args"])
    head.load_state_dict(ck["head"])
    last = order[-8:]
    x = torch.stack([as_views(ds[((iters - 1) // 3, i)][0]) for i in last])  # (8, 2, 3, S, S)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    with torch.no_grad():
        f = vit.pool(enc((x.transpose(0, 1).flatten(0, 1).float() - mean) / std), "mean").view(2, 8, -1)
        z = F.normalize(head.train()(f)[0], dim=-1)
    stored = q["vectors"][(iters - 1) * 8: iters * 8]
    torch.testing.assert_close(stored, z[0], atol=1e-5, rtol=0)
    assert (stored - z[1]).abs().max() > 1e-2
    log = [json.loads(line) for line in open(tmp_path / "h" / "log.txt")]
    assert [e["iter"] for e in log if "loss" in e] == list(range(1, iters + 1))
    assert all(0 <= e["nn_acc"] <= 1 and e["img_per_s"] > 0 for e in log if "loss" in e)
    assert [e["epoch"] for e in log if "nn_acc_epoch" in e] == [1]
    assert log[0]["nn_acc"] == 0.0  # the first step only sees the random initial queue (label -1)


def test_warmup_is_the_floor_of_20_percent(setup, tmp_path):
    """The authors' schedule in stages 2 and 3: W = floor(0.2 T) warmup steps (13 steps: W = 2, where
    round would give 3), step s < W at lr (s + 1) / (W + 1), then the cosine to 0 from s = W."""
    iters, lr = 13, 1e-4 * 8 * 2 / 256
    run_script(*head_argv(setup, tmp_path / "h", iters=iters))
    logged = [e["lr"] for e in map(json.loads, open(tmp_path / "h" / "log.txt")) if "loss" in e]
    W = 2
    want = [lr * (s + 1) / (W + 1) if s < W else lr * 0.5 * (1 + np.cos(np.pi * (s - W) / (iters - W)))
            for s in range(iters)]
    np.testing.assert_allclose(logged, want, rtol=1e-12, atol=0)


def test_two_processes_same_global_batches(setup, tmp_path):
    run_torchrun(2, *head_argv(setup, tmp_path / "h2", iters=4))
    ck = torch.load(tmp_path / "h2" / "head.pt", weights_only=False)
    assert ck["queue"]["indices"][:32].tolist() == sampler_order(24, 8, 4)
    assert ck["args"]["batch_size"] == 8 and ck["iter_num"] == 4
    log = [json.loads(line) for line in open(tmp_path / "h2" / "log.txt")]
    assert all(np.isfinite(e["loss"]) for e in log if "loss" in e)


def test_resume_after_sigterm_is_bit_identical(setup, tmp_path):
    iters = 40
    run_script(*head_argv(setup, tmp_path / "ref", iters=iters))
    rc, out = run_until_sigterm(head_argv(setup, tmp_path / "int", iters=iters), tmp_path / "int")
    assert rc == 0 and "stopped by signal at iteration" in out and "--resume auto" in out, out[-2000:]
    ckpts = sorted(os.listdir(tmp_path / "int"))
    assert not os.path.exists(tmp_path / "int" / "head.pt") and any(c.startswith("ckpt_") for c in ckpts), ckpts
    stopped = torch.load(tmp_path / "int" / [c for c in ckpts if c.startswith("ckpt_")][-1], weights_only=False)
    assert 0 < stopped["iter_num"] < iters
    p = run_script(*head_argv(setup, tmp_path / "int", "--resume", "auto", iters=iters))
    assert f"at iteration {stopped['iter_num']}" in p.stdout
    a = torch.load(tmp_path / "ref" / "head.pt", weights_only=False)
    b = torch.load(tmp_path / "int" / "head.pt", weights_only=False)
    for k in ("head", "queue", "optimizer", "scaler", "iter_num", "monitor", "model_args", "head_args"):
        assert_same(a[k], b[k], k)
    assert log_entries(tmp_path / "ref" / "log.txt") == log_entries(tmp_path / "int" / "log.txt")


def test_sigterm_to_the_process_group_with_workers(setup, tmp_path):
    """timeout and SLURM signal every process of the job: with DataLoader workers the run must
    still stop at a step boundary, checkpoint and exit 0."""
    rc, out = run_until_sigterm(head_argv(setup, tmp_path / "w", "--num_workers", "2", iters=400), tmp_path / "w",
                                group=True)
    assert rc == 0 and "stopped by signal at iteration" in out, out[-3000:]
    assert any(f.startswith("ckpt_") for f in os.listdir(tmp_path / "w"))


# -----------------------------------------------------------------------------
# errors: one clear line, exit 2


def run_main_expect_fail(capsys, argv):
    with pytest.raises(SystemExit) as e:
        nh.main(nh.parser.parse_args(argv))
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1
    return err[0]


def test_errors(setup, tmp_path, capsys, keep_signals):
    base = ["--data_path", setup["data"], "--out_dir", str(tmp_path / "o"), "--num_workers", "0", "--device", "cpu",
            "--batch_size", "8"]
    # a head checkpoint (or a probe's) is not an encoder
    torch.save(dict(stage="nnclr_head", head={}, encoder_init="/x/mae.pt"), tmp_path / "head.pt")
    msg = run_main_expect_fail(capsys, base + ["--init", str(tmp_path / "head.pt")])
    assert "nnclr_head checkpoint" in msg and "encoder" in msg
    torch.save(dict(stage="linear_probe", encoder={}), tmp_path / "probe.pt")
    assert "linear_probe checkpoint" in run_main_expect_fail(capsys, base + ["--init", str(tmp_path / "probe.pt")])
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    assert "cannot read checkpoint" in run_main_expect_fail(capsys, base + ["--init", str(tmp_path / "junk.pt")])
    assert "--init" in run_main_expect_fail(capsys, base)
    # a checkpoint whose keys do not fit: named
    sd = torch.load(setup["mae"], weights_only=False)
    del sd["encoder"]["blocks.2.attn.qkv.weight"]
    torch.save(sd, tmp_path / "broken.pt")
    assert "blocks.2.attn.qkv.weight" in run_main_expect_fail(capsys, base + ["--init", str(tmp_path / "broken.pt")])
    # resuming from another stage's file
    assert "expected a nnclr_head checkpoint, found mae" in run_main_expect_fail(
        capsys, base + ["--init", setup["mae"], "--resume", setup["mae"]])
    assert "larger than the training set" in run_main_expect_fail(
        capsys, base[:-1] + ["64", "--init", setup["mae"]])


def test_batch_not_divisible_by_processes(setup, tmp_path):
    p = run_torchrun(2, *head_argv(setup, tmp_path / "o", "--batch_size", "9"), check=False)
    assert p.returncode != 0
    assert "error: --batch_size 9 is not divisible by processes (2)" in p.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_run(setup, tmp_path):
    run_script(*head_argv(setup, tmp_path / "g", "--device", "cuda", "--dtype", "bfloat16", iters=4))
    ck = torch.load(tmp_path / "g" / "head.pt", weights_only=False)
    assert ck["queue"]["indices"][:32].tolist() == sampler_order(24, 8, 4)
    assert all(np.isfinite(e["loss"]) for e in map(json.loads, open(tmp_path / "g" / "log.txt")) if "loss" in e)
