"""
Build the low-shot ImageNet training subsets used for MAE-CT's low-shot probes.

Two kinds of subsets:

  official  --split_file FILE   the published split files, one training file
                                name per line (e.g. n01440764_10040.JPEG):
              * SimCLRv2 1% / 10%: google-research/simclr repository,
                folder imagenet_subsets/ (1percent.txt, 10percent.txt)
              * MSN 1 / 2 / 5 images per class, three splits each:
                facebookresearch/msn repository, folders
                imagenet_subsets1/, imagenet_subsets2/, imagenet_subsets3/
                ({1,2,5}imgs_class.txt; in split 3 the 5-per-class file is
                named 3imgs_class.txt but holds 5 images per class)
  seeded    --per_class N --seed S   N images of every class
            --percent P --seed S     P percent of every class

Output (--mode):
  link  (default) OUT/train/<wnid>/<file> symlinks to the absolute source files,
        OUT/val a symlink to ROOT/val (if it exists), OUT/MANIFEST.json
  copy  same layout, but the train files are real copies (val is still a link)
  list  OUT is a text file: the chosen file names, one per line, sorted, in the
        same format as the official split files; a name that is in several class
        dirs (CIFAR-style train/cat/0001.jpg, train/dog/0001.jpg) is written as
        class/name, as probe.py --train_list reads it; manifest in OUT + ".json"

Examples:
  python lowshot_subsets.py --root /data/imagenet --out /data/in1k_10pct \
      --split_file imagenet_subsets/10percent.txt
  python lowshot_subsets.py --root /data/imagenet --out lists/5shot_s0.txt \
      --per_class 5 --seed 0 --mode list

Standard library only. Running the same command twice is a no-op; an existing
different output is refused, never mixed or overwritten.
"""

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from fractions import Fraction

# bump when the selection rule or the output layout changes: the version is
# stored in the manifest, so an output made by another version is not reused
TOOL_VERSION = 1
MANIFEST_NAME = "MANIFEST.json"
# the extensions the stage scripts read (torchvision's, and .gif); in seeded mode only these count as images, so a
# stray README or .DS_Store in a class dir is never drawn, and probe.py --per_class draws the same files
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
SHOW = 5  # how many offending names an error message shows


def die(msg):
    # one line on stderr, exit code 2 (same as argparse's usage errors)
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def first_few(items, n=SHOW):
    items = list(items)
    more = f", ... ({len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def class_of(name):
    # ImageNet training files are named <wnid>_<number>.JPEG; the class dir is
    # everything before the first underscore
    return name.split("_", 1)[0]


def scan_class(train_dir, wnid):
    # os.scandir gets the file type from the directory listing itself (no stat
    # per file on most filesystems), so 1.28M ImageNet files scan in seconds
    try:
        with os.scandir(os.path.join(train_dir, wnid)) as it:
            return {e.name for e in it if not e.name.startswith(".") and e.is_file()}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def percent_type(s):
    try:
        p = Fraction(s)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number: {s!r}")
    if not 0 < p <= 100:
        raise argparse.ArgumentTypeError(f"must be in (0, 100], got {s}")
    return p


def positive_int(s):
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {s!r}")
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {s}")
    return n


def rank_key(seed, wnid, name):
    # Why not random.Random(seed).sample(): Python only promises that random()
    # stays the same across versions, not sample()/shuffle(). Ranking every
    # file by a SHA-256 of (seed, class, name) is the same on every machine and
    # Python version, and taking the k best-ranked files makes subsets nested:
    # with one seed, --per_class 1 is inside --per_class 2 is inside ... , and
    # --percent 1 is inside --percent 10 (like the official MSN/SimCLR files).
    return hashlib.sha256(f"{seed}/{wnid}/{name}".encode()).digest()


def percent_count(n, p):
    # P percent of a class of n images, rounded half up, at least 1:
    # 1% of 1300 -> 13, 1% of 732 -> 7, 1% of 50 -> 1 (0.5 rounds up),
    # 1% of 40 -> 1 (0.4 rounds to 0, raised to the minimum of 1).
    # Exact Fraction arithmetic, so no float rounding surprises.
    return max(1, math.floor(n * p / 100 + Fraction(1, 2)))


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Build official or seeded low-shot ImageNet training subsets.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring for where to get the official split files.",
    )
    parser.add_argument("--root", required=True, help="ImageNet root holding train/<wnid>/<file> (and val/)")
    parser.add_argument("--out", required=True, help="output root dir (link/copy) or list file (list)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--split_file", help="official split: one training file name per line")
    which.add_argument("--per_class", type=positive_int, help="seeded: N images of every class")
    which.add_argument("--percent", type=percent_type, help="seeded: P%% of every class (half up, >= 1)")
    parser.add_argument("--seed", type=int, default=None, help="seed for --per_class/--percent (default 0)")
    parser.add_argument("--mode", choices=["link", "copy", "list"], default="link")
    parser.add_argument("--short_classes", choices=["error", "all"], default=None,
                        help="classes with fewer images than asked: fail (default) or take all of them")
    parser.add_argument("--allow_missing", action="store_true",
                        help="split file names missing from the root are skipped (and counted) instead of failing")
    args = parser.parse_args(argv)
    # flags that would be silently ignored are refused instead: someone passing
    # --seed with an official split file probably expects something else
    if args.split_file is not None:
        if args.seed is not None:
            parser.error("--seed only applies to --per_class/--percent, not --split_file")
        if args.short_classes is not None:
            parser.error("--short_classes only applies to --per_class/--percent")
    else:
        if args.allow_missing:
            parser.error("--allow_missing only applies to --split_file")
        args.seed = 0 if args.seed is None else args.seed
        args.short_classes = args.short_classes or "error"
    return args


def read_split_file(path):
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a BOM
            lines = f.read().splitlines()
    except OSError as e:
        die(f"cannot read split file {path}: {e.strerror}")
    names, bad = [], []
    for lineno, line in enumerate(lines, 1):
        name = line.strip()
        if not name:
            continue
        # a bare file name <wnid>_<...>: anything with a path separator or
        # whitespace inside is some other format (e.g. "wnid/file label")
        if "_" not in name or name.startswith(("_", ".")) or "/" in name or "\\" in name or len(name.split()) > 1:
            bad.append(f"line {lineno}: {name!r}")
        else:
            names.append(name)
    if bad:
        die(f"{path}: {len(bad)} bad line(s), expected one file name like n01440764_10040.JPEG per line; "
            f"{first_few(bad)}")
    if not names:
        die(f"{path}: no file names in it")
    seen, dups = set(), []
    for name in names:
        if name in seen:
            dups.append(name)
        seen.add(name)
    if dups:
        die(f"{path}: {len(dups)} duplicated name(s): {first_few(sorted(set(dups)))}")
    return names


def check_tree(out, subset, train_dir, mode, val_target):
    """Compare an existing output tree with the expected one; return a short
    description of the first difference, or None if they match."""
    expected_top = {"train", MANIFEST_NAME} | ({"val"} if val_target else set())
    top = set(os.listdir(out))
    if top != expected_top:
        return f"top level has {sorted(top ^ expected_top)} unexpected/missing"
    if val_target and (not os.path.islink(os.path.join(out, "val"))
                       or os.readlink(os.path.join(out, "val")) != val_target):
        return "val is not a link to the source val/"
    out_train = os.path.join(out, "train")
    have_classes = set(os.listdir(out_train))
    if have_classes != set(subset):
        return f"class dirs differ: {first_few(sorted(have_classes ^ set(subset)))}"
    for wnid, names in subset.items():
        d = os.path.join(out_train, wnid)
        with os.scandir(d) as it:
            entries = {e.name: e for e in it}
        if set(entries) != set(names):
            return f"files in train/{wnid} differ: {first_few(sorted(set(entries) ^ set(names)))}"
        for name, e in entries.items():
            if mode == "link":
                if not e.is_symlink() or os.readlink(e.path) != os.path.join(train_dir, wnid, name):
                    return f"train/{wnid}/{name} is not a link to the source file"
            elif e.is_symlink() or not e.is_file():
                return f"train/{wnid}/{name} is not a regular file"
    return None


def main(argv=None):
    t0 = time.perf_counter()
    args = parse_args(argv)

    # ---- 1. the source root -------------------------------------------------
    root = os.path.abspath(args.root)
    train_dir = os.path.join(root, "train")
    if not os.path.isdir(train_dir):
        die(f"{root} has no train/ directory (expected an ImageNet-style root: train/<wnid>/<file>)")
    try:
        with os.scandir(train_dir) as it:
            root_classes = sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())
    except OSError as e:
        die(f"cannot list {train_dir}: {e.strerror}")
    val_dir = os.path.join(root, "val")
    has_val = os.path.isdir(val_dir)

    out = os.path.abspath(args.out)
    out_parent = os.path.dirname(out)
    real_root, real_out = os.path.realpath(root), os.path.realpath(out)  # through symlinks
    if real_out == real_root or real_out.startswith(real_root + os.sep):
        die(f"--out {out} must not be the root {root} or inside it")
    # fail early (before any scanning) if the output cannot be created at all
    try:
        os.makedirs(out_parent, exist_ok=True)
    except OSError as e:
        die(f"cannot create the output's parent dir {out_parent}: {e.strerror}")
    if not os.access(out_parent, os.W_OK):
        die(f"output parent dir {out_parent} is not writable")

    # ---- 2. choose the files: {wnid: sorted [file names]} -------------------
    subset = {}
    manifest_extra = {}
    if args.split_file is not None:
        split_path = os.path.abspath(args.split_file)
        names = read_split_file(split_path)
        wanted = {}
        for name in names:
            wanted.setdefault(class_of(name), []).append(name)
        missing = []
        for wnid in sorted(wanted):
            present = scan_class(train_dir, wnid)
            have = sorted(n for n in wanted[wnid] if n in present)
            missing += [n for n in wanted[wnid] if n not in present]
            if have:
                subset[wnid] = have
        missing.sort()
        if missing and not args.allow_missing:
            die(f"{len(missing)} of {len(names)} names in {split_path} are not in {train_dir} "
                f"(first few: {first_few(missing)}); pass --allow_missing to skip them")
        if missing:
            print(f"warning: skipping {len(missing)} of {len(names)} names missing from {train_dir} "
                  f"(first few: {first_few(missing)})")
        with open(split_path, "rb") as f:
            split_sha = hashlib.sha256(f.read()).hexdigest()
        source = {"split_file": split_path, "split_file_sha256": split_sha,
                  "split_file_names": len(names), "allow_missing": args.allow_missing}
        manifest_extra = {"missing": len(missing), "missing_first": missing[:10]}
    else:
        short = {}
        for wnid in root_classes:
            # sort first: the listing order of a directory is filesystem-dependent
            files = sorted(n for n in scan_class(train_dir, wnid) if n.lower().endswith(IMG_EXTENSIONS))
            k = args.per_class if args.per_class is not None else percent_count(len(files), args.percent)
            if len(files) < k:
                short[wnid] = len(files)
                k = len(files)
            ranked = sorted(files, key=lambda n: (rank_key(args.seed, wnid, n), n))
            # an empty class (0 images, only with --short_classes all) still gets
            # its (empty) dir, so ImageFolder's class numbering is not shifted
            subset[wnid] = sorted(ranked[:k])
        if not root_classes:
            die(f"{train_dir} has no class directories")
        if short:
            asked = (f"{args.per_class} per class" if args.per_class is not None
                     else f"{float(args.percent):g}% (at least 1)")
            listing = first_few([f"{w} ({n})" for w, n in sorted(short.items())])
            if args.short_classes == "error":
                die(f"{len(short)} class(es) have fewer images than asked ({asked}): {listing}; "
                    f"pass --short_classes all to take all their images")
            print(f"note: {len(short)} class(es) have fewer images than asked ({asked}); took all of them: {listing}")
        if args.per_class is not None:
            source = {"per_class": args.per_class, "seed": args.seed}
        else:
            source = {"percent": float(args.percent), "seed": args.seed}
        source["short_classes"] = args.short_classes
        manifest_extra = {"short": dict(sorted(short.items()))}

    # a name in several class dirs (CIFAR-style 0001.jpg) is class/name, in the list and in the fingerprint:
    # a bare name must pick one file (probe.py --train_list refuses it otherwise)
    chosen, dirs_of = {n for names_ in subset.values() for n in names_}, {}
    for wnid in root_classes:
        for n in scan_class(train_dir, wnid) & chosen:
            dirs_of[n] = dirs_of.get(n, 0) + 1
    files = sorted(f"{w}/{n}" if dirs_of.get(n, 0) > 1 else n for w, names_ in subset.items() for n in names_)
    num_images = len(files)
    if num_images == 0:
        die("the subset is empty")
    if args.mode != "list" and set(subset) != set(root_classes):
        print(f"warning: the subset has {len(subset)} classes but {train_dir} has {len(root_classes)}; "
              f"an ImageFolder on {out}/train will number the classes differently from the full train set")

    # ---- 3. the manifest: what was asked and what came out -------------------
    counts = [len(v) for v in subset.values()]
    hist = {}
    for c in counts:
        hist[str(c)] = hist.get(str(c), 0) + 1
    manifest = {
        "tool": "lowshot_subsets.py",
        "version": TOOL_VERSION,
        "root": root,
        "mode": args.mode,
        "val": val_dir if (has_val and args.mode != "list") else None,
        **source,
        "num_classes": len(subset),
        "num_images": num_images,
        # class counts: min/max and {images per class: number of classes}
        "per_class_counts": {"min": min(counts), "max": max(counts),
                             "histogram": dict(sorted(hist.items(), key=lambda kv: int(kv[0])))},
        # fingerprint of the chosen files, to compare subsets across machines
        "files_sha256": hashlib.sha256("".join(f"{n}\n" for n in files).encode()).hexdigest(),
        **manifest_extra,
    }
    manifest = json.loads(json.dumps(manifest))  # normalise, as it will read back
    manifest_text = json.dumps(manifest, indent=1) + "\n"
    list_text = "".join(f"{n}\n" for n in files)
    manifest_path = out + ".json" if args.mode == "list" else os.path.join(out, MANIFEST_NAME)

    # ---- 4. an existing output: identical -> done, anything else -> refuse ---
    def load_manifest(path):
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def refuse_different(old):
        if old is None:
            die(f"{out} exists but has no readable {os.path.basename(manifest_path)}; "
                f"refusing to write into it (remove it or choose another --out)")
        diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
        die(f"{out} already holds a different subset (manifest differs in: {', '.join(diff)}); "
            f"remove it or choose another --out")

    if args.mode == "list":
        if os.path.isdir(out):
            die(f"--out {out} is a directory; --mode list writes a file")
        if os.path.lexists(out):
            old = load_manifest(manifest_path)
            if old != manifest:
                refuse_different(old)
            with open(out) as f:
                if f.read() != list_text:
                    die(f"{out} has the same manifest but different contents; remove it and rerun")
            print(f"{out} already holds this subset ({num_images} images, {len(subset)} classes); nothing to do")
            return 0
        if os.path.lexists(manifest_path):
            # a manifest without its list: only a crash between the two renames
            # leaves this; finish the job if it is ours, else refuse
            old = load_manifest(manifest_path)
            if old != manifest:
                die(f"{manifest_path} exists (without {out}) and describes a different subset; remove it")
    elif os.path.lexists(out):
        if not os.path.isdir(out) or os.path.islink(out):
            die(f"--out {out} exists and is not a directory")
        entries = sorted(os.listdir(out))
        if entries:  # an empty dir (e.g. made by mkdir) is fine to fill
            old = load_manifest(manifest_path)
            if old != manifest:
                refuse_different(old)
            problem = check_tree(out, subset, train_dir, args.mode, val_dir if manifest["val"] else None)
            if problem:
                die(f"{out} has the same manifest but its files differ ({problem}); remove it and rerun")
            print(f"{out} already holds this subset ({num_images} images, {len(subset)} classes); nothing to do")
            return 0

    # ---- 5. write into a temp path next to OUT, then rename into place -------
    # A crash leaves only a hidden .<name>.tmp-* next to OUT, never a
    # half-written OUT that a rerun would take for complete.
    base = os.path.basename(out)
    umask = os.umask(0)
    os.umask(umask)  # mkstemp / mkdtemp make 0600 / 0700; the output gets the usual permissions
    tmp = None
    try:
        if args.mode == "list":
            fd, tmp = tempfile.mkstemp(prefix=f".{base}.tmp-", dir=out_parent)
            with os.fdopen(fd, "w") as f:
                f.write(list_text)
            os.chmod(tmp, 0o666 & ~umask)
            with open(tmp + ".json", "w") as f:
                f.write(manifest_text)
            os.replace(tmp + ".json", manifest_path)
            os.replace(tmp, out)  # the list appears last: its presence means done
            tmp = None
        else:
            tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=out_parent)
            os.chmod(tmp, 0o777 & ~umask)
            tmp_train = os.path.join(tmp, "train")
            os.mkdir(tmp_train)
            for wnid, names_ in subset.items():
                src_dir, dst_dir = os.path.join(train_dir, wnid), os.path.join(tmp_train, wnid)
                os.mkdir(dst_dir)
                for name in names_:
                    if args.mode == "link":
                        os.symlink(os.path.join(src_dir, name), os.path.join(dst_dir, name))
                    else:
                        shutil.copyfile(os.path.join(src_dir, name), os.path.join(dst_dir, name))
            if manifest["val"]:
                # val is the full validation set either way; never copied
                os.symlink(val_dir, os.path.join(tmp, "val"))
            with open(os.path.join(tmp, MANIFEST_NAME), "w") as f:
                f.write(manifest_text)
            # rename replaces OUT only if it is missing or an empty dir; if
            # something appeared there meanwhile it fails instead of mixing
            os.rename(tmp, out)
            tmp = None
    except OSError as e:
        die(f"cannot write {out}: {e.strerror or e} ({e.filename or out})")
    finally:
        if tmp is not None:
            if os.path.isdir(tmp) and not os.path.islink(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                for p in (tmp, tmp + ".json"):
                    if os.path.lexists(p):
                        os.remove(p)

    # ---- 6. report ------------------------------------------------------------
    what = {"link": "symlink tree", "copy": "copied tree", "list": "file list"}[args.mode]
    if args.split_file is not None:
        desc = os.path.basename(args.split_file)
    elif args.per_class is not None:
        desc = f"{args.per_class} per class, seed {args.seed}"
    else:
        desc = f"{float(args.percent):g}% per class, seed {args.seed}"
    pc = manifest["per_class_counts"]
    print(f"{desc}: {num_images} images in {len(subset)} classes "
          f"({pc['min']}-{pc['max']} per class) -> {what} {out} "
          f"[{time.perf_counter() - t0:.2f}s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
