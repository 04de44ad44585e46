"""
The one training loop both scripts share: `python baseline_model.py ...` and `python novel_model.py ...`
both call main(argv, kind) here, and differ only by the model kind (baseline_model.MODELS).

Read it top to bottom: configuration (defaults <- config files <- --key=value; a resumed run keeps its
checkpoint's settings unless overridden on the command line), the runtime (device, dtype, compile, DDP),
evaluation in bits per byte, then the Trainer: build, resume, one optimizer step, evaluate and
checkpoint, finish. Attention modules that own behaviour (ASCA's sparsity schedule and diagnostics)
expose it through GPT.set_step / GPT.diagnostics; the loop only calls and logs them.
"""
import contextlib
import json
import math
import os
import platform
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import checkpoint
import configurator
import trackers
from baseline_model import MODELS
from checkpoint import CheckpointError
from prepare_dataset import ByteDataset, DataError, sliding_windows, stack_windows

LN2 = math.log(2)
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
)
TYPES = dict(min_lr=float, lr_decay_iters=int, eval_stride=int, compile=bool, device=str, dtype=str, backend=str,
             wandb_run_name=str)
# On resume these come from this command, everything else from the checkpoint unless given as --key=value.
THIS_RUN_KEYS = ("out_dir", "init_from", "eval_only", "device", "dtype", "compile", "backend", "progress")
# (plus each model config's DEVICE_DEFAULTS keys, such as ASCA's attn_impl)
RUN_FILES = ("ckpt.pt", "best.pt", "metrics.jsonl", "final.json")  # a directory holding one holds a run
TRAIN_LEGACY = {"optimizer": "adamw"}  # what a checkpoint from before a key existed ran with
SEED_STRIDE = 1000  # data-stream seed = seed * SEED_STRIDE + rank: ranks never share a stream

# Peak dense bf16 tensor-core FLOP/s by GPU name, for MFU (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
                   "A10G": 125e12, "4090": 165e12, "3090": 71e12}


class TrainError(Exception):
    """A user-facing problem: one line, no traceback."""


def defaults_for(kind):
    """Every key a script accepts, with its default: the loop's, then the model kind's."""
    cfg = dict(TRAIN_DEFAULTS)
    cfg.update(MODELS[kind].defaults())
    cfg["out_dir"] = MODELS[kind].out_dir
    return cfg


# ----------------------------------------------------------------------------- configuration

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


# ----------------------------------------------------------------------------- runtime

DEVICES = "auto, cpu, cuda, cuda:N"


class Runtime:
    """Device, dtype, autocast context, DDP rank info: resolved once, with the reasons logged."""

    def __init__(self, cfg):
        self.ddp = int(os.environ.get("RANK", -1)) != -1
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.master = self.rank == 0
        notes = []
        dev = cfg["device"]
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise TrainError(f"device={dev!r} is not one of {DEVICES} (lower case)")
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
            notes.append(f"device=auto -> {dev} ({'CUDA available' if dev == 'cuda' else 'no CUDA'})")
        if dev.startswith("cuda") and not torch.cuda.is_available():
            raise TrainError(f"device={dev} requested but torch.cuda.is_available() is False; use --device=cpu")
        if dev == "cuda" and self.ddp:
            dev = f"cuda:{self.local_rank}"
        self.device = dev
        self.device_type = "cuda" if dev.startswith("cuda") else "cpu"
        dt = cfg["dtype"]
        if dt == "auto":
            if self.device_type == "cuda":
                dt = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
                notes.append(f"dtype=auto -> {dt} ({'bf16 supported' if dt == 'bfloat16' else 'no bf16: fp16 + GradScaler'})")
            else:
                dt = "float32"
                notes.append("dtype=auto -> float32 (CPU)")
        if dt not in ("float32", "bfloat16", "float16"):
            raise TrainError(f"dtype={dt} is not one of float32, bfloat16, float16, auto")
        self.dtype = dt
        self.ptdtype = getattr(torch, dt)
        comp = cfg["compile"]
        if comp == "auto":
            comp = self.device_type == "cuda"
            notes.append(f"compile=auto -> {comp} ({'CUDA' if comp else 'CPU: compile time would dominate'})")
        self.compile = comp
        backend = cfg["backend"]
        if backend == "auto":
            backend = "nccl" if self.device_type == "cuda" else "gloo"
        self.backend = backend
        self.notes = notes
        self.ctx = (contextlib.nullcontext() if dt == "float32"
                    else torch.autocast(device_type=self.device_type, dtype=self.ptdtype))
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=(dt == "float16"))
        self.control_group = None
        self.say = print if self.master else (lambda *a, **k: None)

    def init_distributed(self):
        if not self.ddp:
            return
        import torch.distributed as dist
        if self.device_type == "cuda":
            torch.cuda.set_device(self.device)
        dist.init_process_group(backend=self.backend)
        # a CPU group for stop flags: agreeing on "stop now" costs no GPU sync
        self.control_group = dist.new_group(backend="gloo")

    def close(self):
        if self.ddp:
            import torch.distributed as dist
            dist.destroy_process_group()

    def any_rank(self, flag):
        """True if `flag` is true on any rank (CPU all-reduce; identity without DDP)."""
        if not self.ddp:
            return bool(flag)
        import torch.distributed as dist
        t = torch.tensor([1 if flag else 0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control_group)
        return bool(t.item())

    def max_over_ranks(self, value):
        """The largest `value` over the ranks (a float; CPU all-reduce; identity without DDP)."""
        if not self.ddp:
            return value
        import torch.distributed as dist
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control_group)
        return t.item()

    def mean_over_ranks(self, t):
        """The mean of tensor `t` over the ranks (an all-reduce on the model's device; identity without DDP)."""
        if not self.ddp:
            return t
        import torch.distributed as dist
        t = t.clone()
        dist.all_reduce(t)
        return t / self.world_size

    def gather(self, obj):
        """[obj of rank 0, obj of rank 1, ...] (a one-element list without DDP)."""
        if not self.ddp:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.control_group)
        return out

    def device_name(self):
        if self.device_type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"

    def peak_flops(self):
        if self.device_type != "cuda" or self.dtype == "float32":
            return None
        return next((f for key, f in PEAK_BF16_FLOPS.items() if key in self.device_name()), None)

    def env(self):
        return {"python": platform.python_version(), "torch": str(torch.__version__), "numpy": np.__version__,
                "device": self.device_name(), "device_type": self.device_type, "dtype": self.dtype,
                "compile": self.compile, "world_size": self.world_size,
                "cuda": torch.version.cuda if self.device_type == "cuda" else None}


def get_lr(it, cfg, pos=None):
    """Linear warm-up over the first warmup_iters iterations, then cosine decay to min_lr at lr_decay_iters,
    then min_lr (nanoGPT). `pos` is the position along the schedule in iterations (iteration runs: it; a time
    budget: progress * max_iters, see Trainer.schedule_position); the warm-up always counts real steps."""
    lr, min_lr = cfg["learning_rate"], cfg["min_lr"]
    pos = it if pos is None else pos
    if not cfg["decay_lr"]:
        return lr
    if it < cfg["warmup_iters"]:
        return lr * (it + 1) / (cfg["warmup_iters"] + 1)
    if pos > cfg["lr_decay_iters"]:
        return min_lr
    ratio = max(0.0, pos - cfg["warmup_iters"]) / max(1, cfg["lr_decay_iters"] - cfg["warmup_iters"])
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def eval_windows(model, data, starts, block_size, batch_size, device, ctx, after_forward=None):
    """Mean bits per byte over fixed windows data[s : s+block_size] -> next bytes (after_forward: as
    evaluate_stream's)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        x, y = (t.to(device) for t in stack_windows(data, starts[i:i + batch_size], block_size))
        with ctx:
            logits, _ = model(x)
        if after_forward is not None:
            after_forward()
        total += F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), reduction="sum").item()
        count += y.numel()
    return total / count / LN2


@torch.no_grad()
def evaluate_stream(model, data, block_size, stride, batch_size, device, ctx=contextlib.nullcontext(), after_forward=None):
    """Bits per byte over every target byte 1..n-1 of `data`, each scored exactly once, with sliding
    windows of block_size and the given stride (DESIGN.md section 4). Returns (bpc, n_scored).
    after_forward() is called after each forward (to tally what the model measured on it)."""
    model.eval()
    windows = sliding_windows(len(data), block_size, stride)
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        by_len = {}
        for w in windows[i:i + batch_size]:  # all windows have length block_size unless the data is shorter
            by_len.setdefault(w[1], []).append(w)
        for length, ws in by_len.items():
            x, y = (t.to(device) for t in stack_windows(data, [s for s, _, _ in ws], length))
            with ctx:
                logits, _ = model(x)
            if after_forward is not None:
                after_forward()
            nll = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")  # (b, length)
            keep = torch.zeros_like(nll, dtype=torch.bool)
            for r, (_, _, n_score) in enumerate(ws):
                keep[r, length - n_score:] = True
            total += nll[keep].double().sum().item()
            count += int(keep.sum().item())
    return total / count / LN2, count


# ----------------------------------------------------------------------------- small pieces of the loop

def append_jsonl(row, path):
    """Append one JSON line; a symlink at `path` is refused, not followed (O_NOFOLLOW)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as e:
        raise TrainError(f"cannot append to {path}: {e.strerror} (a symlink is refused); remove it, "
                         f"or use another --out_dir") from None
    with os.fdopen(fd, "a") as f:
        f.write(json.dumps(row) + "\n")


class LoadMeter:
    """How much of the machine other processes used while this run trained, in cores: the CPU time of every
    process (/proc/stat) minus this process's own (os.times), over the wall-clock. A throughput measured next
    to another job is 5-10x off on a small CPU, so metrics rows and final.json carry it and comparison tables
    flag rows above CONTENDED_CORES. None where /proc/stat is missing (not Linux). DDP ranks on one machine
    count each other as other processes."""

    def __init__(self):
        self.start = self.mark = self.read()

    @staticmethod
    def read():
        try:
            with open("/proc/stat") as f:
                ticks = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
            busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None
        t = os.times()
        return time.time(), busy, t.user + t.system

    @staticmethod
    def others(a, b):
        if a is None or b is None or b[0] - a[0] <= 0:
            return None
        return round(max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / (b[0] - a[0])), 3)

    def interval(self):
        """{'other_cpu_load': cores used by other processes since the last call}."""
        now = self.read()
        load, self.mark = self.others(self.mark, now), now
        return {"other_cpu_load": load}

    def summary(self):
        return {"other_cpu_load": self.others(self.start, self.read()), "cpu_cores": os.cpu_count()}


CONTENDED_CORES = 0.25  # other processes' mean CPU use above which a run's throughput is flagged


@dataclass
class Counters:
    """Where the run stands; saved in checkpoints (the first five) so resume continues exactly."""
    iter_num: int = 0
    tokens: int = 0
    train_time: float = 0.0  # seconds of training steps, without compile/warm-up and evals
    best_val: float = float("inf")
    best_iter: int = -1
    warmup_s: float = 0.0  # this process: the first step after (re)start, compile included
    eval_s: float = 0.0
    run_time: float = 0.0  # this process: training time and tokens behind tokens_per_s
    run_tokens: int = 0
    interval_time: float = 0.0  # since the last eval, for the metrics row
    interval_tokens: int = 0


class StopFlag:
    """SIGINT/SIGTERM during training: finish the step, checkpoint, exit (a second SIGINT aborts at once).
    Outside training (the final test evaluation) both signals interrupt at once. restore() puts back
    the handlers it replaced."""

    def __init__(self):
        self.signum, self.saved = None, {}

    def install(self):
        def handler(signum, frame):
            if self.signum is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.signum = signum
        for s in (signal.SIGINT, signal.SIGTERM):
            self.saved[s] = signal.signal(s, handler)

    def interrupt_now(self):
        def handler(signum, frame):
            raise KeyboardInterrupt
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, handler)

    def restore(self):
        for s, h in self.saved.items():
            signal.signal(s, h)
        self.saved = {}


# ----------------------------------------------------------------------------- the trainer

class Trainer:
    def __init__(self, cfg, kind, rt, ds, ckpt, build_model):
        self.cfg, self.kind, self.rt, self.ds, self.say = cfg, kind, rt, ds, rt.say
        self.out_dir = cfg["out_dir"]
        self.ckpt_path = os.path.join(self.out_dir, "ckpt.pt")
        self.best_path = os.path.join(self.out_dir, "best.pt")
        self.model_args = {k: cfg[k] for k in MODELS[kind].defaults()}
        self.model_args["vocab_size"] = 256
        self.c = Counters()
        self.data_sha256 = data_identity(ds)
        self.sched_pos = 0.0  # where the schedules stand (set_schedule); saved, so a reload runs at it
        self.load = LoadMeter()
        self.build(build_model)
        if ckpt is not None:
            self.resume(ckpt)

    # --- build and resume
    def build(self, build_model):
        cfg, rt = self.cfg, self.rt
        for seed_fn in (torch.manual_seed, random.seed, np.random.seed):
            seed_fn(cfg["seed"] + rt.rank)
        if rt.device_type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.gen = torch.Generator().manual_seed(cfg["seed"] * SEED_STRIDE + rt.rank)  # each rank its own windows
        self.model = (build_model or MODELS[self.kind].build)(cfg).to(rt.device)
        self.optimizer = self.model.configure_optimizer(cfg["weight_decay"], cfg["learning_rate"],
                                                        (cfg["beta1"], cfg["beta2"]), rt.device_type,
                                                        cfg["optimizer"], cfg["muon_lr"], cfg["muon_momentum"])
        self.fwd = torch.compile(self.model) if rt.compile else self.model  # eval and, without DDP, training
        self.train_fwd = self.fwd
        if rt.ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.train_fwd = DDP(self.fwd, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)
        self.tokens_per_iter = cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"]
        self.grad_accum = cfg["gradient_accumulation_steps"] // rt.world_size

    def resume(self, ckpt):
        rt, c = self.rt, self.c
        try:
            self.model.load_state_dict(ckpt["model"])
        except (RuntimeError, TypeError, AttributeError) as e:
            raise TrainError(f"{self.ckpt_path}: its weights do not fit its model_args ({checkpoint.first_line(e, 160)}); "
                             f"the file is damaged: resume from another checkpoint, or start again") from None
        c.iter_num, c.best_val = ckpt["iter_num"], ckpt["best_val_bpc"]
        self.sched_pos = checkpoint.schedule_position(ckpt)
        c.best_iter, c.train_time, c.tokens = ckpt.get("best_iter", -1), ckpt.get("train_time_s", 0.0), ckpt.get("tokens", 0)
        if self.cfg["eval_only"]:
            return
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise TrainError(f"{self.ckpt_path}: its optimizer state does not fit optimizer={self.cfg['optimizer']!r} "
                             f"({str(e).splitlines()[0][:120]}); resume with the optimizer it was written with") from None
        if ckpt.get("scaler") is not None:
            rt.scaler.load_state_dict(ckpt["scaler"])
        gens = ckpt["data_generator"]
        if len(gens) != rt.world_size:
            self.say(f"note: checkpoint was written with {len(gens)} ranks, now {rt.world_size}: "
                     f"ranks beyond the saved ones keep their fresh seeds")
        if rt.rank < len(gens):
            try:
                self.gen.set_state(gens[rt.rank])
                checkpoint.set_rng_states(ckpt["rng"][rt.rank])
            except Exception as e:  # a damaged file: the RNG states are the last thing read
                raise TrainError(f"{self.ckpt_path}: its RNG states are damaged ({type(e).__name__}: "
                                 f"{checkpoint.first_line(e, 120)}); resume from another checkpoint, or start again") from None
        if rt.master:
            self.repair_best(ckpt)
        self.say(f"resumed from {self.ckpt_path} at iter {c.iter_num} (best val {c.best_val:.4f} bpc at iter {c.best_iter})")

    # --- the loop
    def fit(self):
        cfg, rt, c = self.cfg, self.rt, self.c
        self.start_iter, self.stop = c.iter_num, StopFlag()
        self.loss_sum, self.loss_n = torch.zeros((), device=rt.device), 0
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=rt.device)
        self.last_val, self.bar = None, self.progress_bar()
        self.trackers = trackers.Trackers(cfg, self.out_dir, resumed=c.iter_num > 0, say=self.say) if rt.master else None
        self.stop.install()
        try:
            while True:
                lr = self.last_lr = self.set_schedule()
                time_up = cfg["max_time_s"] > 0 and c.train_time >= cfg["max_time_s"]
                done = c.iter_num >= cfg["max_iters"] or rt.any_rank(time_up)
                resumed_here = c.iter_num == self.start_iter > 0  # already evaluated before the checkpoint
                if done or (c.iter_num % cfg["eval_interval"] == 0 and not resumed_here):
                    self.evaluate_and_save(lr)
                if done:
                    break
                self.train_step()
                if rt.any_rank(self.stop.signum is not None):
                    return self.stop_on_signal()
            if self.bar is not None:
                self.bar.close()
            self.stop.interrupt_now()  # the final test: Ctrl-C or SIGTERM stop it at once
            return self.finish("max_time_s" if time_up else "max_iters")
        finally:
            self.stop.restore()
            if self.trackers is not None:
                self.trackers.close()

    def schedule_position(self):
        """(position along the schedules in iterations, progress in [0, 1]). Without a time budget the
        position is the iteration. With max_time_s, progress = the larger of iterations / max_iters and
        training time / max_time_s, and the position is progress * max_iters: the lr decay and the sparsity
        warm-up then end when the budget does, however many iterations fit (ranks agree on the time)."""
        c, cfg = self.c, self.cfg
        if cfg["max_time_s"] <= 0:
            return c.iter_num, c.iter_num / cfg["max_iters"] if cfg["max_iters"] else 1.0
        t = self.rt.max_over_ranks(c.train_time)
        progress = min(1.0, max(c.iter_num / cfg["max_iters"] if cfg["max_iters"] else 1.0, t / cfg["max_time_s"]))
        return progress * cfg["max_iters"], progress

    def set_schedule(self):
        pos, self.progress = self.schedule_position()
        self.sched_pos = pos
        lr = get_lr(self.c.iter_num, self.cfg, pos)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's group: muon_lr / learning_rate
        self.model.set_step(pos)
        return lr

    def train_step(self):
        """One optimizer step over grad_accum micro-batches; its time counts as training time, except the
        first step after a (re)start, which carries compile and warm-up."""
        cfg, rt, c = self.cfg, self.rt, self.c
        t0 = time.time()
        for micro in range(self.grad_accum):
            x, y = self.ds.get_batch("train", cfg["batch_size"], cfg["block_size"], self.gen)
            if rt.device_type == "cuda":
                x, y = x.pin_memory().to(rt.device, non_blocking=True), y.pin_memory().to(rt.device, non_blocking=True)
            if rt.ddp:  # sync gradients only on the last micro step
                self.train_fwd.require_backward_grad_sync = micro == self.grad_accum - 1
            with rt.ctx:
                _, loss = self.train_fwd(x, y)
            rt.scaler.scale(loss / self.grad_accum).backward()
            self.loss_sum += loss.detach().float()
            self.nonfinite |= ~torch.isfinite(loss.detach())
            self.loss_n += 1
        if cfg["grad_clip"] > 0:
            rt.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg["grad_clip"])
        rt.scaler.step(self.optimizer)
        rt.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.update_budgets(rt.mean_over_ranks)  # controller state moves between steps only
        c.iter_num += 1
        c.tokens += self.tokens_per_iter
        log_now = c.iter_num % cfg["log_interval"] == 0
        if log_now:
            if rt.device_type == "cuda":
                torch.cuda.synchronize()
            self.check_finite(f"at iter {c.iter_num}")
        dt = time.time() - t0
        if c.iter_num == self.start_iter + 1:
            c.warmup_s += dt
        else:
            c.train_time += dt
            c.interval_time += dt
            c.interval_tokens += self.tokens_per_iter
            c.run_time += dt
            c.run_tokens += self.tokens_per_iter
        if self.bar is not None:
            self.bar.update(1)
            if log_now and self.loss_n:
                self.bar.set_postfix_str(progress_text({
                    "train_bpc": self.loss_sum.item() / self.loss_n / LN2, "val_bpc": self.last_val,
                    "tokens_per_s": c.interval_tokens / c.interval_time if c.interval_time else None,
                    **self.model.diagnostics()}))

    def check_finite(self, where):
        if self.rt.any_rank(bool(self.nonfinite.item())):
            raise TrainError(f"the training loss became NaN or inf ({where}); the last good checkpoint in "
                             f"{self.out_dir} was kept; lower learning_rate or warm up longer, and resume or restart")

    # --- evaluate and checkpoint
    def val_bpc(self):
        """Bits per byte on the fixed val windows; what the model measured over all of them (ASCA: the
        sparsity, which varies with content) is kept in self.val_measured."""
        cfg = self.cfg
        starts = self.ds.val_windows(cfg["block_size"], cfg["eval_iters"] * cfg["batch_size"])
        self.model.start_tally()
        bpc = eval_windows(self.fwd, self.ds.splits["val"], starts, cfg["block_size"], cfg["batch_size"],
                           self.rt.device, self.rt.ctx, after_forward=self.model.tally_step)
        self.val_measured = self.model.end_tally()
        return bpc

    def test_bpc(self, into=None):
        """(bpc, bytes scored) on the test split; into: a dict that gets what the model measured over the
        whole split as test_KEY (ASCA: test_sparsity, per head, kept-block histograms; it varies with content)."""
        cfg = self.cfg
        self.model.start_tally()
        out = evaluate_stream(self.fwd, self.ds.splits["test"], cfg["block_size"], cfg["eval_stride"],
                              cfg["batch_size"], self.rt.device, self.rt.ctx, after_forward=self.model.tally_step)
        measured = self.model.end_tally()
        if into is not None:
            into.update({f"test_{k}": v for k, v in measured.items()})
        return out

    def evaluate_and_save(self, lr):
        rt, c = self.rt, self.c
        t0 = time.time()
        self.check_finite(f"before iter {c.iter_num}")
        improved = False
        if rt.master:
            val = self.last_val = self.val_bpc()
            improved = val < c.best_val
            if improved:
                c.best_val, c.best_iter = val, c.iter_num
            tps = c.interval_tokens / c.interval_time if c.interval_time > 0 else None
            peak, fpt = rt.peak_flops(), self.model.flops_per_token()
            row = {"iter": c.iter_num, "tokens": c.tokens, "elapsed_s": round(c.train_time, 3),
                   "progress": round(self.progress, 6), "lr": lr,
                   "train_bpc": (self.loss_sum.item() / self.loss_n / LN2) if self.loss_n else None, "val_bpc": val,
                   "tokens_per_s": tps, "mfu": (fpt * tps / peak) if (tps and peak) else None,
                   **self.load.interval()}
            row.update(self.model.diagnostics())  # the last forward's, then the val eval's means where it has them
            row.update({k: v for k, v in self.val_measured.items() if not k.startswith("kept_blocks_hist")})
            append_jsonl(row, os.path.join(self.out_dir, "metrics.jsonl"))
            self.trackers.log(row)  # the same row, as it is written
            if self.bar is not None:
                self.bar.set_postfix_str(progress_text(row), refresh=True)
        self.save(best=rt.any_rank(improved))
        self.loss_sum.zero_()
        self.loss_n, c.interval_time, c.interval_tokens = 0, 0.0, 0
        self.model.train()
        c.eval_s += time.time() - t0

    def save(self, best=False):
        """ckpt.pt (and best.pt) atomically, from finite weights only: a NaN never replaces a good file."""
        rt, c = self.rt, self.c
        per_rank = rt.gather((self.gen.get_state(), checkpoint.rng_states()))  # every rank's stream and RNGs
        if rt.any_rank(not all(torch.isfinite(p).all() for p in self.model.parameters())):
            raise TrainError(f"the weights are not finite at iter {c.iter_num}; not checkpointing them: the last "
                             f"good checkpoint in {self.out_dir} was kept")
        ck = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
              "scaler": rt.scaler.state_dict() if rt.scaler.is_enabled() else None,
              "iter_num": c.iter_num, "best_val_bpc": c.best_val, "best_iter": c.best_iter, "config": self.cfg,
              "model_args": self.model_args, "model_kind": self.kind, "rng": [r for _, r in per_rank],
              "data_generator": [g for g, _ in per_rank], "train_time_s": c.train_time, "tokens": c.tokens,
              "schedule_pos": float(self.sched_pos), "data_sha256": self.data_sha256, "env": rt.env()}
        if not rt.master:
            return
        try:
            checkpoint.save(ck, self.ckpt_path)
            if best:  # best.pt is a copy of this ckpt.pt: it holds its iter_num, checked before it is used
                checkpoint.atomic_write(self.best_path, lambda tmp: shutil.copyfile(self.ckpt_path, tmp))
        except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as a RuntimeError
            raise TrainError(f"cannot write a checkpoint in {self.out_dir}: {getattr(e, 'strerror', None) or checkpoint.first_line(e)}; "
                             f"the previous one is intact; free some space (or use another --out_dir) and resume") from None

    def best_iter_on_disk(self):
        """The iteration best.pt holds (None: no readable best.pt)."""
        if not os.path.exists(self.best_path):
            return None
        try:
            return checkpoint.load(self.best_path, require=("iter_num",))["iter_num"]
        except CheckpointError:
            return None

    def repair_best(self, ckpt):
        """A best.pt copy that failed after ckpt.pt was written (a full disk, a kill) leaves best.pt older than
        the recorded best. If the recorded best is ckpt.pt itself, copy it again; the final test checks the rest."""
        c = self.c
        if c.best_iter == ckpt["iter_num"] and self.best_iter_on_disk() != c.best_iter:
            checkpoint.atomic_write(self.best_path, lambda tmp: shutil.copyfile(self.ckpt_path, tmp))
            self.say(f"note: best.pt did not hold the best iteration {c.best_iter} (a copy was interrupted); "
                     f"copied it again from ckpt.pt")

    def stop_on_signal(self):
        self.check_finite(f"at iter {self.c.iter_num}, when the signal came")
        self.save()
        if self.bar is not None:
            self.bar.close()
        signum = self.stop.signum or signal.SIGTERM
        name = signal.Signals(self.stop.signum).name if self.stop.signum else "a signal on another rank"
        self.say(f"stopped by {name} after iter {self.c.iter_num}: checkpoint written to {self.ckpt_path}; "
                 f"continue with --init_from=resume")
        return 128 + signum

    # --- finish
    def finish(self, stop_reason):
        rt, c, cfg = self.rt, self.c, self.cfg
        final = {"model_kind": self.kind, "iters": c.iter_num, "tokens": c.tokens, "train_time_s": c.train_time,
                 "warmup_s": c.warmup_s, "eval_time_s": c.eval_s, "stop_reason": stop_reason,
                 "max_iters": cfg["max_iters"], "max_time_s": cfg["max_time_s"], "final_lr": self.last_lr,
                 "tokens_per_s": c.run_tokens / c.run_time if c.run_time > 0 else None,
                 "n_params": self.model.num_params(), "val_bpc": self.last_val, "best_val_bpc": c.best_val,
                 "best_iter": c.best_iter, "eval_stride": cfg["eval_stride"], "block_size": cfg["block_size"],
                 "data_dir": cfg["data_dir"], "data_sha256": self.data_sha256, "schedule_pos": self.sched_pos,
                 **self.load.summary(), "env": rt.env()}
        final.update(self.model.diagnostics())
        if rt.ddp:  # every rank checksums its own weights; equal sums show the ranks stayed in sync
            final["rank_param_checksums"] = rt.gather(float(sum(p.detach().double().sum().item()
                                                                for p in self.model.parameters())))
        if not rt.master:
            return 0
        if cfg["final_test"]:
            t0 = time.time()
            final["test_bpc"], final["test_bytes_scored"] = self.test_bpc(into=final)
            if c.best_iter not in (-1, c.iter_num) and os.path.exists(self.best_path):
                best = checkpoint.load(self.best_path, require=checkpoint.MODEL_KEYS + ("iter_num",))
                if best["iter_num"] == c.best_iter:
                    self.model.load_state_dict(best["model"])
                    self.model.set_step(checkpoint.schedule_position(best))
                    final["test_bpc_best_val_ckpt"], _ = self.test_bpc()
                else:  # never score or name a stale copy as the best one
                    final["best_ckpt_stale"] = f"best.pt holds iter {best['iter_num']}, not the best iter {c.best_iter}"
                    self.say(f"warning: {self.best_path} holds iter {best['iter_num']}, not the best iter "
                             f"{c.best_iter} (a copy was interrupted); not scoring it")
            final["test_eval_s"] = time.time() - t0
        checkpoint.write_json(final, os.path.join(self.out_dir, "final.json"))
        self.trackers.summary(final)
        test = f", test {final['test_bpc']:.4f} bpc" if "test_bpc" in final else ""
        tps = f"{final['tokens_per_s']:,.0f}" if final["tokens_per_s"] else "n/a"
        self.say(f"done ({stop_reason}): {c.iter_num} iters, {c.tokens:,} tokens, {c.train_time:.1f}s training "
                 f"(+{c.warmup_s:.1f}s compile/warm-up, {c.eval_s:.1f}s eval), {tps} tokens/s; val "
                 f"{self.last_val:.4f} bpc (best {c.best_val:.4f} at iter {c.best_iter}){test}. "
                 f"Wrote {self.out_dir}/final.json")
        return 0

    def eval_only(self):
        cfg, c = self.cfg, self.c
        self.model.set_step(self.sched_pos)  # the checkpoint's schedule position (a time budget's, too)
        if not self.rt.master:
            return 0
        val = self.val_bpc()
        measured = {}
        test, n = self.test_bpc(into=measured)
        out = {**measured, "iter": c.iter_num, "val_bpc": val, "test_bpc": test, "test_bytes_scored": n,
               "eval_stride": cfg["eval_stride"], "block_size": cfg["block_size"], "data_dir": cfg["data_dir"],
               "data_sha256": self.data_sha256, "schedule_pos": self.sched_pos, "env": self.rt.env()}
        out.update(self.model.diagnostics())
        checkpoint.write_json(out, os.path.join(self.out_dir, "eval.json"))
        self.say(f"checkpoint at iter {c.iter_num}: val {val:.4f} bpc, test {test:.4f} bpc "
                 f"({n:,} bytes, stride {cfg['eval_stride']}); wrote {self.out_dir}/eval.json")
        return 0

    def progress_bar(self):
        if not (self.rt.master and self.cfg["progress"]):
            return None
        from tqdm import tqdm
        return tqdm(total=self.cfg["max_iters"], initial=self.c.iter_num, unit="it", dynamic_ncols=True, file=sys.stderr)


def progress_text(row):
    parts = []
    for key, fmt in (("train_bpc", "train {:.3f}"), ("val_bpc", "val {:.3f}"), ("tokens_per_s", "{:,.0f} tok/s"),
                     ("sparsity", "sparsity {:.2f}")):
        if row.get(key) is not None:
            parts.append(fmt.format(row[key]))
    return " | ".join(parts)


# ----------------------------------------------------------------------------- entry point

def main(argv, kind, build_model=None):
    """Entry point of a training script (kind: 'baseline' or 'asca'). Returns the process exit code.
    build_model(cfg) -> GPT replaces the kind's builder (tests use it to inject faults)."""
    cfg = configurator.resolve_or_exit(defaults_for(kind), argv, TYPES)
    try:
        return run(cfg, kind, explicit_keys(argv), build_model)
    except (TrainError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"error: interrupted; {cfg['out_dir']}/ckpt.pt holds the last checkpoint: continue with "
              f"--init_from=resume, or test it with --eval_only=True --init_from=resume", file=sys.stderr)
        return 130


def run(cfg, kind, explicit=(), build_model=None):
    rt = Runtime(cfg)
    out_dir = cfg["out_dir"]
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise TrainError(f"out_dir {out_dir} is a file, not a directory; choose another --out_dir")
    if cfg["init_from"] == "scratch":
        finalize_config(cfg, kind, rt)  # a bad setting is named before out_dir is created
    lock = contextlib.nullcontext()
    if rt.master and (cfg["init_from"] == "scratch" or os.path.isdir(out_dir)):
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:
            raise TrainError(f"cannot create out_dir {out_dir}: {e.strerror or e}; choose a writable --out_dir") from None
        lock = checkpoint.RunLock(out_dir)  # one writer per run directory, before anything there is read
    with lock:
        return _run(cfg, kind, explicit, build_model, rt)


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


def _run(cfg, kind, explicit, build_model, rt):
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    ckpt = None
    if cfg["init_from"] == "resume":
        need = checkpoint.MODEL_KEYS + ("iter_num", "best_val_bpc", "config") if cfg["eval_only"] else checkpoint.TRAINING_KEYS
        ckpt = checkpoint.load(ckpt_path, require=need)
        check_kind(ckpt, kind, ckpt_path)  # before any other check: the clearest error comes first
        cfg = resume_config(cfg, kind, ckpt["config"], explicit, rt.say)
    cfg = finalize_config(cfg, kind, rt)
    if ckpt is not None:
        check_architecture(ckpt, kind, cfg, ckpt_path)
    elif not cfg["eval_only"]:
        if rt.master:
            restart_incomplete(cfg["out_dir"], rt.say)
        there = [f for f in RUN_FILES if os.path.lexists(os.path.join(cfg["out_dir"], f))]
        if there:
            raise TrainError(f"{cfg['out_dir']} already holds a run ({', '.join(there)}); continue it with "
                             f"--init_from=resume, or start over with another --out_dir (or delete that one first)")
    ds = ByteDataset(cfg["data_dir"])
    ds.check_block_size(cfg["block_size"])
    if ckpt is not None and ckpt.get("data_sha256") and ckpt["data_sha256"] != data_identity(ds):
        changed = sorted(k for k in ckpt["data_sha256"] if ckpt["data_sha256"][k] != (data_identity(ds) or {}).get(k))
        rt.say(f"warning: the data in {cfg['data_dir']} changed since this checkpoint was written (split "
               f"{', '.join(changed) or 'set'} differs): its curves and test bpc will not compare with the earlier ones")
    rt.init_distributed()
    try:
        if rt.master:
            for name in checkpoint.remove_stale_temps(cfg["out_dir"]):
                rt.say(f"removed {name}, left by a process that no longer runs")
        trainer = Trainer(cfg, kind, rt, ds, ckpt, build_model)
        ckpt = None  # free memory
        env = rt.env()
        rt.say(f"{kind}: {trainer.model.num_params() / 1e6:.2f}M parameters (non-embedding), "
               f"{trainer.tokens_per_iter:,} tokens/iter, torch {torch.__version__}, {env['device']}, "
               f"world size {rt.world_size}")
        for note in rt.notes:
            rt.say("  " + note)
        rt.say("config: " + json.dumps(cfg, sort_keys=True))
        if cfg["eval_only"]:
            return trainer.eval_only()
        if rt.master:
            checkpoint.write_json(cfg, os.path.join(cfg["out_dir"], "config.json"))
        return trainer.fit()
    finally:
        rt.close()
