"""--wandb PROJECT, run as users run it, in W&B's offline mode (files only, no network): what a run logs is read back
from its transaction log (out_dir/wandb/offline-run-<time>-<id>/run-<id>.wandb, the file `wandb sync` uploads): the
numbers of log.txt at their iterations, stage 1's reconstruction, the flags as the config; a run stopped by a signal
and resumed continues the same W&B run; knn.py's results; without the package, one line."""
import glob
import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch

import mae_pretrain
import vit
from conftest import ROOT, make_image_folder, run_script

TINY = ["--model", "vit_micro", "--img_size", "32", "--patch_size", "4", "--dec_dim", "32", "--dec_depth", "1",
        "--dec_heads", "2", "--num_workers", "0", "--device", "cpu", "--batch_size", "8"]


@pytest.fixture
def env(tmp_path):  # offline, quiet, and nothing of W&B outside tmp_path
    return dict(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path),
                WANDB_CACHE_DIR=str(tmp_path / "cache"), WANDB_DATA_DIR=str(tmp_path / "data_dir"))


def records(path):
    """The protobuf records of a .wandb file: a 7-byte header, then LevelDB's log format (32 KiB blocks of records,
    each a 7-byte header (crc, length, type) and its data; a record that does not fit a block is split)."""
    from wandb.proto import wandb_internal_pb2
    data = open(path, "rb").read()
    assert data[:7] == b":W&B\xe1\xbe\x00", f"{path}: not a version-0 W&B transaction log"
    pos, part = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        n, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if kind == 0:  # zeros: the end of what was written
            break
        part, pos = part + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a whole record, or the last piece of one
            r = wandb_internal_pb2.Record()
            r.ParseFromString(part)
            part = b""
            yield r


def offline_runs(out):
    return sorted(glob.glob(os.path.join(out, "wandb", "offline-run-*")))


def read_run(folder):
    """-> the run record, the history rows {step: {key: value}}, the exit code (None: the run did not finish)."""
    (path,) = glob.glob(os.path.join(folder, "run-*.wandb"))
    run, rows, exit_code = None, {}, None
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run = r.run
        elif kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            rows[row["_step"]] = row
        elif kind == "exit":
            exit_code = r.exit.exit_code
    return run, rows, exit_code


def read_log(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.txt"))]


def test_mae_pretrain_logs_the_scalars_the_picture_and_the_flags(tmp_path, env):
    pytest.importorskip("wandb")
    data, out = make_image_folder(tmp_path / "data"), str(tmp_path / "mae")
    args = ["mae_pretrain.py", "--data_path", data, "--out_dir", out, *TINY, "--log_interval", "2", "--eval_interval",
            "4", "--wandb", "maect-test", "--wandb_run", "tiny"]
    t0 = time.time()
    run_script(*args, "--max_iters", "4", env=env, timeout=120)
    seconds = time.time() - t0
    (folder,) = offline_runs(out)
    run, rows, exit_code = read_run(folder)
    ckpt = torch.load(os.path.join(out, "mae.pt"), weights_only=False)
    assert folder.endswith("-" + run.run_id) and ckpt["wandb_id"] == run.run_id and exit_code == 0
    assert (run.project, run.display_name, run.job_type) == ("maect-test", "tiny", "mae")
    config = {i.key: json.loads(i.value_json) for i in run.config.update if i.key != "_wandb"}
    assert config == ckpt["args"] and config["wandb"] == "maect-test" and config["log_interval"] == 2
    assert sorted(rows) == [2, 4]  # W&B's step is the iteration
    for e in read_log(out):
        numbers = {k: v for k, v in e.items() if k not in ("stage", "iter", "epoch")}
        assert numbers and {k: rows[e["iter"]][k] for k in numbers} == numbers  # loss, lr, img/s; val loss at 4
    assert "val_loss" in rows[4] and rows[4]["reconstruction/_type"] == "image-file"
    assert os.path.getsize(os.path.join(folder, "files", rows[4]["reconstruction/path"])) > 1000
    assert seconds < 60  # W&B's end neither hangs nor waits on a network
    # resumed without --wandb, the id stays in the checkpoints (a later run with --wandb continues that W&B run)
    run_script(*args[:-4], "--max_iters", "6", "--resume", "auto", env=env, timeout=120)
    assert torch.load(os.path.join(out, "mae.pt"), weights_only=False)["wandb_id"] == run.run_id
    assert offline_runs(out) == [folder]


def test_a_stopped_then_resumed_run_continues_the_same_wandb_run(tmp_path, env):
    pytest.importorskip("wandb")
    data, out = make_image_folder(tmp_path / "data"), str(tmp_path / "mae")
    args = ["mae_pretrain.py", "--data_path", data, "--out_dir", out, *TINY, "--log_interval", "1", "--max_iters",
            "400", "--eval_interval", "1000", "--wandb", "maect-test"]
    # SIGTERM to the process group, as timeout and SLURM send it (W&B's service runs in a session of its own)
    p = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", **env),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log = os.path.join(out, "log.txt")
    while p.poll() is None and not (os.path.exists(log) and len(open(log).readlines()) >= 3):
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGTERM)
    t0 = time.time()
    stdout = p.communicate(timeout=60)[0]
    assert p.returncode == 0 and "stopped by signal" in stdout and time.time() - t0 < 30, stdout[-3000:]
    (ckpt,) = glob.glob(os.path.join(out, "ckpt_*.pt"))
    stopped = torch.load(ckpt, weights_only=False)
    (first,) = offline_runs(out)
    run, rows, exit_code = read_run(first)
    assert stopped["wandb_id"] == run.run_id and exit_code == 0  # ended as the process exited
    assert max(rows) == stopped["iter_num"]
    run_script(*args[:args.index("--max_iters")], "--max_iters", str(stopped["iter_num"] + 2),
               *args[args.index("--max_iters") + 2:], "--resume", "auto", env=env, timeout=120)
    second = [f for f in offline_runs(out) if f != first]
    assert len(second) == 1 and second[0].endswith("-" + run.run_id)  # offline: one folder per process, one id
    run2, rows2, exit_code2 = read_run(second[0])
    assert run2.run_id == run.run_id and exit_code2 == 0
    assert sorted(rows2) == [stopped["iter_num"] + 1, stopped["iter_num"] + 2]  # the steps go on
    assert torch.load(os.path.join(out, "mae.pt"), weights_only=False)["wandb_id"] == run.run_id


def test_knn_and_kmeans_results_are_wandb_runs(tmp_path, env):
    pytest.importorskip("wandb")
    data = make_image_folder(tmp_path / "data")
    torch.manual_seed(0)
    model_args = vit.model_args_from_preset("vit_micro", 32, 4)
    torch.save(dict(stage="mae", model_args=model_args, encoder=vit.ViT(**model_args).state_dict()), tmp_path / "e.pt")
    common = ["--data_path", data, "--init", str(tmp_path / "e.pt"), "--num_workers", "0", "--device", "cpu",
              "--wandb", "maect-test"]
    run_script("knn.py", *common, "--out_dir", str(tmp_path / "knn"), "--k", "1", "3", env=env, timeout=120)
    (folder,) = offline_runs(tmp_path / "knn")
    run, rows, exit_code = read_run(folder)
    (entry,) = read_log(tmp_path / "knn")
    assert run.job_type == "knn" and exit_code == 0 and len(rows) == 1
    (row,) = rows.values()
    assert {k: row[f"knn_top1/{k}"] for k in ("1", "3")} == entry["knn_top1"]
    assert row["bank"] == 24 and row["queries"] == 12 and "pool" not in row  # strings: flags, in the config
    run_script("knn.py", *common, "--out_dir", str(tmp_path / "km"), "--kmeans", "--kmeans_runs", "2", env=env,
               timeout=120)
    (folder,) = offline_runs(tmp_path / "km")
    run, rows, _ = read_run(folder)
    (row,), (entry,) = rows.values(), read_log(tmp_path / "km")
    assert run.job_type == "kmeans" and row["kmeans/acc/mean"] == entry["kmeans"]["acc"]["mean"]
    assert row["kmeans/runs/1/nmi"] == entry["kmeans"]["runs"][1]["nmi"] and row["kmeans/clusters"] == 3


@pytest.mark.parametrize("script", ["mae_pretrain.py", "nnclr_head.py", "contrastive_tune.py", "probe.py", "knn.py"])
def test_without_the_package_it_is_one_line(tmp_path, script):
    """A wandb that fails to import (as where it is not installed): one line, exit 2, before out_dir is made."""
    fake = tmp_path / "fake" / "wandb"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no wandb here')\n")
    out = tmp_path / "out"
    p = run_script(script, "--data_path", str(tmp_path / "nowhere"), "--init", str(tmp_path / "none.pt"),
                   "--out_dir", str(out), "--wandb", "maect-test", check=False,
                   env=dict(PYTHONPATH=str(tmp_path / "fake")))
    assert p.returncode == 2 and p.stderr == "error: --wandb needs the wandb package: pip install wandb\n", p.stderr
    assert not out.exists()


def test_the_stall_watchdog_leaves_wandbs_service_alone(tmp_path):
    """W&B's service is a child of the training process: its CPU is not a loader's work, and a stall does not kill
    it."""
    os.symlink("/bin/sleep", tmp_path / "wandb-core")
    service = subprocess.Popen([str(tmp_path / "wandb-core"), "30"])
    worker = subprocess.Popen(["/bin/sleep", "30"])
    try:
        time.sleep(0.2)
        kids = mae_pretrain.children(os.getpid())
        assert kids.get(worker.pid) == "worker" and service.pid not in kids
    finally:
        service.kill(), worker.kill(), service.wait(), worker.wait()


def test_a_run_name_without_a_project_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        mae_pretrain.main(mae_pretrain.parser.parse_args(["--data_path", str(tmp_path), "--out_dir",
                                                          str(tmp_path / "out"), "--wandb_run", "tiny"]))
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: --wandb_run tiny names a W&B run: it needs --wandb PROJECT\n"
    assert not (tmp_path / "out").exists()
