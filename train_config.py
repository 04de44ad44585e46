"""
A training run's configuration: every key a script accepts (the loop's, then the model kind's), what a
resumed run takes from its checkpoint and what from the command line, and the start-up checks that turn an
impossible setting into one line naming the key and a fix.
"""
import math
import os

import torch

import config_keys
import evaluate
import trackers
from asca_selector import SELECTORS
from config_keys import Key
from models import MODELS
from runtime import MUON_NS_DTYPES, TrainError, free_memory_bytes

# The training loop's keys, each declared once with its rules (config_keys.Key: resume='this_run' = always this
# command's on resume; compared=False = compare.py does not compare it; legacy = what runs from before it ran with).
TRAIN_KEYS = dict(
    # I/O
    out_dir=Key("out/run", resume="this_run", compared=False), data_dir=Key("data/enwik8"),
    # 'scratch', 'resume' (this out_dir's ckpt.pt), or a checkpoint file: a new run from its weights
    # (checkpoint.warm_start: fresh optimizer and schedule, the same or a longer block_size, dense into ASCA); its
    # origin (path, sha256, iteration) is recorded in config.json, checkpoints and final.json, and compare.py compares
    # it like any key
    init_from=Key("scratch", resume="this_run"),
    eval_interval=Key(500), log_interval=Key(10), eval_iters=Key(20), eval_only=Key(False, resume="this_run"),
    # with eval_only, an ASCA checkpoint scored with another choice of blocks at the same counts (a mask swap):
    # does the model depend on its own selector's choices? '' = its own
    eval_selector=Key("", resume="this_run", compared=False, choices=("", *SELECTORS)),
    final_test=Key(True),
    # iterations at which the test split is scored during training too (a comma list, e.g. '500,1000':
    # does a gap move with more steps?), into that iteration's metrics row and final.json's test_bpc_at_iter
    test_iters=Key("", type=str, compared=False),
    # the long-range copy test (evaluate.copy_test): with the final test (and --eval_only), bpc on copy_len-byte
    # copies planted in this many test windows per distance bucket, next to the same bytes unplanted; 0 = off
    copy_test_windows=Key(0, resume="this_run", compared=False), copy_len=Key(64),
    copy_augment=Key(0.0),  # the fraction of training windows with such a copy planted (retrieval to learn)
    eval_stride=Key(None, type=int),  # test stride; None = block_size // 2
    progress=Key(True, resume="this_run", compared=False),  # tqdm bar
    # optional live trackers (trackers.py; each needs its package): every metrics row, as it is written
    wandb_log=Key(False), wandb_project=Key("asca"),
    wandb_run_name=Key(None, type=str),  # None = the out_dir's name
    tensorboard_log=Key(False),  # event files in out_dir/tb/
    # schedule
    max_iters=Key(5000), max_time_s=Key(0.0),  # training stops at whichever comes first (0 = no time limit)
    batch_size=Key(32), gradient_accumulation_steps=Key(1),  # accumulation is the total across DDP ranks
    learning_rate=Key(1e-3), min_lr=Key(None, type=float), warmup_iters=Key(200),
    lr_decay_iters=Key(None, type=int), decay_lr=Key(True),
    weight_decay=Key(0.1), beta1=Key(0.9), beta2=Key(0.95), grad_clip=Key(1.0),
    # 'muon': torch.optim.Muon on the hidden matrices, AdamW on the rest; or 'adamw' for all
    optimizer=Key("muon", legacy="adamw", choices=("adamw", "muon")),
    muon_lr=Key(0.02), muon_momentum=Key(0.95),  # Muon's peak lr (same warm-up and decay shape) and momentum
    # the dtype of Muon's Newton-Schulz iteration: 'auto' = bfloat16 on CUDA and on a CPU with native bf16
    # matmuls (torch's Muon), float32 on other CPUs, where bf16 matmuls are emulated ~100x slower (muon.py)
    muon_ns_dtype=Key("auto", legacy="bfloat16", resume="this_run", choices=MUON_NS_DTYPES),
    # system: where and how this process runs
    device=Key("auto", type=str, resume="this_run"), dtype=Key("auto", type=str, resume="this_run"),
    compile=Key("auto", type=bool, resume="this_run"), backend=Key("auto", type=str, resume="this_run"),
    seed=Key(1337),
    # before the first step, on one batch: the path this run trains on against an independent one (ASCA: compiled
    # flex against gather, or gather against the reference); 'auto' = on CUDA, 'on' = on any device, 'off'
    startup_check=Key("auto", resume="this_run", choices=("auto", "on", "off")),
)
TRAIN_DEFAULTS = {k: d.default for k, d in TRAIN_KEYS.items()}
SEED_STRIDE = 1000  # data-stream seed = seed * SEED_STRIDE + rank: ranks never share a stream


def key_declarations(kind):
    """{name: Key} of every key a script of this model kind accepts: the loop's, then the model's."""
    return {**TRAIN_KEYS, **MODELS[kind].config_cls.declarations()}


def with_legacy(saved, kind):
    """A run's saved config (or a checkpoint's model_args) with each key it predates set to what runs of its time
    ran with (config_keys.with_legacy over this kind's declarations)."""
    return config_keys.with_legacy(saved, key_declarations(kind))


def types_for(kind):
    """The value types configurator needs where a default (None, 'auto') does not say it."""
    return {k: d.type for k, d in key_declarations(kind).items() if d.type is not None}


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
    """The resumed run's config: the checkpoint's, except this command's 'this_run' keys and --key=value
    overrides (each override is reported). Keys newer than the checkpoint take their legacy value (what runs of
    its time ran with), else their default."""
    merged, overridden, kept = dict(cfg), [], []
    decls = key_declarations(kind)
    for key, old in with_legacy(saved, kind).items():
        if key not in merged or decls.get(key, Key(None)).resume == "this_run":
            continue
        if key in explicit:
            if merged[key] != old and key in saved:
                overridden.append(f"{key} {old!r} -> {merged[key]!r}")
            continue
        if key in saved and merged[key] is not None and merged[key] != old:
            kept.append(f"{key}={old!r} (this command's config: {merged[key]!r})")
        merged[key] = old
    if overridden:
        say("resume: overriding the checkpoint's settings from the command line: " + ", ".join(overridden))
    if kept:
        say("resume: kept the checkpoint's " + ", ".join(kept) + "; pass --key=value to change one")
    return merged


def check_exclusive(kind, explicit):
    """A command that gives two keys saying the same thing two ways (Key.excludes) is one line naming both."""
    for name, d in key_declarations(kind).items():
        both = [other for other in d.excludes if name in explicit and other in explicit]
        if both:
            raise TrainError(f"--{name} and --{both[0]} set the same thing two ways: give one of them")


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
            free = free_memory_bytes(rt.device_type, rt.device)
            mcfg.check_memory(cfg["batch_size"], rt.device_type, rt.compile, free)
    except ValueError as e:
        raise TrainError(str(e)) from None
    _check(cfg["out_dir"].strip() != "", "out_dir is empty; give a directory such as --out_dir=out/run")
    init = cfg["init_from"]
    _check(init in ("scratch", "resume") or os.path.isfile(init),
           f"init_from={init!r} must be 'scratch', 'resume' or a checkpoint file to start a new run from (such as "
           f"out/RUN/ckpt.pt); there is no file {init}")
    _check(init in ("scratch", "resume") or not cfg["eval_only"],
           f"--eval_only=True evaluates this out_dir's checkpoint (--init_from=resume); to score {init} at another "
           f"block_size, start a run from it with --max_iters=0")
    _check(not cfg["eval_only"] or cfg["init_from"] == "resume",
           "--eval_only=True evaluates a checkpoint: add --init_from=resume")
    if cfg["eval_selector"]:
        _check(cfg["eval_only"], f"--eval_selector={cfg['eval_selector']} scores a checkpoint with another choice of "
                                 f"blocks: add --eval_only=True --init_from=resume")
        _check("selector" in MODELS[kind].defaults(), f"--eval_selector swaps an ASCA model's block choice; this "
                                                      f"is a {kind!r} run (dense attention keeps every block): drop it")
    _check(math.isfinite(cfg["copy_augment"]) and 0 <= cfg["copy_augment"] <= 1,
           f"copy_augment={cfg['copy_augment']} is the fraction of training windows with a planted copy: use a "
           f"number in [0, 1] (0 = off)")
    _check(cfg["copy_test_windows"] >= 0, f"copy_test_windows={cfg['copy_test_windows']} must be >= 0 (0 = no copy "
                                          f"test)")
    if cfg["copy_augment"] > 0 or cfg["copy_test_windows"] > 0:
        why = evaluate.check_copy_len(cfg["copy_len"], cfg["block_size"])
        _check(why is None, why)
    try:
        its = [int(x) for x in str(cfg["test_iters"]).split(",") if x.strip()]
    except ValueError:
        its = None
    _check(its is not None and all(i >= 1 for i in its),
           f"test_iters={cfg['test_iters']!r} must be a comma list of iterations >= 1, such as '500,1000'")
    late = [i for i in its if i > cfg["max_iters"]]
    _check(not late, f"test_iters={cfg['test_iters']!r} names iteration {late[0] if late else 0}, beyond "
                     f"max_iters={cfg['max_iters']}: it would never be scored; give iterations up to max_iters")
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
    for k, d in TRAIN_KEYS.items():
        _check(d.choices is None or cfg[k] in d.choices, f"{k}={cfg[k]!r} must be one of {', '.join(d.choices or ())}")
    if cfg["optimizer"] == "muon":
        _check(hasattr(torch.optim, "Muon"), f"optimizer='muon' needs torch.optim.Muon (torch >= 2.9), this is "
                                             f"torch {torch.__version__}; use optimizer='adamw'")
        _check(math.isfinite(cfg["muon_lr"]) and cfg["muon_lr"] > 0, f"muon_lr must be a positive finite number, "
                                                                      f"got {cfg['muon_lr']}")
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
    runtime = MODELS[kind].config_cls.runtime_keys()
    old = ckpt["model_args"]
    diff = [f"{k}={old[k]!r} (run: {cfg[k]!r})" for k in MODELS[kind].defaults()
            if k in old and k not in runtime and old[k] != cfg[k]]
    if diff:
        raise TrainError(f"{path} has a different architecture: {', '.join(diff)}; "
                         f"drop those overrides to resume, or use another --out_dir")
