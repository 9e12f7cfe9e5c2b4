"""How the stage scripts read: the method first, main one flow, the same plumbing block last in every script (each
script is copied alone with vit.py, so the copies must not drift apart), lines of at most 120 characters."""
import ast
import os

import pytest

from conftest import ROOT

TRAINING = ["mae_pretrain.py", "nnclr_head.py", "contrastive_tune.py", "probe.py"]
SCRIPTS = TRAINING + ["knn.py"]
MARKER = "# ==== plumbing: the same in every stage script below this line ===="
PART = ("# ---- training only", "# ---- end of training only ----")


def text(name):
    return open(os.path.join(ROOT, name)).read()


def block(name):
    lines = text(name).splitlines(keepends=True)
    (start,) = [i for i, line in enumerate(lines) if line.startswith("# ==== plumbing")]
    assert lines[start].rstrip("\n") == MARKER, name
    return "".join(lines[start:])


def test_the_plumbing_block_is_the_same_text_in_every_stage_script():
    full = block("mae_pretrain.py")
    for name in TRAINING[1:]:
        assert block(name) == full, f"{name}'s block differs from mae_pretrain.py's: python scripts/sync_plumbing.py"
    # knn.py: the same lines minus the marked training-only part (its two marker lines, what they enclose, and the
    # blank lines after it)
    lines = full.splitlines(keepends=True)
    (a,) = [i for i, line in enumerate(lines) if line.startswith(PART[0])]
    (b,) = [i for i, line in enumerate(lines) if line.rstrip("\n") == PART[1]]
    assert a < b and lines[b + 1] == lines[b + 2] == "\n"
    assert block("knn.py") == "".join(lines[:a] + lines[b + 3:])
    assert "def main(" not in full and 'if __name__ == "__main__":' in full  # the block ends each script


def test_nnclr_head_and_contrastive_tune_share_the_method_text():
    """The head, queue, loss, step and views of stage 2 are stage 3's too: the same source in both."""
    def part(name):
        t = text(name)
        return t[t.index("class NNCLRHead"):t.index("    return img\n", t.index("def strong_aug")) + 16]
    assert part("nnclr_head.py") == part("contrastive_tune.py")

    def crop(name):
        t = text(name)
        return t[t.index("def centre_crop"):t.index("    return [((w - s) / 2", t.index("def centre_crop"))]
    assert crop("probe.py") == crop("knn.py")


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_method_comes_first_and_main_is_one_flow(name):
    tree = ast.parse(text(name))
    defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    first = min(n.lineno for n in defs.values())
    assert first <= 60, f"{name}: the first definition is at line {first}"
    main = defs["main"]
    length = main.end_lineno - main.lineno + 1
    assert length <= {"knn.py": 60, "probe.py": 80}.get(name, 130), f"{name}: main has {length} lines"
    if name == "probe.py":  # main dispatches to the three modes
        for mode in ("evaluate_head", "logistic_regression", "train_heads"):
            assert defs[mode].end_lineno - defs[mode].lineno + 1 <= 100, mode
    # main comes after the method and the flags, before the block
    assert main.lineno < text(name).count("\n", 0, text(name).index(MARKER)) + 1
    own = {"vit"}  # each script imports nothing of the project but vit.py
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            assert not {n.split(".")[0] for n in names} & ({s[:-3] for s in SCRIPTS} - own), (name, names)


def test_lines_are_at_most_120_characters():
    long = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("out", "__pycache__")]
        for f in files:
            if f.endswith((".py", ".sh")):
                path = os.path.join(folder, f)
                long += [f"{os.path.relpath(path, ROOT)}:{i}" for i, line in enumerate(open(path), 1)
                         if len(line.rstrip("\n")) > 120]
    assert not long, f"lines over 120 characters: {long[:20]}"
