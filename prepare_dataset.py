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
import math
import os
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


def _atomic_write(path, data):
    """Write to a temp name next to `path`, fsync, then rename: never a half file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_splits(data, out_dir, source):
    """Split `data` (bytes) into out_dir/{train,val,test}.bin and write meta.json last."""
    n = len(data)
    if n == 0:
        raise DataError(f"the input {source} is empty: nothing to split")
    if n < MIN_BYTES:
        raise DataError(f"the input {source} has only {n} bytes; at least {MIN_BYTES} are needed "
                        f"for a 90/5/5 split")
    n_train, n_val, n_test = split_sizes(n)
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}
    try:
        os.makedirs(out_dir, exist_ok=True)
        meta_path = os.path.join(out_dir, "meta.json")
        if os.path.exists(meta_path):  # the directory is no longer complete from here on
            os.remove(meta_path)
        meta = {"vocab_size": 256, "dtype": "uint8", "source": source, "total_bytes": n,
                "split_rule": "val = test = n // 20, train = rest, in file order",
                "tool": f"prepare_dataset.py {__version__}", "splits": {}}
        view = memoryview(data)
        for name in SPLITS:
            a, b = bounds[name]
            _atomic_write(os.path.join(out_dir, f"{name}.bin"), view[a:b])
            meta["splits"][name] = {"bytes": b - a, "sha256": sha256_of(view[a:b]), "offset": a}
        _atomic_write(meta_path, (json.dumps(meta, indent=2) + "\n").encode())
    except OSError as e:
        raise DataError(f"cannot write to --out_dir {out_dir}: {e.strerror or e}; "
                        f"choose a writable directory") from None
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

def read_input(path):
    """The bytes of `path`: the single member of a zip, or the raw file."""
    if not os.path.isfile(path):
        raise DataError(f"--input {path} does not exist or is not a file")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                members = [m for m in z.infolist() if not m.is_dir()]
                if len(members) != 1:
                    names = ", ".join(m.filename for m in members[:5]) or "none"
                    raise DataError(f"the zip {path} must hold exactly one file, it holds "
                                    f"{len(members)} ({names}); unzip it and pass the file with --input")
                return z.read(members[0])
        except zipfile.BadZipFile as e:
            raise DataError(f"the zip {path} is corrupt ({e}); download it again") from None
    with open(path, "rb") as f:
        return f.read()


def check_canonical(data):
    """If `data` has enwik8's size it must be enwik8: check its md5."""
    if len(data) == ENWIK8_SIZE:
        got = hashlib.md5(data).hexdigest()
        if got != ENWIK8_MD5:
            raise DataError(f"this looks like enwik8 ({ENWIK8_SIZE} bytes) but its md5 is {got}, "
                            f"expected {ENWIK8_MD5}; the file is corrupt, get it again")


def prepare(args):
    if args.input:
        if not os.path.isfile(args.input):
            raise DataError(f"--input {args.input} does not exist or is not a file")
        source = os.path.abspath(args.input)
    else:
        source = args.url
    done = None if args.force else is_complete(args.out_dir)
    if done is not None:
        if done.get("source") == source:
            print(f"{args.out_dir} is already prepared from {source} (checksums match); "
                  f"nothing to do (use --force to redo it)")
            return done
        raise DataError(f"{args.out_dir} already holds a dataset made from {done.get('source')}; "
                        f"use --force to replace it, or another --out_dir")
    if args.input:
        if args.sha256 or os.path.getsize(args.input) == ENWIK8_ZIP_SIZE:
            want = (args.sha256 or ENWIK8_ZIP_SHA256).lower()
            got = sha256_of(args.input)
            if got != want:
                raise DataError(f"checksum mismatch for {args.input}: expected sha256 {want}, got {got}")
        data = read_input(args.input)
    else:
        zip_path = os.path.join(os.path.dirname(os.path.abspath(args.out_dir)), os.path.basename(args.url))
        if not (os.path.exists(zip_path) and (args.sha256 or ENWIK8_ZIP_SHA256).lower() == sha256_of(zip_path)):
            download(args.url, zip_path, sha256=args.sha256 or (ENWIK8_ZIP_SHA256 if args.url == ENWIK8_URL
                                                                else None),
                     retries=args.retries, backoff_s=args.backoff)
        data = read_input(zip_path)
        if args.url == ENWIK8_URL and not args.sha256 and len(data) != ENWIK8_SIZE:
            raise DataError(f"{zip_path} unzips to {len(data):,} bytes, enwik8 has {ENWIK8_SIZE:,}; "
                            f"delete it and run again")
    check_canonical(data)
    meta = write_splits(data, args.out_dir, source)
    s = meta["splits"]
    print(f"wrote {args.out_dir}: train {s['train']['bytes']:,} / val {s['val']['bytes']:,} / "
          f"test {s['test']['bytes']:,} bytes")
    return meta


def build_parser():
    p = argparse.ArgumentParser(
        description="Download enwik8 (or take a local file), verify it, and split its raw bytes "
                    "90/5/5 into OUT_DIR/{train,val,test}.bin + meta.json.",
        epilog="Offline: copy enwik8.zip here and run `python prepare_dataset.py --input enwik8.zip`. "
               "Any text or binary file works the same way: --input FILE --out_dir data/NAME.")
    p.add_argument("--out_dir", default="data/enwik8", help="where the splits go (default: data/enwik8)")
    p.add_argument("--input", metavar="PATH", help="use this local file (raw bytes, or a zip holding one "
                   "file) instead of downloading")
    p.add_argument("--url", default=ENWIK8_URL, help=f"download source (default: {ENWIK8_URL})")
    p.add_argument("--sha256", metavar="HEX", help="expected sha256 of the download or of --input "
                   "(default: enwik8.zip's, enforced for the default URL and for inputs of its size)")
    p.add_argument("--force", action="store_true", help="redo even if OUT_DIR is already complete")
    p.add_argument("--retries", type=int, default=5, help="download attempts before giving up (default 5)")
    p.add_argument("--backoff", type=float, default=1.0, help="seconds before the first retry, doubled "
                   "after each (default 1.0)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
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

    def __len__(self):
        return sum(len(s) for s in self.splits.values())

    def check_block_size(self, block_size):
        for name, data in self.splits.items():
            if len(data) <= block_size:
                raise DataError(f"the {name} split of {self.data_dir} has {len(data)} bytes, not more "
                                f"than block_size={block_size}; use a smaller block_size or more data")

    @staticmethod
    def _stack(data, starts, block_size):
        import torch  # lazy: the command-line tool does not need torch
        x = np.stack([data[s:s + block_size] for s in starts]).astype(np.int64)
        y = np.stack([data[s + 1:s + 1 + block_size] for s in starts]).astype(np.int64)
        return torch.from_numpy(x), torch.from_numpy(y)

    def get_batch(self, split, batch_size, block_size, generator):
        """(x, y), int64 (B, T) CPU tensors at random offsets drawn from `generator`; y = x shifted by 1."""
        data = self.splits[split]
        import torch
        starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator).tolist()
        return self._stack(data, starts, block_size)

    def val_windows(self, block_size, n_windows, split="val"):
        """A fixed, evenly spaced set of window offsets: the same every eval, so curves compare."""
        data = self.splits[split]
        last = len(data) - block_size - 1
        if n_windows <= 1 or last <= 0:
            return [0]
        return sorted(set(int(round(i * last / (n_windows - 1))) for i in range(n_windows)))

    def window_batches(self, starts, batch_size, block_size, split="val"):
        data = self.splits[split]
        for i in range(0, len(starts), batch_size):
            yield self._stack(data, starts[i:i + batch_size], block_size)

    def test_windows(self, block_size, stride, split="test"):
        """Sliding windows that score every position 1..n-1 of `split` exactly once.

        Yields (start, n_score): the window covers targets data[start+1 : start+1+block_size]
        (clipped at the end) and scores only its last n_score targets; the first window scores all.
        """
        return sliding_windows(len(self.splits[split]), block_size, stride)


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
