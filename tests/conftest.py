"""Shared test fixtures: tiny generated image folders (tests never read real data)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_image_folder(root, classes=3, per_class=8, val_per_class=4, size=32, seed=0):
    """root/{train,val}/class_k/*.jpg|png. Each class has its own colour and stripe direction, so
    a few steps of training can tell them apart."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            d = os.path.join(root, split, f"class_{c}")
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                base = np.zeros((size, size, 3), np.float32)
                base[..., c % 3] = 160
                yy, xx = np.mgrid[:size, :size]
                stripes = np.sin((xx if c % 2 else yy) * (0.5 + 0.3 * c)) * 60
                img = base + stripes[..., None] + rng.normal(0, 20, (size, size, 3))
                ext = "png" if i % 4 == 3 else "jpg"
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(os.path.join(d, f"{i:04d}.{ext}"))
    return str(root)


def as_views(crops):
    """An ImageFolder item's crops (V x (S, S, 3) uint8, resized in the worker) -> (V, 3, S, S)."""
    return torch.stack([c.permute(2, 0, 1) for c in crops])


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "data")


def run_script(*argv, env=None, check=True, timeout=600):
    """Run a stage script as a subprocess from the repo root; returns CompletedProcess."""
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.update(env or {})
    p = subprocess.run([sys.executable, *argv], cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{argv[0]} exited {p.returncode}\nstdout:\n{p.stdout[-3000:]}\n"
                             f"stderr:\n{p.stderr[-3000:]}")
    return p


def run_torchrun(nproc, *argv, env=None, check=True, timeout=600):
    return run_script("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *argv,
                      env=env, check=check, timeout=timeout)
