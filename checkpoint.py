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

import numpy as np
import torch

import baseline_model
import novel_model  # noqa: F401  (registers "asca" in baseline_model.MODELS)

MODELS = baseline_model.MODELS
TRAINING_KEYS = ("model", "optimizer", "iter_num", "best_val_bpc", "data_generator", "rng", "config",
                 "model_args", "model_kind")
MODEL_KEYS = ("model", "model_args", "model_kind")
SHAPE_KEYS = ("block_size", "n_layer", "n_head", "n_embd")
# what an older checkpoint's numpy RNG state needs (numpy 1.x and 2.x spell _reconstruct differently)
# and its env held torch.__version__ (a str subclass). Nothing else is ever allowed.
LEGACY_GLOBALS = {"numpy.ndarray", "numpy.dtype", "numpy.core.multiarray._reconstruct",
                  "numpy._core.multiarray._reconstruct", "numpy.dtypes.UInt32DType",
                  "torch.torch_version.TorchVersion"}


class CheckpointError(Exception):
    """A checkpoint that cannot be used: one line naming the file, the problem and the fix."""


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


def load(path, require=TRAINING_KEYS):
    """The checkpoint dict at `path`, loaded without running code; CheckpointError if it is missing,
    unreadable, would run code, or lacks a key in `require`."""
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
    except Exception as e:  # a truncated or foreign file: say which and why
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a checkpoint of this code (it holds a {type(ckpt).__name__}, not a dict)")
    missing = [k for k in require if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(repr(k) for k in missing)}: it is damaged or was not "
                              f"written by this code's trainer; retrain, or resume from another checkpoint")
    return ckpt


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


def remove_stale_temps(out_dir):
    """Delete temp files (NAME.tmp.PID) that a killed process left in out_dir; a live process's stay."""
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


def model_from_checkpoint(path, device="cpu"):
    """(model in eval mode, checkpoint) for any run's ckpt.pt/best.pt, whichever script wrote it."""
    ckpt = load(path, require=MODEL_KEYS)
    kind = model_kind(ckpt, path)
    args = dict(ckpt["model_args"])
    missing = [k for k in SHAPE_KEYS if k not in args]
    if missing:  # keys added later may be missing (they default to the old behaviour); the shape may not
        raise CheckpointError(f"{path}: model_args lacks {', '.join(missing)}; it cannot be rebuilt faithfully")
    for key, old in kind.config_cls.LEGACY.items():  # keys the checkpoint predates: the behaviour of its time
        args.setdefault(key, old)
    args.update(kind.config_cls.DEVICE_DEFAULTS)  # e.g. a GPU run's attn_impl='flex' must not follow it onto a CPU
    model = kind.build(args)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: its weights do not fit its model_args ({str(e).splitlines()[0][:200]})") from None
    model.set_step(ckpt.get("iter_num", 0))
    return model.to(device).eval(), ckpt
