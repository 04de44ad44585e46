"""
Prepare a byte-level dataset (enwik8 by default) and load it for training.

This file owns the on-disk data format, so both the writer (the command-line tool)
and the reader (`ByteDataset`, used by the trainer) live here:

    DIR/train.bin, DIR/val.bin, DIR/test.bin   raw uint8, one token per byte
    DIR/meta.json                              {"vocab_size": 256, "dtype": "uint8", ...}

Split rule (Transformer-XL / adaptive-span convention): for n bytes,
n_val = n_test = n // 20 and train is the first n - 2*(n // 20) bytes, then val, then
test, in file order. For enwik8 that is exactly 90M / 5M / 5M.

    python prepare_dataset.py                         # download + verify + split enwik8
    python prepare_dataset.py --input FILE --out_dir data/NAME   # any local file or zip
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import zipfile

import numpy as np

__version__ = "1.0"

ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
ENWIK8_ZIP_SHA256 = "547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc"
ENWIK8_ZIP_SIZE = 36_445_475
ENWIK8_SIZE = 100_000_000
ENWIK8_MD5 = "a1fa5ffddb56f4953e226637dabbb36a"
MIN_BYTES = 1000  # below this a 5% val/test split is meaningless
SPLITS = ("train", "val", "test")
TOOL = "prepare_dataset.py"
DATASET_FILES = ("train.bin", "val.bin", "test.bin", "meta.json", "meta.pkl")  # another tool's too
ZIP_MAGIC = b"PK\x03\x04"
XZ_MAGIC = b"\xfd7zXZ\x00"
# Shipped with the repository (assets/README.md: source and licence), so the main job runs offline.
BUNDLED_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "enwik8_excerpt.txt.xz")
BUNDLED_SHA256 = "4971a0966fac948a8c84e4926fc64ee6ffcfab0b1481baa9ad34cb70f825d47e"  # of the .xz file
BUNDLED_RAW_SHA256 = "3ae49930b603e7b98128e45789d586aa093b83769fcaf4a0e6da493395444c1c"  # of the text inside


class DataError(Exception):
    """A user-facing problem with the data: printed as one line, never a traceback."""


# ----------------------------------------------------------------------------- split

def split_sizes(n):
    """(n_train, n_val, n_test) for n bytes: val = test = n // 20, train = the rest."""
    n_hold = n // 20
    return n - 2 * n_hold, n_hold, n_hold


def sha256_of(data_or_path, chunk=1 << 22):
    h = hashlib.sha256()
    if isinstance(data_or_path, (bytes, bytearray, memoryview)):
        h.update(data_or_path)
    else:
        with open(data_or_path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def _write_synced(path, data):
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def remove_stale_temps(out_dir):
    """Delete temp files (NAME.tmp.PID) that a killed process left in out_dir (a run's or a dataset's); a live
    process's stay."""
    removed = []
    for name in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        base, sep, pid = name.rpartition(".tmp.")
        if not sep or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # that process is alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        os.remove(os.path.join(out_dir, name))
        removed.append(name)
    return removed


def write_splits(data, out_dir, source, input_sha256=None, extra_meta=None):
    """Split `data` (bytes or a uint8 buffer) into out_dir/{train,val,test}.bin and meta.json.

    Every file is first written in full under a temp name; only then are they renamed into place
    (meta.json last). A failure on the way (disk full, Ctrl-C) leaves the previous dataset complete."""
    n = len(data)
    if n == 0:
        raise DataError(f"the input {source} is empty: nothing to split")
    if n < MIN_BYTES:
        raise DataError(f"the input {source} has only {n} bytes; at least {MIN_BYTES} are needed "
                        f"for a 90/5/5 split")
    n_train, n_val, n_test = split_sizes(n)
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}
    meta = {"vocab_size": 256, "dtype": "uint8", "source": source, "total_bytes": n,
            "input_sha256": input_sha256, "split_rule": "val = test = n // 20, train = rest, in file order",
            "tool": f"{TOOL} {__version__}", "splits": {}, **(extra_meta or {})}
    view = memoryview(data)
    meta_path = os.path.join(out_dir, "meta.json")
    staged = {}
    try:
        os.makedirs(out_dir, exist_ok=True)
        for name in SPLITS:
            a, b = bounds[name]
            staged[name] = os.path.join(out_dir, f"{name}.bin.tmp.{os.getpid()}")
            _write_synced(staged[name], view[a:b])
            meta["splits"][name] = {"bytes": b - a, "sha256": sha256_of(view[a:b]), "offset": a}
        staged["meta"] = f"{meta_path}.tmp.{os.getpid()}"
        _write_synced(staged["meta"], (json.dumps(meta, indent=2) + "\n").encode())
        if os.path.exists(meta_path):  # incomplete from here until the last rename
            os.remove(meta_path)
        for name in SPLITS:
            os.replace(staged.pop(name), os.path.join(out_dir, f"{name}.bin"))
        os.replace(staged.pop("meta"), meta_path)
    except OSError as e:
        raise DataError(f"cannot write to --out_dir {out_dir}: {e.strerror or e}; "
                        f"choose a writable directory with space for {n:,} bytes") from None
    finally:
        for tmp in staged.values():
            if os.path.exists(tmp):
                os.remove(tmp)
    return meta


def is_complete(out_dir):
    """The meta.json of out_dir, if it and all three splits exist and match their sha256."""
    try:
        with open(os.path.join(out_dir, "meta.json")) as f:
            meta = json.load(f)
        for name in SPLITS:
            rec = meta["splits"][name]
            path = os.path.join(out_dir, f"{name}.bin")
            if os.path.getsize(path) != rec["bytes"] or sha256_of(path) != rec["sha256"]:
                return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def written_by_us(out_dir):
    """True if out_dir holds no dataset files, or its meta.json was written by this tool."""
    present = [f for f in DATASET_FILES if os.path.lexists(os.path.join(out_dir, f))]
    if not present:
        return True
    try:
        with open(os.path.join(out_dir, "meta.json")) as f:
            meta = json.load(f)
        return isinstance(meta, dict) and str(meta.get("tool", "")).startswith(TOOL)
    except (OSError, ValueError):
        return False


# ----------------------------------------------------------------------------- download

def download(url, dest, sha256=None, retries=5, backoff_s=1.0, timeout_s=30.0):
    """Stream `url` into `dest`, resuming from `dest`.part with HTTP Range requests.

    The file only gets its final name after its sha256 matched (when one is given).
    """
    import requests
    from tqdm import tqdm

    part = dest + ".part"
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    last_err = None
    for attempt in range(retries):
        have = os.path.getsize(part) if os.path.exists(part) else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with requests.get(url, stream=True, headers=headers, timeout=timeout_s) as r:
                if r.status_code == 416:  # we already have every byte
                    break
                if r.status_code >= 500:
                    raise requests.HTTPError(f"HTTP {r.status_code}", response=r)
                if r.status_code >= 400:
                    raise DataError(f"download of {url} failed with HTTP {r.status_code}; "
                                    f"check --url, or use --input PATH with a local copy")
                if r.status_code == 200 and have:  # server ignored Range: start over
                    have = 0
                length = r.headers.get("Content-Length")
                total = have + int(length) if length is not None else None
                mode = "ab" if have else "wb"
                with open(part, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                                 unit_divisor=1024, desc=os.path.basename(dest),
                                                 file=sys.stderr, disable=None) as bar:
                    for chunk in r.iter_content(chunk_size=1 << 16):
                        f.write(chunk)
                        bar.update(len(chunk))
            break
        except (requests.ConnectionError, requests.Timeout, requests.HTTPError,
                requests.exceptions.ChunkedEncodingError) as e:
            last_err = e
            if attempt + 1 < retries:
                wait = backoff_s * 2 ** attempt
                print(f"download interrupted ({type(e).__name__}); retrying in {wait:.1f}s "
                      f"({attempt + 2}/{retries})", file=sys.stderr)
                time.sleep(wait)
    else:
        raise DataError(f"could not download {url} after {retries} tries ({type(last_err).__name__}: "
                        f"no network?); download enwik8.zip elsewhere and run "
                        f"`python prepare_dataset.py --input enwik8.zip`")
    if sha256 is not None:
        got = sha256_of(part)
        if got != sha256.lower():
            os.remove(part)
            raise DataError(f"checksum mismatch for {url}: expected sha256 {sha256.lower()}, got {got}; "
                            f"the download was removed")
    os.replace(part, dest)
    return dest


# ----------------------------------------------------------------------------- input

def looks_like_zip(path):
    with open(path, "rb") as f:
        head = f.read(4)
    return head == ZIP_MAGIC or path.lower().endswith(".zip")


def looks_like_xz(path):
    with open(path, "rb") as f:
        head = f.read(6)
    return head == XZ_MAGIC or path.lower().endswith(".xz")


def _unpack(path, scratch_dir, open_member, errors, what):
    """Stream the bytes open_member() yields into a temp file in scratch_dir and map it (never whole in
    memory); `errors` raised on the way mean a broken archive: a one-line DataError naming `what`."""
    tmp = os.path.join(scratch_dir, f".input.tmp.{os.getpid()}")
    try:
        os.makedirs(scratch_dir, exist_ok=True)
        with open_member() as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)  # zip: raises BadZipFile on a CRC mismatch at the end
    except errors as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise DataError(f"{path} is not a valid {what} ({type(e).__name__}: {e}); it may be truncated: get it "
                        f"again (a raw file must not be named .zip or .xz)") from None
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if os.path.getsize(tmp) == 0:
        os.remove(tmp)
        return b"", None
    return np.memmap(tmp, dtype=np.uint8, mode="r"), tmp


def _zip_member(path):
    """Open the single member of the zip at `path` (a DataError if it holds none or several)."""
    z = zipfile.ZipFile(path)
    members = [m for m in z.infolist() if not m.is_dir()]
    if len(members) != 1:
        z.close()
        names = ", ".join(m.filename for m in members[:5]) or "none"
        raise DataError(f"the zip {path} must hold exactly one file, it holds "
                        f"{len(members)} ({names}); unzip it and pass the file with --input")
    return z.open(members[0])


def open_input(path, scratch_dir):
    """(uint8 buffer of the input's bytes, temp file to delete or None).

    A zip (by name or by its first bytes) must be a valid zip holding one file, an .xz file a valid xz
    stream: either is streamed to a temp file in scratch_dir and mapped. Any other file is mapped as it is."""
    import lzma
    if not os.path.isfile(path):
        raise DataError(f"input {path} does not exist or is not a file")
    if os.path.getsize(path) == 0:
        return b"", None
    if looks_like_xz(path):
        return _unpack(path, scratch_dir, lambda: lzma.open(path), (lzma.LZMAError, EOFError), ".xz file")
    if looks_like_zip(path):
        return _unpack(path, scratch_dir, lambda: _zip_member(path),
                       (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError), "zip")
    return np.memmap(path, dtype=np.uint8, mode="r"), None


def read_input(path):
    """The bytes of `path` (the single member of a zip, or the raw file), read into memory."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        data, _ = open_input(path, d)
        return bytes(data)


def check_canonical(data):
    """If `data` has enwik8's size it must be enwik8: check its md5."""
    if len(data) == ENWIK8_SIZE:
        got = hashlib.md5(memoryview(data)).hexdigest()
        if got != ENWIK8_MD5:
            raise DataError(f"this looks like enwik8 ({ENWIK8_SIZE} bytes) but its md5 is {got}, "
                            f"expected {ENWIK8_MD5}; the file is corrupt, get it again")


def download_name(url):
    """The file name a URL downloads to (inside --out_dir), or a one-line error."""
    from urllib.parse import urlparse
    name = os.path.basename(urlparse(url).path)
    if not name or name in (".", ".."):
        raise DataError(f"--url {url} does not name a file (it ends in '/'); give the file's URL, "
                        f"such as {ENWIK8_URL}")
    return name


def prepare(args):
    out_dir = args.out_dir
    if out_dir is None:
        out_dir = args.out_dir = "data/excerpt" if args.bundled else "data/enwik8"
    if not out_dir.strip():
        raise DataError("--out_dir is empty; give a directory, such as data/enwik8")
    if args.bundled:
        if args.input:
            raise DataError("--bundled and --input both name an input; give one")
        args.input = BUNDLED_PATH
    if args.input:
        if not os.path.isfile(args.input):
            raise DataError(f"--input {args.input} does not exist or is not a file")
        source = os.path.abspath(args.input)
        inside = os.path.realpath(os.path.dirname(source)) == os.path.realpath(out_dir)
        if inside and os.path.basename(source) in DATASET_FILES:
            raise DataError(f"--input {args.input} is one of the files this would write in --out_dir {out_dir}: "
                            f"splitting it would replace it; copy it elsewhere first, or choose another --out_dir")
    else:
        source = args.url
        name = download_name(args.url)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"--out_dir {out_dir} is a file, not a directory; choose another --out_dir")
    for name in remove_stale_temps(out_dir):
        print(f"removed {os.path.join(out_dir, name)}, left by a process that no longer runs")
    done = is_complete(out_dir)
    if not args.force:
        if not written_by_us(out_dir):
            found = ", ".join(f for f in DATASET_FILES if os.path.lexists(os.path.join(out_dir, f)))
            raise DataError(f"{out_dir} holds dataset files this tool did not write ({found}); "
                            f"use --force to replace them, or another --out_dir")
        if done is not None and done.get("source") != source:
            raise DataError(f"{out_dir} already holds a dataset made from {done.get('source')}; "
                            f"use --force to replace it, or another --out_dir")
    if args.input:
        input_path = args.input
        input_sha = sha256_of(input_path)
        want = (args.sha256 or (ENWIK8_ZIP_SHA256 if os.path.getsize(input_path) == ENWIK8_ZIP_SIZE else "")).lower()
        if args.bundled and not args.sha256:
            want = BUNDLED_SHA256
        if want and input_sha != want:
            raise DataError(f"checksum mismatch for {input_path}: expected sha256 {want}, got {input_sha}")
    else:
        input_path = os.path.join(out_dir, name)
        want = (args.sha256 or (ENWIK8_ZIP_SHA256 if args.url == ENWIK8_URL else "")).lower() or None
        if done is not None and not args.force and done.get("source") == source and not os.path.exists(input_path):
            print(f"{out_dir} is already prepared from {source} (its download has been removed since); "
                  f"nothing to do (use --force to download and redo it)")
            return done
        if not (os.path.exists(input_path) and (want is None or sha256_of(input_path) == want)):
            download(args.url, input_path, sha256=want, retries=args.retries, backoff_s=args.backoff)
        input_sha = sha256_of(input_path)
    if done is not None and not args.force and done.get("source") == source:
        if done.get("input_sha256") == input_sha:
            print(f"{out_dir} is already prepared from {source} (input and splits match their checksums); "
                  f"nothing to do (use --force to redo it)")
            return done
        raise DataError(f"{source} changed since {out_dir} was prepared (input sha256 {input_sha[:12]}..., recorded "
                        f"{str(done.get('input_sha256'))[:12]}...): splitting it again would change the test set under "
                        f"the runs trained on it; use --force to split it again, or another --out_dir")
    data, tmp = open_input(input_path, out_dir)
    try:
        if not args.input and args.url == ENWIK8_URL and not args.sha256 and len(data) != ENWIK8_SIZE:
            raise DataError(f"{input_path} unzips to {len(data):,} bytes, enwik8 has {ENWIK8_SIZE:,}; "
                            f"delete it and run again")
        check_canonical(data)
        if args.bundled and hashlib.sha256(memoryview(data)).hexdigest() != BUNDLED_RAW_SHA256:
            raise DataError(f"{input_path} unpacks to text whose sha256 is not the recorded {BUNDLED_RAW_SHA256}; "
                            f"restore it with `git checkout -- assets/`")
        meta = write_splits(data, out_dir, source, input_sha)
    finally:
        del data
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    s = meta["splits"]
    print(f"wrote {out_dir}: train {s['train']['bytes']:,} / val {s['val']['bytes']:,} / "
          f"test {s['test']['bytes']:,} bytes")
    return meta


def build_parser():
    p = argparse.ArgumentParser(
        description="Download enwik8 (or take a local file), verify it, and split its raw bytes "
                    "90/5/5 into OUT_DIR/{train,val,test}.bin + meta.json.",
        epilog="Offline: copy enwik8.zip here and run `python prepare_dataset.py --input enwik8.zip`. "
               "Any text or binary file works the same way: --input FILE --out_dir data/NAME.")
    p.add_argument("--out_dir", default=None, help="where the splits go (default: data/enwik8, or "
                   "data/excerpt with --bundled)")
    p.add_argument("--input", metavar="PATH", help="use this local file (raw bytes, or a zip holding one "
                   "file) instead of downloading")
    p.add_argument("--url", default=ENWIK8_URL, help=f"download source (default: {ENWIK8_URL})")
    p.add_argument("--sha256", metavar="HEX", help="expected sha256 of the download or of --input "
                   "(default: enwik8.zip's, enforced for the default URL and for inputs of its size)")
    p.add_argument("--bundled", action="store_true", help="use the enwik8 excerpt shipped in assets/ "
                   "(5,020,103 bytes of enwik8 text, xz-compressed; offline); try --out_dir data/excerpt")
    p.add_argument("--force", action="store_true", help="redo even if OUT_DIR is already complete")
    p.add_argument("--retries", type=int, default=5, help="download attempts before giving up (default 5)")
    p.add_argument("--backoff", type=float, default=1.0, help="seconds before the first retry, doubled "
                   "after each (default 1.0)")
    g = p.add_argument_group("synthetic data (recall_task.py): --synthetic recall makes episodes of T + 1 bytes")
    g.add_argument("--synthetic", choices=("recall",), default=None,
                   help="make a synthetic task instead of reading text: 'recall' (associative recall; default "
                        "--out_dir data/recall_VARIANT)")
    g.add_argument("--recall_T", type=int, default=256, help="the training window T (episodes are T + 1 bytes)")
    g.add_argument("--recall_records", type=int, default=8, help="records (key, value) per episode")
    g.add_argument("--recall_queries", type=int, default=32, help="queries per episode (dense learns the task in "
                   "about 1000 iterations with 32 at T=256; with 8 it had not after 600)")
    g.add_argument("--recall_distance", type=int, default=64,
                   help="each query lies at least this many bytes after its record (beyond the forced blocks)")
    g.add_argument("--recall_variant", choices=("A", "B"), default="A",
                   help="A: queries at tile starts (where the block choice reads them); B: at any position")
    g.add_argument("--recall_tile", type=int, default=4, help="the tile size S that variant A aligns queries to (the "
                   "runs' sparse_block_size; 4 leaves room for 32 queries at T=256)")
    g.add_argument("--recall_episodes", type=int, default=20_000, help="episodes in all (a multiple of 20: the "
                   "90/5/5 split falls between episodes)")
    g.add_argument("--seed", type=int, default=0, help="the generator's seed (synthetic data)")
    return p


def prepare_synthetic(args):
    """Write a synthetic task's splits: episodes from recall_task.make_episodes, deterministic by --seed, with the
    generator's settings in meta.json ('synthetic'; the runs record the splits' sha256, so compare.py never mixes
    runs made from different ones) and 'align' (the loader's windows are whole episodes)."""
    import recall_task
    settings = dict(T=args.recall_T, n_records=args.recall_records, n_queries=args.recall_queries,
                    min_distance=args.recall_distance, variant=args.recall_variant, tile=args.recall_tile)
    why = recall_task.check_spec(**settings)
    if why:
        raise DataError(f"--synthetic recall: {why}")
    if args.recall_episodes < 20 or args.recall_episodes % 20:
        raise DataError(f"--recall_episodes={args.recall_episodes} must be a positive multiple of 20 (the 90/5/5 "
                        f"split must fall between episodes)")
    out_dir = args.out_dir or f"data/recall_{args.recall_variant}"
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"--out_dir {out_dir} is a file, not a directory; choose another --out_dir")
    meta = {"task": "recall", **settings, "seed": args.seed, "episodes": args.recall_episodes}
    done = is_complete(out_dir)
    if done is not None and done.get("synthetic") == meta and not args.force:
        print(f"{out_dir} already holds this synthetic data; nothing to do")
        return done
    if not args.force and not written_by_us(out_dir):
        raise DataError(f"{out_dir} holds dataset files this tool did not write; use --force to replace them, or "
                        f"another --out_dir")
    if done is not None and not args.force:
        raise DataError(f"{out_dir} already holds a dataset made from {done.get('source')}; use --force to replace "
                        f"it, or another --out_dir")
    episodes = recall_task.make_episodes(args.recall_episodes, seed=args.seed, **settings)
    source = "synthetic:recall " + " ".join(f"{k}={v}" for k, v in meta.items() if k != "task")
    meta_out = write_splits(episodes.tobytes(), out_dir, source,
                            extra_meta={"synthetic": meta, "align": args.recall_T + 1})
    print(f"wrote {out_dir}: {args.recall_episodes:,} episodes of {args.recall_T + 1} bytes ({source})")
    return meta_out


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.synthetic:
            if args.input or args.bundled:
                raise DataError("--synthetic makes its own data: drop --input / --bundled")
            prepare_synthetic(args)
        else:
            prepare(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; no complete output was written", file=sys.stderr)
        return 130
    return 0


# ----------------------------------------------------------------------------- loader

class ByteDataset:
    """Memory-mapped train/val/test splits of a directory written by this tool (or anyone
    writing the same three .bin files and a minimal meta.json)."""

    def __init__(self, data_dir):
        self.data_dir = data_dir
        hint = f"run `python prepare_dataset.py --out_dir {data_dir}` (or with --input FILE) first"
        meta_path = os.path.join(data_dir, "meta.json")
        if not os.path.isfile(meta_path):
            raise DataError(f"no dataset in {data_dir} (meta.json missing); {hint}")
        try:
            with open(meta_path) as f:
                self.meta = json.load(f)
        except ValueError as e:
            raise DataError(f"{meta_path} is not valid JSON ({e}); {hint}") from None
        if not isinstance(self.meta, dict):
            raise DataError(f"{meta_path} holds a JSON {type(self.meta).__name__}, not an object such as "
                            f'{{"vocab_size": 256, "dtype": "uint8"}}; {hint}')
        if self.meta.get("vocab_size") != 256 or self.meta.get("dtype") != "uint8":
            raise DataError(f"{meta_path} says vocab_size={self.meta.get('vocab_size')} "
                            f"dtype={self.meta.get('dtype')}; this code reads raw bytes "
                            f"(vocab_size 256, dtype uint8); {hint}")
        self.splits = {}
        for name in SPLITS:
            path = os.path.join(data_dir, f"{name}.bin")
            if not os.path.isfile(path):
                raise DataError(f"{path} is missing; {hint}")
            if os.path.getsize(path) < 2:
                raise DataError(f"{path} has fewer than 2 bytes; {hint}")
            self.splits[name] = np.memmap(path, dtype=np.uint8, mode="r")

    def check_block_size(self, block_size):
        align = self.meta.get("align")
        if align and block_size != align - 1:
            raise DataError(f"{self.data_dir} holds episodes of {align} bytes, one per training window: train it at "
                            f"block_size={align - 1}, or make the data for block_size={block_size} "
                            f"(prepare_dataset.py --synthetic recall --recall_T {block_size})")
        for name, data in self.splits.items():
            if len(data) <= block_size:
                raise DataError(f"the {name} split of {self.data_dir} has {len(data)} bytes, not more "
                                f"than block_size={block_size}; use a smaller block_size or more data")

    def get_batch(self, split, batch_size, block_size, generator):
        """(x, y), int64 (B, T) CPU tensors at random offsets drawn from `generator`; y = x shifted by 1."""
        data = self.splits[split]
        import torch
        align = self.meta.get("align")
        if align:  # episodes (a synthetic task): every window is one whole episode
            starts = (torch.randint(len(data) // align, (batch_size,), generator=generator) * align).tolist()
        else:
            starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator).tolist()
        return stack_windows(data, starts, block_size)

    def val_windows(self, block_size, n_windows, split="val"):
        """A fixed, evenly spaced set of window offsets: the same every eval, so curves compare."""
        data = self.splits[split]
        align = self.meta.get("align")
        last = len(data) - block_size - 1
        if align:  # whole episodes, evenly spaced
            n = len(data) // align
            return sorted(set(int(round(i * (n - 1) / max(1, n_windows - 1))) * align for i in range(n_windows)))
        if n_windows <= 1 or last <= 0:
            return [0]
        return sorted(set(int(round(i * last / (n_windows - 1))) for i in range(n_windows)))


def stack_windows(data, starts, length):
    """(x, y) int64 (len(starts), length) CPU tensors: x = data[s : s+length], y = the next bytes."""
    import torch  # lazy: the command-line tool does not need torch
    x = np.stack([data[s:s + length] for s in starts]).astype(np.int64)
    y = np.stack([data[s + 1:s + 1 + length] for s in starts]).astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


def sliding_windows(n, block_size, stride):
    """[(start, length, n_score)]: windows over n tokens (n - 1 targets) with the given stride.

    Window k holds inputs data[start : start+length] and targets data[start+1 : start+1+length];
    it scores its last n_score targets. Together they score every target index 1..n-1 exactly once.
    """
    if not 1 <= stride <= block_size:
        raise DataError(f"eval_stride={stride} must be between 1 and block_size={block_size}")
    n_targets = n - 1
    out = []
    end = min(block_size, n_targets)  # targets scored so far: indices 1..end
    out.append((0, end, end))
    while end < n_targets:
        new_end = min(end + stride, n_targets)
        start = max(0, new_end - block_size)
        out.append((start, new_end - start, new_end - end))
        end = new_end
    return out


if __name__ == "__main__":
    sys.exit(main())
