"""Tests for knn.py: the vote rule against a brute-force numpy reference (weights, ties, chunking,
standardisation), the whole script against features computed here, 1 vs 2 processes, clear errors."""
import json
import os
import random
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, make_image_folder, run_script, run_torchrun

sys.path.insert(0, ROOT)
import knn  # noqa: E402
import vit  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs like the subprocess ones (OMP_NUM_THREADS=1): tiny matmuls on a shared
    2-core machine are slower on two threads, and results then match the subprocess runs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -----------------------------------------------------------------------------
# independent references (float64 numpy)

def knn_reference(bank, bank_labels, queries, k, T, num_classes, standardize=False):
    """Brute force: cosine similarity to every bank row, the k most similar (a stable sort, so equal
    similarities go by increasing bank index), votes exp(sim / T), the first class with the most votes."""
    bank, queries = np.asarray(bank, np.float64), np.asarray(queries, np.float64)
    if standardize:
        mu, sd = bank.mean(0), bank.std(0, ddof=1) + 1e-5
        bank, queries = (bank - mu) / sd, (queries - mu) / sd
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    preds = []
    for q in queries:
        sim = bank @ q
        votes = np.zeros(num_classes)
        for j in np.argsort(-sim, kind="stable")[:k]:
            votes[bank_labels[j]] += np.exp(sim[j] / T)
        preds.append(int(np.argmax(votes)))
    return np.array(preds)


def run_knn(bank, labels, queries, ks, T, C, chunk, standardize=False):
    b, q = knn.prepare_features(torch.as_tensor(bank), torch.as_tensor(queries), standardize)
    out = knn.knn_classify(b, torch.as_tensor(labels), q, ks, T, C, chunk)
    return {k: v.numpy() for k, v in out.items()}


def make_encoder(path, seed=0):
    torch.manual_seed(seed)
    m = vit.ViT(img_size=32, patch_size=4, dim=96, depth=2, heads=3)
    torch.save(dict(stage="mae", model_args=m.args, encoder=m.state_dict()), path)
    return str(path)


def folder_features(enc_path, split_dir, pool="cls"):
    """Features of every image of an image folder, computed here: PIL decode (32 px images, crop_pct 1
    is the identity), ImageNet normalisation, the encoder, CLS token / mean of patch tokens."""
    enc = vit.load_encoder(enc_path, verbose=False)
    classes = sorted(os.listdir(split_dir))
    paths, labels = [], []
    for c, name in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(split_dir, name))):
            paths.append(os.path.join(split_dir, name, f))
            labels.append(c)
    x = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths]).astype(np.float32)  # (N, H, W, 3)
    x = (x - np.array([0.485, 0.456, 0.406], np.float32) * 255) / (np.array([0.229, 0.224, 0.225], np.float32) * 255)
    with torch.no_grad():
        tokens = enc(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())  # (N, 1+P, D)
    f = tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(1)
    return f.double().numpy(), np.array(labels)


def noise_folder(root, classes=3, per_class=7, val_per_class=5, seed=0):
    """Images whose class is unrelated to their pixels: k-NN accuracies land between 0 and 100 and
    depend on every neighbour, so matching the reference for several k means matching the votes."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f"c{c}"))
            for i in range(n):
                img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(img).save(os.path.join(root, split, f"c{c}", f"{i}.png"))
    return str(root)


def main_knn(*argv):
    argv = argv if "--device" in argv else (*argv, "--device", "cpu")
    knn.main(knn.parser.parse_args([str(a) for a in argv]))


def error_line(capsys, fn, *argv):
    with pytest.raises(SystemExit) as e:
        fn(*argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ")
    return err[-1]


# -----------------------------------------------------------------------------
# the vote rule

@pytest.mark.parametrize("T", [0.07, 0.5])
def test_knn_matches_numpy_reference(T):
    rng = np.random.default_rng(1)
    C = 5
    bank, queries = rng.normal(size=(60, 8)), rng.normal(size=(23, 8))
    labels = rng.integers(0, C, 60)
    ks = [1, 3, 10, 60]
    ref = {k: knn_reference(bank, labels, queries, k, T, C) for k in ks}
    if T == 0.5:  # at T 0.07 the nearest neighbour outweighs the rest; at 0.5 the k matter
        assert len({tuple(r) for r in ref.values()}) == len(ks)
    for chunk in (1, 7, 23, 1000):  # smaller than, equal to, larger than the query count
        got = run_knn(bank, labels, queries, ks, T, C, chunk)
        for k in ks:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=f"k={k} chunk={chunk}")


def test_knn_weights_not_counts():
    # one very close neighbour of class 0 against two far ones of class 1: exp(sim / T) decides
    bank = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = np.array([0, 1, 1])
    q = np.array([[1.0, 0.3]])
    assert run_knn(bank, labels, q, [3], 0.07, 2, 4)[3][0] == 0  # e^(0.958/0.07) >> 2 e^(0.287/0.07)
    assert run_knn(bank, labels, q, [3], 100.0, 2, 4)[3][0] == 1  # at high T it is nearly a count
    for T in (0.07, 100.0):
        assert knn_reference(bank, labels, q, 3, T, 2)[0] == run_knn(bank, labels, q, [3], T, 2, 4)[3][0]


def test_knn_ties():
    # query orthogonal to every bank row: all similarities are exactly 0, so the neighbours are the
    # k lowest bank indices and the votes are counts; vote ties go to the lowest class
    e = np.eye(4)
    bank = np.array([e[1], e[1], e[2], e[2], e[3], e[3], e[1]])
    labels = np.array([2, 1, 1, 0, 0, 0, 2])
    q = e[:1]
    want = {1: 2, 2: 1, 3: 1, 4: 1, 5: 0, 6: 0}  # k=2: 2 vs 1 tie -> 1; k=4: 1 has 2, 0 has 1 ...
    for chunk in (1, 3):
        got = run_knn(bank, labels, q, list(want), 0.07, 3, chunk)
        assert {k: int(v[0]) for k, v in got.items()} == want
    for k, c in want.items():
        assert knn_reference(bank, labels, q, k, 0.07, 3)[0] == c
    # exact duplicates at the k-th place: the lower bank index is taken (k=1 -> label of row 1);
    # both inside the k: equal weights, vote tie -> the lower class
    bank = np.array([e[2], e[0], e[3], e[0], e[1]])
    labels = np.array([0, 2, 0, 1, 0])
    got = run_knn(bank, labels, q, [1, 2], 0.07, 3, 2)
    assert int(got[1][0]) == 2 and int(got[2][0]) == 1
    # many queries with ties in one chunk (the per-row redo) and without
    rng = np.random.default_rng(0)
    bank = e[rng.integers(0, 4, 40)]
    labels = rng.integers(0, 3, 40)
    queries = np.concatenate([e[rng.integers(0, 4, 9)], rng.normal(size=(9, 4))])
    for k in (1, 5, 17):
        ref = knn_reference(bank, labels, queries, k, 0.07, 3)
        for chunk in (4, 18):
            np.testing.assert_array_equal(run_knn(bank, labels, queries, [k], 0.07, 3, chunk)[k], ref)


def test_knn_neighbours_in_the_reference_order():
    """return_neighbours: each query's kmax nearest bank rows, most similar first, equal similarities by increasing
    bank index (exact ties from repeated one-hot rows, cut at the kmax-th place), whatever the chunk: the neighbours
    the vote used, which --show draws; the predictions are those without it."""
    rng = np.random.default_rng(3)
    e = np.eye(4)
    bank = np.concatenate([e[rng.integers(0, 4, 30)], rng.normal(size=(30, 4))])
    queries = np.concatenate([e[rng.integers(0, 4, 6)], rng.normal(size=(6, 4))])
    labels = torch.as_tensor(rng.integers(0, 3, 60))
    b, q = knn.prepare_features(torch.as_tensor(bank), torch.as_tensor(queries))
    sim = q.numpy() @ b.numpy().T
    ref = np.argsort(-sim, axis=1, kind="stable")[:, :7]
    kth = np.take_along_axis(sim, ref[:, -1:], axis=1)  # (12, 1)
    assert ((sim == kth).sum(1) > (np.take_along_axis(sim, ref, axis=1) == kth).sum(1))[:6].all()  # ties cut at 7
    for chunk in (1, 5, 12):
        preds, near = knn.knn_classify(b, labels, q, [3, 7], 0.07, 3, chunk, return_neighbours=True)
        np.testing.assert_array_equal(near.numpy(), ref, err_msg=f"chunk={chunk}")
        plain = knn.knn_classify(b, labels, q, [3, 7], 0.07, 3, chunk)
        assert all(torch.equal(preds[k], plain[k]) for k in (3, 7))


def test_knn_standardize():
    rng = np.random.default_rng(2)
    # a large offset and scale per dimension: standardising changes the neighbours; dimension 5's std is
    # near the 1e-5 added to it (the authors' (x - mean) / (unbiased std + 1e-5)), where that term matters
    scale, offset = [1, 10, 0.1, 5, 1, 2e-5], [0, 0, 3, 0, -2, 7]
    bank = rng.normal(size=(50, 6)) * scale + offset
    queries = rng.normal(size=(20, 6)) * scale + offset
    labels = rng.integers(0, 4, 50)
    b, q = knn.prepare_features(torch.as_tensor(bank), torch.as_tensor(queries), True)
    mu, sd = bank.mean(0), bank.std(0, ddof=1) + 1e-5
    rb, rq = (bank - mu) / sd, (queries - mu) / sd
    np.testing.assert_allclose(b.numpy(), rb / np.linalg.norm(rb, axis=1, keepdims=True), atol=1e-12)
    np.testing.assert_allclose(q.numpy(), rq / np.linalg.norm(rq, axis=1, keepdims=True), atol=1e-12)
    plain = knn_reference(bank, labels, queries, 5, 0.07, 4)
    ref = knn_reference(bank, labels, queries, 5, 0.07, 4, standardize=True)
    assert (plain != ref).any()
    np.testing.assert_array_equal(run_knn(bank, labels, queries, [5], 0.07, 4, 8, standardize=True)[5], ref)


def test_knn_k_larger_than_bank_function():
    with pytest.raises(ValueError, match="larger than the bank"):
        run_knn(np.eye(3), np.array([0, 1, 2]), np.eye(3), [4], 0.07, 3, 2)


# -----------------------------------------------------------------------------
# the script

def test_knn_script_matches_reference(tmp_path):
    data = noise_folder(tmp_path / "data")
    enc = make_encoder(tmp_path / "enc.pt")
    for pool in ("cls", "mean"):
        out = tmp_path / f"out_{pool}"
        main_knn("--data_path", data, "--init", enc, "--pool", pool, "--k", 1, 3, 21, "--crop_pct", 1,
                 "--num_workers", 0, "--batch_size", 4, "--chunk", 4, "--out_dir", out)
        entry = json.loads((out / "log.txt").read_text().splitlines()[-1])
        bank, bl = folder_features(enc, os.path.join(data, "train"), pool)
        queries, ql = folder_features(enc, os.path.join(data, "val"), pool)
        assert entry["bank"] == 21 and entry["queries"] == 15
        for k in (1, 3, 21):
            ref = 100.0 * (knn_reference(bank, bl, queries, k, 0.07, 3) == ql).mean()
            assert entry["knn_top1"][str(k)] == round(ref, 4), (pool, k)


def test_knn_torchrun_two_processes_match_one(tmp_path):
    data = noise_folder(tmp_path / "data")  # 21 bank / 15 queries: shards of unequal size
    enc = make_encoder(tmp_path / "enc.pt", seed=3)
    args = ["--data_path", data, "--init", enc, "--k", 1, 5, 10, "--crop_pct", 0.875, "--num_workers", 0,
            "--batch_size", 4, "--chunk", 6]
    main_knn(*args, "--out_dir", tmp_path / "one")
    run_torchrun(2, "knn.py", *map(str, args), "--out_dir", str(tmp_path / "two"), "--device", "cpu")
    one = json.loads((tmp_path / "one" / "log.txt").read_text())
    two = json.loads((tmp_path / "two" / "log.txt").read_text())
    assert one["knn_top1"] == two["knn_top1"]
    assert 0 < min(one["knn_top1"].values()) < 100  # not a trivial score


def test_knn_errors(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", classes=2, per_class=3, val_per_class=1)
    enc = make_encoder(tmp_path / "enc.pt")
    line = error_line(capsys, main_knn, "--data_path", data, "--init", enc, "--k", 7, "--num_workers", 0)
    assert "--k 7 is larger than the bank (6 train images)" in line
    head = tmp_path / "probe.pt"  # a head file: no encoder inside
    torch.save(dict(stage="probe", head={}, encoder_init="out/mae/mae.pt"), head)
    line = error_line(capsys, main_knn, "--data_path", data, "--init", head, "--k", 1, "--num_workers", 0)
    assert "probe checkpoint" in line and "holds no encoder" in line and "out/mae/mae.pt" in line
    line = error_line(capsys, main_knn, "--data_path", data, "--init", tmp_path / "nope.pt", "--num_workers", 0)
    assert "not found" in line
    (tmp_path / "data" / "val" / "class_1" / "zz.jpg").write_bytes(b"not a jpeg")
    line = error_line(capsys, main_knn, "--data_path", data, "--init", enc, "--k", 1, "--num_workers", 0)
    assert "unreadable image" in line and "zz.jpg" in line


# -----------------------------------------------------------------------------
# --show: the picture of the neighbours

def folder_files(split_dir):
    """The image files of a split in dataset order (class folders, then files, by name)."""
    return [os.path.join(split_dir, c, f) for c in sorted(os.listdir(split_dir))
            for f in sorted(os.listdir(os.path.join(split_dir, c)))]


def expected_picture(rows, same):
    """The documented layout, built here from the files' pixels: 32 px crops upscaled x2 to 64 px tiles, frames b = 4,
    cells 72 px, b apart, the neighbours 4 b from the query; the query unframed, a neighbour green or red."""
    tile, b, k = 64, 4, len(rows[0]) - 1
    cell = tile + 2 * b
    out = np.full((len(rows) * cell + (len(rows) - 1) * b, cell + 4 * b + k * cell + (k - 1) * b, 3), 255, np.uint8)
    for r, (files, marks) in enumerate(zip(rows, same)):
        y = r * (cell + b)
        for i, f in enumerate(files):
            x = 0 if i == 0 else cell + 4 * b + (i - 1) * (cell + b)
            if i:
                out[y:y + cell, x:x + cell] = (40, 170, 40) if marks[i - 1] else (220, 30, 30)
            px = np.asarray(Image.open(f).convert("RGB"))  # (32, 32, 3): crop_pct 1 at img_size 32 is the file
            out[y + b:y + b + tile, x + b:x + b + tile] = px.repeat(2, axis=0).repeat(2, axis=1)
    return out


def test_knn_show_draws_the_neighbours_that_voted(tmp_path):
    """knn.py --show 3 --k 3 2 as a user runs it: out_dir/neighbours.png is exactly the picture built here, pixel
    for pixel: the 3 val images drawn with --seed (in val order), each followed by its 2 (the smallest k) nearest
    train images by a float64 reference on features computed here, most similar first, framed red exactly where the
    class differs."""
    data = noise_folder(tmp_path / "data")
    enc = make_encoder(tmp_path / "enc.pt", seed=1)
    out = tmp_path / "out"
    p = run_script("knn.py", "--data_path", data, "--init", enc, "--k", "3", "2", "--show", "3", "--seed", "4",
                   "--crop_pct", "1", "--num_workers", "0", "--batch_size", "4", "--out_dir", str(out),
                   "--device", "cpu")
    assert f"wrote {out / 'neighbours.png'}" in p.stdout
    entry = json.loads((out / "log.txt").read_text())
    picked = sorted(random.Random(4).sample(range(15), 3))
    assert entry["show_queries"] == picked and entry["show"] == 3 and entry["show_k"] == 2
    assert entry["neighbours_png"] == "neighbours.png"
    bank, bl = folder_features(enc, os.path.join(data, "train"))
    queries, ql = folder_features(enc, os.path.join(data, "val"))
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    train, val = folder_files(os.path.join(data, "train")), folder_files(os.path.join(data, "val"))
    rows, same = [], []
    for q in picked:
        sim = bank @ queries[q]
        near = np.argsort(-sim, kind="stable")[:3]
        assert np.diff(-sim[near]).min() > 1e-4, "a near tie: float32 and float64 could order it differently"
        rows.append([val[q]] + [train[j] for j in near[:2]])
        same.append([bl[j] == ql[q] for j in near[:2]])
    assert {m for row in same for m in row} == {True, False}  # both frames are drawn
    np.testing.assert_array_equal(np.asarray(Image.open(out / "neighbours.png")), expected_picture(rows, same))


def test_knn_show_two_processes_give_the_same_png(tmp_path):
    data = noise_folder(tmp_path / "data")  # 21 bank / 15 queries: shards of unequal size
    enc = make_encoder(tmp_path / "enc.pt", seed=2)
    args = ["--data_path", data, "--init", enc, "--k", 2, "--show", 3, "--crop_pct", 0.875, "--num_workers", 0,
            "--batch_size", 4]
    main_knn(*args, "--out_dir", tmp_path / "one")
    run_torchrun(2, "knn.py", *map(str, args), "--out_dir", str(tmp_path / "two"), "--device", "cpu")
    one, two = ((tmp_path / d / "neighbours.png").read_bytes() for d in ("one", "two"))
    assert one == two and Image.open(tmp_path / "one" / "neighbours.png").size == (236, 224)


def test_knn_show_refusals_and_left_out_images(tmp_path, capsys):
    """--show with --kmeans, or without --out_dir: one line, exit 2, before anything is written. With unreadable
    images left out (--skip_bad_images 1) the features no longer name their files: a warning, no picture, the result."""
    data = noise_folder(tmp_path / "data", per_class=3, val_per_class=2)
    enc = make_encoder(tmp_path / "enc.pt")
    base = ["--data_path", data, "--init", enc, "--k", 2, "--show", 3, "--crop_pct", 1, "--num_workers", 0]
    for extra, want in ((["--kmeans", "--out_dir", tmp_path / "km"], "error: --show draws k-NN neighbours: not with "
                         "--kmeans"), ([], "error: --show needs --out_dir (the picture is written to "
                                       "out_dir/neighbours.png)")):
        with pytest.raises(SystemExit) as e:
            main_knn(*base, *extra)
        assert e.value.code == 2 and capsys.readouterr().err == want + "\n"
    assert not (tmp_path / "km").exists()
    (tmp_path / "data" / "train" / "c1" / "zz.png").write_bytes(b"not a png")
    main_knn(*base, "--skip_bad_images", 1, "--out_dir", tmp_path / "out")
    assert "warning: --show: no picture: unreadable images were left out" in capsys.readouterr().err
    entry = json.loads((tmp_path / "out" / "log.txt").read_text())
    assert entry["bank"] == 9 and entry["show"] == 3 and "neighbours_png" not in entry
    assert not (tmp_path / "out" / "neighbours.png").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_knn_cuda_matches_cpu(tmp_path):
    # the vote rule on the GPU (whose topk orders ties its own way): the same predictions as on the CPU
    rng = np.random.default_rng(4)
    e = np.eye(4, dtype=np.float32)
    bank = np.concatenate([rng.normal(size=(3000, 4)).astype(np.float32), e[rng.integers(0, 4, 3000)]])
    queries = np.concatenate([rng.normal(size=(200, 4)).astype(np.float32), e[rng.integers(0, 4, 100)]])
    labels = rng.integers(0, 7, 6000)
    b, q = knn.prepare_features(torch.from_numpy(bank), torch.from_numpy(queries))
    cpu = knn.knn_classify(b, torch.from_numpy(labels), q, [1, 10, 50], 0.07, 7, 64)
    gpu = knn.knn_classify(b.cuda(), torch.from_numpy(labels).cuda(), q.cuda(), [1, 10, 50], 0.07, 7, 64)
    for k in cpu:
        assert torch.equal(cpu[k], gpu[k].cpu()), k
    np.testing.assert_array_equal(cpu[50][200:].numpy(), knn_reference(bank, labels, queries[200:], 50, 0.07, 7))
    data = make_image_folder(tmp_path / "data")
    enc = make_encoder(tmp_path / "enc.pt")
    main_knn("--data_path", data, "--init", enc, "--k", 1, 5, "--num_workers", 0, "--device", "cuda",
             "--dtype", "bfloat16", "--out_dir", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "log.txt").read_text())["knn_top1"] == {"1": 100.0, "5": 100.0}


# -----------------------------------------------------------------------------
# k-means clustering (--kmeans): the scores against scikit-learn, k-means against a float64 reference

def test_cluster_scores_match_scikit_learn():
    """ACC, NMI (arithmetic normalisation) and ARI against scikit-learn's (a test-only dependency), on random and
    structured labelings: permuted, merged, split, constant, more clusters than classes."""
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 6, 300)
    cases = {"random": rng.integers(0, 6, 300), "permuted": (y + 2) % 6, "merged": y // 2,
             "split": y * 2 + (rng.random(300) < 0.5),
             "noisy": np.where(rng.random(300) < 0.3, rng.integers(0, 6, 300), y), "constant": np.zeros(300, int),
             "small": np.array([0, 0, 1, 1, 2])}
    for name, c in cases.items():
        labels = y if name != "small" else np.array([0, 1, 1, 1, 2])
        acc, nmi, ari = knn.cluster_scores(c, labels)
        assert nmi == pytest.approx(100 * metrics.normalized_mutual_info_score(labels, c), abs=1e-9), name
        assert ari == pytest.approx(100 * metrics.adjusted_rand_score(labels, c), abs=1e-9), name
        assert 0 <= acc <= 100
    assert knn.cluster_scores(cases["permuted"], y)[0] == 100.0  # a relabelling is a perfect clustering


def test_hungarian_accuracy_equals_the_best_permutation():
    """5 classes, 5 clusters: ACC is the best of all 120 one-to-one matchings, found by brute force."""
    import itertools
    rng = np.random.default_rng(1)
    for trial in range(5):
        y = rng.integers(0, 5, 60)
        c = np.where(rng.random(60) < 0.5, y, rng.integers(0, 5, 60))
        c = np.array([3, 0, 4, 1, 2])[c]  # scramble the cluster ids
        best = max(np.mean(np.array(perm)[c] == y) for perm in itertools.permutations(range(5)))
        assert knn.cluster_scores(c, y)[0] == pytest.approx(100 * best, abs=1e-12), trial


def lloyd_reference(x, centroids, iters):
    """Lloyd's iterations in float64 numpy from given centroids, until no assignment changes."""
    x, c, assign = np.asarray(x, np.float64), np.asarray(centroids, np.float64), None
    for _ in range(iters):
        new = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
        if assign is not None and (new == assign).all():
            break
        assign = new
        c = np.stack([x[assign == k].mean(0) if (assign == k).any() else c[k] for k in range(len(c))])
    return assign, c


def test_kmeans_matches_a_float64_reference_and_recovers_blobs():
    rng = np.random.default_rng(2)
    # Gaussian blobs far apart: every run recovers them exactly (ACC = NMI = ARI = 100), converged
    centres = rng.normal(size=(4, 8)) * 10
    y = np.repeat(np.arange(4), 50)
    x = torch.tensor(centres[y] + rng.normal(size=(200, 8)), dtype=torch.float32)
    for seed in range(5):
        assign, _, _, iters, converged = knn.kmeans(x, 4, seed)
        assert converged and knn.cluster_scores(assign.numpy(), y) == (100.0, 100.0, 100.0), seed
    # overlapping data: from the same k-means++ start, the assignments and centroids of a float64 Lloyd
    x = torch.tensor(rng.normal(size=(300, 5)), dtype=torch.float32)
    assign, cent, inertia, iters, converged = knn.kmeans(x, 6, seed=3, max_iters=1)  # the start, one update
    g = torch.Generator().manual_seed(3)  # the same draws as kmeans' k-means++
    first = x[torch.randint(300, (1,), generator=g)]
    d2 = ((x - first) ** 2).sum(1).double()
    picks = [first]
    for _ in range(5):
        p = x[torch.multinomial(d2 / d2.sum(), 1, generator=g)]
        picks.append(p)
        d2 = torch.minimum(d2, ((x - p) ** 2).sum(1).double())
    start = torch.cat(picks).numpy()
    ref_assign, ref_c = lloyd_reference(x.numpy(), start, 1)
    np.testing.assert_array_equal(assign.numpy(), ref_assign)
    full, full_c, _, iters, converged = knn.kmeans(x, 6, seed=3, max_iters=300)
    ref_assign, ref_c = lloyd_reference(x.numpy(), start, 300)
    assert converged and iters < 300
    np.testing.assert_array_equal(full.numpy(), ref_assign)
    np.testing.assert_allclose(full_c.numpy(), ref_c, atol=1e-5)
    # the iteration cap is reported as not converged
    assert knn.kmeans(x, 6, seed=3, max_iters=1)[4] is False


def test_kmeans_reseeds_an_empty_cluster():
    """Two far points and a duplicate: 3 clusters of 4 points whose k-means++ start cannot fill them all (two starts
    on the same point) -> the empty cluster takes the point farthest from its centroid; every cluster is used."""
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [10.0, 0.0], [10.0, 1.0]])
    assign, cent, _, _, _ = knn.kmeans(x, 3, seed=0)
    assert sorted(set(assign.tolist())) == [0, 1, 2] and torch.isfinite(cent).all()


def test_kmeans_script_one_and_two_processes(tmp_path):
    """--kmeans on the val features (as many clusters as classes): the table and the log line, the same on 2
    processes (features gathered in order, k-means on rank 0); the scores equal cluster_scores of a k-means run
    here on features computed here."""
    data = noise_folder(tmp_path / "data", per_class=4, val_per_class=7)
    enc = make_encoder(tmp_path / "enc.pt", seed=5)
    args = ["--data_path", data, "--init", enc, "--kmeans", "--kmeans_runs", 3, "--crop_pct", 1, "--num_workers", 0,
            "--batch_size", 4, "--pool", "mean"]
    main_knn(*args, "--out_dir", tmp_path / "one")
    run_torchrun(2, "knn.py", *map(str, args), "--out_dir", str(tmp_path / "two"), "--device", "cpu")
    one, two = (json.loads((tmp_path / d / "log.txt").read_text()) for d in ("one", "two"))
    assert one["stage"] == "kmeans" and one["kmeans"] == two["kmeans"] and one["images"] == 21
    k = one["kmeans"]
    assert k["clusters"] == 3 and len(k["runs"]) == 3 and [r["seed"] for r in k["runs"]] == [0, 1, 2]
    feats, labels = folder_features(enc, os.path.join(data, "val"), "mean")
    x = torch.nn.functional.normalize(torch.tensor(feats, dtype=torch.float32), dim=1)
    for r in k["runs"]:
        assign = knn.kmeans(x, 3, r["seed"])[0]
        acc, nmi, ari = knn.cluster_scores(assign.numpy(), labels)
        assert (r["acc"], r["nmi"], r["ari"]) == pytest.approx((acc, nmi, ari), abs=1e-3)
    assert k["acc"]["mean"] == pytest.approx(sum(r["acc"] for r in k["runs"]) / 3, abs=1e-3)
    assert k["nmi"]["best"] == max(r["nmi"] for r in k["runs"])
