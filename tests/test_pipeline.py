"""pipeline.py end to end on its own generated image folder: every stage runs, passes its
checkpoint on by path, and the results table holds both encoders; a second run skips every stage."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, run_script
from PIL import Image

TINY = ["--model", "vit_micro", "--dim", "32", "--depth", "2", "--heads", "2", "--dec_dim", "32", "--dec_depth", "1",
        "--dec_heads", "2", "--batch_size", "32", "--mae_epochs", "1", "--head_epochs", "1", "--ct_epochs", "1",
        "--probe_epochs", "2", "--lowshot", "2", "--lowshot_splits", "2", "--num_workers", "0",
        "--head_args", "--queue_size 64", "--ct_args", "--topk 2"]


def test_pipeline_runs_every_stage_and_writes_the_table(tmp_path):
    out = tmp_path / "p"
    p = run_script("pipeline.py", "--out_dir", out, *TINY, timeout=900)
    for f in ("mae/mae.pt", "head/head.pt", "ct/ct.pt", "data/train", "data/val"):
        assert (out / f).exists(), f
    table = (out / "results.md").read_text()
    assert table in p.stdout.replace("\r", "") or table.strip() in p.stdout
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| (MAE|MAE-CT|Δ) \|(.*)\|$", table, re.M)}
    assert set(rows) == {"MAE", "MAE-CT", "Δ"}
    nums = {k: [float(x) for x in v.split("|")] for k, v in rows.items()}
    assert all(len(v) == 6 and all(0 <= x <= 100 for x in v) for k, v in nums.items() if k != "Δ")
    for i in range(6):  # the Δ row is MAE-CT minus MAE, per column
        assert abs(nums["Δ"][i] - (nums["MAE-CT"][i] - nums["MAE"][i])) <= 0.11
    assert "low-shot 2/class (mean of 2 splits)" in table and "k-means ACC (mean of 5)" in table
    for enc, col in (("mae", "MAE"), ("maect", "MAE-CT")):  # the clustering columns: the mean over the runs
        k = json.loads((out / f"eval_{enc}" / "kmeans" / "log.txt").read_text())["kmeans"]
        assert len(k["runs"]) == 5 and abs(nums[col][4] - k["acc"]["mean"]) <= 0.051
        assert abs(nums[col][5] - k["nmi"]["mean"]) <= 0.051
    assert f"on {out / 'data' / 'val'};" in table
    # the low-shot column is the mean of the two splits, each with its own labelled subset
    for enc, col in (("mae", "MAE"), ("maect", "MAE-CT")):
        splits = [json.loads((out / f"eval_{enc}" / f"logreg_s{s}" / "log.txt").read_text().splitlines()[-1])
                  for s in (0, 1)]
        assert all(e["n_train"] == 8 for e in splits)  # 2 per class, 4 classes
        assert abs(nums[col][3] - sum(e["logreg_top1"] for e in splits) / 2) <= 0.051
    assert "| total |" in table
    # below the table, side by side, the k-NN pictures of both encoders (--show 8, k = 10): the same val images
    assert "\n| MAE encoder | MAE-CT encoder |\n|---|---|\n| ![MAE](eval_mae/knn/neighbours.png) | " \
           "![MAE-CT](eval_maect/knn/neighbours.png) |\n" in table
    assert "k-NN neighbours: 8 val images (the same for both encoders), each followed by its 10 nearest" in table
    shown = [json.loads((out / f"eval_{enc}" / "knn" / "log.txt").read_text()) for enc in ("mae", "maect")]
    assert shown[0]["show_queries"] == shown[1]["show_queries"] and len(shown[0]["show_queries"]) == 8
    for enc in ("mae", "maect"):  # 32 px crops in 64 px tiles, cells of 72 px 4 px apart: 8 rows, 1 + 10 columns
        assert Image.open(out / f"eval_{enc}" / "knn" / "neighbours.png").size == (72 + 16 + 10 * 72 + 9 * 4,
                                                                                 8 * 72 + 7 * 4)
    # the same command again: every stage's output exists, nothing runs, the same numbers
    again = run_script("pipeline.py", "--out_dir", out, *TINY, timeout=300)
    assert "===" not in again.stdout and "| total |" not in (out / "results.md").read_text()
    assert all(line in (out / "results.md").read_text() for line in table.splitlines()[:5])
    # another --show changes no number: not refused; the two k-NN stages alone run again and draw 3 rows
    again = run_script("pipeline.py", "--out_dir", out, *TINY, "--show", "3", timeout=300)
    assert re.findall(r"^=== (.*?):", again.stdout, re.M) == ["k-NN MAE", "k-NN MAE-CT"]
    assert all(line in (out / "results.md").read_text() for line in table.splitlines()[:5])
    assert "k-NN neighbours: 3 val images" in (out / "results.md").read_text()
    assert Image.open(out / "eval_maect" / "knn" / "neighbours.png").size[1] == 3 * 72 + 2 * 4


@pytest.mark.parametrize("to", ["group", "stage"])
def test_a_stage_stopped_by_a_signal_stops_the_pipeline(tmp_path, to):
    """SIGTERM to the whole process group (as timeout and SLURM send it) or to the running stage alone: the stage
    checkpoints and exits 0 without mae.pt, and the pipeline stops there in one line instead of starting the head."""
    out = tmp_path / "p"
    argv = [sys.executable, "pipeline.py", "--out_dir", str(out), *TINY, "--mae_epochs", "500"]
    p = subprocess.Popen(argv, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = out / "mae" / "log.txt"
    while p.poll() is None and not (log.exists() and log.read_text().count("\n") >= 1):
        time.sleep(0.05)
    if to == "group":
        os.killpg(p.pid, signal.SIGTERM)
    else:  # the stage is pipeline.py's only child
        stage = int(open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()[0])
        os.kill(stage, signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 2, (stdout[-2000:], stderr[-2000:])
    assert "stopped by signal" in stdout
    assert stderr.strip().splitlines()[-1] == ("error: stage MAE pretraining was interrupted; "
                                               "run the same command to continue")
    assert any(f.name.startswith("ckpt_") for f in (out / "mae").iterdir()) and not (out / "mae" / "mae.pt").exists()
    assert not (out / "head").exists() and "=== NNCLR head" not in stdout


def test_a_rerun_with_other_flags_is_refused_not_skipped(tmp_path):
    """A finished out_dir rerun with flags that change a stage: refused in one line naming the stage and the flag
    (before: exit 0 at once, the old table under the new command). Flags that change nothing (workers) are fine."""
    out = tmp_path / "p"
    quick = [*TINY, "--lowshot", "0", "--kmeans_runs", "0"]
    # started in the user's folder with a relative out_dir: the printed commands and paths are the user's own
    p = subprocess.run([sys.executable, os.path.join(ROOT, "pipeline.py"), "--out_dir", "p", *quick], cwd=tmp_path,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    assert str(tmp_path) not in p.stdout + p.stderr and sys.executable not in p.stdout, p.stdout[-3000:]
    assert "\n=== MAE pretraining: python " in p.stdout and "--out_dir p/mae " in p.stdout
    assert "wrote p/ct/ct.pt" in p.stdout and "on p/data/val;" in (out / "results.md").read_text()
    # from another folder, the same out_dir by its absolute path: the same stages, nothing runs
    p = run_script("pipeline.py", "--out_dir", out, *quick)
    assert "===" not in p.stdout
    p = run_script("pipeline.py", "--out_dir", out, *quick, "--mask_ratio", "0.5", check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == (
        "error: stage MAE pretraining was run with --mask_ratio 0.75, this command gives --mask_ratio 0.5: use "
        "another --out_dir, or remove that stage's output to run it again")
    p = run_script("pipeline.py", "--out_dir", out, *quick, "--ct_args", "--topk 3", check=False)
    assert p.returncode == 2
    assert "stage contrastive tuning was run with --topk 2, this command gives --topk 3" in p.stderr
    p = run_script("pipeline.py", "--out_dir", out, *quick, "--num_workers", "1")
    assert "===" not in p.stdout


def test_a_signal_while_the_data_is_generated_leaves_no_partial_folder(tmp_path):
    """The generated folder is written into a temp folder and renamed when whole: stopped half-way, no data/ is left
    that a rerun would take as complete (before: "train and val class folders differ" for ever)."""
    out = tmp_path / "p"
    p = subprocess.Popen([sys.executable, "pipeline.py", "--out_dir", str(out), *TINY, "--img_size", "128",
                          "--patch_size", "16"], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    while p.poll() is None and not any(f.name.startswith("data.tmp-") and (f / "train").exists()
                                       for f in out.glob("*")):
        time.sleep(0.01)
    os.killpg(p.pid, signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 2 and stderr.strip().splitlines()[-1] == \
        "error: stopped by signal while generating the image folder; run the same command to continue"
    assert not (out / "data").exists()
