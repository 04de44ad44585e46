"""
Benchmark: ASCA attention (predictor + selection + BlockMask + kernel) against dense SDPA flash
attention, forward + backward, and a whole training step of both models. Prints a table last.

    python bench_attention.py                 # CUDA: the full table (a few minutes)
    python bench_attention.py --seq 8192 --sparsity 0.75 --step_seq 8192   # one row of each table
    python bench_attention.py --quick         # small sizes; on CPU it only checks the script runs
    python bench_attention.py --out DIR       # also write DIR/bench.json and DIR/bench.md

Rows print as they are measured (a failed row prints its error and the rest go on); the tables last.
A target out of reach for (T, S) is skipped (asca.max_sparsity). --gate_grad also times the
attention with the gate bias detached (the cost of its gradient: fp32 atomics inside FlexAttention) and with the
bias read per block (flex_gate_bias='block', S*S logits per atomic address) instead of per key position (the
default, S per address; asca_kernels.gate_score_mod).
--profile T prints the top CUDA kernels of one ASCA forward+backward at that T (where the time goes).

Timings: median after --warmup runs (compile and autotuning excluded); on CUDA triton.testing.do_bench (the L2
cache flushed before each run, about 100 ms of repetitions), on a CPU --iters runs.
B * T = --tokens (65,536 by default), 8 heads, head dim 64, bf16 autocast on CUDA (the modules stay fp32, as
in training). Compiled rows: torch.compile(dynamic=False) with a fresh compile cache per sequence length, and
hitting torch's recompile limit is an error, so a row never falls back to eager and is timed as compiled.

The CPU dry run of scripts/gpu_check.sh (--dry-run, and tests/test_gpu_path.py in CI) runs every row kind:
    python bench_attention.py --quick --dtype bfloat16 --compile --backend aot_eager --gate_grad --profile 256
"""
import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

import gpt
import asca
from checkpoint import first_line
from runtime import cuda_autocast_on_cpu


def timeit(fn, warmup, iters, cuda):
    """Median ms of fn after `warmup` calls (compile and autotuning). CUDA: triton.testing.do_bench, which
    flushes the L2 cache before each run and repeats it for about 100 ms (torch.utils.benchmark's Timer where
    Triton is missing). CPU: perf_counter over `iters` runs."""
    for _ in range(warmup):
        fn()
    if cuda:
        try:
            from triton.testing import do_bench
        except ImportError:
            from torch.utils.benchmark import Timer
            return Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.2).median * 1e3
        return do_bench(fn, warmup=1, rep=100, return_mode="median")
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def compiled(fn, args, sparse=False):
    """fn compiled as the benchmark runs it (static shapes: training never runs a symbolic length), or fn. The
    gather path stays eager: its group sizes are host values that a compiled graph would guard on (one recompile
    per count), and training never compiles it (attn_impl='auto' keeps a compiled CPU run on the reference)."""
    eager = sparse and args.device == "cpu" and args.cpu_impl == "gather"
    return torch.compile(fn, dynamic=False, backend=args.backend) if args.compile and not eager else fn


def autocast(device, dtype, args):
    """The training loop's mixed precision: fp32 modules under autocast to dtype (nothing for fp32); with
    --cuda_policy on a CPU, CUDA's autocast policy (float32 softmax, sums and norms: runtime.cuda_autocast_on_cpu)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    if args.cuda_policy and device == "cpu":
        return cuda_autocast_on_cpu(dtype)
    return torch.autocast(device, dtype=dtype)


def asca_impl(device, args):
    """The ASCA path the rows time: flex on CUDA; on a CPU --cpu_impl (the reference, or the gather path)."""
    return "flex" if device == "cuda" else args.cpu_impl


def bench_attention(T, sparsities, args, device, dtype, emit=print):
    """One module per T, compiled once: the target lives in a buffer, so changing it does not recompile.
    The gate-detached and block-indexed variants are more modules (same weights), each compiled on its own.
    emit(row) is called as soon as a row's main timing exists and again after each variant, so a run cut short
    keeps every timing it finished; a variant that fails is noted in the row and the rest go on."""
    torch._dynamo.reset()  # each length starts from an empty compile cache: no length inherits another's variants
    B, H, hs = max(1, args.tokens // T), args.heads, args.head_dim
    cuda = device == "cuda"
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, T, hs, device=device, dtype=dtype, generator=g).requires_grad_(True)
               for _ in range(3))
    grad = torch.randn(B, H, T, hs, device=device, dtype=dtype, generator=g)

    def dense():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)

    cfg = asca.ASCAConfig(block_size=T, n_head=H, n_embd=H * hs, sparse_block_size=args.sparse_block_size,
                                 target_sparsity=max(sparsities), sparsity_warmup_iters=0,
                                 attn_impl=asca_impl(device, args))
    attn = asca.AdaptiveSparseCausalSelfAttention(cfg).to(device)
    attend = compiled(attn.attend, args, sparse=True)
    ctx = autocast(device, dtype, args)

    def sparse(fn=attend):
        with ctx:
            y = fn(q, k, v)
        y.backward(grad)

    variants = {}
    if args.gate_grad:  # the cost of the gate bias's gradient: the same module with the bias detached
        import copy
        twin = copy.deepcopy(attn)
        bias = twin.selector.gate_bias
        twin.selector.gate_bias = lambda scores, sel: bias(scores, sel).detach()
        by_block = copy.deepcopy(attn)  # and with the bias indexed by block instead of per key position
        by_block.flex_layout = "block"
        variants = {"detached_gate_ms": twin, "block_bias_ms": by_block}  # compiled when first timed

    t_dense = timeit(dense, args.warmup, args.iters, cuda)
    rows = []
    top = asca.max_sparsity(T, args.sparse_block_size, True)
    for sparsity in sparsities:
        if sparsity > top:
            print(f"T={T} target {sparsity}: out of reach with S={args.sparse_block_size} (max {top:.3f}), skipped",
                  flush=True)
            continue
        for a in (attn, *variants.values()):
            a.selector.target = sparsity
            a.set_step(0)
        reset_peak(cuda)
        t_sparse = timeit(sparse, args.warmup, args.iters, cuda)
        d = attn.diagnostics()
        row = {"T": T, "B": B, "S": args.sparse_block_size, "target": sparsity, "pair_sparsity": d["sparsity"],
               "skipped_blocks": d["block_sparsity"], "dense_ms": t_dense, "asca_ms": t_sparse,
               "ratio": t_sparse / t_dense, "peak_mib": peak_mib(cuda), "detached_gate_ms": None, "block_bias_ms": None}
        rows.append(row)
        emit(row)  # the main timing first: a cut in a variant's compile keeps it
        for key, module in variants.items():
            try:
                if not hasattr(module, "_bench_attend"):
                    module._bench_attend = compiled(module.attend, args, sparse=True)
                row[key] = timeit(lambda: sparse(module._bench_attend), args.warmup, args.iters, cuda)
            except Exception as e:  # one variant's failure must not cost the row
                row[key] = None
                row.setdefault("errors", []).append(f"{key}: {type(e).__name__}: {first_line(e)}")
            emit(row)
    return rows


def reset_peak(cuda):
    if cuda:
        torch.cuda.reset_peak_memory_stats()


def peak_mib(cuda):
    return torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None


def bench_step(T, args, device, dtype, kind, sparsity=None, budget="fixed"):
    torch._dynamo.reset()
    B = max(1, args.tokens // T)
    cuda = device == "cuda"
    common = dict(n_layer=args.layers, n_head=args.heads, n_embd=args.heads * args.head_dim, block_size=T)
    if kind == "baseline":
        model = gpt.make_model(**common)
    else:
        model = asca.make_model(**common, sparse_block_size=args.sparse_block_size,
                                       target_sparsity=sparsity, sparsity_warmup_iters=0, budget=budget,
                                       attn_impl=asca_impl(device, args))
    model.to(device)
    opt = model.configure_optimizer(0.1, 1e-4, (0.9, 0.95), device)
    fwd = compiled(model, args, sparse=kind == "asca")
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, 256, (B, T), device=device, generator=g)
    y = torch.randint(0, 256, (B, T), device=device, generator=g)
    ctx = autocast(device, dtype, args)

    def step():
        with ctx:
            _, loss = fwd(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_budgets()  # as the trainer does: an adaptive budget's threshold moves after each step

    reset_peak(cuda)
    return timeit(step, args.warmup, args.iters, cuda), peak_mib(cuda)


def profile_attention(T, args, device, dtype):
    """Top kernels of one ASCA attention forward+backward at T (after warm-up): predictor, selection,
    BlockMask build and the flex kernels each show up by name."""
    from torch.profiler import ProfilerActivity, profile
    B, H, hs = max(1, args.tokens // T), args.heads, args.head_dim
    cfg = asca.ASCAConfig(block_size=T, n_head=H, n_embd=H * hs, sparse_block_size=args.sparse_block_size,
                                 target_sparsity=min(0.75, asca.max_sparsity(T, args.sparse_block_size, True)),
                                 sparsity_warmup_iters=0, attn_impl=asca_impl(device, args))
    attn = asca.AdaptiveSparseCausalSelfAttention(cfg).to(device)
    torch._dynamo.reset()
    attend = compiled(attn.attend, args, sparse=True)
    q, k, v = (torch.randn(B, H, T, hs, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    ctx = autocast(device, dtype, args)

    def once():
        with ctx:
            y = attend(q, k, v)
        y.float().sum().backward()

    for _ in range(3):
        once()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(5):
            once()
    key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15), flush=True)


def write_tables(rows, steps, errors, args, name, final=True):
    """The tables so far: printed at the end, and (with --out) written after every row, so a run cut short by its
    time limit keeps what it measured."""
    mem = lambda m: f"{m:,.0f}" if m is not None else "-"
    timer = "triton.testing.do_bench, L2 flushed" if torch.cuda.is_available() else f"{args.iters} runs"
    lines = [f"{name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; B*T={args.tokens}, "
             f"{args.heads} heads x {args.head_dim}, S={args.sparse_block_size}, median ({timer})",
             "attention forward+backward (ASCA = predictor + selection + BlockMask + kernel)",
             "| T | B | target | pair sparsity | skipped blocks | SDPA ms | ASCA ms | ASCA/SDPA | gate detached ms | "
             "bias per block ms | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    ms = lambda x: f"{x:.2f}" if x is not None else "-"
    for r in rows:
        lines.append(f"| {r['T']} | {r['B']} | {r['target']:.2f} | {r['pair_sparsity']:.3f} | "
                     f"{r['skipped_blocks']:.3f} | "
                     f"{r['dense_ms']:.2f} | {r['asca_ms']:.2f} | {r['ratio']:.2f}x | {ms(r['detached_gate_ms'])} | "
                     f"{ms(r.get('block_bias_ms'))} | {mem(r['peak_mib'])} |")
    lines += ["", f"whole training step ({args.layers} layers, n_embd {args.heads * args.head_dim}, AdamW, "
                  f"ASCA at the target shown)",
              "| T | ASCA target | ASCA budget | baseline ms | ASCA ms | ASCA/baseline | baseline peak MiB | "
              "ASCA peak MiB |",
              "|---|---|---|---|---|---|---|---|"]
    for r in steps:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        lines.append(f"| {r['T']} | {r['target']:.2f} | {r['budget']} | {r['baseline_ms']:.2f} | {ms(r['asca_ms'])} | "
                     f"{ratio} | {mem(r['baseline_peak_mib'])} | {mem(r['asca_peak_mib'])} |")
    lines += [f"failed: T={r['T']} {e}" for r in rows for e in r.get("errors", [])]
    lines += [f"failed: {e}" for e in errors]
    if final:
        print("\n" + "\n".join(lines), flush=True)
    if args.out:
        import json
        import os
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench.json"), "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "args": vars(args), "attention": rows,
                       "steps": steps, "errors": errors}, f, indent=1)
        with open(os.path.join(args.out, "bench.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (and the only mode that makes sense on CPU)")
    p.add_argument("--seq", type=int, nargs="+", default=[1024, 4096, 8192, 16384])
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    p.add_argument("--step_seq", type=int, nargs="+", default=[1024, 8192])
    p.add_argument("--step_sparsity", type=float, default=0.75)
    p.add_argument("--budgets", nargs="+", default=["fixed", "adaptive"], choices=("fixed", "adaptive"),
                   help="ASCA budgets of the whole-step rows (the adaptive one: per-head counts, a threshold update)")
    p.add_argument("--tokens", type=int, default=65536, help="B * T")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=6, help="layers of the whole-step models")
    p.add_argument("--sparse_block_size", type=int, default=128,
                   help="128: FlexAttention's backward on H100/H200 needs S %% 128 == 0 before torch 2.14.1")
    p.add_argument("--gate_grad", action="store_true",
                   help="also time with the gate bias detached, and indexed per block instead of per key")
    p.add_argument("--profile", type=int, default=None, metavar="T", help="profile one ASCA attention at T")
    p.add_argument("--out", default=None, help="directory for bench.json and bench.md")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="autocast dtype (default: bfloat16 on CUDA, float32 on CPU; the CPU dry run uses bfloat16)")
    p.add_argument("--compile", action="store_true", default=None, help="compile the rows (default: on CUDA)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (the CPU dry run: aot_eager)")
    p.add_argument("--cuda_policy", action="store_true",
                   help="CPU: autocast with CUDA's float32 ops (softmax, sums, norms), as a GPU runs them (dry run)")
    p.add_argument("--cpu_impl", choices=("reference", "gather"), default="reference",
                   help="CPU: the ASCA path of the rows (a GPU times flex)")
    p.add_argument("--only", choices=("attention", "steps"), default=None,
                   help="only the attention rows or only the whole-step rows (gpu_check.sh gives each its time limit)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    if p.parse_args().quick:  # small defaults; sizes given on the command line still win
        p.set_defaults(seq=[512], step_seq=[512], tokens=1024, warmup=1, iters=2, layers=2, heads=2, head_dim=32,
                       sparse_block_size=32)
    args = p.parse_args()
    device = args.device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    if args.compile is None:
        args.compile = device == "cuda"
    try:  # past the recompile limit torch runs eager code silently: a row would be timed as compiled
        torch._dynamo.config.fail_on_recompile_limit_hit = True
    except AttributeError:
        pass
    name = (torch.cuda.get_device_name() if device == "cuda" else f"CPU ({args.cpu_impl} path, not a performance "
            f"number{', CUDA autocast policy emulated' if args.cuda_policy else ''})")
    print(f"{name}, torch {torch.__version__}; B*T={args.tokens}, {args.heads} heads x {args.head_dim}, "
          f"S={args.sparse_block_size}, {str(dtype).split('.')[-1]}, "
          f"{'compiled (' + args.backend + ')' if args.compile else 'eager'}", flush=True)
    rows, steps, errors = [], [], []
    if args.only == "steps":
        args.seq = []
    if args.only == "attention":
        args.step_seq = []
    def emit(row):  # a row as soon as it has a timing, again with each variant: the tables on disk follow it
        if not any(r is row for r in rows):
            rows.append(row)
        print("row", row, flush=True)
        write_tables(rows, steps, errors, args, name, final=False)

    for T in args.seq:
        try:
            bench_attention(T, args.sparsity, args, device, dtype, emit)
        except Exception as e:  # one failed size must not cost the whole table
            errors.append(f"attention T={T}: {type(e).__name__}: {first_line(e)}")
            print(errors[-1], flush=True)
        write_tables(rows, steps, errors, args, name, final=False)
        if device == "cuda":
            torch.cuda.empty_cache()
    for T in args.step_seq:
        sp = min(args.step_sparsity, asca.max_sparsity(T, args.sparse_block_size, True))
        try:
            tb, mb = bench_step(T, args, device, dtype, "baseline")
        except Exception as e:
            errors.append(f"step T={T} baseline: {type(e).__name__}: {first_line(e)}")
            print(errors[-1], flush=True)
            continue
        for budget in args.budgets:
            # the dense step is on disk before ASCA's compiles: a cut keeps it
            row = {"T": T, "target": sp, "budget": budget, "baseline_ms": tb, "asca_ms": None, "ratio": None,
                   "baseline_peak_mib": mb, "asca_peak_mib": None}
            steps.append(row)
            write_tables(rows, steps, errors, args, name, final=False)
            try:
                ta, ma = bench_step(T, args, device, dtype, "asca", sp, budget)
                row.update(asca_ms=ta, ratio=ta / tb, asca_peak_mib=ma)
                print("step", row, flush=True)
            except Exception as e:
                errors.append(f"step T={T} {budget}: {type(e).__name__}: {first_line(e)}")
                print(errors[-1], flush=True)
            write_tables(rows, steps, errors, args, name, final=False)
            if device == "cuda":
                torch.cuda.empty_cache()
    if args.profile:
        try:
            profile_attention(args.profile, args, device, dtype)
        except Exception as e:
            errors.append(f"profile T={args.profile}: {type(e).__name__}: {e}")
            print(errors[-1], flush=True)

    write_tables(rows, steps, errors, args, name)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
