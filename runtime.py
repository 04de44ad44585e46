"""
Where a training run executes, resolved once at start-up with the reasons logged: device, dtype, autocast,
compile, DDP rank and the collectives the loop needs (stop flags on a CPU group, means over ranks), the
environment a run records, and a meter of how much of the machine other processes used while it trained.
"""
import contextlib
import functools
import os
import platform
import signal
import time

import numpy as np
import torch


class TrainError(Exception):
    """A user-facing problem: one line, no traceback."""


# Peak dense bf16 tensor-core FLOP/s by GPU name, for MFU (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
                   "A10G": 125e12, "4090": 165e12, "3090": 71e12}

DEVICES = "auto, cpu, cuda, cuda:N"


def resolve_auto(cfg):
    """{device, dtype, compile, backend} with each 'auto' resolved as a run on this machine resolves it: CUDA if
    present; bf16 on CUDA (fp16 without bf16), fp32 on a CPU; compile on CUDA; nccl on CUDA, gloo on a CPU."""
    device = cfg["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device.startswith("cuda")
    dtype = cfg["dtype"]
    if dtype == "auto":
        bf16 = cuda and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        dtype = "float32" if not cuda else ("bfloat16" if bf16 else "float16")
    compile_ = cuda if cfg["compile"] == "auto" else cfg["compile"]
    backend = cfg["backend"] if cfg["backend"] != "auto" else ("nccl" if cuda else "gloo")
    ns_dtype = resolve_muon_ns_dtype(cfg.get("muon_ns_dtype", "auto"), cuda)[0]
    return {"device": device, "dtype": dtype, "compile": compile_, "backend": backend, "muon_ns_dtype": ns_dtype}


def cpu_model():
    """The CPU's model name as /proc/cpuinfo gives it (Linux), else platform's best guess."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def cpu_native_bf16():
    """(native, why): whether this CPU multiplies bfloat16 matrices at float32's rate or faster. On x86 by the
    flags torch's CPU kernels dispatch on (AVX512-BF16 or AMX); elsewhere (Arm) by a one-off probe of a few ms,
    a 128^3 matmul in each dtype. Without native support a bf16 matmul is emulated, about 100x slower (AMD EPYC
    without AVX512-BF16: 0.8 against 80 GFLOP/s, docs/results/dense_cpu.md)."""
    cpu = torch.cpu
    if platform.machine().lower() in ("x86_64", "amd64", "i686") and hasattr(cpu, "_is_avx512_bf16_supported"):
        flags = [name for name, has in (("AVX512-BF16", cpu._is_avx512_bf16_supported()),
                                        ("AMX", getattr(cpu, "_is_amx_tile_supported", lambda: False)()))
                 if has]
        return bool(flags), (", ".join(flags) if flags else "no AVX512-BF16 or AMX")
    rates = {}
    for dt in (torch.float32, torch.bfloat16):
        a = torch.randn(128, 128).to(dt)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - t0)
        rates[dt] = best
    ratio = rates[torch.bfloat16] / rates[torch.float32]
    return ratio <= 2.0, f"a bf16 matmul probed at {ratio:.1f}x float32's time"


MUON_NS_DTYPES = ("auto", "bfloat16", "float32")


def resolve_muon_ns_dtype(setting, cuda):
    """(dtype name, why) of Muon's Newton-Schulz iteration: 'auto' is bfloat16 on CUDA and on a CPU with native
    bf16 matmuls (torch.optim.Muon's own choice), float32 on any other CPU."""
    if setting != "auto":
        return setting, "set"
    if cuda:
        return "bfloat16", "CUDA"
    native, why = cpu_native_bf16()
    return ("bfloat16" if native else "float32"), f"{cpu_model()}: {why}"


MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory():
    """On a CPU run, tell glibc's malloc to keep freed memory for reuse (mallopt: mmap threshold 32 MiB, the most
    glibc allows, trim threshold 1 GiB), as MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824
    would. By default glibc hands multi-MB blocks back to the kernel when freed, so the next step's activations of
    the same size are mapped afresh and page-faulted in (tens of thousands of minor faults per step at T=4096):
    with the setting the gather path's step at T=4096 and 0.875 took 0.89-0.97x its time and dense's 0.96-1.02x
    (five alternating process pairs, docs/results/gather_cpu.md, 2026-12-04). Numerics are untouched. Returns a
    one-line note of what was done, or None where glibc is absent or the user set either variable (theirs stands)."""
    if any(k in os.environ for k in MALLOC_ENV):
        return None
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-1, 1 << 30) == 1 and libc.mallopt(-3, 1 << 25) == 1  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to set
        return None
    return ("malloc: freed memory kept for reuse (mmap threshold 32 MiB, trim 1 GiB; set MALLOC_MMAP_THRESHOLD_ "
            "to choose otherwise)") if ok else None


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
        if cfg["dtype"] not in ("float32", "bfloat16", "float16", "auto"):
            raise TrainError(f"dtype={cfg['dtype']} is not one of float32, bfloat16, float16, auto")
        self.resolved = resolve_auto(cfg)  # what 'auto' means on this machine: config.json records it
        dev, dt, comp, backend = (self.resolved[k] for k in ("device", "dtype", "compile", "backend"))
        if cfg["device"] == "auto":
            notes.append(f"device=auto -> {dev} ({'CUDA available' if dev == 'cuda' else 'no CUDA'})")
        if dev.startswith("cuda") and not torch.cuda.is_available():
            raise TrainError(f"device={dev} requested but torch.cuda.is_available() is False; use --device=cpu")
        if dev == "cuda" and self.ddp:
            dev = f"cuda:{self.local_rank}"
        self.device = dev
        self.device_type = "cuda" if dev.startswith("cuda") else "cpu"
        if cfg["dtype"] == "auto":
            notes.append(f"dtype=auto -> {dt} " + ("(CPU)" if self.device_type == "cpu" else
                         f"({'bf16 supported' if dt == 'bfloat16' else 'no bf16: fp16 + GradScaler'})"))
        self.dtype = dt
        self.ptdtype = getattr(torch, dt)
        if cfg["compile"] == "auto":
            notes.append(f"compile=auto -> {comp} ({'CUDA' if comp else 'CPU: compile time would dominate'})")
        self.compile = comp
        self.backend = backend
        if self.device_type == "cpu" and dt == "bfloat16" and not cpu_native_bf16()[0]:
            notes.append(f"warning: dtype=bfloat16 on a CPU without native bf16 matmuls ({cpu_model()}: "
                         f"{cpu_native_bf16()[1]}): they are emulated, about 100x slower than float32; "
                         f"use --dtype=float32")
        if cfg.get("optimizer") == "muon" and cfg.get("muon_ns_dtype") == "auto":
            ns, why = resolve_muon_ns_dtype("auto", self.device_type == "cuda")
            notes.append(f"muon_ns_dtype=auto -> {ns} ({why})")
        if self.device_type == "cpu":
            kept = keep_freed_memory()
            if kept:
                notes.append(kept)
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
        bf16 = "native bf16" if cpu_native_bf16()[0] else "no native bf16"
        return f"CPU ({cpu_model()}, {platform.machine()}, {bf16}, {torch.get_num_threads()} threads)"

    def peak_flops(self):
        if self.device_type != "cuda" or self.dtype == "float32":
            return None
        return next((f for key, f in PEAK_BF16_FLOPS.items() if key in self.device_name()), None)

    def env(self):
        return {"python": platform.python_version(), "torch": str(torch.__version__), "numpy": np.__version__,
                "device": self.device_name(), "device_type": self.device_type, "dtype": self.dtype,
                "compile": self.compile, "world_size": self.world_size,
                "cuda": torch.version.cuda if self.device_type == "cuda" else None}



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


def free_memory_bytes(device_type, device=None):
    """Memory a run may still take: the GPU's free memory, or on a CPU the least of what cpu_memory_room() finds
    (the machine's available memory, this process's address-space limit, its cgroup's limit); None where nothing
    can be read."""
    if device_type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0]
        except RuntimeError:
            return None
    room = cpu_memory_room()
    return min(room.values()) if room else None


def _read_int(path, key=None):
    """An integer from a /proc or /sys file: the whole file, or the line starting with key (its first number)."""
    try:
        with open(path) as f:
            if key is None:
                text = f.read().strip()
                return None if text == "max" else int(text)
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_memory_room():
    """{where: bytes} this process may still allocate on a CPU, by each limit that applies: 'available' (the
    machine's MemAvailable), 'address space' (RLIMIT_AS less the process's virtual size, as `ulimit -v` or
    `prlimit --as` set it) and 'cgroup' (memory.max less memory.current, v2; limit_in_bytes less usage_in_bytes,
    v1: a container's limit). A run whose estimate passes MemAvailable alone could die under the others with an
    allocator traceback."""
    room = {}
    avail = _read_int("/proc/meminfo", "MemAvailable:")
    if avail is not None:
        room["available"] = avail * 1024
    try:
        import resource
        soft, unlimited = resource.getrlimit(resource.RLIMIT_AS)[0], resource.RLIM_INFINITY
    except (ImportError, OSError, ValueError):  # not a POSIX system
        soft = unlimited = -1
    vm = _read_int("/proc/self/status", "VmSize:")
    if soft != unlimited and vm is not None:
        room["address space"] = max(0, soft - vm * 1024)
    v1 = "/sys/fs/cgroup/memory/memory."
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         (v1 + "limit_in_bytes", v1 + "usage_in_bytes")):
        lim, used = _read_int(limit), _read_int(usage)
        if lim is not None and used is not None and lim < (1 << 60):  # v1 reports "no limit" as a huge number
            room["cgroup"] = max(0, lim - used)
            break
    return room


CONTENDED_CORES = 0.25  # other processes' mean CPU use above which a run's throughput is flagged


# ----------------------------------------------------------------------------- CUDA's autocast policy on a CPU

# Where CUDA's autocast differs from the CPU's (ATen/autocast_mode.h, torch 2.11 and 2.13; checked on both): CUDA
# runs these ops in float32 whatever their low-precision inputs, the CPU keeps bf16. FP32: every floating
# argument is cast to float32. SET_OPT_DTYPE: the op gets dtype=float32 unless it names one (softmax, sums).
CUDA_FP32_OPS = frozenset((
    "acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan pow softplus layer_norm "
    "group_norm nuclear_norm cosine_similarity poisson_nll_loss cosine_embedding_loss nll_loss "
    "nll_loss2d hinge_embedding_loss kl_div l1_loss smooth_l1_loss huber_loss mse_loss margin_ranking_loss "
    "multilabel_margin_loss soft_margin_loss triplet_margin_loss multi_margin_loss binary_cross_entropy_with_logits "
    "dist pdist cdist renorm logsumexp").split())
CUDA_FP32_SET_OPT_DTYPE_OPS = frozenset(
    "prod softmax log_softmax cumprod cumsum sum norm linalg_vector_norm linalg_matrix_norm".split())


def _low_precision(t):
    return isinstance(t, torch.Tensor) and t.dtype in (torch.bfloat16, torch.float16)


class CudaAutocastPolicy(torch.overrides.TorchFunctionMode):
    """Inside CPU autocast, applies the CUDA policy's float32 ops (CUDA_FP32_OPS, CUDA_FP32_SET_OPT_DTYPE_OPS) at
    the torch-function level, so a CPU test sees the dtypes a GPU would give: float32 softmax over bf16 logits, a
    float32 sum of bf16 values, float32 norms (rms_norm too with rms_norm_fp32: on CUDA's list from torch 2.13,
    not in 2.11). Built because a kernel that ran on every CPU test would have crashed on the first CUDA step."""

    def __init__(self, rms_norm_fp32=True):
        super().__init__()
        self.fp32_ops = CUDA_FP32_OPS | ({"rms_norm"} if rms_norm_fp32 else set())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if torch.is_autocast_enabled("cpu"):
            if name in self.fp32_ops and (any(map(_low_precision, args)) or any(map(_low_precision, kwargs.values()))):
                args = tuple(a.float() if _low_precision(a) else a for a in args)
                kwargs = {k: v.float() if _low_precision(v) else v for k, v in kwargs.items()}
            elif (name in CUDA_FP32_SET_OPT_DTYPE_OPS and kwargs.get("dtype") is None and args
                  and isinstance(args[0], torch.Tensor) and args[0].is_floating_point()):
                kwargs["dtype"] = torch.float32
        return func(*args, **kwargs)


class cuda_autocast_on_cpu:  # noqa: N801 (used as torch.autocast is)
    """CPU autocast to `dtype` with CUDA's float32 ops (CudaAutocastPolicy): a CPU rehearsal of a GPU's mixed
    precision. Re-entrant one use at a time, like torch.autocast, so it serves as a run's `ctx`. Backward, run
    outside the context as the trainer runs it, sees the dtypes the forward saved."""

    def __init__(self, dtype=torch.bfloat16, rms_norm_fp32=True):
        self.dtype, self.rms_norm_fp32, self.stack = dtype, rms_norm_fp32, None

    def __enter__(self):
        self.stack = contextlib.ExitStack()
        self.stack.enter_context(torch.autocast("cpu", dtype=self.dtype))
        self.stack.enter_context(CudaAutocastPolicy(self.rms_norm_fp32))
        return self

    def __exit__(self, *exc):
        self.stack.close()
        return False
