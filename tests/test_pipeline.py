"""pipeline.py end to end on its own generated image folder: every stage runs, passes its
checkpoint on by path, and the results table holds both encoders; a second run skips every stage."""
import json
import os
import re

from conftest import run_script

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
    assert all(len(v) == 4 and all(0 <= x <= 100 for x in v) for k, v in nums.items() if k != "Δ")
    for i in range(4):  # the Δ row is MAE-CT minus MAE, per column
        assert abs(nums["Δ"][i] - (nums["MAE-CT"][i] - nums["MAE"][i])) <= 0.11
    assert "low-shot 2/class (mean of 2 splits)" in table
    # the low-shot column is the mean of the two splits, each with its own labelled subset
    for enc, col in (("mae", "MAE"), ("maect", "MAE-CT")):
        splits = [json.loads((out / f"eval_{enc}" / f"logreg_s{s}" / "log.txt").read_text().splitlines()[-1]) for s in (0, 1)]
        assert all(e["n_train"] == 8 for e in splits)  # 2 per class, 4 classes
        assert abs(nums[col][3] - sum(e["logreg_top1"] for e in splits) / 2) <= 0.051
    assert "| total |" in table
    # the same command again: every stage's output exists, nothing runs, the same numbers
    again = run_script("pipeline.py", "--out_dir", out, *TINY, timeout=300)
    assert "===" not in again.stdout and "| total |" not in (out / "results.md").read_text()
    assert all(line in (out / "results.md").read_text() for line in table.splitlines()[:5])
