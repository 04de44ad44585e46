"""prepare_dataset.py: download (against a real local HTTP server), split, errors, loader."""
import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import threading
import zipfile

import numpy as np
import pytest
import torch

import prepare_dataset as pd
from prepare_dataset import ByteDataset, DataError, sliding_windows, split_sizes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXCERPT = os.path.join(ROOT, "..", "shared", "data", "enwik8_excerpt.txt")


def make_source(n=300_000, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def make_zip(data, names=("enwik8",)):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:  # stored: keeps the zip ~ the data size
        for name in names:
            z.writestr(name, data)
    return buf.getvalue()


class Server:
    """http.server on 127.0.0.1 serving one blob, with Range support and an optional truncated
    first response (headers promise the full length, the body stops halfway, the socket closes)."""

    def __init__(self, blob, truncate_first=False):
        self.blob, self.truncate_first, self.requests = blob, truncate_first, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                outer.requests.append(rng)
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                body = outer.blob[start:]
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.truncate_first and len(outer.requests) == 1:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/enwik8.zip"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def check_splits(out_dir, data):
    n_train, n_val, n_test = split_sizes(len(data))
    expect = {"train": data[:n_train], "val": data[n_train:n_train + n_val], "test": data[n_train + n_val:]}
    meta = json.load(open(os.path.join(out_dir, "meta.json")))
    assert meta["vocab_size"] == 256 and meta["dtype"] == "uint8"
    for name, want in expect.items():
        got = open(os.path.join(out_dir, f"{name}.bin"), "rb").read()
        assert got == want, name
        assert meta["splits"][name]["sha256"] == hashlib.sha256(want).hexdigest()
        assert meta["splits"][name]["bytes"] == len(want)
    assert n_train + n_val + n_test == len(data)


def test_split_sizes_rule():
    assert split_sizes(100_000_000) == (90_000_000, 5_000_000, 5_000_000)
    assert split_sizes(1019) == (1019 - 2 * 50, 50, 50)


@pytest.mark.parametrize("truncate_first", [False, True])
def test_download_from_local_server(tmp_path, truncate_first):
    data = make_source()
    blob = make_zip(data)
    srv = Server(blob, truncate_first=truncate_first)
    try:
        out = tmp_path / "data" / "enwik8"
        rc = pd.main(["--url", srv.url, "--sha256", hashlib.sha256(blob).hexdigest(),
                      "--out_dir", str(out), "--backoff", "0.01"])
    finally:
        srv.close()
    assert rc == 0
    check_splits(out, data)
    if truncate_first:  # the second request resumed from where the first stopped
        assert srv.requests[0] is None and srv.requests[1].startswith("bytes=")
        resumed_at = int(srv.requests[1][6:-1])
        assert 0 < resumed_at <= len(blob) // 2
    assert (out / "enwik8.zip").read_bytes() == blob  # inside --out_dir: nothing written beside it
    assert not (out / "enwik8.zip.part").exists() and sorted(os.listdir(tmp_path / "data")) == ["enwik8"]


def test_download_checksum_mismatch_leaves_nothing(tmp_path, capsys):
    blob = make_zip(make_source())
    srv = Server(blob)
    try:
        out = tmp_path / "data" / "enwik8"
        rc = pd.main(["--url", srv.url, "--sha256", "0" * 64, "--out_dir", str(out)])
    finally:
        srv.close()
    err = capsys.readouterr().err
    assert rc == 1 and "checksum mismatch" in err and "0" * 64 in err
    assert hashlib.sha256(blob).hexdigest() in err
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.part"))
    assert not list(tmp_path.rglob("*.zip"))


def test_no_network_says_how_to_go_offline(tmp_path, capsys):
    rc = pd.main(["--url", "http://127.0.0.1:9/enwik8.zip", "--out_dir", str(tmp_path / "d"),
                  "--retries", "2", "--backoff", "0.01"])
    err = capsys.readouterr().err
    assert rc == 1 and "--input" in err and "Traceback" not in err


@pytest.mark.parametrize("as_zip", [False, True])
def test_input_file_and_idempotence(tmp_path, capsys, as_zip):
    data = make_source(50_000, seed=1)
    src = tmp_path / ("in.zip" if as_zip else "in.txt")
    src.write_bytes(make_zip(data) if as_zip else data)
    out = tmp_path / "out"
    assert pd.main(["--input", str(src), "--out_dir", str(out)]) == 0
    check_splits(out, data)
    mtime = os.path.getmtime(out / "train.bin")
    capsys.readouterr()
    assert pd.main(["--input", str(src), "--out_dir", str(out)]) == 0
    assert "already prepared" in capsys.readouterr().out
    assert os.path.getmtime(out / "train.bin") == mtime
    # a damaged split is not "complete": it is redone
    (out / "val.bin").write_bytes(b"x")
    assert pd.main(["--input", str(src), "--out_dir", str(out)]) == 0
    check_splits(out, data)
    # another source over a complete dir needs --force
    other = tmp_path / "other.txt"
    other.write_bytes(data[::-1])
    assert pd.main(["--input", str(other), "--out_dir", str(out)]) == 1
    assert pd.main(["--input", str(other), "--out_dir", str(out), "--force"]) == 0
    check_splits(out, data[::-1])


def _bad(tmp_path, name, content):
    p = tmp_path / name
    p.write_bytes(content)
    return str(p)


@pytest.mark.parametrize("case,needle", [
    ("empty", "empty"),
    ("small", "at least"),
    ("zip_none", "exactly one file"),
    ("zip_two", "exactly one file"),
    ("missing", "does not exist"),
    ("sha", "checksum mismatch"),
    ("unwritable", "cannot write"),
])
def test_bad_inputs_one_line_error_no_output(tmp_path, case, needle):
    out = tmp_path / "out"
    args = ["--out_dir", str(out)]
    if case == "empty":
        args += ["--input", _bad(tmp_path, "e.txt", b"")]
    elif case == "small":
        args += ["--input", _bad(tmp_path, "s.txt", b"abc" * 100)]
    elif case == "zip_none":
        buf = io.BytesIO()
        zipfile.ZipFile(buf, "w").close()
        args += ["--input", _bad(tmp_path, "z.zip", buf.getvalue())]
    elif case == "zip_two":
        args += ["--input", _bad(tmp_path, "z.zip", make_zip(b"a" * 5000, names=("a", "b")))]
    elif case == "missing":
        args += ["--input", str(tmp_path / "nope.txt")]
    elif case == "sha":
        args += ["--input", _bad(tmp_path, "ok.txt", b"a" * 5000), "--sha256", "ab" * 32]
    elif case == "unwritable":
        blocker = _bad(tmp_path, "file", b"")  # a regular file where a directory is needed
        args = ["--input", _bad(tmp_path, "ok.txt", b"a" * 5000), "--out_dir", os.path.join(blocker, "sub")]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_dataset.py"), *args],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("meta.json"))


# ----------------------------------------------------------------------------- loader

@pytest.fixture
def dataset(tmp_path):
    data = make_source(20_000, seed=2)
    pd.write_splits(data, str(tmp_path), "test")
    return ByteDataset(str(tmp_path)), data


def test_batches_are_slices_and_reproducible(dataset):
    ds, data = dataset
    n_train = split_sizes(len(data))[0]
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    x, y = ds.get_batch("train", 8, 32, g)
    assert x.dtype == torch.int64 and x.shape == (8, 32)
    train = np.frombuffer(data[:n_train], dtype=np.uint8)
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        hits = [s for s in range(n_train - 32) if np.array_equal(train[s:s + 32], row_x)]
        assert hits, "x is not a slice of train.bin"
        assert np.array_equal(train[hits[0] + 1:hits[0] + 33], row_y)
    x2, _ = ds.get_batch("train", 8, 32, g)
    assert not torch.equal(x, x2)
    g.set_state(state)
    x3, y3 = ds.get_batch("train", 8, 32, g)
    assert torch.equal(x, x3) and torch.equal(y, y3)


def test_val_windows_are_fixed(dataset):
    ds, _ = dataset
    a = ds.val_windows(64, 10)
    assert a == ds.val_windows(64, 10) and len(a) == 10
    assert a[0] == 0 and a[-1] == len(ds.splits["val"]) - 65


@pytest.mark.parametrize("n,block,stride", [(1000, 64, 32), (1000, 64, 64), (1000, 64, 1),
                                            (65, 64, 32), (30, 64, 16), (1001, 100, 37)])
def test_sliding_windows_score_every_target_once(n, block, stride):
    counts = np.zeros(n, dtype=int)
    for start, length, n_score in sliding_windows(n, block, stride):
        assert 1 <= length <= block and 1 <= n_score <= length and start + length <= n - 1
        targets = np.arange(start + 1, start + 1 + length)
        counts[targets[length - n_score:]] += 1
    assert counts[0] == 0 and (counts[1:] == 1).all()


def test_minimal_foreign_dataset_loads(tmp_path):
    for name in ("train", "val", "test"):
        (tmp_path / f"{name}.bin").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "meta.json").write_text('{"vocab_size": 256, "dtype": "uint8"}')
    ds = ByteDataset(str(tmp_path))
    assert ds.splits["val"][:3].tolist() == [0, 1, 2]


@pytest.mark.parametrize("setup,needle", [("nothing", "prepare_dataset.py"), ("vocab", "vocab_size"),
                                          ("missing", "test.bin")])
def test_loader_errors_name_dir_and_fix(tmp_path, setup, needle):
    if setup != "nothing":
        vocab = 50257 if setup == "vocab" else 256
        (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": vocab, "dtype": "uint8"}))
        for name in ("train", "val"):
            (tmp_path / f"{name}.bin").write_bytes(b"ab" * 100)
    with pytest.raises(DataError) as e:
        ByteDataset(str(tmp_path))
    assert needle in str(e.value) and str(tmp_path) in str(e.value)


@pytest.mark.skipif(not os.path.exists(EXCERPT), reason="../shared/data/enwik8_excerpt.txt not present")
def test_real_excerpt(tmp_path):
    assert pd.main(["--input", EXCERPT, "--out_dir", str(tmp_path)]) == 0
    data = open(EXCERPT, "rb").read()
    check_splits(tmp_path, data)
    ds = ByteDataset(str(tmp_path))
    assert bytes(ds.splits["test"][:]) == data[-(len(data) // 20):]


# ----------------------------------------------------------------------------- nothing lost, nothing silently wrong

def test_bundled_excerpt_builds_from_the_repository_alone(tmp_path):
    """The shipped excerpt (assets/) prepares offline, without ../shared, into splits whose bytes match
    the sha256 recorded for the text inside."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_dataset.py"), "--bundled"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "data" / "excerpt"
    text = b"".join((out / f"{n}.bin").read_bytes() for n in ("train", "val", "test"))
    assert hashlib.sha256(text).hexdigest() == pd.BUNDLED_RAW_SHA256 and len(text) == 5_020_103
    assert text.count(b"[[") > 10_000  # wiki markup, not random bytes
    check_splits(out, text)
    assert os.path.getsize(pd.BUNDLED_PATH) <= 2 * 2 ** 20
    assert sorted(os.listdir(out)) == ["meta.json", "test.bin", "train.bin", "val.bin"]  # no temp left


def test_download_stays_inside_out_dir(tmp_path):
    """--url .../small.txt --out_dir X/data once saved the download as X/small.txt, over a user's file."""
    data = make_source(20_000, seed=5)
    (tmp_path / "small.txt").write_bytes(b"the user's own file")
    srv = Server(data)
    srv.url = srv.url.replace("enwik8.zip", "small.txt")
    try:
        assert pd.main(["--url", srv.url, "--out_dir", str(tmp_path / "data"), "--backoff", "0.01"]) == 0
    finally:
        srv.close()
    assert (tmp_path / "small.txt").read_bytes() == b"the user's own file"
    check_splits(tmp_path / "data", data)


def test_foreign_dataset_dir_is_not_replaced_without_force(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    for name, content in (("train.bin", b"theirs-train"), ("val.bin", b"theirs-val"), ("meta.pkl", b"pkl")):
        (out / name).write_bytes(content)
    src = tmp_path / "in.txt"
    src.write_bytes(make_source(20_000))
    assert pd.main(["--input", str(src), "--out_dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "did not write" in err and "--force" in err and "meta.pkl" in err
    assert (out / "train.bin").read_bytes() == b"theirs-train" and not (out / "meta.json").exists()
    assert pd.main(["--input", str(src), "--out_dir", str(out), "--force"]) == 0
    check_splits(out, src.read_bytes())


def test_force_onto_a_full_disk_keeps_the_old_dataset(tmp_path, monkeypatch, capsys):
    import errno
    old, new = make_source(20_000, seed=1), make_source(30_000, seed=2)
    (tmp_path / "a.txt").write_bytes(old)
    (tmp_path / "b.txt").write_bytes(new)
    out = tmp_path / "out"
    assert pd.main(["--input", str(tmp_path / "a.txt"), "--out_dir", str(out)]) == 0
    real = pd._write_synced

    def full(path, data):
        if "val.bin" in path:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(pd, "_write_synced", full)
    assert pd.main(["--input", str(tmp_path / "b.txt"), "--out_dir", str(out), "--force"]) == 1
    assert "No space left" in capsys.readouterr().err
    check_splits(out, old)  # the old dataset is complete and still loads
    ByteDataset(str(out))
    assert sorted(os.listdir(out)) == ["meta.json", "test.bin", "train.bin", "val.bin"]


@pytest.mark.parametrize("kind", ["truncated", "not_a_zip"])
def test_broken_zip_is_an_error_not_raw_bytes(tmp_path, kind, capsys):
    blob = make_zip(make_source(20_000))
    src = tmp_path / "in.zip"
    src.write_bytes(blob[: len(blob) // 2] if kind == "truncated" else b"plain text, " * 500)
    assert pd.main(["--input", str(src), "--out_dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "not a valid zip" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "train.bin").exists() and not list(tmp_path.rglob(".input.tmp.*"))


def test_zip_with_bad_crc_is_refused(tmp_path, capsys):
    data = make_source(20_000)
    blob = bytearray(make_zip(data))
    i = bytes(blob).index(data[:64])
    blob[i + 100] ^= 0xFF  # flip one byte of the stored member: its CRC no longer matches
    src = tmp_path / "in.zip"
    src.write_bytes(bytes(blob))
    assert pd.main(["--input", str(src), "--out_dir", str(tmp_path / "out")]) == 1
    assert "not a valid zip" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.bin"))


def test_changed_input_is_not_split_again_without_force(tmp_path, capsys):
    # re-splitting once silently changed the test set under finished runs
    src = tmp_path / "in.txt"
    first = make_source(20_000, seed=1)
    src.write_bytes(first)
    out = tmp_path / "out"
    assert pd.main(["--input", str(src), "--out_dir", str(out)]) == 0
    src.write_bytes(make_source(20_000, seed=9))  # same name, same size, other bytes
    capsys.readouterr()
    assert pd.main(["--input", str(src), "--out_dir", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "changed" in err and "--force" in err
    check_splits(out, first)  # the old split is intact
    assert pd.main(["--input", str(src), "--out_dir", str(out), "--force"]) == 0
    check_splits(out, src.read_bytes())
    assert json.load(open(out / "meta.json"))["input_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()


def test_temp_files_of_a_killed_prepare_are_removed_by_the_next(tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_bytes(make_source(20_000, seed=1))
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs, as a killed prepare_dataset.py leaves behind
    stale = [out / f"train.bin.tmp.{dead.pid}", out / f".input.tmp.{dead.pid}"]
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    live = out / f"val.bin.tmp.{alive.pid}"  # a live process's temp file stays
    for p in stale + [live]:
        p.write_bytes(b"x" * 100)
    try:
        assert pd.main(["--input", str(src), "--out_dir", str(out)]) == 0
    finally:
        alive.kill()
    assert not any(p.exists() for p in stale) and live.exists()
    assert "removed" in capsys.readouterr().out


@pytest.mark.parametrize("args,needle", [
    (["--out_dir="], "--out_dir is empty"),
    (["--url", "http://127.0.0.1:9/dir/"], "does not name a file"),
])
def test_more_bad_arguments_are_one_line_errors(tmp_path, args, needle):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_dataset.py"), *args],
                       capture_output=True, text=True, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and needle in lines[0], r.stderr


def test_meta_json_that_is_not_an_object(tmp_path):
    pd.write_splits(make_source(5000), str(tmp_path), "t")
    (tmp_path / "meta.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="not an object"):
        ByteDataset(str(tmp_path))
