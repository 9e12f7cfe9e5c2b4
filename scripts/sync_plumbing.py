#!/usr/bin/env python3
"""Copy the plumbing block of one stage script into the others, after an edit of it.

Every stage script ends with the same block, from the line starting with MARKER on: each script is meant to be
copied alone with vit.py, so each carries its own copy, and tests/test_layout.py checks that the copies are equal.
knn.py trains nothing, so its copy leaves out the part between the two TRAINING lines.

    python scripts/sync_plumbing.py                     # from mae_pretrain.py to the other four
    python scripts/sync_plumbing.py --source probe.py   # from the script that was edited
"""
import argparse
import os
import sys

SCRIPTS = ["mae_pretrain.py", "nnclr_head.py", "contrastive_tune.py", "probe.py", "knn.py"]
MARKER = "# ==== plumbing: the same in every stage script below this line ===="
TRAINING = ("# ---- training only", "# ---- end of training only ----")


def block(text, path):
    """The text from the marker line on."""
    at = text.find("\n" + MARKER + "\n")
    if at < 0:
        sys.exit(f"error: {path} has no line {MARKER!r}")
    return text[at + 1:]


def without_training(b, path):
    """The block minus the training-only part: its two marker lines, what is between them, and the two blank lines
    after it."""
    start, end = b.find("\n" + TRAINING[0]), b.find("\n" + TRAINING[1] + "\n\n\n")
    if start < 0 or end < start:
        sys.exit(f"error: {path}: the training-only part is not marked ({TRAINING[0]!r} ... {TRAINING[1]!r})")
    return b[:start + 1] + b[end + len(TRAINING[1]) + 4:]


def expected(source_block, script, path="the source"):
    return without_training(source_block, path) if script == "knn.py" else source_block


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="mae_pretrain.py", choices=[s for s in SCRIPTS if s != "knn.py"])
    args = parser.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = block(open(os.path.join(root, args.source)).read(), args.source)
    for script in SCRIPTS:
        path = os.path.join(root, script)
        text = open(path).read()
        new = text[:len(text) - len(block(text, script))] + expected(src, script)
        if new != text:
            with open(path, "w") as f:
                f.write(new)
            print(f"updated {script}")
