"""What a researcher's own runs need, run as users run them: k-NN of the encoder while it trains (--knn_interval), the
same number on 1 and 2 processes; TensorBoard event files read back (--tensorboard); unlabelled images (train/ holding
the images directly, no val/); gradient-norm clipping (--clip_grad)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, make_image_folder, run_script, run_torchrun

sys.path.insert(0, ROOT)
import vit  # noqa: E402

HEAD = ["--queue_size", "64", "--proj_hidden", "64", "--proj_dim", "16", "--pred_hidden", "64"]
MAE = ["--model", "vit_micro", "--img_size", "32", "--patch_size", "4", "--dec_dim", "32", "--dec_depth", "1",
       "--dec_heads", "2"]
COMMON = ["--batch_size", "8", "--num_workers", "0", "--device", "cpu", "--log_interval", "1"]


@pytest.fixture(scope="module")
def s(tmp_path_factory):
    d = tmp_path_factory.mktemp("research")
    torch.manual_seed(0)
    args = vit.model_args_from_preset("vit_micro", 32, 4)
    torch.save(dict(stage="mae", model_args=args, encoder=vit.ViT(**args).state_dict()), d / "mae.pt")
    s = dict(dir=d, data=make_image_folder(d / "data", per_class=8, val_per_class=6), mae=str(d / "mae.pt"))
    run_script("nnclr_head.py", "--data_path", s["data"], "--init", s["mae"], "--out_dir", str(d / "head"),
               "--max_iters", "2", *COMMON, *HEAD)
    s["head"] = str(d / "head" / "head.pt")
    return s


def log(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.txt"))]


def knn_reference(bank, bank_labels, queries, labels, k=10, T=0.07):
    """knn.py's rule in float64: cosine similarity, the k nearest vote with weight exp(sim / T)."""
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sim = q @ b.T
    hits = 0
    for i, row in enumerate(sim):
        votes = np.zeros(labels.max() + 1)
        for j in np.argsort(-row, kind="stable")[:k]:
            votes[bank_labels[j]] += np.exp(row[j] / T)
        hits += votes.argmax() == labels[i]
    return 100.0 * hits / len(labels)


def test_knn_while_training_is_logged_and_equals_knn_py_on_the_subsets(s, tmp_path):
    """mae_pretrain.py --knn_interval 2: k-NN top-1 of the encoder at every second step (and at the end), a field of
    log.txt and of the progress bar; at the first evaluation it is knn.py's rule on the encoder and the seeded
    subsets (bank 12 of 24 train images, queries 10 of 18 val images), computed here."""
    out = tmp_path / "mae"
    p = run_script("mae_pretrain.py", "--data_path", s["data"], "--out_dir", str(out), *MAE, *COMMON, "--max_iters",
                   "4", "--knn_interval", "2", "--knn_bank", "12", "--knn_queries", "10", "--ckpt_interval", "100",
                   "--blr", "0")  # the weights stay those of iteration 0: the reference can recompute them
    entries = [e for e in log(out) if "knn_top1" in e]
    assert [e["iter"] for e in entries] == [2, 4] and "k-NN top-1" in p.stdout + p.stderr
    assert all(isinstance(e["knn_s"], float) and 0 <= e["knn_s"] < 60 for e in entries)  # its cost, in seconds
    import random
    enc = vit.load_encoder(str(out / "mae.pt"))
    feats = {}
    for split, size in (("train", 12), ("val", 10)):
        root = os.path.join(s["data"], split)
        files = [(os.path.join(root, c, f), i) for i, c in enumerate(sorted(os.listdir(root)))
                 for f in sorted(os.listdir(os.path.join(root, c)))]
        files = [files[i] for i in sorted(random.Random(0).sample(range(len(files)), size))]
        from PIL import Image
        x = np.stack([np.asarray(Image.open(f).convert("RGB")) for f, _ in files]).astype(np.float32)
        with torch.no_grad():
            t = enc(vit.normalize(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()))
        feats[split] = (t[:, 1:].mean(1).double().numpy(), np.array([c for _, c in files]))
    want = knn_reference(*feats["train"], *feats["val"])
    assert entries[0]["knn_top1"] == pytest.approx(want, abs=0.01) and entries[1]["knn_top1"] == entries[0]["knn_top1"]


def test_knn_while_contrastive_tuning_one_and_two_processes(s, tmp_path):
    """contrastive_tune.py --knn_interval: the EMA encoder's k-NN at epoch ends, in the epoch line too; the same
    numbers for 1 and 2 processes."""
    argv = ["contrastive_tune.py", "--data_path", s["data"], "--init", s["mae"], "--head", s["head"], *COMMON,
            "--max_iters", "6", "--topk", "2", "--knn_interval", "3", "--knn_bank", "16", "--knn_queries", "12",
            "--encoder_ema", "0.5", "--blr", "3e-3"]
    p = run_script(*argv, "--out_dir", str(tmp_path / "one"))
    run_torchrun(2, *argv, "--out_dir", str(tmp_path / "two"))
    one, two = ([e["knn_top1"] for e in log(tmp_path / d) if "knn_top1" in e] for d in ("one", "two"))
    assert len(one) == 2 and one == two and all(0 <= v <= 100 for v in one)
    assert "epoch 1: nearest-neighbour accuracy" in p.stdout + p.stderr and ", k-NN top-1" in p.stdout + p.stderr


def test_tensorboard_events_hold_the_scalars_and_the_reconstructions(s, tmp_path):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out = tmp_path / "mae"
    run_script("mae_pretrain.py", "--data_path", s["data"], "--out_dir", str(out), *MAE, *COMMON, "--max_iters", "4",
               "--tensorboard", "1", "--eval_interval", "2", "--knn_interval", "2", "--knn_bank", "8",
               "--knn_queries", "8", "--clip_grad", "1.0")
    acc = ea.EventAccumulator(str(out / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"loss", "lr", "img_per_s", "val_loss", "knn_top1", "grad_norm"} <= set(tags["scalars"]), tags
    losses = {e.step: e.value for e in acc.Scalars("loss")}
    logged = {e["iter"]: e["loss"] for e in log(out) if "loss" in e}
    assert sorted(losses) == [1, 2, 3, 4] and all(abs(losses[k] - logged[k]) < 1e-4 for k in logged)
    assert "reconstruction" in tags["images"] and len(acc.Images("reconstruction")) == 2  # iterations 2 and 4
    run_script("nnclr_head.py", "--data_path", s["data"], "--init", s["mae"], "--out_dir", str(tmp_path / "h"),
               "--max_iters", "3", *COMMON, *HEAD, "--tensorboard", "1")
    acc = ea.EventAccumulator(str(tmp_path / "h" / "tb"))
    acc.Reload()
    assert {"loss", "nn_acc", "lr"} <= set(acc.Tags()["scalars"])


def test_tensorboard_missing_is_one_line(s, tmp_path):
    """Without the tensorboard package (here: one that fails to import), --tensorboard 1 is refused in one line."""
    fake = tmp_path / "fake" / "tensorboard"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no tensorboard here')\n")
    p = run_script("nnclr_head.py", "--data_path", s["data"], "--init", s["mae"], "--out_dir", str(tmp_path / "h"),
                   "--max_iters", "2", *COMMON, *HEAD, "--tensorboard", "1", check=False,
                   env=dict(PYTHONPATH=str(tmp_path / "fake")))
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == \
        "error: --tensorboard 1 needs the tensorboard package: pip install tensorboard", p.stderr[-2000:]


def test_unlabelled_images(s, tmp_path):
    """train/ holding the images directly (no class folders) and no val/: stage 1 trains without val loss or
    pictures, stages 2 and 3 with the nearest-neighbour monitor off, each saying so; the evaluations need labels."""
    flat = tmp_path / "flat" / "train"
    flat.mkdir(parents=True)
    for i, (path, _) in enumerate((os.path.join(r, f), 0) for r, _, fs in os.walk(os.path.join(s["data"], "train"))
                                  for f in sorted(fs)):
        shutil.copy(path, flat / f"{i:03d}_{os.path.basename(path)}")
    data = str(tmp_path / "flat")
    p = run_script("mae_pretrain.py", "--data_path", data, "--out_dir", str(tmp_path / "m"), *MAE, *COMMON,
                   "--max_iters", "3", "--eval_interval", "1")
    assert "no val/: no val loss or reconstructions" in p.stdout and not [e for e in log(tmp_path / "m")
                                                                           if "val_loss" in e]
    for script, extra in (("nnclr_head.py", [*HEAD]), ("contrastive_tune.py", ["--head", s["head"], "--topk", "2"])):
        p = run_script(script, "--data_path", data, "--init", str(tmp_path / "m" / "mae.pt"), "--out_dir",
                       str(tmp_path / script), *COMMON, "--max_iters", "3", *extra)
        assert f"no class folders in {flat}: the nearest-neighbour accuracy monitor is off" in p.stdout
        entries = log(tmp_path / script)
        assert entries and not [e for e in entries if "nn_acc" in e or "nn_acc_epoch" in e]
    p = run_script("knn.py", "--data_path", data, "--init", s["mae"], *COMMON[2:6], check=False)
    assert p.returncode == 2 and "missing split folder" in p.stderr.strip().splitlines()[-1]


def test_clip_grad_clips_the_total_norm_and_logs_it(s, tmp_path):
    """clip_grad (every training stage's): the gradients scaled to a total norm of max_norm (float64 reference), the
    norm before clipping returned; off at 0. A run with --clip_grad logs that norm at log steps and trains otherwise
    than without (AdamW's step is nearly scale-free, so it moves the weights differently rather than much less)."""
    import nnclr_head
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(5, 3)), torch.nn.Parameter(torch.zeros(4))]
    grads = [torch.randn(5, 3, generator=g), torch.randn(4, generator=g)]
    for p, gr in zip(params, grads):
        p.grad = gr.clone()
    total = sum(gr.double().square().sum() for gr in grads).sqrt().item()
    opt, scaler = torch.optim.AdamW(params), torch.amp.GradScaler(enabled=False)
    assert nnclr_head.clip_grad(params, 0.0, scaler, opt) is None and torch.equal(params[0].grad, grads[0])
    norm = nnclr_head.clip_grad(params, 0.5, scaler, opt)
    assert norm.item() == pytest.approx(total, rel=1e-6)
    for p, gr in zip(params, grads):
        torch.testing.assert_close(p.grad.double(), gr.double() * 0.5 / total, rtol=1e-5, atol=0)

    def head_after(out, *extra):
        run_script("nnclr_head.py", "--data_path", s["data"], "--init", s["mae"], "--out_dir", str(out),
                   "--max_iters", "3", *COMMON, *HEAD, "--blr", "0.05", "--warmup_epochs", "0", *extra)
        return torch.load(out / "head.pt", weights_only=False)["head"]

    plain, clipped = head_after(tmp_path / "plain"), head_after(tmp_path / "clip", "--clip_grad", "1e-6")
    norms = [e["grad_norm"] for e in log(tmp_path / "clip") if "grad_norm" in e]
    assert len(norms) == 3 and all(n > 1e-6 for n in norms)
    assert not [e for e in log(tmp_path / "plain") if "grad_norm" in e]
    assert not torch.equal(plain["projector.0.weight"], clipped["projector.0.weight"])
