"""Tests for lowshot_subsets.py, on tiny fake ImageNet trees under tmp_path."""

import hashlib
import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "lowshot_subsets.py"
sys.path.insert(0, str(REPO))
import lowshot_subsets  # noqa: E402

# class sizes chosen so that rounding cases show up in --percent
SIZES = {"n00000001": 10, "n00000002": 7, "n00000003": 5, "n00000004": 3}


def make_root(base, sizes=SIZES, val=True):
    root = base / "imagenet"
    for wnid, n in sizes.items():
        d = root / "train" / wnid
        d.mkdir(parents=True)
        for i in range(n):
            (d / f"{wnid}_{i}.JPEG").write_bytes(f"pixels of {wnid}_{i}".encode())
    # a non-image file in a class dir must never be drawn
    (root / "train" / "n00000001" / "README.txt").write_text("not an image")
    if val:
        (root / "val" / "n00000001").mkdir(parents=True)
    return root


@pytest.fixture
def root(tmp_path):
    return make_root(tmp_path)


def write_split(path, names, extra_lines=()):
    path.write_text("\n".join(list(names) + list(extra_lines)) + "\n")
    return path


def run_main(*args):
    assert lowshot_subsets.main([str(a) for a in args]) == 0


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, env=env)


def read_list(path):
    return Path(path).read_text().splitlines()


def per_class(names):
    counts = {}
    for n in names:
        counts[n.split("_")[0]] = counts.get(n.split("_")[0], 0) + 1
    return counts


def tree_files(out):
    train = Path(out) / "train"
    return sorted(p.name for p in train.glob("*/*"))


def assert_one_line_error(r, *needles):
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for needle in needles:
        assert needle in r.stderr, r.stderr


# ---- seeded subsets ----------------------------------------------------------

def test_per_class_counts(root, tmp_path):
    out = tmp_path / "two.txt"
    run_main("--root", root, "--out", out, "--per_class", 2, "--mode", "list")
    names = read_list(out)
    assert per_class(names) == {w: 2 for w in SIZES}
    assert all((root / "train" / n.split("_")[0] / n).is_file() for n in names)
    assert "README.txt" not in names
    m = json.loads(Path(str(out) + ".json").read_text())
    assert (m["num_images"], m["num_classes"], m["per_class"], m["seed"]) == (8, 4, 2, 0)


@pytest.mark.parametrize("percent,expected", [
    # round half up, at least 1: 30% of 10,7,5,3 = 3, 2.1, 1.5, 0.9
    ("30", [3, 2, 2, 1]),
    # 50% of 10,7,5,3 = 5, 3.5, 2.5, 1.5 (banker's rounding would give 4, 2, 2)
    ("50", [5, 4, 3, 2]),
    ("1", [1, 1, 1, 1]),
    ("100", [10, 7, 5, 3]),
])
def test_percent_counts(root, tmp_path, percent, expected):
    out = tmp_path / f"p{percent}.txt"
    run_main("--root", root, "--out", out, "--percent", percent, "--mode", "list")
    assert per_class(read_list(out)) == dict(zip(SIZES, expected))


def test_percent_rule():
    pc = lowshot_subsets.percent_count
    assert pc(1300, Fraction(1)) == 13 and pc(732, Fraction(1)) == 7
    assert pc(250, Fraction(1)) == 3  # 2.5 rounds up
    assert pc(40, Fraction(1)) == 1   # 0.4 -> at least 1
    assert pc(1281, Fraction("0.5")) == 6  # 6.405


def test_seeded_deterministic_and_seed_matters(root, tmp_path):
    outs = {}
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        outs[name] = tmp_path / f"{name}.txt"
        run_main("--root", root, "--out", outs[name], "--per_class", 2, "--seed", seed, "--mode", "list")
    assert read_list(outs["a"]) == read_list(outs["b"])
    assert read_list(outs["a"]) != read_list(outs["c"])


def test_seeded_selection_is_pinned(root, tmp_path):
    # the selection must not depend on the machine, Python's hash salt or
    # version: pin it, and run in processes with different PYTHONHASHSEEDs
    expected = ["n00000001_0.JPEG", "n00000001_9.JPEG", "n00000002_0.JPEG", "n00000002_6.JPEG",
                "n00000003_1.JPEG", "n00000003_2.JPEG", "n00000004_0.JPEG", "n00000004_2.JPEG"]
    # the documented rule, recomputed here: per class, the k files with the
    # smallest sha256("<seed>/<wnid>/<name>")
    rule = []
    for wnid, n in SIZES.items():
        names = [f"{wnid}_{i}.JPEG" for i in range(n)]
        rule += sorted(names, key=lambda x: hashlib.sha256(f"7/{wnid}/{x}".encode()).digest())[:2]
    assert sorted(rule) == expected
    for hs in ("1", "2"):
        out = tmp_path / f"h{hs}.txt"
        r = run_cli("--root", root, "--out", out, "--per_class", 2, "--seed", 7, "--mode", "list",
                    env={**os.environ, "PYTHONHASHSEED": hs})
        assert r.returncode == 0, r.stderr
        assert read_list(out) == expected


def test_seeded_subsets_are_nested(root, tmp_path):
    run_main("--root", root, "--out", tmp_path / "k1.txt", "--per_class", 1, "--seed", 3, "--mode", "list")
    run_main("--root", root, "--out", tmp_path / "k3.txt", "--per_class", 3, "--seed", 3, "--mode", "list")
    assert set(read_list(tmp_path / "k1.txt")) < set(read_list(tmp_path / "k3.txt"))


def test_short_classes_error_and_all(root, tmp_path):
    out = tmp_path / "five"
    r = run_cli("--root", root, "--out", out, "--per_class", 5)
    assert_one_line_error(r, "1 class(es)", "n00000004 (3)", "--short_classes all")
    assert not out.exists()
    r = run_cli("--root", root, "--out", out, "--per_class", 5, "--short_classes", "all")
    assert r.returncode == 0, r.stderr
    assert "n00000004 (3)" in r.stdout
    assert per_class(tree_files(out)) == {"n00000001": 5, "n00000002": 5, "n00000003": 5, "n00000004": 3}
    assert json.loads((out / "MANIFEST.json").read_text())["short"] == {"n00000004": 3}


# ---- official split files -----------------------------------------------------

def test_split_file_gives_exactly_its_names(root, tmp_path):
    names = ["n00000003_4.JPEG", "n00000001_9.JPEG", "n00000001_0.JPEG", "n00000004_2.JPEG"]
    # blank lines and surrounding whitespace are ignored
    split = tmp_path / "split.txt"
    split.write_text("  n00000003_4.JPEG\nn00000001_9.JPEG  \n\nn00000001_0.JPEG\r\nn00000004_2.JPEG\n\n")
    run_main("--root", root, "--out", tmp_path / "s.txt", "--split_file", split, "--mode", "list")
    assert read_list(tmp_path / "s.txt") == sorted(names)
    run_main("--root", root, "--out", tmp_path / "s", "--split_file", split)
    assert tree_files(tmp_path / "s") == sorted(names)
    assert sorted(p.name for p in (tmp_path / "s" / "train").iterdir()) == ["n00000001", "n00000003", "n00000004"]


def test_split_file_rejects_seed(root, tmp_path):
    split = write_split(tmp_path / "split.txt", ["n00000001_1.JPEG"])
    r = run_cli("--root", root, "--out", tmp_path / "o", "--split_file", split, "--seed", 1)
    assert r.returncode == 2 and "--seed" in r.stderr


# ---- output modes ---------------------------------------------------------------

def test_link_mode(root, tmp_path):
    out = tmp_path / "linked"
    run_main("--root", root, "--out", out, "--per_class", 2)
    links = sorted((out / "train").glob("*/*"))
    assert len(links) == 8
    for p in links:
        assert p.is_symlink()
        target = os.readlink(p)
        assert os.path.isabs(target)
        assert target == str(root / "train" / p.parent.name / p.name)
        assert Path(target).is_file()
    assert (out / "val").is_symlink() and os.readlink(out / "val") == str(root / "val")
    m = json.loads((out / "MANIFEST.json").read_text())
    assert (m["mode"], m["root"], m["num_images"]) == ("link", str(root), 8)
    assert sorted(os.listdir(out)) == ["MANIFEST.json", "train", "val"]


def test_link_mode_without_val(tmp_path):
    root = make_root(tmp_path, val=False)
    out = tmp_path / "linked"
    run_main("--root", root, "--out", out, "--per_class", 1)
    assert sorted(os.listdir(out)) == ["MANIFEST.json", "train"]


def test_copy_mode(root, tmp_path):
    out = tmp_path / "copied"
    run_main("--root", root, "--out", out, "--percent", 50, "--mode", "copy")
    files = sorted((out / "train").glob("*/*"))
    assert len(files) == 14
    for p in files:
        assert p.is_file() and not p.is_symlink()
        assert p.read_bytes() == (root / "train" / p.parent.name / p.name).read_bytes()
    assert json.loads((out / "MANIFEST.json").read_text())["mode"] == "copy"


def test_list_mode(root, tmp_path):
    out = tmp_path / "lists" / "sub.txt"  # parent dir is created
    run_main("--root", root, "--out", out, "--per_class", 3, "--mode", "list")
    names = read_list(out)
    assert names == sorted(names) and len(names) == 12
    assert out.is_file() and Path(str(out) + ".json").is_file()
    assert sorted(os.listdir(out.parent)) == ["sub.txt", "sub.txt.json"]


def test_list_of_names_repeated_across_classes_is_read_by_probe(tmp_path):
    """CIFAR-style folders: the same file name in several classes is written class/name (a bare name would be
    ambiguous), a name found in one class alone stays bare; probe.py --train_list selects exactly these files."""
    import probe
    root = tmp_path / "cifar"
    for cls, names in {"cat": ["0001.jpg", "0002.jpg", "0003.jpg"],
                       "dog": ["0001.jpg", "0002.jpg", "0004.jpg"]}.items():
        (root / "train" / cls).mkdir(parents=True)
        for n in names:
            (root / "train" / cls / n).write_bytes(f"{cls} {n}".encode())
    out = tmp_path / "sub.txt"
    run_main("--root", root, "--out", out, "--per_class", 3, "--mode", "list")
    lines = read_list(out)
    assert lines == ["0003.jpg", "0004.jpg", "cat/0001.jpg", "cat/0002.jpg", "dog/0001.jpg", "dog/0002.jpg"]
    m = json.loads(Path(str(out) + ".json").read_text())
    assert m["files_sha256"] == hashlib.sha256("".join(f"{n}\n" for n in lines).encode()).hexdigest()
    samples, classes = probe.scan_image_folder(str(root / "train"))
    chosen = probe.select_train(samples, classes, str(out), 0, 0)
    assert sorted(os.path.relpath(samples[i][0], root / "train") for i in chosen) == sorted(
        f"{c}/{n}" for c, names in (("cat", ["0001.jpg", "0002.jpg", "0003.jpg"]),
                                    ("dog", ["0001.jpg", "0002.jpg", "0004.jpg"]))
        for n in names)


@pytest.mark.parametrize("seed,per_class", [(0, 5), (3, 2)])
def test_probe_per_class_draws_the_same_images_as_lowshot_subsets(tmp_path, seed, per_class):
    """The one rule for "N per class, seed S": probe.py --per_class N --seed S picks the files lowshot_subsets.py
    --per_class N --seed S lists (per class, the smallest sha256(seed/class/name)); before, two different draws."""
    import probe
    root = tmp_path / "r"
    for c in ("a", "b", "c"):
        (root / "train" / c).mkdir(parents=True)
        for i in range(9):
            (root / "train" / c / f"{c}{i:02d}.{'png' if i % 3 else 'jpg'}").write_bytes(b"x")
    out = tmp_path / "sub.txt"
    run_main("--root", root, "--out", out, "--per_class", per_class, "--seed", seed, "--mode", "list")
    samples, classes = probe.scan_image_folder(str(root / "train"))
    chosen = probe.select_train(samples, classes, "", per_class, seed)
    assert sorted(os.path.basename(samples[i][0]) for i in chosen) == read_list(out)


@pytest.mark.parametrize("inside", [".", "val/sub", "other/x.txt"])
def test_out_inside_the_root_is_refused(root, inside):
    r = run_cli("--root", root, "--out", root / inside, "--per_class", 1,
                "--mode", "list" if inside.endswith(".txt") else "link")
    assert_one_line_error(r, "must not be the root", "inside it")
    assert sorted(os.listdir(root)) == ["train", "val"] and os.listdir(root / "val") == ["n00000001"]


@pytest.mark.parametrize("mode", ["link", "list"])
def test_output_gets_ordinary_permissions(root, tmp_path, mode):
    out = tmp_path / ("o.txt" if mode == "list" else "o")
    old = os.umask(0o022)
    try:
        run_main("--root", root, "--out", out, "--per_class", 1, "--mode", mode)
    finally:
        os.umask(old)
    assert oct(os.stat(out).st_mode & 0o777) == ("0o644" if mode == "list" else "0o755")


# ---- idempotency and refusing to mix -------------------------------------------------

@pytest.mark.parametrize("mode", ["link", "list"])
def test_second_run_is_a_noop(root, tmp_path, mode):
    out = tmp_path / ("o.txt" if mode == "list" else "o")
    args = ("--root", root, "--out", out, "--per_class", 2, "--mode", mode)
    r1 = run_cli(*args)
    assert r1.returncode == 0, r1.stderr
    manifest = Path(str(out) + ".json") if mode == "list" else out / "MANIFEST.json"
    before = (os.stat(out).st_ino, os.stat(manifest).st_mtime_ns, manifest.read_text(),
              read_list(out) if mode == "list" else tree_files(out))
    r2 = run_cli(*args)
    assert r2.returncode == 0, r2.stderr
    assert "nothing to do" in r2.stdout
    after = (os.stat(out).st_ino, os.stat(manifest).st_mtime_ns, manifest.read_text(),
             read_list(out) if mode == "list" else tree_files(out))
    assert before == after


@pytest.mark.parametrize("mode", ["link", "list"])
def test_refuses_different_existing_output(root, tmp_path, mode):
    out = tmp_path / ("o.txt" if mode == "list" else "o")
    assert run_cli("--root", root, "--out", out, "--per_class", 1, "--mode", mode).returncode == 0
    r = run_cli("--root", root, "--out", out, "--per_class", 2, "--mode", mode)
    assert_one_line_error(r, "different subset", "per_class")
    got = read_list(out) if mode == "list" else tree_files(out)
    assert len(got) == 4  # still the first output, untouched


def test_refuses_dir_with_unexpected_content(root, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "something.txt").write_text("mine")
    r = run_cli("--root", root, "--out", out, "--per_class", 1)
    assert_one_line_error(r, "MANIFEST.json")
    assert os.listdir(out) == ["something.txt"]


def test_refuses_tampered_tree_with_same_manifest(root, tmp_path):
    out = tmp_path / "o"
    run_main("--root", root, "--out", out, "--per_class", 2)
    next((out / "train" / "n00000002").iterdir()).unlink()
    r = run_cli("--root", root, "--out", out, "--per_class", 2)
    assert_one_line_error(r, "files differ", "n00000002")


def test_empty_existing_out_dir_is_filled(root, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    run_main("--root", root, "--out", out, "--per_class", 1)
    assert len(tree_files(out)) == 4


def test_crash_leaves_no_output(root, tmp_path, monkeypatch):
    calls = []

    def failing_symlink(src, dst):
        calls.append(src)
        if len(calls) > 3:
            raise OSError(28, "No space left on device", dst)
        os_symlink(src, dst)

    os_symlink = os.symlink
    monkeypatch.setattr(lowshot_subsets.os, "symlink", failing_symlink)
    out = tmp_path / "outs" / "o"
    with pytest.raises(SystemExit) as e:
        lowshot_subsets.main(["--root", str(root), "--out", str(out), "--per_class", "2"])
    assert e.value.code == 2
    assert os.listdir(out.parent) == []  # no OUT, no leftover temp dir


# ---- error cases -------------------------------------------------------------------

def test_missing_names_fail_with_count(root, tmp_path):
    ok = ["n00000001_1.JPEG", "n00000002_2.JPEG"]
    gone = ["n00000001_99.JPEG", "n00000002_42.JPEG", "n09999999_1.JPEG"]
    split = write_split(tmp_path / "split.txt", ok + gone)
    out = tmp_path / "o"
    r = run_cli("--root", root, "--out", out, "--split_file", split)
    assert_one_line_error(r, "3 of 5 names", "n00000001_99.JPEG", "n09999999_1.JPEG", "--allow_missing")
    assert not out.exists()


def test_allow_missing_continues_and_reports(root, tmp_path):
    split = write_split(tmp_path / "split.txt", ["n00000001_1.JPEG", "n00000002_2.JPEG", "n00000001_99.JPEG"])
    out = tmp_path / "o"
    r = run_cli("--root", root, "--out", out, "--split_file", split, "--allow_missing")
    assert r.returncode == 0, r.stderr
    assert "skipping 1 of 3" in r.stdout
    assert tree_files(out) == ["n00000001_1.JPEG", "n00000002_2.JPEG"]
    m = json.loads((out / "MANIFEST.json").read_text())
    assert (m["missing"], m["num_images"]) == (1, 2)


def test_duplicate_names_fail(root, tmp_path):
    split = write_split(tmp_path / "split.txt", ["n00000001_1.JPEG", "n00000002_2.JPEG", "n00000001_1.JPEG"])
    r = run_cli("--root", root, "--out", tmp_path / "o", "--split_file", split)
    assert_one_line_error(r, "1 duplicated", "n00000001_1.JPEG")


def test_bad_line_fails(root, tmp_path):
    split = write_split(tmp_path / "split.txt", ["n00000001_1.JPEG", "n00000002-2.JPEG"])
    r = run_cli("--root", root, "--out", tmp_path / "o", "--split_file", split)
    assert_one_line_error(r, "line 2", "n00000002-2.JPEG")


def test_root_without_train_fails(tmp_path):
    (tmp_path / "notimagenet" / "val").mkdir(parents=True)
    r = run_cli("--root", tmp_path / "notimagenet", "--out", tmp_path / "o", "--per_class", 1)
    assert_one_line_error(r, "no train/")


def test_unwritable_out_fails(root, tmp_path):
    # a regular file in the parent path makes OUT unwritable even for root
    (tmp_path / "afile").write_text("x")
    for mode in ("link", "list"):
        r = run_cli("--root", root, "--out", tmp_path / "afile" / "o", "--per_class", 1, "--mode", mode)
        assert_one_line_error(r, "afile")
