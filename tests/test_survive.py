"""Long runs survive what a cluster and a real dataset throw at them, tried as users run the training
scripts: a subprocess with data-loading workers, real signals to the process group, real truncated
files, a real full disk. Every run has a timeout, so that a hang fails the test instead of the suite."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, make_image_folder, run_script

sys.path.insert(0, ROOT)
import vit  # noqa: E402

SCRIPTS = ["mae_pretrain.py", "nnclr_head.py", "contrastive_tune.py", "probe.py"]
FINAL = {"mae_pretrain.py": "mae.pt", "nnclr_head.py": "head.pt", "contrastive_tune.py": "ct.pt",
         "probe.py": "probe.pt"}
HEAD = ["--queue_size", "64", "--proj_hidden", "64", "--proj_dim", "16", "--pred_hidden", "64"]


@pytest.fixture(scope="module")
def s(tmp_path_factory):
    """Tiny data, a stage-1 encoder file and a head.pt written by nnclr_head.py."""
    d = tmp_path_factory.mktemp("survive")
    torch.manual_seed(0)
    args = vit.model_args_from_preset("vit_micro", 32, 4)
    torch.save(dict(stage="mae", model_args=args, encoder=vit.ViT(**args).state_dict()), d / "mae.pt")
    s = dict(dir=d, data=make_image_folder(d / "data"), mae=str(d / "mae.pt"))
    run_script("nnclr_head.py", "--data_path", s["data"], "--init", s["mae"], "--out_dir", str(d / "head"),
               "--batch_size", "8", "--max_iters", "2", "--num_workers", "0", "--device", "cpu", *HEAD)
    s["head"] = str(d / "head" / "head.pt")
    return s


def argv(s, script, out, *extra, data=None, iters=6):
    """A tiny run of `script` with 2 data-loading workers (the default is 8)."""
    own = {"mae_pretrain.py": ["--model", "vit_micro", "--img_size", "32", "--patch_size", "4", "--dec_dim", "32",
                               "--dec_depth", "1", "--dec_heads", "2"],
           "nnclr_head.py": ["--init", s["mae"], *HEAD],
           "contrastive_tune.py": ["--init", s["mae"], "--head", s["head"], "--topk", "5"],
           "probe.py": ["--init", s["mae"], "--crop_pct", "1", "--blrs", "0.1"]}[script]
    return [sys.executable, script, "--data_path", data or s["data"], "--out_dir", str(out), "--batch_size", "8",
            "--max_iters", str(iters), "--num_workers", "2", "--device", "cpu", *own, *extra]


def start(cmd, log):
    """Popen in its own process group (as a job under timeout or SLURM), output to the file `log`. Every process of
    the run inherits the variable MAECT_RUN=<its pid>: torchrun's ranks, each in a session of its own, too."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MAECT_RUN=f"{os.getpid()}-{time.time()}")
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                         start_new_session=True)
    p.marker = env["MAECT_RUN"]
    return p


def finish(p, log, timeout=90):
    """-> (exit code, output). A run still alive after `timeout` s is a hang: its whole group is killed."""
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        pytest.fail(f"still running after {timeout} s (hung)\n" + open(log).read()[-3000:])
    assert_run_gone(p)
    return p.returncode, open(log).read()


def processes_of(marker):
    """{pid: command line} of the live processes whose environment holds MAECT_RUN=marker."""
    found = {}
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and f"MAECT_RUN={marker}".encode() in open(f"/proc/{d}/environ", "rb").read().split(b"\0"):
                found[int(d)] = open(f"/proc/{d}/cmdline", "rb").read().replace(b"\0", b" ").decode()[:150]
        except OSError:  # it ended meanwhile
            pass
    return found


def assert_run_gone(p, grace=5.0):
    """Nothing of the run may outlive it: no worker, no rank, in its process group or not. (The workers are started
    by "spawn", whose resource tracker, a helper process, ends by itself as soon as the run has ended: a moment's
    grace for it.)"""
    t0 = time.time()
    while True:
        try:
            os.killpg(p.pid, 0)
        except ProcessLookupError:
            left = processes_of(p.marker)
            if not left:
                return
        else:
            left = processes_of(p.marker) or {"group": str(p.pid)}
        if time.time() - t0 > grace:
            pytest.fail(f"a process of the run outlived it by {grace:g} s: {left}")
        time.sleep(0.05)


def run(cmd, tmp_path, timeout=90):
    log = tmp_path / f"run{len(list(tmp_path.glob('run*.txt')))}.txt"
    return finish(start(cmd, log), log, timeout)


def truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 3])


def error_lines(out):
    assert "Traceback" not in out, out[-3000:]
    return [line for line in out.splitlines() if line.startswith("error:")]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def wait_for(log, pattern, p, timeout=60):
    t0 = time.time()
    while not re.search(pattern, open(log).read()):
        assert p.poll() is None and time.time() - t0 < timeout, open(log).read()[-3000:]
        time.sleep(0.01)


# -----------------------------------------------------------------------------
# 1. with workers, an error ends the process at once: one line, exit 2, no worker left


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_train_image_with_workers_is_one_line_not_a_hang(s, script, tmp_path):
    data = shutil.copytree(s["data"], tmp_path / "data")
    bad = os.path.join(data, "train", "class_1", "0002.jpg")
    truncate(bad)
    rc, out = run(argv(s, script, tmp_path / "o", data=data), tmp_path, timeout=60)
    assert rc == 2, out[-3000:]
    (line,) = error_lines(out)
    assert line.startswith(f"error: unreadable image {bad}") and "--skip_bad_images 1" in line


def test_exception_in_the_main_process_with_workers_ends_the_run(s, tmp_path):
    """An exception in the main process while its workers live (a CUDA OOM, a bug; here the KeyboardInterrupt of a
    second Ctrl-C, SIGINT sent twice to the main process alone, long before a log step): the process ends with it,
    in one line, instead of waiting for the workers."""
    log = tmp_path / "out.txt"
    p = start(argv(s, "mae_pretrain.py", tmp_path / "o", "--log_interval", "100000", iters=100000), log)
    wait_for(log, r"\| [1-9]\d*/100000", p)
    os.kill(p.pid, signal.SIGINT)
    wait_for(log, "Ctrl-C again", p)
    os.kill(p.pid, signal.SIGINT)
    rc, out = finish(p, log, timeout=60)
    assert rc == 130 and "Traceback" not in out, out[-3000:]
    assert error_lines(out) == [] and "stopped at once by a second Ctrl-C" in out


def test_ctrl_c_is_a_stop(s, tmp_path):
    """Ctrl-C in a terminal: SIGINT to every process of the foreground group, the workers too. The run stops at the
    next log step with a checkpoint, in one line, exit 0 (before: exit 1, KeyboardInterrupt tracebacks of the
    workers, no checkpoint); --resume auto continues it."""
    out, log = tmp_path / "o", tmp_path / "ctrl_c.txt"
    cmd = argv(s, "mae_pretrain.py", out, "--log_interval", "2", iters=400)
    p = start(cmd, log)
    wait_for(log, r"\| [1-9]\d*/400", p)
    os.killpg(p.pid, signal.SIGINT)
    rc, text = finish(p, log)
    assert rc == 0 and "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    (line,) = [x for x in text.splitlines() if x.startswith("stopped by signal at iteration")]
    (ckpt,) = out.glob("ckpt_*.pt")
    assert line.endswith("to continue, run the same command with --resume auto")
    assert f"stopped by signal at iteration {load(ckpt)['iter_num']};" in line
    rc, text = run(cmd + ["--resume", "auto", "--max_iters", str(load(ckpt)["iter_num"] + 2)], tmp_path)
    assert rc == 0 and load(out / "mae.pt")["iter_num"] == load(ckpt)["iter_num"] + 2, text[-3000:]


# -----------------------------------------------------------------------------
# 2. a stop signal at any moment leaves a resumable state; 7. --resume auto falls back past a truncated
# checkpoint, and a changed flag is refused


def signal_storm(p, log, pattern):
    """SIGTERM to the whole process group (as timeout and SLURM send it) from the first progress line
    matching `pattern` on, every 20 ms until the run ends: twice in a row, during checkpoint writes,
    after the last iteration, during the exit."""
    wait_for(log, pattern, p)
    sent = 0
    while p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            break
        sent += 1
        time.sleep(0.02)
    assert sent >= 2, "the run ended before the signals"


@pytest.mark.parametrize("script", SCRIPTS)
def test_signals_in_the_last_log_interval_then_resume_auto(s, script, tmp_path):
    """Signals from the first iteration of a run shorter than --log_interval: the run ends with its
    final file (training is done), exit 0. Then the final file is removed and the newest checkpoint
    truncated: --resume auto with a changed flag is refused in one line naming it; the same command
    warns, naming both checkpoints, resumes from the previous one and ends with the final file."""
    out, log = tmp_path / "o", tmp_path / "storm.txt"
    cmd = argv(s, script, out, "--log_interval", "100", "--ckpt_interval", "4", "--keep_last", "0", iters=12)
    p = start(cmd, log)
    signal_storm(p, log, r"\| [1-9]\d*/12")
    rc, text = finish(p, log)
    assert rc == 0, text[-3000:]
    assert "stopped by signal" not in text and load(out / FINAL[script])["iter_num"] == 12
    assert {"ckpt_00000004.pt", "ckpt_00000008.pt"} <= set(os.listdir(out)) and not list(out.glob("*.tmp"))

    os.remove(out / FINAL[script])
    truncate(out / "ckpt_00000008.pt")
    rc, text = run(cmd + ["--resume", "auto", "--seed", "1"], tmp_path)
    assert rc == 2
    (line,) = error_lines(text)
    assert line == f"error: {out / 'ckpt_00000004.pt'} was made with --seed 0, this run has --seed 1"
    rc, text = run(cmd + ["--resume", "auto"], tmp_path)
    assert rc == 0, text[-3000:]
    (warning,) = [line for line in text.splitlines() if line.startswith("warning:")]
    assert str(out / "ckpt_00000008.pt") in warning and "truncated" in warning
    assert warning.endswith(f"resuming from the previous checkpoint {out / 'ckpt_00000004.pt'}")
    assert "resuming from" in text and "at iteration 4" in text and load(out / FINAL[script])["iter_num"] == 12


def test_signals_mid_run_leave_a_checkpoint_and_exit_0(s, tmp_path):
    """A signal storm in the middle of a run: the run stops at the next log step with a readable
    checkpoint, exit 0, however many signals arrive while it is written and while the process exits."""
    out, log = tmp_path / "o", tmp_path / "storm.txt"
    cmd = argv(s, "mae_pretrain.py", out, "--log_interval", "2", iters=400)
    p = start(cmd, log)
    signal_storm(p, log, r"\| [1-9]\d*/400")
    rc, text = finish(p, log)
    assert rc == 0 and "stopped by signal at iteration" in text, text[-3000:]
    (ckpt,) = out.glob("ckpt_*.pt")
    assert load(ckpt)["iter_num"] == int(ckpt.stem.split("_")[1]) < 400 and not list(out.glob("*.tmp"))


def test_signals_while_workers_start_reach_only_the_main_process(s, tmp_path):
    """probe.py --cached 1 starts new workers for each feature extraction: signals from its start on may come before
    a worker has set itself to ignore them; held back until then, they reach only the main process, which stops the
    extraction within a few batches, in one line, exit 0 (not 'DataLoader worker exited unexpectedly')."""
    out, log = tmp_path / "o", tmp_path / "storm.txt"
    p = start(argv(s, "probe.py", out, "--cached", "1", "--log_interval", "1", iters=9), log)
    signal_storm(p, log, r"val:")
    rc, text = finish(p, log)
    assert rc == 0 and "Traceback" not in text and "exited unexpectedly" not in text, text[-3000:]
    assert re.search(r"stopped by signal while extracting the val features \(\d+ of 12 images\)", text), text


# -----------------------------------------------------------------------------
# 3. evaluation errors do not lose the training


def test_bad_val_image_checkpoint_first_then_final_file(s, tmp_path):
    """A truncated val image: the checkpoint due at the evaluation step is written first, the error is
    one line naming the file; resumed, the run writes mae.pt before its last evaluation fails the same
    way; --skip_bad_images 1 then evaluates with a warning naming the file."""
    data = shutil.copytree(s["data"], tmp_path / "data")
    bad = os.path.join(data, "val", "class_2", "0001.jpg")
    truncate(bad)
    out = tmp_path / "o"
    cmd = argv(s, "mae_pretrain.py", out, data=data)
    rc, text = run(cmd + ["--eval_interval", "3", "--ckpt_interval", "3"], tmp_path)
    assert rc == 2 and (out / "ckpt_00000003.pt").exists() and not (out / "mae.pt").exists(), text[-3000:]
    (line,) = error_lines(text)
    assert line.startswith(f"error: unreadable image {bad}")
    rc, text = run(cmd + ["--resume", "auto"], tmp_path)
    assert rc == 2 and "at iteration 3" in text and load(out / "mae.pt")["iter_num"] == 6
    (line,) = error_lines(text)
    assert line.startswith(f"error: unreadable image {bad}")
    rc, text = run(cmd + ["--resume", "auto", "--skip_bad_images", "1"], tmp_path)
    assert rc == 0 and f"skipping unreadable image {bad}" in text and (out / "recon_00000006.png").exists(), text


# -----------------------------------------------------------------------------
# 7. a full disk: one line, the partial file removed, the previous checkpoint intact


def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(s, tmp_path):
    """out_dir on a 320 KiB tmpfs: the first checkpoint (188 KiB) fits, the second does not."""
    out = tmp_path / "o"
    out.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(out)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        rc, text = run(argv(s, "nnclr_head.py", out, "--ckpt_interval", "2"), tmp_path)
        assert rc == 2, text[-3000:]
        (line,) = error_lines(text)
        assert line.startswith(f"error: cannot write {out / 'ckpt_00000004.pt'}: No space left on device")
        assert sorted(os.listdir(out)) == ["ckpt_00000002.pt", "log.txt"]
        assert load(out / "ckpt_00000002.pt")["iter_num"] == 2
    finally:
        subprocess.run(["umount", str(out)])


# -----------------------------------------------------------------------------
# out_dir ownership: a run never deletes, overwrites or appends to what another run wrote


def listing(out):
    return {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out)) if f != "lock"}


def test_a_fresh_run_into_a_used_out_dir_is_refused_and_changes_nothing(s, tmp_path):
    """Another run's checkpoints in out_dir: a fresh start (no --resume) of any stage is refused in one line before
    it writes, and so is --resume auto of another stage; every file stays as it was (before: the old checkpoints were
    rotated away and --resume auto then continued the other run)."""
    out = tmp_path / "o"
    rc, text = run(argv(s, "mae_pretrain.py", out, "--ckpt_interval", "2", "--keep_last", "0", iters=6), tmp_path)
    assert rc == 0, text[-3000:]
    before = listing(out)
    assert {"ckpt_00000002.pt", "ckpt_00000004.pt", "mae.pt", "log.txt"} <= set(before)
    for script, extra in (("mae_pretrain.py", ["--keep_last", "1"]), ("nnclr_head.py", []), ("probe.py", [])):
        rc, text = run(argv(s, script, out, *extra, iters=4), tmp_path)
        (line,) = error_lines(text)
        assert rc == 2 and line.startswith(f"error: --out_dir {out} holds another run's files (ckpt_00000002.pt, "), \
            line
        assert line.endswith("continue that run with --resume auto, or use another --out_dir")
        assert listing(out) == before, script
    rc, text = run(argv(s, "nnclr_head.py", out, "--resume", "auto", iters=4), tmp_path)
    (line,) = error_lines(text)
    assert rc == 2 and "holds another stage's files" in line and "is a mae checkpoint" in line, line
    rc, text = run([sys.executable, "knn.py", "--data_path", s["data"], "--init", s["mae"], "--out_dir", str(out),
                    "--num_workers", "0", "--device", "cpu"], tmp_path)  # an evaluation appends to its own log only
    (line,) = error_lines(text)
    assert rc == 2 and line.endswith("use another --out_dir") and listing(out) == before, line


def test_rotation_removes_only_this_runs_older_checkpoints(s, tmp_path):
    """--keep_last rotates the checkpoints this run wrote (a resumed run: its lineage's), never the newest, never a
    file of another folder: resumed from another out_dir's checkpoint, that folder keeps every file."""
    a, b = tmp_path / "a", tmp_path / "b"
    cmd = argv(s, "mae_pretrain.py", a, "--ckpt_interval", "2", "--keep_last", "2", "--log_interval", "100", iters=9)
    rc, text = run(cmd, tmp_path)
    assert rc == 0 and sorted(f for f in os.listdir(a) if f.startswith("ckpt_")) == [
        "ckpt_00000006.pt", "ckpt_00000008.pt"], text[-2000:]
    assert load(a / "mae.pt")["ckpts"] == ["ckpt_00000006.pt", "ckpt_00000008.pt"]
    before = listing(a)
    rc, text = run(argv(s, "mae_pretrain.py", b, "--ckpt_interval", "2", "--keep_last", "1", "--resume",
                        str(a / "ckpt_00000006.pt"), iters=12), tmp_path)
    assert rc == 0 and "resuming from" in text, text[-2000:]
    assert listing(a) == before  # the other folder: untouched
    assert sorted(f for f in os.listdir(b) if f.startswith("ckpt_")) == ["ckpt_00000010.pt"]


def test_resume_onto_other_images_is_refused_the_same_images_elsewhere_are_not(s, tmp_path):
    """A checkpoint records its image list (count, names relative to the folder): a resume onto another list is
    refused in one line; the same images under another path (a new mount) resume."""
    data = shutil.copytree(s["data"], tmp_path / "data")
    out = tmp_path / "o"
    rc, text = run(argv(s, "nnclr_head.py", out, "--ckpt_interval", "2", data=data, iters=4), tmp_path)
    assert rc == 0 and load(out / "head.pt")["data"][0]["images"] == 24, text[-2000:]
    os.remove(out / "head.pt")
    moved = shutil.copytree(data, tmp_path / "elsewhere")
    shutil.copy(os.path.join(data, "train", "class_0", "0000.jpg"), os.path.join(data, "train", "class_0", "9.jpg"))
    rc, text = run(argv(s, "nnclr_head.py", out, "--resume", "auto", data=data, iters=6), tmp_path)
    (line,) = error_lines(text)
    assert rc == 2 and "was made on other images" in line and "(24 images then, 25 now" in line, line
    rc, text = run(argv(s, "nnclr_head.py", out, "--resume", "auto", data=str(moved), iters=6), tmp_path)
    assert rc == 0 and "at iteration 2" in text and load(out / "head.pt")["iter_num"] == 6, text[-2000:]


def test_a_failing_evaluation_checkpoints_first(s, tmp_path):
    """A truncated val image with --eval_interval 3 and no checkpoint due (--ckpt_interval 1000): the checkpoint of
    iteration 3 is written before the evaluation fails in one line (before: only log.txt was left)."""
    data = shutil.copytree(s["data"], tmp_path / "data")
    bad = os.path.join(data, "val", "class_2", "0001.jpg")
    truncate(bad)
    out = tmp_path / "o"
    rc, text = run(argv(s, "mae_pretrain.py", out, "--eval_interval", "3", "--ckpt_interval", "1000", data=data),
                   tmp_path)
    (line,) = error_lines(text)
    assert rc == 2 and line.startswith(f"error: unreadable image {bad}") and load(out / "ckpt_00000003.pt")[
        "iter_num"] == 3, text[-3000:]


def small_tmpfs(path, kib):
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")


def test_full_disk_while_logging_is_one_line(s, tmp_path):
    """out_dir on a full tmpfs but for one page, which the lock takes: the first log line cannot be written. One
    line naming the file, exit 2, log.txt as it was (before: an OSError traceback from log()). lowshot_subsets.py's
    list and pipeline.py's results.md say it the same way."""
    out = tmp_path / "o"
    small_tmpfs(out, 64)
    try:
        with open(out / "filler", "wb") as f:
            f.write(b"x" * 60 * 1024)
        rc, text = run(argv(s, "mae_pretrain.py", out, "--log_interval", "1", iters=3), tmp_path)
        (line,) = error_lines(text)
        assert rc == 2 and line == f"error: cannot write {out / 'log.txt'}: No space left on device (its earlier " \
            "lines and every checkpoint are intact)", line
        assert (out / "log.txt").read_bytes() == b""
        os.remove(out / "log.txt")
        rc, text = run([sys.executable, "lowshot_subsets.py", "--root", s["data"], "--out", str(out / "list.txt"),
                        "--per_class", "2", "--mode", "list"], tmp_path)
        (line,) = error_lines(text)
        assert rc == 2 and line.startswith(f"error: cannot write {out / 'list.txt'}: No space left on device"), line
    finally:
        subprocess.run(["umount", str(out)])


def test_bad_flags_the_model_cannot_take_are_one_line(s, tmp_path):
    """Decoder heads that do not divide the decoder width, a mask ratio that leaves no visible patch, --device cuda
    without a GPU: one line each, exit 2, no traceback."""
    cases = [(["--dec_dim", "32", "--dec_heads", "5"], "--dec_dim 32 must be divisible by --dec_heads (5) and by 4"),
             (["--mask_ratio", "0.99"], "--mask_ratio 0.99 leaves no visible patch of 64")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda: torch finds no CUDA GPU on this machine"))
    for extra, want in cases:
        rc, text = run(argv(s, "mae_pretrain.py", tmp_path / "o", *extra), tmp_path)
        (line,) = error_lines(text)
        assert rc == 2 and want in line, (extra, line)


def test_a_non_finite_loss_before_any_checkpoint_says_none_was_written(s, tmp_path):
    rc, text = run(argv(s, "mae_pretrain.py", tmp_path / "o", "--blr", "1e38", "--warmup_epochs", "0",
                        "--log_interval", "1"), tmp_path)
    (line,) = error_lines(text)
    assert rc == 2 and "non-finite loss at iteration" in line and line.endswith("no checkpoint was written yet"), line


@pytest.mark.parametrize("script,extra,pattern", [
    ("knn.py", [], r"bank:"),
    ("probe.py", ["--logreg", "1", "--per_class", "2"], r"train:"),
    ("probe.py", ["--eval_head", "HEAD"], r"val:")])
def test_a_stop_signal_during_feature_extraction_stops_it(s, tmp_path, script, extra, pattern):
    """SIGTERM to the process group while the features are extracted (workers on): the extraction stops within a few
    batches, one line, exit 0 (before: knn.py died at once without a word, exit 143; probe.py --eval_head /
    --logreg ran on to the end)."""
    if "HEAD" in extra:  # a trained head to evaluate
        rc, text = run(argv(s, "probe.py", tmp_path / "p", "--cached", "1", iters=2), tmp_path)
        extra = ["--eval_head", str(tmp_path / "p" / "probe.pt")]
    data = shutil.copytree(s["data"], tmp_path / "data")
    for c in range(3):  # more images, so that the extraction takes long enough to be stopped in
        for i in range(60):
            shutil.copy(os.path.join(data, "train", f"class_{c}", "0000.jpg"), os.path.join(
                data, split := ("train" if "val" not in pattern else "val"), f"class_{c}", f"x{i}.jpg"))
    cmd = [sys.executable, script, "--data_path", data, "--init", s["mae"], "--num_workers", "2", "--device", "cpu",
           "--crop_pct", "1", "--batch_size", "2", "--out_dir", str(tmp_path / "o"), *extra]
    p = start(cmd, tmp_path / "x.txt")
    signal_storm(p, tmp_path / "x.txt", pattern)
    rc, text = finish(p, tmp_path / "x.txt")
    assert rc == 0 and "Traceback" not in text and not error_lines(text), text[-3000:]
    assert re.search(r"stopped by signal while extracting the (bank|train|val) features \(\d+ of \d+ images\)", text)
    assert not os.path.exists(tmp_path / "o" / "log.txt")


def test_workers_never_hang_nor_outlive_back_to_back_runs(s, tmp_path):
    """knn.py and probe.py with workers, one process and two, back to back: every run ends, and no process is left
    (the workers are started by spawn, not by a fork of a process whose threads come and go: CPython gh-112275).
    (scripts/worker_soak.sh: the same, many times over, with the default 8 workers, also beside a CPU hog.)"""
    base = ["--data_path", s["data"], "--init", s["mae"], "--device", "cpu", "--crop_pct", "1", "--batch_size", "4",
            "--num_workers", "3"]
    runs = [[sys.executable, "knn.py", *base, "--k", "1"]] + [
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "knn.py", *base,
         "--k", "1"], [sys.executable, "probe.py", *base, "--logreg", "1", "--per_class", "2"]]
    for i, cmd in enumerate(runs):
        rc, text = run(cmd + ["--out_dir", str(tmp_path / f"o{i}")], tmp_path, timeout=240)
        assert rc == 0 and "top-1" in text, text[-3000:]


# -----------------------------------------------------------------------------
# no wait without end (--stall_timeout), no process left behind, however the run ends


def stalled_folder(s, tmp_path):
    """The tiny folder plus train/class_1/0003b.jpg, a named pipe that no one writes: opening it waits forever (as a
    read from a file server that has died). It is train image 12 (8 in class_0 before it): in the 4th batch of 4
    images, and with 2 ranks in rank 0's share (images 0, 2, 4, ...)."""
    data = shutil.copytree(s["data"], tmp_path / "data")
    os.mkfifo(os.path.join(data, "train", "class_1", "0003b.jpg"))
    return data


@pytest.mark.parametrize("workers,nproc", [(2, 1), (0, 1), (1, 2)])
def test_a_stalled_loader_is_one_line_and_its_stacks_then_exit_3(s, tmp_path, workers, nproc):
    """A loader that gives no batch and uses no CPU for --stall_timeout seconds: one line naming the loader, the rank
    and the workers alive, the Python stacks of the main process and of each worker, exit 3, nothing left running
    and no log.txt. Under torchrun the other rank says in one line that it lost a rank, instead of a traceback."""
    cmd = [sys.executable, "knn.py", "--data_path", stalled_folder(s, tmp_path), "--init", s["mae"], "--device",
           "cpu", "--crop_pct", "1", "--batch_size", "4", "--k", "1", "--num_workers", str(workers),
           "--stall_timeout", "3", "--out_dir", str(tmp_path / "o")]
    if nproc > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    log = tmp_path / "x.txt"
    rc, out = finish(start(cmd, log), log, timeout=120)
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    stall = [line for line in lines if line.startswith("error: stalled:")]
    assert len(stall) == 1, out[-3000:]
    m = re.fullmatch(r"error: stalled: rank 0 has waited \d+ s for a batch of the bank loader, and neither it nor its "
                     r"workers used any CPU for 3 s \(--stall_timeout\); workers alive: (none|[\d ]+); the Python "
                     r"stacks follow", stall[0])
    assert m, stall[0]
    assert "--- the main process, pid" in out and "in extract_features" in out
    pids = [] if m.group(1) == "none" else m.group(1).split()
    assert 1 <= len(pids) <= workers if workers else not pids  # fewer on a machine with fewer CPUs than workers
    assert all(f"--- worker pid {pid}:" in out for pid in pids)
    assert re.search(r"in open\n\s+File .*knn\.py\", line \d+ in load", out)  # the process that waits on the pipe
    if nproc == 1:
        assert rc == 3 and lines == stall and "Traceback" not in out, out[-3000:]
    else:  # torchrun ends the other rank, which says so in one line
        assert rc != 0 and "error: rank 1 lost another rank" in out and "]: Traceback" not in out, out[-3000:]
    assert not os.path.exists(tmp_path / "o" / "log.txt")


def test_a_slow_start_is_a_note_not_a_stall(s, tmp_path):
    """Workers that take longer than --stall_timeout to start (each a new Python importing torch) but compute all
    the while: one note, and the run goes on to its result."""
    rc, out = run([sys.executable, "knn.py", "--data_path", s["data"], "--init", s["mae"], "--device", "cpu",
                   "--crop_pct", "1", "--batch_size", "4", "--k", "1", "--num_workers", "2", "--stall_timeout", "1"],
                  tmp_path)
    assert rc == 0 and "top-1" in out and not error_lines(out), out[-3000:]
    assert re.search(r"note: rank 0 has waited \d+ s for a batch of the bank loader; its processes are computing "
                     r"\([\d.]+ CPU s in the last \d+ s\): slow, not stalled, waiting on", out), out[-3000:]


@pytest.mark.parametrize("how", ["python", "torchrun", "pipeline"])
def test_a_killed_run_leaves_no_process(s, tmp_path, how):
    """SIGKILL to the run's first process (python, torchrun, or pipeline.py while a stage runs) while data-loading
    workers start: every process of the run is gone within 5 s. Before: the workers ran on until they had imported
    torch, and torchrun's ranks (each in a session of its own) ran on to the end of the run."""
    base = ["--data_path", s["data"], "--device", "cpu", "--num_workers", "2"]
    knn = ["knn.py", *base, "--init", s["mae"], "--crop_pct", "1", "--batch_size", "2", "--k", "1"]
    cmd, pattern = {
        "python": ([sys.executable, *knn], r"k-NN: encoder"),
        "torchrun": ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *knn],
                     r"bank:"),
        "pipeline": ([sys.executable, "pipeline.py", *base, "--out_dir", str(tmp_path / "p"), "--model", "vit_micro",
                      "--dim", "32", "--depth", "2", "--heads", "2", "--dec_dim", "32", "--dec_depth", "1",
                      "--dec_heads", "2", "--batch_size", "8"], r"MAE pretraining: python mae_pretrain.py")}[how]
    p = start(cmd, tmp_path / "killed.txt")
    wait_for(tmp_path / "killed.txt", pattern, p, timeout=120)
    time.sleep(0.3)  # the stage, or the workers, starting
    assert len(processes_of(p.marker)) >= 2
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert_run_gone(p, grace=5)
