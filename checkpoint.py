"""
Checkpoints: one save/load pair for the trainer, sample.py and extraction.py.

A checkpoint is a dict of tensors and plain Python values (no numpy objects, no classes), written
atomically (temp file, fsync, os.replace) and read with torch.load(weights_only=True): unpickling a
file can run code, so a checkpoint that would import anything beyond tensors is refused. Checkpoints
from before 2026-11-28 held numpy's RNG state as an ndarray; those few numpy names (and nothing else)
are allowed so they still load.
"""
import json
import os
import pickle
import random
import sys
import time
import zipfile

import numpy as np
import torch

import config_keys
from gpt import GPT, GPTConfig
from models import MODELS
from prepare_dataset import remove_stale_temps, sha256_of  # noqa: F401  (one helper for run and data directories)

TRAINING_KEYS = ("model", "optimizer", "iter_num", "best_val_bpc", "data_generator", "rng", "config",
                 "model_args", "model_kind")
MODEL_KEYS = ("model", "model_args", "model_kind")
RUN_FILES = ("ckpt.pt", "best.pt", "metrics.jsonl", "final.json")  # a directory holding one holds a run
# what an older checkpoint's numpy RNG state needs (numpy 1.x and 2.x spell _reconstruct differently)
# and its env held torch.__version__ (a str subclass). Nothing else is ever allowed.
LEGACY_GLOBALS = {"numpy.ndarray", "numpy.dtype", "numpy.core.multiarray._reconstruct",
                  "numpy._core.multiarray._reconstruct", "numpy.dtypes.UInt32DType",
                  "torch.torch_version.TorchVersion"}


class CheckpointError(Exception):
    """A checkpoint that cannot be used: one line naming the file, the problem and the fix."""


def first_line(e, limit=200):
    """The first line of an exception's text (its type name when the text is empty), for one-line errors."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


# ----------------------------------------------------------------------------- run directory files

def append_jsonl(row, path):
    """Append one JSON line; a symlink at `path` is refused, not followed (O_NOFOLLOW)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as e:
        raise CheckpointError(f"cannot append to {path}: {e.strerror} (a symlink is refused); remove it, "
                         f"or use another --out_dir") from None
    with os.fdopen(fd, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_jsonl(path):
    """The JSON object rows of a metrics.jsonl ([] if there is none; a line that is not one is skipped)."""
    rows = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict):
                    rows.append(row)
    return rows


def drop_rows_after(path, iter_num):
    """Rewrite metrics.jsonl (atomically) without the rows past `iter_num`, the checkpoint a run resumes from: a row
    is written before its checkpoint, so a stop between the two leaves a row the resumed run writes again. Returns
    the number of rows dropped (lines that are not JSON rows are kept as they are)."""
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = f.readlines()

    def past(line):
        try:
            row = json.loads(line)
        except ValueError:
            return False
        return isinstance(row, dict) and isinstance(row.get("iter"), int) and row["iter"] > iter_num

    keep = [line for line in lines if not past(line)]
    if len(keep) < len(lines):
        def write(tmp):
            with open(tmp, "w") as f:
                f.writelines(keep)
        atomic_write(path, write)
    return len(lines) - len(keep)


def restart_incomplete(out_dir, say):
    """A run killed after its first metrics row but before its first checkpoint holds nothing to resume:
    set its metrics.jsonl (and config.json) aside as *.incomplete so it starts again cleanly."""
    there = {f for f in RUN_FILES + ("config.json",) if os.path.lexists(os.path.join(out_dir, f))}
    if not there or there - {"metrics.jsonl", "config.json"}:
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for f in sorted(there):
        os.replace(os.path.join(out_dir, f), os.path.join(out_dir, f"{f}.incomplete-{stamp}"))
    say(f"note: {out_dir} held a run that stopped before its first checkpoint ({', '.join(sorted(there))}); "
        f"set aside as *.incomplete-{stamp}, starting again")


def data_identity(ds):
    """The sha256 of each split (from the dataset's meta.json): what a run was trained and scored on."""
    splits = ds.meta.get("splits") if isinstance(ds.meta.get("splits"), dict) else {}
    return {name: rec.get("sha256") for name, rec in splits.items() if isinstance(rec, dict)} or None


# ----------------------------------------------------------------------------- one writer per run directory

class RunLock:
    """One writer per directory (a run's out_dir, a comparison's OUT): an exclusive flock on DIR/.lock, held
    for as long as the holder lives. The OS drops it when the process ends, however it ends (a crash, kill
    -9), so it never stays stuck; a second writer gets a one-line error naming the holder. The file keeps
    the holder's pid and command for that message; it is never removed (removing it would race)."""

    NAME = ".lock"

    def __init__(self, directory, what="--out_dir"):
        self.dir, self.what, self.fd = directory, what, None
        self.path = os.path.join(directory, self.NAME)

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock (said once)
            print(f"note: no file locking on this platform; make sure one process writes {self.dir}", file=sys.stderr)
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            raise CheckpointError(f"cannot write in {self.dir}: {e.strerror or first_line(e)}; choose a writable "
                                  f"{self.what}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 500).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise CheckpointError(f"{self.dir} is in use by another process ({holder}); wait for it to finish or "
                                  f"stop it, or use another {self.what}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}: {' '.join(sys.argv)[:300]}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None
        return False


def _legacy_objects(names):
    import importlib
    objs = []
    for name in names:
        module, _, attr = name.rpartition(".")
        try:
            objs.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            pass
    return objs


RESUME_FIX = "resume from another checkpoint (best.pt), or start again"


def load(path, require=TRAINING_KEYS, fix=RESUME_FIX):
    """The checkpoint dict at `path`, loaded without running code; CheckpointError if it is missing,
    unreadable, would run code, or lacks a key in `require`. `fix`: the advice its errors end with."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}; train first, or check --out_dir")
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
            if not unsafe or not unsafe <= LEGACY_GLOBALS:
                shown = ", ".join(sorted(unsafe - LEGACY_GLOBALS)[:4]) or "unknown objects"
                raise CheckpointError(f"refusing to load {path}: unpickling it would import {shown}, which can "
                                      f"run code; only load checkpoints written by this code from a source you "
                                      f"trust") from None
            with torch.serialization.safe_globals(_legacy_objects(LEGACY_GLOBALS)):  # listed or not, all may be needed
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # a truncated, empty or foreign file: say which and why
        raise CheckpointError(f"cannot read checkpoint {path}: {unreadable_because(path, e)}; {fix}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a checkpoint of this code (it holds a {type(ckpt).__name__}, not a dict)")
    missing = [k for k in require if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(repr(k) for k in missing)}: it is damaged or was not "
                              f"written by this code's trainer; {fix}")
    for key in ("iter_num", "best_iter"):
        v = ckpt.get(key)
        whole = isinstance(v, int) and not isinstance(v, bool)
        if key in ckpt and not (whole and v >= (0 if key == "iter_num" else -1)):
            raise CheckpointError(f"{path}: {key}={v!r} is not a whole number >= 0; the file is damaged or was "
                                  f"not written by this code's trainer; resume from another checkpoint")
    pos = ckpt.get("schedule_pos")
    number = isinstance(pos, (int, float)) and not isinstance(pos, bool)
    if pos is not None and not (number and 0 <= pos < float("inf")):
        raise CheckpointError(f"{path}: schedule_pos={pos!r} is not a finite number >= 0; the file is damaged")
    return ckpt


def unreadable_because(path, e):
    """Why torch.load could not read `path`, in words: torch's own text for a truncated zip is a paragraph."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        size, head = None, b""
    if size == 0:
        return "the file is empty (what a full disk or a killed copy leaves)"
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        return (f"the file is truncated ({size:,} bytes, its zip archive's end is missing: an interrupted copy or a "
                f"full disk)")
    if head != b"PK\x03\x04":
        return "the file is not a torch checkpoint (no zip archive)"
    return f"it is damaged ({type(e).__name__}: {first_line(e, 120)})"


def schedule_position(ckpt):
    """Where along its schedules (lr decay, sparsity warm-up) the checkpointed model was, in iterations. A
    time-budget run's position is its progress * max_iters, not its iteration count (trainer.schedule_position);
    checkpoints from before 2026-12-01 did not record it and reload at their iteration, as they did then."""
    pos = ckpt.get("schedule_pos")
    return ckpt.get("iter_num", 0) if pos is None else pos


def schedule_progress(ckpt, max_iters=None):
    """The checkpointed run's progress in [0, 1]: its schedule position over its max_iters (a time budget's
    position is progress * max_iters, so this holds for both); None where the checkpoint does not say."""
    max_iters = max_iters or (ckpt.get("config") or {}).get("max_iters")
    if not max_iters:
        return None
    return min(1.0, schedule_position(ckpt) / max_iters)


def atomic_write(path, write):
    """Write `path` atomically: write(tmp) fills a temp file beside it (NAME.tmp.PID), which is fsynced and
    renamed over `path`. A crash, a kill or a full disk leaves the old file whole."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save(obj, path):
    """A checkpoint dict to `path`, atomically."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_json(obj, path):
    """config.json, final.json, eval.json: atomically, indented, one trailing newline."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=str)
            f.write("\n")
    atomic_write(path, write)


# ----------------------------------------------------------------------------- RNG states as tensors

def rng_states():
    """Every RNG the loop uses, as tensors and plain values (weights_only-loadable)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    s = {"python": random.getstate(), "torch": torch.get_rng_state(),
         "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_states(s):
    py = s["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = s["numpy"]
    if isinstance(n, dict):
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    else:  # an older checkpoint: numpy's own tuple
        np.random.set_state(n)
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])


# ----------------------------------------------------------------------------- models from checkpoints

def model_kind(ckpt, path):
    kind = ckpt.get("model_kind")
    if kind not in MODELS:
        raise CheckpointError(f"{path} has unknown model_kind {kind!r} (known: {', '.join(MODELS)})")
    return MODELS[kind]


def check_model_args(args, kind, path, weights):
    """One-line CheckpointError for model_args that cannot describe the weights beside them: a key of the
    wrong type, an impossible shape, or a model far larger than the weights (refused before anything is
    allocated: a damaged n_layer=10**6 must not take the machine's memory); and for non-finite weights."""
    for key, default in kind.defaults().items():
        if key not in args or default is None:
            continue
        v, want = args[key], type(default)
        ok = (isinstance(v, bool) if want is bool else
              isinstance(v, (int, float)) and not isinstance(v, bool) if want is float else
              isinstance(v, want) and not isinstance(v, bool))
        if not ok:
            raise CheckpointError(f"{path}: model_args {key}={v!r} should be a {want.__name__}; the file is "
                                  f"damaged or was not written by this code")
    # the size first, in arithmetic alone: validate() below may allocate by the shape (ASCA's block masks, per-layer
    # targets), so a damaged block_size=10**12 or n_layer=10**9 must be refused before it runs
    n_weights = sum(t.numel() for t in weights.values() if torch.is_tensor(t))
    d, L = args["n_embd"], args["n_layer"]
    estimate = 12 * L * d * d + 2 * 256 * d + args["block_size"] * d  # the blocks, embeddings and a position table
    if estimate > 4 * n_weights + 1_000_000:
        raise CheckpointError(f"{path}: its model_args describe a model of about {estimate:,} parameters but it "
                              f"holds {n_weights:,} weights; the file is damaged")
    try:
        kind.config_cls.from_dict(args).validate()
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: its model_args are impossible ({first_line(e)}); the file is damaged") from None
    bad = [k for k,
           t in weights.items() if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"{path} holds non-finite weights (NaN or inf) in {', '.join(bad[:3])}; use an earlier "
                              f"checkpoint (best.pt) or retrain")


def model_from_checkpoint(path, device="cpu"):
    """(model in eval mode, checkpoint) for any run's ckpt.pt/best.pt, whichever script wrote it; the model is
    at the checkpoint's schedule position (ASCA: the sparsity it was trained at)."""
    ckpt = load(path, require=MODEL_KEYS)
    kind = model_kind(ckpt, path)
    if not isinstance(ckpt["model_args"], dict) or not isinstance(ckpt["model"], dict):
        raise CheckpointError(f"{path}: model_args or model is not a dict; the file is damaged")
    args = dict(ckpt["model_args"])
    missing = [k for k in kind.config_cls.shape_keys() if k not in args]
    if missing:  # keys added later may be missing (they default to the old behaviour); the shape may not
        raise CheckpointError(f"{path}: model_args lacks {', '.join(missing)}; it cannot be rebuilt faithfully")
    # keys the checkpoint predates: the behaviour of its time (before the checks: today's default of such a key
    # may not fit the old model)
    args = config_keys.with_legacy(args, kind.config_cls.declarations())
    check_model_args(args, kind, path, ckpt["model"])
    args.update(kind.config_cls.device_defaults())  # e.g. a GPU run's attn_impl='flex' must not follow it onto a CPU
    model = kind.build(args)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: its weights do not fit its model_args ({first_line(e)})") from None
    model.set_step(schedule_position(ckpt), schedule_progress(ckpt))
    return model.to(device).eval(), ckpt


# ----------------------------------------------------------------------------- init_from=PATH
# the keys that give a dense GPT's weights their meaning (block_size aside: rotary positions carry to any T): a new
# run starting from a checkpoint must match them (and a same-kind checkpoint its kind's own_weight_keys)
WARM_KEYS = ("n_layer", "n_head", "n_embd", "bias", "pos_encoding", "rope_base", "qk_norm", "mlp_act",
             "tie_embeddings")


def warm_start(model, cfg, kind, path):
    """--init_from=PATH: a new run whose model starts from another run's weights, as nanoGPT's init_from (the
    optimizer, schedule and data stream start afresh). A dense checkpoint may start an ASCA model: its attention
    is the dense one, and what ASCA adds (the predictor) keeps its fresh initialisation. Rotary positions serve any
    block_size; a learned position table serves at most its own (a shorter run uses its first rows). An ASCA
    predictor is sized for its number of key blocks, so an ASCA checkpoint starts ASCA at its own block_size only.
    Everything else that differs is a one-line CheckpointError. Returns what was done, in words."""
    ckpt = load(path, require=MODEL_KEYS, fix="give --init_from a ckpt.pt or best.pt that this code's trainer wrote")
    src = model_kind(ckpt, path)
    if not isinstance(ckpt["model_args"], dict) or not isinstance(ckpt["model"], dict):
        raise CheckpointError(f"{path}: model_args or model is not a dict; the file is damaged")
    args = config_keys.with_legacy(dict(ckpt["model_args"]), src.config_cls.declarations())
    check_model_args(args, src, path, ckpt["model"])
    same_kind = ckpt["model_kind"] == kind
    keys = WARM_KEYS + (MODELS[kind].own_weight_keys if same_kind else ())
    decls = src.config_cls.declarations()  # a key the checkpoint predates (no legacy value): its default is the old way
    args.update({k: decls[k].default for k in keys if k not in args and k in decls})
    diff = [f"{k}={args.get(k)!r} (this run: {cfg[k]!r})" for k in keys if k in cfg and args.get(k) != cfg[k]]
    if diff:
        raise CheckpointError(f"--init_from={path} holds another architecture: {', '.join(diff)}; give this run the "
                              f"checkpoint's values")
    T0, T = args["block_size"], cfg["block_size"]
    weights, own = dict(ckpt["model"]), model.state_dict()
    notes = []
    if "transformer.wpe.weight" in own:
        if T > T0:
            raise CheckpointError(f"{path} has learned positions for block_size={T0}, not this run's {T}: a position "
                                  f"table cannot be extended faithfully; train at block_size <= {T0}, or start from "
                                  f"a pos_encoding=rope model")
        if T < T0:
            weights["transformer.wpe.weight"] = weights["transformer.wpe.weight"][:T]
            notes.append(f"the first {T} of its {T0} learned positions")
    problem = same_kind and MODELS[kind].warm_start_problem and MODELS[kind].warm_start_problem(args, cfg, path)
    if problem:
        raise CheckpointError(problem)
    with torch.device("meta"):  # the dense GPT's names (every kind's attention extends the dense one's)
        dense = set(GPT(GPTConfig.from_dict({**cfg, "block_size": T})).state_dict())
    added = [k for k in own if k not in dense]  # the kind's own (ASCA's predictor): fresh unless the source has it
    fresh = [k for k in own if k not in weights]
    dropped = [k for k in weights if k not in own]
    wrong = [k for k in fresh if k not in added] + [k for k in dropped if k in dense or k in own]
    wrong += [k for k in own if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    if wrong:
        raise CheckpointError(f"--init_from={path}: its weights do not fit this run's model ({', '.join(wrong[:3])}); "
                              f"start from a checkpoint of the same architecture")
    for k in fresh:
        weights[k] = own[k]
    for k in dropped:
        del weights[k]
    model.load_state_dict(weights)
    if fresh:
        notes.append(f"{len(fresh)} fresh tensors ({'the predictor' if all(k in added for k in fresh) else 'new'})")
    if dropped:
        notes.append(f"{len(dropped)} of its tensors dropped (its predictor)")
    text = (f"weights from {path} ({ckpt['model_kind']}, iter {ckpt.get('iter_num', '?')}, block_size {T0})"
            + (": " + ", ".join(notes) if notes else "") + "; a fresh optimizer, schedule and data stream")
    return text, weights_origin(path, ckpt)


def weights_origin(path, ckpt):
    """Where a warm-started run's weights came from, as the run records it once (config.json, its checkpoints,
    final.json) and keeps through every resume: the file (real path and sha256), its iteration, tokens, kind and
    block_size, and that run's own origin if it had one."""
    return {"path": os.path.realpath(path), "sha256": sha256_of(path), "iter": ckpt.get("iter_num"),
            "tokens": ckpt.get("tokens"), "model_kind": ckpt.get("model_kind"),
            "block_size": (ckpt.get("model_args") or {}).get("block_size"),
            "schedule_pos": schedule_position(ckpt), "progress": schedule_progress(ckpt),
            "from": ckpt.get("init_origin")}
