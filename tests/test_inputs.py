"""Inputs every stage script checks before it trusts them: image modes (16-bit, 32-bit integer and float images
scaled to 8-bit RGB or refused, decompression bombs unreadable, dotfiles not read), flag ranges (one line each,
before anything runs), out_dir (a file or a read-only folder: one line at start) and the lock on out_dir (a second
run refused before it writes anything, the lock of a killed run taken over)."""
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, make_image_folder, run_script

sys.path.insert(0, ROOT)
import contrastive_tune as ct  # noqa: E402
import knn  # noqa: E402
import mae_pretrain as mae  # noqa: E402
import nnclr_head as nh  # noqa: E402
import probe  # noqa: E402
import vit  # noqa: E402

SCRIPTS = {"mae_pretrain.py": mae, "nnclr_head.py": nh, "contrastive_tune.py": ct, "probe.py": probe, "knn.py": knn}
S = 16  # side of the test images


def ramp(hi):  # (S, S) float64 from 0 to hi: every level of a 16-bit or float image, both ends included
    return np.linspace(0, hi, S * S).reshape(S, S)


def bomb_png(path, side=20000):
    """A PNG whose header claims side x side pixels (over twice Image.MAX_IMAGE_PIXELS): a few bytes on disk."""
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def folder_of_modes(root):
    """root/c/<image in each mode> and the 8-bit RGB pixels each must decode to (computed here, not by the scripts)."""
    d = os.path.join(root, "c")
    os.makedirs(d)
    want, rgb = {}, (np.random.default_rng(0).random((S, S, 3)) * 255).astype(np.uint8)
    v16 = np.rint(ramp(65535))
    Image.fromarray(v16.astype(np.uint16)).save(os.path.join(d, "i16.png"))  # opens as I;16
    Image.fromarray(v16.astype(">u2")).save(os.path.join(d, "i16b.tif"))  # I;16B
    Image.fromarray(v16.astype(np.int32)).save(os.path.join(d, "i32.tif"))  # I
    for name in ("i16.png", "i16b.tif", "i32.tif"):
        want[name] = np.repeat(np.rint(v16 / 257)[..., None], 3, 2)  # 65535 -> 255
    f = ramp(1).astype(np.float32)
    Image.fromarray(f).save(os.path.join(d, "f.tif"))  # F
    want["f.tif"] = np.repeat(np.rint(f.astype(np.float64) * 255)[..., None], 3, 2)
    for mode in ("1", "L", "LA", "P", "RGBA", "CMYK"):  # what PIL converts right: unchanged
        name = f"{mode.lower()}.{'jpg' if mode == 'CMYK' else 'png'}"
        Image.fromarray(rgb).convert(mode).save(os.path.join(d, name), **({"transparency": 0} if mode == "P" else {}))
        want[name] = np.array(Image.open(os.path.join(d, name)).convert("RGB"))
    return want


def make_loader(m, root, skip_bad=False):
    """Each script's ImageFolder, uncropped: load(i, whole image) returns image i as it enters the crops."""
    ds = m.ImageFolder(root, S, lambda rng, w, h: [(0, 0, w, h)], skip_bad=skip_bad)
    return ds, lambda i: ds.load(i, lambda w, h: [(0, 0, w, h)])


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_image_mode_decodes_to_the_right_pixels(tmp_path, script):
    want = folder_of_modes(tmp_path)
    ds, load = make_loader(SCRIPTS[script], str(tmp_path))
    for i, (path, _) in enumerate(ds.samples):
        got = np.array(load(i)[0][0])
        assert got.shape == (S, S, 3) and got.dtype == np.uint8, path
        np.testing.assert_array_equal(got, want[os.path.basename(path)], err_msg=path)


def bad_image_folder(root):
    """train/class_0: two good images, then one of each kind the scripts must refuse (a file each)."""
    make_image_folder(root, classes=2, per_class=2, val_per_class=2, size=S)
    d, bad = os.path.join(root, "train", "class_0"), {}
    bomb_png(os.path.join(d, "b_bomb.png"))
    bad["b_bomb.png"] = "exceeds limit"
    Image.fromarray((ramp(70000)).astype(np.int32)).save(os.path.join(d, "c_i32.tif"))
    bad["c_i32.tif"] = "mode I values span [0, 70000], outside [0, 65535]"
    Image.fromarray(ramp(255).astype(np.float32)).save(os.path.join(d, "d_f255.tif"))
    bad["d_f255.tif"] = "mode F values span [0, 255], outside [0, 1]"
    Image.fromarray(np.zeros((S, S, 3), np.uint8)).convert("LAB").save(os.path.join(d, "e_lab.tif"))
    bad["e_lab.tif"] = "image mode LAB is not supported"
    return bad


@pytest.mark.parametrize("script", SCRIPTS)
def test_refused_images_are_unreadable_images(tmp_path, script):
    bad = bad_image_folder(tmp_path)
    ds, load = make_loader(SCRIPTS[script], str(tmp_path / "train"))
    names = [os.path.basename(p) for p, _ in ds.samples]
    for name, why in bad.items():
        with pytest.raises(RuntimeError) as e:
            load(names.index(name))
        msg = str(e.value)
        assert msg.startswith(f"unreadable image {tmp_path / 'train' / 'class_0' / name}: ") and why in msg \
            and msg.endswith("(use --skip_bad_images 1 to skip such files)"), msg
    ds, load = make_loader(SCRIPTS[script], str(tmp_path / "train"), skip_bad=True)
    first = load(names.index("b_bomb.png"))  # skips all four to the next good image: the first of class c1
    assert ds.bad == 4 and np.array(first[0][0]).shape == (S, S, 3) and first[1] == 1


def test_knn_refuses_or_skips_unconvertible_images(tmp_path):
    """As a user runs it: one line naming the first bad file; with --skip_bad_images 1 a warning per bad file."""
    bad = bad_image_folder(tmp_path / "data")
    args = vit.model_args_from_preset("vit_micro", S, 4)
    torch.save(dict(stage="mae", model_args=args, encoder=vit.ViT(**args).state_dict()), tmp_path / "mae.pt")
    argv = ["knn.py", "--data_path", str(tmp_path / "data"), "--init", str(tmp_path / "mae.pt"), "--k", "1",
            "--crop_pct", "1", "--num_workers", "0", "--device", "cpu"]
    p = run_script(*argv, check=False, timeout=120)
    first = tmp_path / "data" / "train" / "class_0" / "b_bomb.png"
    errors = [line for line in p.stderr.splitlines() if "error" in line.lower()]  # the rest: tqdm's bar
    assert p.returncode == 2 and len(errors) == 1 and errors[0].startswith(f"error: unreadable image {first}: ") \
        and "Traceback" not in p.stderr, p.stderr[-2000:]
    p = run_script(*argv, "--skip_bad_images", "1", "--out_dir", str(tmp_path / "o"), timeout=120)
    warnings = [line for line in p.stderr.splitlines()
                if "warning: skipping unreadable image" in line]  # tqdm: same line
    named = {name for line in warnings for name, why in bad.items() if f"/{name} (" in line and why in line}
    # an evaluation leaves a bad image out (once each), rather than counting a copy of another image
    assert named == set(bad) and len(warnings) == 4, p.stderr[-3000:]
    assert f"4 unreadable images of {tmp_path / 'data' / 'train'} left out" in p.stderr
    entry = json.loads((tmp_path / "o" / "log.txt").read_text())
    assert (entry["bank"], entry["queries"]) == (4, 4)  # 2 classes x 2 good train images, without the 4 bad ones


@pytest.mark.parametrize("script", SCRIPTS)
def test_dotfiles_and_dot_folders_are_not_read(tmp_path, script):
    """macOS ._* resource forks and .ipynb_checkpoints are not images or classes; classes sort as strings."""
    for c in ("0", "10", "2", ".ipynb_checkpoints"):
        os.makedirs(tmp_path / c)
        Image.new("RGB", (S, S)).save(tmp_path / c / "a.jpg")
    (tmp_path / "0" / "._a.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    (tmp_path / "10" / ".hidden.png").write_bytes(b"not an image")
    samples, classes = SCRIPTS[script].scan_image_folder(str(tmp_path))
    assert classes == ["0", "10", "2"]
    assert samples == [(str(tmp_path / c / "a.jpg"), i) for i, c in enumerate(classes)]


# -----------------------------------------------------------------------------
# flags: (flag, value as given and as printed, wanted), every case of the issue
BAD_FLAGS = {
    "mae_pretrain.py": [("epochs", "-1", ">= 1"), ("max_iters", "-5", ">= 0"), ("mask_ratio", "1.5", "in (0, 1)"),
                        ("batch_size", "0", ">= 1"), ("views", "0", ">= 1"), ("grad_accum", "0", ">= 1"),
                        ("log_interval", "0", ">= 1"), ("ckpt_interval", "0", ">= 1"), ("eval_interval", "0", ">= 1"),
                        ("num_workers", "-1", ">= 0"), ("keep_last", "-1", ">= 0"), ("blr", "-0.001", ">= 0"),
                        ("weight_decay", "-0.1", ">= 0"), ("dec_depth", "0", ">= 1"), ("norm_pix_loss", "2", "0 or 1"),
                        ("device", "gpu", "auto, cpu, cuda or cuda:N")],
    "nnclr_head.py": [("epochs", "0", ">= 1"), ("max_iters", "-5", ">= 0"), ("batch_size", "0", ">= 1"),
                      ("grad_accum", "0", ">= 1"), ("log_interval", "0", ">= 1"), ("ckpt_interval", "0", ">= 1"),
                      ("queue_size", "0", ">= 1"), ("proj_dim", "0", ">= 1"), ("temperature", "0.0", "> 0"),
                      ("num_workers", "-1", ">= 0"), ("keep_last", "-1", ">= 0"),
                      ("warmup_epochs", "-2.0", "-1 or >= 0"), ("aug", "2", "0 or 1")],
    "contrastive_tune.py": [("epochs", "-1", ">= 1"), ("topk", "0", ">= 1"), ("temperature", "-0.1", "> 0"),
                            ("target_ema", "1.0", "in [0, 1)"), ("encoder_ema", "-0.5", "in [0, 1)"),
                            ("layer_decay", "0.0", "in (0, 1]"), ("freeze_blocks", "-2", "-1 or >= 0"),
                            ("head_blr", "-1.0", ">= 0"), ("batch_size", "0", ">= 1"), ("log_interval", "0", ">= 1"),
                            ("max_iters", "-5", ">= 0"), ("keep_last", "-1", ">= 0"),
                            ("skip_bad_images", "-1", "0 or 1")],
    "probe.py": [("epochs", "0", ">= 1"), ("batch_size", "0", ">= 1"), ("blrs", "0.1 -0.1", "> 0"),
                 ("eval_every", "0", ">= 1"), ("lambd", "0.0", "> 0"), ("crop_pct", "1.5", "in (0, 1]"),
                 ("per_class", "-1", ">= 0"), ("ckpt_interval", "0", ">= 1"), ("num_workers", "-1", ">= 0"),
                 ("warmup_epochs", "-3.0", "-1 or >= 0"), ("cached", "2", "0 or 1")],
    "knn.py": [("k", "0 10", ">= 1"), ("batch_size", "0", ">= 1"), ("chunk", "0", ">= 1"),
               ("temperature", "0.0", "> 0"), ("crop_pct", "0.0", "in (0, 1]"), ("num_workers", "-1", ">= 0"),
               ("img_size", "-1", ">= 0"), ("standardize", "2", "0 or 1"), ("show", "-1", ">= 0")],
}
ONE_BY_ONE = ([("mae_pretrain.py", "mask_ratio", "0.0", "in (0, 1)"),
               ("mae_pretrain.py", "mask_ratio", "1.0", "in (0, 1)"),
               ("contrastive_tune.py", "encoder_ema", "1.0", "in [0, 1)"),
               ("knn.py", "temperature", "-1.0", "> 0")]
              + [(s, *case) for s, cases in BAD_FLAGS.items() for case in cases])


def base_argv(script, tmp_path):
    return ["--data_path", str(tmp_path / "data"), "--out_dir", str(tmp_path / "out"), "--device", "cpu"] + \
        (["--init", str(tmp_path / "x.pt")] if script in ("probe.py", "knn.py") else [])


@pytest.mark.parametrize("script", BAD_FLAGS)
def test_flag_ranges_are_checked_before_anything_runs(tmp_path, script):
    """As a user runs it: every bad flag named on its own line, exit 2, nothing created (not even out_dir)."""
    bad = [arg for flag, value, _ in BAD_FLAGS[script] for arg in (f"--{flag}", *value.split())]
    p = run_script(script, *base_argv(script, tmp_path), *bad, check=False, timeout=120)
    want = [f"error: --{flag} {value} must be {wanted}" for flag, value, wanted in BAD_FLAGS[script]]
    assert p.returncode == 2 and sorted(p.stderr.strip().splitlines()) == sorted(want), p.stderr[-3000:]
    assert p.stdout == "" and not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("script,flag,value,wanted", ONE_BY_ONE)
def test_each_bad_flag_alone_is_one_line(tmp_path, capsys, script, flag, value, wanted):
    m = SCRIPTS[script]
    with pytest.raises(SystemExit) as e:
        m.main(m.parser.parse_args(base_argv(script, tmp_path) + [f"--{flag}", *value.split()]))
    assert e.value.code == 2 and capsys.readouterr().err == f"error: --{flag} {value} must be {wanted}\n"
    assert not os.path.exists(tmp_path / "out")


def read_only_dir(path):
    """A folder this process cannot write to: mode 555, or for root an immutable folder (chattr +i); None if neither."""
    os.makedirs(path)
    os.chmod(path, 0o555)
    if not os.access(path, os.W_OK):
        return path
    if (subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
            and not os.access(path, os.W_OK)):
        return path
    return None


@pytest.mark.parametrize("script", SCRIPTS)
def test_out_dir_that_is_a_file_or_read_only_fails_at_start(tmp_path, capsys, script):
    m = SCRIPTS[script]
    (tmp_path / "file").write_text("")
    ro = read_only_dir(tmp_path / "ro")
    cases = [(tmp_path / "file", "it is a file"), (tmp_path / "file" / "sub", "Not a directory")]
    cases += [(ro, "permission denied")] if ro else []
    try:
        for out, why in cases:
            argv = base_argv(script, tmp_path)
            argv[argv.index("--out_dir") + 1] = str(out)
            with pytest.raises(SystemExit) as e:
                m.main(m.parser.parse_args(argv))  # data and checkpoint are missing: the out_dir check comes first
            assert e.value.code == 2 and capsys.readouterr().err == f"error: cannot write to --out_dir {out}: {why}\n"
    finally:
        if ro:
            subprocess.run(["chattr", "-i", str(ro)], capture_output=True)
            os.chmod(ro, 0o755)


def test_knn_checks_out_dir_before_extracting(tmp_path):
    """knn.py writes out_dir only at the end: a bad one is still refused before any feature is extracted."""
    make_image_folder(tmp_path / "data", classes=2, per_class=2, val_per_class=2, size=S)
    args = vit.model_args_from_preset("vit_micro", S, 4)
    torch.save(dict(stage="mae", model_args=args, encoder=vit.ViT(**args).state_dict()), tmp_path / "mae.pt")
    (tmp_path / "file").write_text("")
    p = run_script("knn.py", "--data_path", str(tmp_path / "data"), "--init", str(tmp_path / "mae.pt"), "--k", "1",
                   "--out_dir", str(tmp_path / "file"), "--num_workers", "0", "--device", "cpu",
                   check=False, timeout=120)
    assert p.returncode == 2 and p.stderr == f"error: cannot write to --out_dir {tmp_path / 'file'}: it is a file\n"
    assert "k-NN:" not in p.stdout


# -----------------------------------------------------------------------------
# the lock on out_dir

def test_second_run_into_a_locked_out_dir_is_refused_and_a_killed_runs_lock_taken_over(tmp_path):
    """A real run holds out_dir; each script started into it is refused in one line naming the holder, and writes
    nothing; after the holder is killed (SIGKILL: no clean-up) the next run takes the lock over with a warning."""
    data, out = make_image_folder(tmp_path / "data", classes=2, per_class=4, val_per_class=2, size=S), tmp_path / "out"
    mae_argv = ["mae_pretrain.py", "--data_path", data, "--out_dir", str(out), "--model", "vit_micro",
                "--img_size", str(S), "--patch_size", "4", "--dec_dim", "16", "--dec_depth", "1", "--dec_heads", "2",
                "--batch_size", "4", "--num_workers", "0", "--device", "cpu"]
    never = ["--log_interval", "100000", "--eval_interval", "100000", "--ckpt_interval", "100000"]  # it writes nothing
    holder = subprocess.Popen([sys.executable, *mae_argv, "--max_iters", "1000000", *never], cwd=ROOT, env=dict(
        os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock, t0 = out / "lock", time.time()
        while not (lock.exists() and lock.read_text()) and time.time() - t0 < 60 and holder.poll() is None:
            time.sleep(0.1)
        holding = f"pid {holder.pid} on host {socket.gethostname()}"
        assert lock.read_text() == holding + "\n"
        holder.send_signal(signal.SIGSTOP)  # holds the lock, frees the CPU for the runs below
        procs = {s: subprocess.Popen([sys.executable, s, *base_argv(s, tmp_path)[:4], "--init", str(tmp_path / "x.pt")],
                                     cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE) for s in SCRIPTS}
        for s, p in procs.items():
            stdout, stderr = p.communicate(timeout=120)
            want = f"error: --out_dir {out} is in use by another run ({holding}): wait for it, use another out_dir, " \
                f"or if that run is gone (its node died), delete {lock}\n"
            assert p.returncode == 2 and stdout == "" and stderr == want, (s, stderr[-2000:])
        assert os.listdir(out) == ["lock"] and lock.read_text() == holding + "\n" and holder.poll() is None
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert lock.read_text() == holding + "\n"  # left behind by the killed run
    p = run_script(*mae_argv, "--max_iters", "1", timeout=120)
    assert f"warning: taking over the lock {lock} of {holding}, which ended without releasing it" in p.stderr
    assert sorted(os.listdir(out)) == ["log.txt", "mae.pt", "recon_00000001.png"]  # the lock released at the end
