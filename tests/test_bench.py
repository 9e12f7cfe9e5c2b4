"""bench.py: every stage runs on CPU and reports sane numbers; the FLOP counts match a hand count and
torch's own flop counter on the real steps; both data pipelines cut the same crops. No timing asserts."""
import functools
import importlib.util
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import bench
import mae_pretrain
import vit
from conftest import run_script

# stages 2 and 3 run through nnclr_head.py / contrastive_tune.py; their rows are checked once those scripts exist
HAVE_23 = all(importlib.util.find_spec(m) for m in ("nnclr_head", "contrastive_tune"))
STAGES = ("mae", "head", "ct", "extract") if HAVE_23 else ("mae", "extract")
MICRO = ["--model", "vit_micro", "--img_size", "32", "--patch_size", "8", "--dim", "16", "--depth", "2", "--heads", "2",
         "--dec_dim", "16", "--dec_depth", "1", "--dec_heads", "2", "--queue_size", "64"]


def test_bench_runs_every_stage_on_cpu_and_reports_json():
    p = run_script("bench.py", *MICRO, "--device", "cpu", "--batch_size", "4", "--warmup", "1", "--iters", "2",
                   "--stages", ",".join(STAGES) + ",data", "--attn", "sdpa,math", "--data_images", "3", "--json", "1")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert set(out) == {"env", "rows", "wins"}
    assert out["env"]["model_args"] == dict(img_size=32, patch_size=8, dim=16, depth=2, heads=2)
    steps = [r for r in out["rows"] if r["stage"] != "data"]
    # per stage: sdpa and math, plus the autograd twin for head and ct
    assert sorted((r["stage"], r["attn"], r["frozen"]) for r in steps) == sorted(
        [(s, a, "-" if s == "extract" else "no_grad") for s in STAGES for a in ("sdpa", "math")]
        + [(s, "sdpa", "autograd") for s in ("head", "ct") if s in STAGES])
    for r in steps:
        assert "error" not in r, r
        assert r["views"] == (2 if r["stage"] in ("head", "ct") else 1)
        for k in ("img_s", "ms_step", "gflop_img", "tflops"):
            assert r[k] > 0, (k, r)
        assert abs(r["img_s"] * r["ms_step"] / 1e3 - 4) < 1e-6  # img/s = batch / step time
        assert "mfu" not in r and "mem_gib" not in r  # CPU: no peak given, no CUDA memory
    assert [(w["stage"], w["win"]) for w in out["wins"]] == [(s, "frozen blocks without autograd")
                                                            for s in ("head", "ct") if s in STAGES]
    assert all(w["speedup"] > 0 for w in out["wins"])
    data = [r for r in out["rows"] if r["stage"] == "data"]
    assert [r["variant"].split(":")[0] for r in data] == ["ours", "ours as on a CPU (resize=True)", "standard",
                                                          "for scale", "ours, the cpu part"]
    assert all(r["img_s"] > 0 for r in data) and [r["images"] for r in data] == [3, 3, 3, 3, 9]  # 3 batches of 3 crops
    for r in data[:2]:
        assert r["speedup"] == pytest.approx(r["img_s"] / data[2]["img_s"])


@pytest.fixture
def one_thread():
    """bench.main sets one CPU thread and the attention backend; give the next tests theirs back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    vit.set_attn_backend("auto")


def test_markdown_tables_and_bad_stage(one_thread, capsys):
    bench.main(bench.parser.parse_args(MICRO + ["--device", "cpu", "--batch_size", "2", "--iters", "1",
                                                "--stages", "extract", "--attn", "math"]))
    out = capsys.readouterr().out
    assert "| stage | attn | compile | dtype |" in out and "| extract | math | 0 | float32 |" in out
    for bad in (["--stages", "mae,bogus"], ["--attn", "sdpa,bogus"], ["--compile", "0,2"]):
        with pytest.raises(SystemExit) as e:
            bench.main(bench.parser.parse_args(["--device", "cpu", *bad]))
        assert e.value.code == 2 and bad[1] in capsys.readouterr().err


def test_flops_match_a_hand_count():
    # img 16, patch 4 -> N = 16 patches; mask 0.75 keeps K = 4, so the encoder sees T = 5 tokens
    m = dict(img_size=16, patch_size=4, dim=8, depth=2, heads=2)
    d = dict(dec_dim=4, dec_depth=1, dec_heads=2)
    D, Dd, N, T, Td, pix = 8, 4, 16, 5, 17, 3 * 4 * 4

    def block(t, w):  # qkv, proj, fc1, fc2, then q k^T and att v over all heads, 2 FLOPs per multiply-add
        return 2 * (t * w * 3 * w + t * w * w + t * w * 4 * w + t * 4 * w * w) + 2 * (t * t * w) * 2

    patch = 2 * N * pix * D
    fwd = patch + 2 * block(T, D) + 2 * T * D * Dd + block(Td, Dd) + 2 * Td * Dd * pix
    assert fwd == 47248
    assert bench.mae_flops(m, d) == 3 * fwd - patch
    assert bench.encoder_flops(m, 1) == patch + block(17, D) + 3 * block(17, D)  # lower block 1x, upper 3x
    assert bench.encoder_flops(m, 2) == vit.flops_per_image(m) == patch + 2 * block(17, D)
    assert bench.linear_flops(torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(),
                                                  torch.nn.Linear(5, 2))) == 2 * (15 + 10)


@pytest.mark.parametrize("stage", ["mae", "head", "ct", "extract"])
def test_flops_equal_torch_flop_counter_on_the_real_step(stage, one_thread):
    if stage not in STAGES:
        pytest.skip("nnclr_head.py / contrastive_tune.py not there yet")
    """The FLOPs bench.py reports per image are what torch counts for a whole step (forward, backward,
    optimizer) divided by the batch; the autograd twin of frozen blocks does strictly more."""
    args = bench.parser.parse_args(MICRO + ["--img_size", "16", "--patch_size", "4", "--depth", "4",
                                            "--batch_size", "3"])
    b = bench.Bench(args, "cpu")
    vit.set_attn_backend("math")  # torch's counter does not see the CPU SDPA kernel
    counted = {}
    for frozen in ("no_grad", "autograd"):
        step, flops, views = getattr(b, stage)(dict(attn="math", compile=0, dtype="float32", optim="foreach",
                                                    frozen=frozen))
        with FlopCounterMode(display=False) as c:
            step()
        counted[frozen] = c.get_total_flops()
        if frozen == "no_grad":
            assert counted[frozen] == flops * 3, (stage, counted[frozen] / 3, flops)
    if stage in ("head", "ct"):
        assert counted["autograd"] > counted["no_grad"]


def test_standard_and_our_pipeline_cut_the_same_crops(tmp_path):
    # 512 x 384 and 32 px crops: our loader decodes at 1/2 .. 1/8 size (PIL draft), the standard one in full
    root = bench.make_jpegs(str(tmp_path / "jpegs"), 3, size=(512, 384))
    ds = mae_pretrain.ImageFolder(root, 32, functools.partial(mae_pretrain.train_boxes, views=1),
                                  mae_pretrain.flip_each,
                                  seed=5, resize=False)  # as the GPU runs: resize on the device
    mean, std = torch.tensor(bench.MEAN).view(3, 1, 1) * 255, torch.tensor(bench.STD).view(3, 1, 1) * 255
    for i, (path, _) in enumerate(ds.samples):
        flat, sizes, _, _ = mae_pretrain.collate([ds[(1, i)]])
        assert flat.dtype == torch.uint8 and sizes.shape == (1, 2)
        ref = bench.standard_sample(path, 32, bench.crop_rng(5, 1, i))
        ours = (mae_pretrain.crops_to_batch(flat, sizes, 32, "cpu")[0] - mean) / std  # what the stage scripts do
        assert ref.dtype == ours.dtype == torch.float32 and ref.shape == ours.shape == (3, 32, 32)
        other = bench.standard_sample(path, 32, bench.crop_rng(5, 2, i))  # another crop of the same image
        assert (ours - ref).abs().mean() < 0.15 < (ours - other).abs().mean(), i
