"""
The one training loop both scripts share (baseline_model.py and novel_model.py differ only by
their model and keys). It owns: device/dtype/compile resolution, DDP, the data stream, AdamW with
warmup + cosine, evaluation in bits per byte, checkpoints (atomic, exact resume), time budgets,
signals, NaN stops, metrics.jsonl / final.json, and --eval_only.

Attention modules that own extra behaviour (schedules, aux losses, diagnostics) expose it through
GPT.set_step / GPT.aux_loss / GPT.diagnostics; this loop only calls and logs them.
"""
import contextlib
import importlib
import json
import math
import os
import platform
import random
import shutil
import signal
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import configurator
from prepare_dataset import ByteDataset, DataError, sliding_windows

LN2 = math.log(2)
MODEL_MODULES = {"baseline": "baseline_model", "asca": "novel_model"}  # model_kind -> script module

TRAIN_DEFAULTS = dict(
    # I/O
    out_dir="out/run", data_dir="data/enwik8", init_from="scratch",  # 'scratch' or 'resume'
    eval_interval=500, log_interval=10, eval_iters=20, eval_only=False, final_test=True,
    eval_stride=None,  # test stride; None = block_size // 2
    progress=True,  # tqdm bar
    # schedule
    max_iters=5000, max_time_s=0.0,  # training stops at whichever comes first (0 = no time limit)
    batch_size=32, gradient_accumulation_steps=1,  # accumulation is the total across DDP ranks
    learning_rate=1e-3, min_lr=None, warmup_iters=200, lr_decay_iters=None, decay_lr=True,
    weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0,
    # system
    device="auto", dtype="auto", compile="auto", backend="auto", seed=1337,
)
TYPES = dict(min_lr=float, lr_decay_iters=int, eval_stride=int, compile=bool, device=str, dtype=str, backend=str)

# Peak dense bf16 tensor-core FLOP/s by GPU name, for MFU (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
                   "A10G": 125e12, "4090": 165e12, "3090": 71e12}


class TrainError(Exception):
    """A user-facing problem: one line, no traceback."""


def defaults_for(model_defaults, out_dir):
    cfg = dict(TRAIN_DEFAULTS)
    cfg.update(model_defaults)
    cfg["out_dir"] = out_dir
    return cfg


def make_model_from_defaults(model_defaults, build_model, overrides):
    """A script's make_model(**overrides): its defaults plus overrides; unknown keys are an error."""
    cfg = defaults_for(model_defaults, out_dir="")
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise TypeError(f"make_model: unknown keys {sorted(unknown)}")
    cfg.update(overrides)
    return build_model(cfg)


# ----------------------------------------------------------------------------- system setup

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

    def init_distributed(self):
        if not self.ddp:
            return
        import torch.distributed as dist
        if self.device_type == "cuda":
            torch.cuda.set_device(self.device)
        dist.init_process_group(backend=self.backend)
        # a CPU group for stop flags: agreeing on "stop now" costs no GPU sync
        self.control_group = dist.new_group(backend="gloo")

    def any_rank(self, flag):
        """True if `flag` is true on any rank (CPU all-reduce; identity without DDP)."""
        if not self.ddp:
            return bool(flag)
        import torch.distributed as dist
        t = torch.tensor([1 if flag else 0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control_group)
        return bool(t.item())

    def device_name(self):
        if self.device_type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"

    def peak_flops(self):
        if self.device_type != "cuda" or self.dtype == "float32":
            return None
        name = self.device_name()
        for key, flops in PEAK_BF16_FLOPS.items():
            if key in name:
                return flops
        return None

    def env(self):
        return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                "device": self.device_name(), "device_type": self.device_type, "dtype": self.dtype,
                "compile": self.compile, "world_size": self.world_size,
                "cuda": torch.version.cuda if self.device_type == "cuda" else None}


def get_lr(it, cfg):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters, then min_lr (nanoGPT)."""
    lr, min_lr = cfg["learning_rate"], cfg["min_lr"]
    if not cfg["decay_lr"]:
        return lr
    if it < cfg["warmup_iters"]:
        return lr * (it + 1) / (cfg["warmup_iters"] + 1)
    if it > cfg["lr_decay_iters"]:
        return min_lr
    ratio = (it - cfg["warmup_iters"]) / max(1, cfg["lr_decay_iters"] - cfg["warmup_iters"])
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def eval_windows(model, data, starts, block_size, batch_size, device, ctx):
    """Mean bits per byte over fixed windows data[s : s+block_size] -> next bytes."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        idx = [s for s in starts[i:i + batch_size]]
        x = torch.from_numpy(np.stack([data[s:s + block_size] for s in idx]).astype(np.int64)).to(device)
        y = torch.from_numpy(np.stack([data[s + 1:s + 1 + block_size] for s in idx]).astype(np.int64)).to(device)
        with ctx:
            logits, _ = model(x)
        nll = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), reduction="sum")
        total += nll.item()
        count += y.numel()
    return total / count / LN2


@torch.no_grad()
def evaluate_stream(model, data, block_size, stride, batch_size, device, ctx=contextlib.nullcontext()):
    """Bits per byte over every target byte 1..n-1 of `data`, each scored exactly once, with sliding
    windows of block_size and the given stride (DESIGN.md section 4). Returns (bpc, n_scored)."""
    model.eval()
    windows = sliding_windows(len(data), block_size, stride)
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        group = windows[i:i + batch_size]
        by_len = {}
        for w in group:  # all windows have length block_size except when the data is shorter
            by_len.setdefault(w[1], []).append(w)
        for length, ws in by_len.items():
            x = torch.from_numpy(np.stack([data[s:s + length] for s, _, _ in ws]).astype(np.int64)).to(device)
            y = torch.from_numpy(np.stack([data[s + 1:s + 1 + length] for s, _, _ in ws]).astype(np.int64)).to(device)
            with ctx:
                logits, _ = model(x)
            nll = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")  # (b, length)
            keep = torch.zeros_like(nll, dtype=torch.bool)
            for r, (_, _, n_score) in enumerate(ws):
                keep[r, length - n_score:] = True
            total += nll[keep].double().sum().item()
            count += int(keep.sum().item())
    return total / count / LN2, count


# ----------------------------------------------------------------------------- checkpoints

def atomic_torch_save(obj, path):
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(obj, path):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


def rng_states():
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_states(s):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise TrainError(f"no checkpoint at {path}; train first, or check --out_dir")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which and why
        raise TrainError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None


def check_compatible(ckpt, kind, model_args, runtime_keys, path):
    if ckpt.get("model_kind") != kind:
        script = MODEL_MODULES.get(ckpt.get("model_kind"), "?") + ".py"
        raise TrainError(f"{path} holds a '{ckpt.get('model_kind')}' model, not '{kind}'; "
                         f"use {script} for it, or another --out_dir")
    old = ckpt.get("model_args", {})
    diff = [f"{k}={old.get(k)!r} (run: {v!r})" for k, v in model_args.items()
            if k not in runtime_keys and old.get(k) != v]
    if diff:
        raise TrainError(f"{path} has a different architecture: {', '.join(diff)}; "
                         f"drop those overrides to resume, or use another --out_dir")


def model_from_checkpoint(path, device="cpu"):
    """(model, checkpoint) for any run's ckpt.pt/best.pt, whichever script wrote it."""
    ckpt = load_checkpoint(path)
    kind = ckpt.get("model_kind")
    if kind not in MODEL_MODULES:
        raise TrainError(f"{path} has unknown model_kind {kind!r}")
    module = importlib.import_module(MODEL_MODULES[kind])
    args = dict(ckpt["model_args"])
    if "attn_impl" in args:  # a GPU run's 'flex' must not follow its checkpoint onto a CPU
        args["attn_impl"] = "auto"
    model = module.model_from_config(args)
    model.load_state_dict(ckpt["model"])
    model.set_step(ckpt.get("iter_num", 0))
    return model.to(device).eval(), ckpt


# ----------------------------------------------------------------------------- the loop

class StopFlag:
    """SIGINT/SIGTERM: finish the step, checkpoint, exit. A second SIGINT aborts at once."""

    def __init__(self):
        self.signum = None

    def install(self):
        def handler(signum, frame):
            if self.signum is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.signum = signum
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, handler)


def main(argv, kind, model_defaults, build_model, config_cls, out_dir, validate=None):
    """Entry point for a training script. Returns the process exit code."""
    cfg = configurator.resolve_or_exit(defaults_for(model_defaults, out_dir), argv, TYPES)
    try:
        return run(cfg, kind, build_model, config_cls, validate=validate)
    except (TrainError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def finalize_config(cfg, rt):
    cfg = dict(cfg)
    if cfg["min_lr"] is None:
        cfg["min_lr"] = cfg["learning_rate"] / 10
    if cfg["lr_decay_iters"] is None:
        cfg["lr_decay_iters"] = cfg["max_iters"]
    if cfg["eval_stride"] is None:
        cfg["eval_stride"] = max(1, cfg["block_size"] // 2)
    if not 1 <= cfg["eval_stride"] <= cfg["block_size"]:
        raise TrainError(f"eval_stride={cfg['eval_stride']} must be in [1, block_size={cfg['block_size']}]")
    if cfg["init_from"] not in ("scratch", "resume"):
        raise TrainError(f"init_from={cfg['init_from']!r} must be 'scratch' or 'resume'")
    if cfg["eval_only"] and cfg["init_from"] != "resume":
        raise TrainError("--eval_only=True evaluates a checkpoint: add --init_from=resume")
    for k in ("batch_size", "gradient_accumulation_steps", "eval_interval", "log_interval", "eval_iters"):
        if cfg[k] < 1:
            raise TrainError(f"{k} must be at least 1, got {cfg[k]}")
    if cfg["gradient_accumulation_steps"] % rt.world_size:
        raise TrainError(f"gradient_accumulation_steps={cfg['gradient_accumulation_steps']} must be divisible "
                         f"by the number of DDP ranks ({rt.world_size})")
    return cfg


def run(cfg, kind, build_model, config_cls, validate=None):
    rt = Runtime(cfg)
    cfg = finalize_config(cfg, rt)
    model_args = {k: cfg[k] for k in config_cls.__dataclass_fields__ if k in cfg}
    model_args["vocab_size"] = 256
    try:  # impossible settings are one-line errors at start-up, not crashes mid-run
        config_cls.from_dict(cfg).validate()
        if validate is not None:
            validate(cfg, rt)  # model-specific checks that need the device
    except ValueError as e:
        raise TrainError(str(e)) from None
    ds = ByteDataset(cfg["data_dir"])
    ds.check_block_size(cfg["block_size"])
    rt.init_distributed()
    try:
        return _run(cfg, kind, build_model, config_cls, model_args, rt, ds)
    finally:
        if rt.ddp:
            import torch.distributed as dist
            dist.destroy_process_group()


def _run(cfg, kind, build_model, config_cls, model_args, rt, ds):
    out_dir = cfg["out_dir"]
    say = print if rt.master else (lambda *a, **k: None)
    if rt.master:
        os.makedirs(out_dir, exist_ok=True)
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    torch.manual_seed(cfg["seed"] + rt.rank)
    random.seed(cfg["seed"] + rt.rank)
    np.random.seed(cfg["seed"] + rt.rank)
    if rt.device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    gen = torch.Generator().manual_seed(cfg["seed"] * 1000 + rt.rank)  # each rank draws its own windows

    model = build_model(cfg)
    iter_num, best_val, best_iter, train_time, tokens_seen, ckpt = 0, float("inf"), -1, 0.0, 0, None
    if cfg["init_from"] == "resume":
        ckpt = load_checkpoint(ckpt_path)
        check_compatible(ckpt, kind, model_args, getattr(config_cls, "RUNTIME_KEYS", ()), ckpt_path)
        model.load_state_dict(ckpt["model"])
        iter_num, best_val = ckpt["iter_num"], ckpt["best_val_bpc"]
        best_iter, train_time = ckpt.get("best_iter", -1), ckpt.get("train_time_s", 0.0)
        tokens_seen = ckpt.get("tokens", 0)
    model.to(rt.device)
    env = rt.env()
    tokens_per_iter = cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"]
    grad_accum = cfg["gradient_accumulation_steps"] // rt.world_size
    say(f"{kind}: {model.num_params() / 1e6:.2f}M parameters (non-embedding), {tokens_per_iter:,} tokens/iter, "
        f"torch {torch.__version__}, {env['device']}, world size {rt.world_size}")
    for note in rt.notes:
        say("  " + note)
    say("config: " + json.dumps(cfg, sort_keys=True))
    if rt.master and not cfg["eval_only"]:
        atomic_write_json(cfg, os.path.join(out_dir, "config.json"))

    eval_model = torch.compile(model) if rt.compile else model
    if cfg["eval_only"]:
        return _eval_only(cfg, model, eval_model, ds, rt, ckpt, say)

    optimizer = model.configure_optimizer(cfg["weight_decay"], cfg["learning_rate"],
                                          (cfg["beta1"], cfg["beta2"]), rt.device_type)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler") is not None:
            rt.scaler.load_state_dict(ckpt["scaler"])
        gens = ckpt["data_generator"]
        if len(gens) != rt.world_size:
            say(f"note: checkpoint was written with {len(gens)} ranks, now {rt.world_size}: "
                f"ranks beyond the saved ones keep their fresh seeds")
        if rt.rank < len(gens):
            gen.set_state(gens[rt.rank])
            set_rng_states(ckpt["rng"][rt.rank])
        say(f"resumed from {ckpt_path} at iter {iter_num} (best val {best_val:.4f} bpc at iter {best_iter})")
    ckpt = None  # free memory
    train_model = eval_model
    if rt.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        train_model = DDP(eval_model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)

    stop = StopFlag()
    stop.install()
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    peak = rt.peak_flops()
    flops_per_token = model.flops_per_token()
    start_iter = iter_num
    warmup_s, eval_s = 0.0, 0.0
    interval_time, interval_tokens = 0.0, 0
    run_time, run_tokens = 0.0, 0  # this process only: throughput excludes warm-up and evals
    loss_sum, loss_n = torch.zeros((), device=rt.device), 0
    nonfinite = torch.zeros((), dtype=torch.bool, device=rt.device)
    last_val, stop_reason = None, "max_iters"
    bar = None
    if rt.master and cfg["progress"]:
        from tqdm import tqdm
        bar = tqdm(total=cfg["max_iters"], initial=iter_num, unit="it", dynamic_ncols=True, file=sys.stderr)

    def check_finite(where):
        if rt.any_rank(bool(nonfinite.item())):
            raise TrainError(f"the training loss became NaN or inf ({where}); the last good checkpoint in "
                             f"{out_dir} was kept; lower learning_rate or warmup more, and resume or restart")

    def save(path_best=False):
        per_rank = [(gen.get_state(), rng_states())]  # every rank's data stream and RNGs
        if rt.ddp:
            import torch.distributed as dist
            per_rank = [None] * rt.world_size
            dist.all_gather_object(per_rank, (gen.get_state(), rng_states()), group=rt.control_group)
        if not rt.master:
            return
        ck = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
              "scaler": rt.scaler.state_dict() if rt.scaler.is_enabled() else None,
              "iter_num": iter_num, "best_val_bpc": best_val, "best_iter": best_iter, "config": cfg,
              "model_args": model_args, "model_kind": kind, "rng": [r for _, r in per_rank],
              "data_generator": [g for g, _ in per_rank],
              "train_time_s": train_time, "tokens": tokens_seen, "env": env}
        atomic_torch_save(ck, ckpt_path)
        if path_best:
            tmp = os.path.join(out_dir, f"best.pt.tmp.{os.getpid()}")
            shutil.copyfile(ckpt_path, tmp)
            os.replace(tmp, os.path.join(out_dir, "best.pt"))

    while True:
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.set_step(iter_num)
        time_up = cfg["max_time_s"] > 0 and train_time >= cfg["max_time_s"]
        done = iter_num >= cfg["max_iters"] or rt.any_rank(time_up)
        if done and time_up:
            stop_reason = "max_time_s"

        if (iter_num % cfg["eval_interval"] == 0 or done) and not (iter_num == start_iter and start_iter > 0 and not done):
            t0 = time.time()
            check_finite(f"before iter {iter_num}")
            row = None
            if rt.master:
                val = eval_windows(eval_model, ds.splits["val"], ds.val_windows(cfg["block_size"], cfg["eval_iters"] * cfg["batch_size"]),
                                   cfg["block_size"], cfg["batch_size"], rt.device, rt.ctx)
                last_val = val
                improved = val < best_val
                if improved:
                    best_val, best_iter = val, iter_num
                tps = interval_tokens / interval_time if interval_time > 0 else None
                row = {"iter": iter_num, "tokens": tokens_seen, "elapsed_s": round(train_time, 3), "lr": lr,
                       "train_bpc": (loss_sum.item() / loss_n / LN2) if loss_n else None, "val_bpc": val,
                       "tokens_per_s": tps, "mfu": (flops_per_token * tps / peak) if (tps and peak) else None}
                row.update(model.diagnostics())
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                if bar is not None:
                    bar.set_postfix_str(progress_text(row), refresh=True)
            else:
                improved = False
            improved = rt.any_rank(improved)
            save(path_best=improved)
            loss_sum.zero_()
            loss_n, interval_time, interval_tokens = 0, 0.0, 0
            model.train()
            eval_s += time.time() - t0
        if done:
            break

        # ---- one optimizer step
        t0 = time.time()
        for micro in range(grad_accum):
            x, y = ds.get_batch("train", cfg["batch_size"], cfg["block_size"], gen)
            if rt.device_type == "cuda":
                x, y = x.pin_memory().to(rt.device, non_blocking=True), y.pin_memory().to(rt.device, non_blocking=True)
            if rt.ddp:  # sync gradients only on the last micro step
                train_model.require_backward_grad_sync = micro == grad_accum - 1
            with rt.ctx:
                _, loss = train_model(x, y)
                aux = model.aux_loss()
                total = loss if aux is None else loss + aux
            rt.scaler.scale(total / grad_accum).backward()
            loss_sum += loss.detach().float()
            nonfinite |= ~torch.isfinite(loss.detach())
            loss_n += 1
        if cfg["grad_clip"] > 0:
            rt.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        rt.scaler.step(optimizer)
        rt.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        tokens_seen += tokens_per_iter

        log_now = iter_num % cfg["log_interval"] == 0
        if log_now:
            if rt.device_type == "cuda":
                torch.cuda.synchronize()
            check_finite(f"at iter {iter_num}")
        dt = time.time() - t0
        if iter_num == start_iter + 1:  # compile and warm-up: timed separately, not training time
            warmup_s += dt
        else:
            train_time += dt
            interval_time += dt
            interval_tokens += tokens_per_iter
            run_time += dt
            run_tokens += tokens_per_iter
        if bar is not None:
            bar.update(1)
            if log_now and loss_n:
                bar.set_postfix_str(progress_text({"train_bpc": loss_sum.item() / loss_n / LN2,
                                                   "val_bpc": last_val,
                                                   "tokens_per_s": interval_tokens / interval_time if interval_time else None,
                                                   **model.diagnostics()}))
        if rt.any_rank(stop.signum is not None):
            save()
            if bar is not None:
                bar.close()
            name = signal.Signals(stop.signum).name if stop.signum else "a signal on another rank"
            say(f"stopped by {name} after iter {iter_num}: checkpoint written to {ckpt_path}; "
                f"continue with --init_from=resume")
            return 128 + (stop.signum or signal.SIGTERM)
    if bar is not None:
        bar.close()

    final = {"model_kind": kind, "iters": iter_num, "tokens": tokens_seen, "train_time_s": train_time,
             "warmup_s": warmup_s, "eval_time_s": eval_s, "stop_reason": stop_reason,
             "tokens_per_s": run_tokens / run_time if run_time > 0 else None,
             "n_params": model.num_params(), "val_bpc": last_val, "best_val_bpc": best_val, "best_iter": best_iter,
             "eval_stride": cfg["eval_stride"], "block_size": cfg["block_size"], "env": env}
    final.update(model.diagnostics())
    if rt.ddp:  # every rank checksums its own weights; equal sums show the ranks stayed in sync
        import torch.distributed as dist
        mine = float(sum(p.detach().double().sum().item() for p in model.parameters()))
        sums = [None] * rt.world_size
        dist.all_gather_object(sums, mine, group=rt.control_group)
        final["rank_param_checksums"] = sums
    if rt.master:
        if cfg["final_test"]:
            t0 = time.time()
            final["test_bpc"], final["test_bytes_scored"] = evaluate_stream(
                eval_model, ds.splits["test"], cfg["block_size"], cfg["eval_stride"], cfg["batch_size"], rt.device, rt.ctx)
            if best_iter not in (-1, iter_num) and os.path.exists(os.path.join(out_dir, "best.pt")):
                best_state = torch.load(os.path.join(out_dir, "best.pt"), map_location="cpu", weights_only=False)
                model.load_state_dict(best_state["model"])
                model.set_step(best_state["iter_num"])
                final["test_bpc_best_val_ckpt"], _ = evaluate_stream(
                    eval_model, ds.splits["test"], cfg["block_size"], cfg["eval_stride"], cfg["batch_size"], rt.device, rt.ctx)
            final["test_eval_s"] = time.time() - t0
        atomic_write_json(final, os.path.join(out_dir, "final.json"))
        test = f", test {final['test_bpc']:.4f} bpc" if "test_bpc" in final else ""
        tps = f"{final['tokens_per_s']:,.0f}" if final["tokens_per_s"] else "n/a"
        say(f"done ({stop_reason}): {iter_num} iters, {tokens_seen:,} tokens, {train_time:.1f}s training "
            f"(+{warmup_s:.1f}s compile/warm-up, {eval_s:.1f}s eval), {tps} tokens/s; "
            f"val {last_val:.4f} bpc (best {best_val:.4f} at iter {best_iter}){test}. Wrote {out_dir}/final.json")
    return 0


def progress_text(row):
    parts = []
    for key, fmt in (("train_bpc", "train {:.3f}"), ("val_bpc", "val {:.3f}"), ("tokens_per_s", "{:,.0f} tok/s"),
                     ("sparsity", "sparsity {:.2f}"), ("aux_loss", "aux {:.3g}")):
        if row.get(key) is not None:
            parts.append(fmt.format(row[key]))
    return " | ".join(parts)


def _eval_only(cfg, model, eval_model, ds, rt, ckpt, say):
    model.set_step(ckpt["iter_num"])
    if not rt.master:
        return 0
    val = eval_windows(eval_model, ds.splits["val"], ds.val_windows(cfg["block_size"], cfg["eval_iters"] * cfg["batch_size"]),
                       cfg["block_size"], cfg["batch_size"], rt.device, rt.ctx)
    test, n = evaluate_stream(eval_model, ds.splits["test"], cfg["block_size"], cfg["eval_stride"],
                              cfg["batch_size"], rt.device, rt.ctx)
    out = {"iter": ckpt["iter_num"], "val_bpc": val, "test_bpc": test, "test_bytes_scored": n,
           "eval_stride": cfg["eval_stride"], "block_size": cfg["block_size"], "data_dir": cfg["data_dir"],
           "env": rt.env()}
    out.update(model.diagnostics())
    atomic_write_json(out, os.path.join(cfg["out_dir"], "eval.json"))
    say(f"checkpoint at iter {ckpt['iter_num']}: val {val:.4f} bpc, test {test:.4f} bpc "
        f"({n:,} bytes, stride {cfg['eval_stride']}); wrote {cfg['out_dir']}/eval.json")
    return 0
