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
from config_keys import Key
from models import MODELS
from runtime import MUON_NS_DTYPES, TrainError, free_memory_bytes

# The training loop's keys, each declared once with its rules (config_keys.Key: resume='this_run' = always this
# command's on resume; compared=False = compare.py does not compare it; legacy = what runs from before it ran with).
TRAIN_KEYS = dict(
    # I/O
    out_dir=Key("out/run", resume="this_run", compared=False,
                help="the run's directory: config.json, metrics.jsonl, checkpoints, final.json, plots"),
    data_dir=Key("data/enwik8", help="a directory prepare_dataset.py wrote (train/val/test .bin and meta.json)"),
    # a checkpoint file starts a new run from its weights (checkpoint.warm_start: fresh optimizer and schedule, the
    # same or a longer block_size, dense into ASCA); its origin (path, sha256, iteration) is recorded in config.json,
    # checkpoints and final.json, and compare.py compares it like any key
    init_from=Key("scratch", resume="this_run",
                  help="'scratch', 'resume' (this out_dir's ckpt.pt), or a checkpoint file: a new run from its "
                       "weights"),
    eval_interval=Key(500, help="iterations between evaluations on the val windows (each writes a checkpoint)"),
    log_interval=Key(10, help="iterations between training log lines"),
    eval_iters=Key(20, help="val batches per evaluation: eval_iters x batch_size fixed windows"),
    eval_only=Key(False, resume="this_run", help="score out_dir's checkpoint (val and test) and stop"),
    # does the model depend on its own selector's choices? (a mask swap)
    eval_selector=Key("", resume="this_run", compared=False,
                      choices=("", *dict.fromkeys(s for kind in MODELS.values() for s in kind.selectors)),
                      help="with eval_only: score an ASCA checkpoint with this selector at the same counts ('' = its "
                           "own)"),
    final_test=Key(True, help="score the whole test split after training (final.json's test_bpc)"),
    # does a gap move with more steps? into that iteration's metrics row and final.json's test_bpc_at_iter
    test_iters=Key("", type=str, compared=False,
                   help="iterations at which the test split is scored during training too, e.g. '500,1000'"),
    # evaluate.copy_test: with the final test (and --eval_only), bpc on copy_len-byte copies planted in this many
    # test windows per distance bucket, next to the same bytes unplanted
    copy_test_windows=Key(0, resume="this_run", compared=False,
                          help="the long-range copy test after training: windows per distance bucket (0 = off)"),
    copy_len=Key(64, help="bytes in each planted copy (the copy test and copy_augment)"),
    copy_augment=Key(0.0, help="fraction of training windows with a copy planted (retrieval to learn)"),
    eval_stride=Key(None, type=int, help="the test pass's stride: every byte scored once with at least block_size - "
                                         "stride bytes of context (None = block_size // 2)"),
    progress=Key(True, resume="this_run", compared=False, help="a tqdm progress bar"),
    # optional live trackers (trackers.py; each needs its package): every metrics row, as it is written
    wandb_log=Key(False, help="log every metrics row to Weights & Biases (needs wandb)"),
    wandb_project=Key("asca", help="the Weights & Biases project"),
    wandb_run_name=Key(None, type=str, help="the Weights & Biases run name (None = the out_dir's name)"),
    tensorboard_log=Key(False, help="TensorBoard event files in out_dir/tb/ (needs tensorboard)"),
    # schedule
    max_iters=Key(5000, help="training stops after this many iterations, or at max_time_s, whichever comes first"),
    max_time_s=Key(0.0, help="training stops after this many seconds of training, and the schedules follow time "
                             "(0 = no limit)"),
    batch_size=Key(32, help="sequences per micro-batch"),
    gradient_accumulation_steps=Key(1, help="micro-batches per optimizer step, the total across DDP ranks"),
    learning_rate=Key(1e-3, help="peak learning rate (AdamW's; Muon's is muon_lr)"),
    min_lr=Key(None, type=float, help="the learning rate after the cosine decay (None = learning_rate / 10)"),
    warmup_iters=Key(200, help="iterations of linear learning-rate warm-up"),
    lr_decay_iters=Key(None, type=int, help="the iteration where the cosine decay reaches min_lr (None = max_iters)"),
    decay_lr=Key(True, help="cosine-decay the learning rate (False: constant after the warm-up)"),
    weight_decay=Key(0.1, help="AdamW's decoupled weight decay, on matrices only"),
    beta1=Key(0.9, help="AdamW's beta1"), beta2=Key(0.95, help="AdamW's beta2"),
    grad_clip=Key(1.0, help="clip the gradients' global norm to this (0 = off)"),
    optimizer=Key("muon", legacy="adamw", choices=("adamw", "muon"),
                  help="'muon': Muon on the hidden matrices, AdamW on the rest; 'adamw': AdamW on all"),
    muon_lr=Key(0.02, help="Muon's peak learning rate (the same warm-up and decay)"),
    muon_momentum=Key(0.95, help="Muon's momentum"),
    # bf16 matmuls are emulated ~100x slower on a CPU without native bf16 (muon.py)
    muon_ns_dtype=Key("auto", legacy="bfloat16", resume="this_run", choices=MUON_NS_DTYPES,
                      help="dtype of Muon's Newton-Schulz iteration ('auto' = bfloat16 on CUDA and on a CPU with "
                           "native bf16 matmuls, float32 on other CPUs)"),
    # system: where and how this process runs
    device=Key("auto", type=str, resume="this_run", help="'cpu', 'cuda', 'cuda:N' ('auto' = CUDA if present)"),
    dtype=Key("auto", type=str, resume="this_run",
              help="'float32', 'bfloat16', 'float16' ('auto' = bfloat16 on CUDA where supported, float32 on a CPU)"),
    compile=Key("auto", type=bool, resume="this_run", help="torch.compile the model ('auto' = on CUDA)"),
    backend=Key("auto", type=str, resume="this_run", help="DDP's backend ('auto' = nccl on CUDA, gloo on a CPU)"),
    seed=Key(1337, help="seeds the weights, the data stream and the selectors' draws"),
    # ASCA: compiled flex against gather, or gather against the reference
    startup_check=Key("auto", resume="this_run", choices=("auto", "on", "off"),
                      help="before the first step, on one batch: the path this run trains on against an independent "
                           "one ('auto' = on CUDA)"),
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


def help_text(kind, width=100):
    """--help: every key a script of this kind accepts, with its default, its allowed values and its help line."""
    import textwrap
    decls, defaults = key_declarations(kind), defaults_for(kind)
    groups = [("the training loop's keys", [k for k in TRAIN_KEYS if k in defaults]),
              (f"the model's keys ({MODELS[kind].config_cls.__name__})", [k for k in decls if k in defaults
                                                                        and k not in TRAIN_KEYS])]
    out = [f"usage: python3 {MODELS[kind].script} [config/FILE.py ...] [--key=value ...]", "",
           "Config files (Python assignments, as in nanoGPT: run only ones you trust) and --key=value overrides apply",
           "left to right. Every key, its outputs and the protocol: docs/usage.md."]
    for title, names in groups:
        out += ["", title + ":"]
        for name in names:
            d = decls[name]
            shown = [c if c != "" else "''" for c in map(str, d.choices or ())]
            head = f"  --{name}={defaults[name]}" + (f"  ({'|'.join(shown)})" if shown else "")
            out.append(head)
            out += textwrap.wrap(d.help, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(out)


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
        _check(cfg["eval_selector"] in MODELS[kind].selectors,
               f"--eval_selector={cfg['eval_selector']} swaps a model's choice of blocks; a {kind!r} run has no such "
               f"choice (its attention keeps every block): drop it")
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
