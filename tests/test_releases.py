"""The released encoders by name, against a file server on 127.0.0.1 that serves a tiny checkpoint in the MAE-CT
release format: downloaded once into torch hub's cache, a file of that name winning, a recorded SHA-256 checked, a
cut, missing, stalled or unreachable download refused in one line that leaves nothing in the cache, one download
for concurrent loaders, and the stage scripts' --init taking a name (no real network is used)."""
import hashlib
import http.server
import os
import socket
import threading
import time

import pytest
import torch

import vit
from conftest import make_image_folder, run_script

ARGS = dict(img_size=32, patch_size=8, dim=192, depth=1, heads=3)  # width 192: 3 heads follow from the file


def release_checkpoint(path, seed=0):
    """A flat state dict with pos_embed (1, N, D), no CLS row: the MAE-CT release format. Returns its model."""
    torch.manual_seed(seed)
    m = vit.ViT(**ARGS).eval()
    sd = dict(m.state_dict())
    sd["pos_embed"] = sd["pos_embed"][:, 1:]
    torch.save(sd, path)
    return m


class Server:
    """http.server on 127.0.0.1 (a free port) serving `folder`. It records every request path; paths in `cut` get
    their full Content-Length but half the bytes before the connection closes; paths in `stall` get half the
    bytes, then silence until the server is closed; `delay` holds every response back that many seconds."""

    def __init__(self, folder):
        self.requests, self.cut, self.stall, self.delay = [], set(), set(), 0.0
        self.closing = threading.Event()
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=folder, **kw)

            def do_GET(self):
                server.requests.append(self.path)
                time.sleep(server.delay)
                if self.path not in server.cut | server.stall:
                    return super().do_GET()
                data = open(os.path.join(folder, self.path.lstrip("/")), "rb").read()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                if self.path in server.stall:
                    server.closing.wait(10)
                self.close_connection = True

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/releases"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(tmp_path, monkeypatch):
    """The server with releases/maect_base16.th, $MAECT_RELEASE_URL pointing at it, torch hub's cache under tmp."""
    folder = tmp_path / "www"
    (folder / "releases").mkdir(parents=True)
    model = release_checkpoint(folder / "releases" / "maect_base16.th")
    server = Server(str(folder))
    monkeypatch.setenv("MAECT_RELEASE_URL", server.url)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.chdir(tmp_path)
    server.model, server.file = model, str(folder / "releases" / "maect_base16.th")
    server.cache = str(tmp_path / "torch" / "hub" / "checkpoints")
    yield server
    server.close()


def cached(server):
    return sorted(os.listdir(server.cache)) if os.path.isdir(server.cache) else []


def one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def test_the_names_are_the_authors_table():
    names = {f"{k}_{s}" for k in ("maect", "maectaug") for s in ("base16", "large16", "huge16", "huge14")}
    names |= {f"mae_reimpl_{s}" for s in ("base16", "large16", "huge16")} | {"mae_huge14"}
    assert set(vit.RELEASES) == names
    for name, (url, sha256) in vit.RELEASES.items():
        assert url.startswith("https://") and (sha256 is None or len(sha256) == 64)
        if name != "mae_huge14":  # the authors' files are named as their encoders
            assert url.endswith(f"/{name}.th")
    assert vit.RELEASES["mae_huge14"][0].endswith("/mae_pretrain_vit_huge.pth")  # facebookresearch/mae's H/14


def test_the_cache_path_and_the_url_override(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("MAECT_RELEASE_URL", raising=False)
    hub = os.path.join(str(tmp_path), "hub", "checkpoints")
    assert vit.release_path("maect_base16") == os.path.join(hub, "maect_base16.th")
    assert vit.release_path("mae_huge14") == os.path.join(hub, "mae_pretrain_vit_huge.pth")
    assert vit.release_url("maect_base16") == vit.RELEASES["maect_base16"][0]
    monkeypatch.setenv("MAECT_RELEASE_URL", "http://127.0.0.1:9/mirror/")
    assert vit.release_url("maect_base16") == "http://127.0.0.1:9/mirror/maect_base16.th"
    assert vit.release_url("mae_huge14") == "http://127.0.0.1:9/mirror/mae_pretrain_vit_huge.pth"


def test_a_name_downloads_once_into_the_hub_cache(served, capsys):
    imgs = torch.randn(2, 3, 32, 32)
    enc = vit.load_encoder("maect_base16")
    assert "downloading maect_base16 from " + served.url + "/maect_base16.th" in capsys.readouterr().err
    again = vit.load_encoder("maect_base16")
    assert served.requests == ["/releases/maect_base16.th"]  # the second load read the cache
    assert cached(served) == ["maect_base16.th"]  # and no temporary file is left
    assert open(os.path.join(served.cache, "maect_base16.th"), "rb").read() == open(served.file, "rb").read()
    for e in (enc, again):
        assert e.args == ARGS and not e.training
        assert torch.equal(e(imgs), served.model(imgs))


def test_a_file_of_that_name_wins_and_an_unknown_name_lists_the_names(served):
    other = release_checkpoint("maect_base16", seed=1)  # in the working directory
    imgs = torch.randn(1, 3, 32, 32)
    assert torch.equal(vit.load_encoder("maect_base16")(imgs), other(imgs))
    assert served.requests == [] and cached(served) == []
    with pytest.raises(FileNotFoundError) as e:
        vit.load_encoder("maect_base")
    assert one_line(e).startswith("checkpoint not found: maect_base,") and "maectaug_huge14" in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        vit.load_encoder("out/ct.pt")  # a path is not listed against the names
    assert one_line(e) == "checkpoint not found: out/ct.pt"


def test_a_recorded_sha256_is_checked(served, monkeypatch):
    url = vit.RELEASES["maect_base16"][0]
    monkeypatch.setitem(vit.RELEASES, "maect_base16", (url, "0" * 64))
    with pytest.raises(ValueError) as e:
        vit.load_encoder("maect_base16", verbose=False)
    msg = one_line(e)
    digest = hashlib.sha256(open(served.file, "rb").read()).hexdigest()
    assert msg.startswith(f"maect_base16 from {served.url}/maect_base16.th has SHA-256 {digest}, not the recorded")
    assert cached(served) == []  # refused, and nothing left behind
    monkeypatch.setitem(vit.RELEASES, "maect_base16", (url, digest))
    assert vit.load_encoder("maect_base16", verbose=False).args == ARGS
    assert cached(served) == ["maect_base16.th"] and len(served.requests) == 2


@pytest.mark.parametrize("how", ["cut", "missing", "not_torch", "old_format_cut"])
def test_a_cut_missing_or_foreign_download_keeps_nothing(served, how):
    """A connection closed mid-file (a zip, or torch's old format, which is checked by reading it whole), a 404, or
    a page that is no torch file (a mirror's error page served as 200): one line naming the URL and the path."""
    whole = open(served.file, "rb").read()
    if how in ("cut", "old_format_cut"):
        served.cut.add("/releases/maect_base16.th")
        if how == "old_format_cut":
            torch.save(torch.load(served.file), served.file, _use_new_zipfile_serialization=False)
    elif how == "missing":
        os.remove(served.file)
    else:
        open(served.file, "w").write("<html>moved</html>")
    with pytest.raises(ValueError) as e:
        vit.load_encoder("maect_base16", verbose=False)
    dst = os.path.join(served.cache, "maect_base16.th")
    reason = "HTTP Error 404: File not found" if how == "missing" else \
        "the file arrived cut short or is not a torch file"
    assert one_line(e) == (f"cannot download maect_base16 from {served.url}/maect_base16.th ({reason}): "
                           f"download it by hand to {dst}")
    assert cached(served) == []
    served.cut.clear()  # the server mended: the next load downloads afresh (an old-format file, read whole, too)
    if how != "old_format_cut":
        open(served.file, "wb").write(whole)
    assert vit.load_encoder("maect_base16", verbose=False).args == ARGS
    assert cached(served) == ["maect_base16.th"] and len(served.requests) == 2


def test_a_stalled_download_times_out(served, monkeypatch):
    served.stall.add("/releases/maect_base16.th")
    monkeypatch.setattr(vit, "DOWNLOAD_TIMEOUT_S", 0.5)
    t0 = time.time()
    with pytest.raises(ValueError) as e:
        vit.load_encoder("maect_base16", verbose=False)
    assert time.time() - t0 < 8
    assert "(timed out)" in one_line(e) and cached(served) == []
    assert socket.getdefaulttimeout() is None  # the process's default is given back


def test_concurrent_loaders_download_once(served):
    """The processes of a multi-GPU run each load the encoder at once: one downloads, the others wait for it (the
    cache folder's lock; two threads hold separate descriptors, as two processes do)."""
    served.delay = 0.5  # the first download is still running when the second loader starts
    paths, errors = [], []

    def load():
        try:
            paths.append(vit.release_file("maect_base16", verbose=False))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and paths == [os.path.join(served.cache, "maect_base16.th")] * 2
    assert served.requests == ["/releases/maect_base16.th"]


def test_knn_takes_a_name_and_fails_offline_in_one_line(served, tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=2, val_per_class=2)
    argv = ["knn.py", "--data_path", data, "--init", "maect_base16", "--heads", "3", "--device", "cpu",
            "--num_workers", "0", "--crop_pct", "1", "--k", "1"]
    env = {"MAECT_RELEASE_URL": served.url, "TORCH_HOME": str(tmp_path / "torch")}
    assert "top-1" in run_script(*argv, env=env).stdout
    assert served.requests == ["/releases/maect_base16.th"]
    with socket.socket() as s:  # a port with nothing listening on it
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/releases"
    offline = dict(env, MAECT_RELEASE_URL=closed, TORCH_HOME=str(tmp_path / "empty"))
    p = run_script(*argv, env=offline, check=False)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    dst = os.path.join(str(tmp_path), "empty", "hub", "checkpoints", "maect_base16.th")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert errors == [f"error: cannot download maect_base16 from {closed}/maect_base16.th "
                      f"([Errno 111] Connection refused): download it by hand to {dst}"], p.stderr
    assert not os.path.exists(os.path.dirname(dst)) or os.listdir(os.path.dirname(dst)) == []


def test_the_training_stages_take_a_name_and_record_it(served, tmp_path):
    """nnclr_head.py and contrastive_tune.py with --init maect_base16: one download between them, and both files
    record the name (not a path in one working directory), so stage 3 sees the head's own encoder and a resume
    finds it again."""
    data = make_image_folder(tmp_path / "data", per_class=2, val_per_class=1)
    env = {"MAECT_RELEASE_URL": served.url, "TORCH_HOME": str(tmp_path / "torch")}
    common = ["--data_path", data, "--init", "maect_base16", "--batch_size", "4", "--max_iters", "1",
              "--num_workers", "0", "--device", "cpu"]
    run_script("nnclr_head.py", *common, "--out_dir", str(tmp_path / "head"), "--queue_size", "16",
               "--proj_hidden", "16", "--proj_dim", "8", "--pred_hidden", "16", env=env)
    head = str(tmp_path / "head" / "head.pt")
    p = run_script("contrastive_tune.py", *common, "--head", head, "--out_dir", str(tmp_path / "ct"), "--topk", "2",
                   env=env)
    assert "was trained on the encoder of" not in p.stderr
    assert torch.load(head, weights_only=False)["encoder_init"] == "maect_base16"
    assert torch.load(tmp_path / "ct" / "ct.pt", weights_only=False)["encoder_init"] == "maect_base16"
    assert served.requests == ["/releases/maect_base16.th"]
