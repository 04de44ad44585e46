"""
A training run's configuration: every key a script accepts (the loop's, then the model kind's), what a
resumed run takes from its checkpoint and what from the command line, and the start-up checks that turn an
impossible setting into one line naming the key and a fix.
"""
import math

import torch

import trackers
from models import MODELS
from runtime import TrainError, free_memory_bytes

TRAIN_DEFAULTS = dict(
    # I/O
    out_dir="out/run", data_dir="data/enwik8", init_from="scratch",  # 'scratch' or 'resume'
    eval_interval=500, log_interval=10, eval_iters=20, eval_only=False, final_test=True,
    eval_stride=None,  # test stride; None = block_size // 2
    progress=True,  # tqdm bar
    # optional live trackers (trackers.py; each needs its package): every metrics row, as it is written
    wandb_log=False, wandb_project="asca", wandb_run_name=None,  # run name None = the out_dir's name
    tensorboard_log=False,  # event files in out_dir/tb/
    # schedule
    max_iters=5000, max_time_s=0.0,  # training stops at whichever comes first (0 = no time limit)
    batch_size=32, gradient_accumulation_steps=1,  # accumulation is the total across DDP ranks
    learning_rate=1e-3, min_lr=None, warmup_iters=200, lr_decay_iters=None, decay_lr=True,
    weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0,
    optimizer="muon",  # 'muon': torch.optim.Muon on the hidden matrices, AdamW on the rest; or 'adamw' for all
    muon_lr=0.02, muon_momentum=0.95,  # Muon's peak lr (same warm-up and decay shape) and momentum
    # system
    device="auto", dtype="auto", compile="auto", backend="auto", seed=1337,
    # before the first step, on one batch: the path this run trains on against an independent one (ASCA: compiled
    # flex against gather, or gather against the reference); 'auto' = on CUDA, 'on' = on any device, 'off'
    startup_check="auto",
)
TYPES = dict(min_lr=float, lr_decay_iters=int, eval_stride=int, compile=bool, device=str, dtype=str, backend=str,
             wandb_run_name=str)
# On resume these come from this command, everything else from the checkpoint unless given as --key=value.
THIS_RUN_KEYS = ("out_dir", "init_from", "eval_only", "device", "dtype", "compile", "backend", "progress",
                 "startup_check")
# (plus each model config's DEVICE_DEFAULTS keys, such as ASCA's attn_impl)
RUN_FILES = ("ckpt.pt", "best.pt", "metrics.jsonl", "final.json")  # a directory holding one holds a run
TRAIN_LEGACY = {"optimizer": "adamw"}  # what a checkpoint from before a key existed ran with
SEED_STRIDE = 1000  # data-stream seed = seed * SEED_STRIDE + rank: ranks never share a stream


def defaults_for(kind):
    """Every key a script accepts, with its default: the loop's, then the model kind's."""
    cfg = dict(TRAIN_DEFAULTS)
    cfg.update(MODELS[kind].defaults())
    cfg["out_dir"] = MODELS[kind].out_dir
    return cfg


def explicit_keys(argv):
    """Keys given as --key=value on the command line (they override a resumed checkpoint)."""
    return {a[2:].split("=", 1)[0] for a in argv if a.startswith("--") and "=" in a}


def resume_config(cfg, kind, saved, explicit, say):
    """The resumed run's config: the checkpoint's, except this command's THIS_RUN_KEYS and --key=value
    overrides (each override is reported). Keys newer than the checkpoint keep their defaults."""
    merged, overridden, kept = dict(cfg), [], []
    this_run = THIS_RUN_KEYS + tuple(MODELS[kind].config_cls.DEVICE_DEFAULTS)
    for key, old in saved.items():
        if key not in merged or key in this_run:
            continue
        if key in explicit:
            if merged[key] != old:
                overridden.append(f"{key} {old!r} -> {merged[key]!r}")
            continue
        if merged[key] is not None and merged[key] != old:
            kept.append(f"{key}={old!r} (this command's config: {merged[key]!r})")
        merged[key] = old
    legacy = {**TRAIN_LEGACY, **MODELS[kind].config_cls.LEGACY}
    for key, old in legacy.items():  # a key the checkpoint predates: the behaviour of its time
        if key not in saved and key not in explicit and key in merged:
            merged[key] = old
    if overridden:
        say("resume: overriding the checkpoint's settings from the command line: " + ", ".join(overridden))
    if kept:
        say("resume: kept the checkpoint's " + ", ".join(kept) + "; pass --key=value to change one")
    return merged


def _check(ok, msg):
    if not ok:
        raise TrainError(msg)


def finalize_config(cfg, kind, rt):
    """Fill the derived keys (min_lr, lr_decay_iters, eval_stride) and reject impossible settings with one
    line each; the model's own shape checks come first, so a bad block_size is named as such."""
    cfg = dict(cfg)
    mcfg = MODELS[kind].config_cls.from_dict(cfg)
    try:
        mcfg.validate()
        mcfg.check_device(rt.device_type, rt.ptdtype, training=not cfg["eval_only"])
        if not cfg["eval_only"]:
            mcfg.check_memory(cfg["batch_size"], rt.device_type, rt.compile, free_memory_bytes(rt.device_type, rt.device))
    except ValueError as e:
        raise TrainError(str(e)) from None
    _check(cfg["out_dir"].strip() != "", "out_dir is empty; give a directory such as --out_dir=out/run")
    _check(cfg["init_from"] in ("scratch", "resume"), f"init_from={cfg['init_from']!r} must be 'scratch' or 'resume'")
    _check(not cfg["eval_only"] or cfg["init_from"] == "resume",
           "--eval_only=True evaluates a checkpoint: add --init_from=resume")
    lr = cfg["learning_rate"]
    _check(math.isfinite(lr) and lr > 0, f"learning_rate={lr} must be a positive finite number, such as 1e-3")
    if cfg["min_lr"] is None:
        cfg["min_lr"] = lr / 10
    _check(math.isfinite(cfg["min_lr"]) and 0 <= cfg["min_lr"] <= lr,
           f"min_lr={cfg['min_lr']} must be in [0, learning_rate={lr}]")
    for k in ("max_iters", "warmup_iters", "seed"):
        _check(cfg[k] >= 0, f"{k} must be >= 0, got {cfg[k]}")
    _check(cfg["seed"] < 2 ** 63 // SEED_STRIDE - 1024, f"seed={cfg['seed']} is too large")
    if cfg["lr_decay_iters"] is None:
        cfg["lr_decay_iters"] = cfg["max_iters"]
    _check(cfg["lr_decay_iters"] >= 0, f"lr_decay_iters must be >= 0, got {cfg['lr_decay_iters']}")
    for k in ("max_time_s", "weight_decay", "grad_clip"):
        _check(math.isfinite(cfg[k]) and cfg[k] >= 0, f"{k} must be a finite number >= 0, got {cfg[k]}")
    for k in ("beta1", "beta2", "muon_momentum"):
        _check(0 <= cfg[k] < 1, f"{k} must be in [0, 1), got {cfg[k]}")
    _check(cfg["optimizer"] in ("adamw", "muon"), f"optimizer={cfg['optimizer']!r} must be 'adamw' or 'muon'")
    if cfg["optimizer"] == "muon":
        _check(hasattr(torch.optim, "Muon"), f"optimizer='muon' needs torch.optim.Muon (torch >= 2.9), this is "
                                             f"torch {torch.__version__}; use optimizer='adamw'")
        _check(math.isfinite(cfg["muon_lr"]) and cfg["muon_lr"] > 0, f"muon_lr must be a positive finite number, "
                                                                      f"got {cfg['muon_lr']}")
    _check(cfg["startup_check"] in ("auto", "on", "off"),
           f"startup_check={cfg['startup_check']!r} must be 'auto' (on CUDA), 'on' or 'off'")
    for k in ("batch_size", "gradient_accumulation_steps", "eval_interval", "log_interval", "eval_iters"):
        _check(cfg[k] >= 1, f"{k} must be at least 1, got {cfg[k]}")
    if cfg["eval_stride"] is None:
        cfg["eval_stride"] = max(1, cfg["block_size"] // 2)
    _check(1 <= cfg["eval_stride"] <= cfg["block_size"],
           f"eval_stride={cfg['eval_stride']} must be in [1, block_size={cfg['block_size']}]")
    try:
        trackers.require(cfg)
    except trackers.TrackerError as e:
        raise TrainError(str(e)) from None
    _check(cfg["gradient_accumulation_steps"] % rt.world_size == 0,
           f"gradient_accumulation_steps={cfg['gradient_accumulation_steps']} must be divisible by the number "
           f"of DDP ranks ({rt.world_size})")
    return cfg


def check_kind(ckpt, kind, path):
    if ckpt["model_kind"] != kind:
        other = MODELS.get(ckpt["model_kind"])
        raise TrainError(f"{path} holds a '{ckpt['model_kind']}' model, not '{kind}'; "
                         f"use {other.script if other else 'the script that wrote it'} for it, or another --out_dir")


def check_architecture(ckpt, kind, cfg, path):
    runtime = MODELS[kind].config_cls.RUNTIME_KEYS
    old = ckpt["model_args"]
    diff = [f"{k}={old[k]!r} (run: {cfg[k]!r})" for k in MODELS[kind].defaults()
            if k in old and k not in runtime and old[k] != cfg[k]]
    if diff:
        raise TrainError(f"{path} has a different architecture: {', '.join(diff)}; "
                         f"drop those overrides to resume, or use another --out_dir")
