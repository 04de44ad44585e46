"""
CPU benchmark of ASCA's gather path (asca_kernels.attend_gather) against dense causal SDPA, in one run:
  attention: one layer's forward + backward, B=1, 4 heads, head dim 64 (ASCA: predictor, selection and the
             gather kernel, the whole attend(), with each gather kernel: 'sdpa', the fused flash kernel, and
             'block', the written-out one; dense: F.scaled_dot_product_attention(is_causal=True));
  forward:   the same, forward only (no grad), plus compiled FlexAttention's forward (inductor's CPU template);
  step:      a whole training step (forward, backward, AdamW) of the default CPU model (4 layers, n_embd 256,
             4 heads, rotary, QK-norm, relu2), B * T = 8192 bytes, dense GPT against ASCA on the gather path.
Rows print as they are measured; the table (markdown) prints last and goes to --out if given.

    OMP_NUM_THREADS=2 python3 scripts/bench_gather_cpu.py              # the grid of docs/results/gather_cpu.md
    python3 scripts/bench_gather_cpu.py --seq 1024 --sparsity 0.5 --iters 2   # a quick look

Timings: median of --iters runs after one warm-up run, fp32, torch.get_num_threads() threads, glibc's malloc
told to keep freed memory as a CPU training run does (runtime.keep_freed_memory; left alone if MALLOC_MMAP_THRESHOLD_
is set); run it alone (a second job on a 2-core machine slows it 5-10x).
"""
import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import gpt  # noqa: E402
import asca  # noqa: E402
import runtime  # noqa: E402
import asca_kernels  # noqa: E402


def median_ms(fn, iters):
    fn()  # warm-up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def reachable(T, S):
    """The largest target sparsity ASCA's defaults reach at T, S (the own and forced blocks are always kept)."""
    d = asca.ASCAConfig()
    return asca.max_sparsity(T, S, d.keep_first_block, d.local_blocks)


def block_for(T):
    # S: the grid (S=64 up to 4096, S=128 at 8192); the main job's T=256 and cpu_quality's T=512 use 32
    return 32 if T <= 512 else 64 if T <= 4096 else 128


REFERENCE_MAX_T = 4096  # the reference path's (T x T) rows up to this T (at 8192 a layer holds GBs)
KERNELS = ("sdpa", "block")  # the fused kernel and the written-out one
default_kernel = asca_kernels.GATHER_KERNEL


def asca_layer(T, S, H, hs, s, impl="gather"):
    cfg = asca.ASCAConfig(block_size=T, n_head=H, n_embd=H * hs, sparse_block_size=S, target_sparsity=s,
                          sparsity_warmup_iters=0, attn_impl=impl, pos_encoding="learned")
    return asca.AdaptiveSparseCausalSelfAttention(cfg)


def attention_rows(T, sparsities, iters, forward_only=False):
    """One layer's attend(), forward + backward (or forward only, no grad), against dense causal SDPA."""
    H, hs, S = 4, 64, block_for(T)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, T, hs, generator=g).requires_grad_(not forward_only) for _ in range(3))
    grad = torch.randn(1, H, T, hs, generator=g)
    kind = "forward" if forward_only else "attention"

    def timed(fn):
        if forward_only:
            with torch.no_grad():
                return median_ms(fn, iters)
        return median_ms(lambda: fn().backward(grad), iters)

    dense = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    yield (kind, T, S, "dense", None, dense, 1.0)
    for s in sparsities:
        if s > reachable(T, S) + 1e-9:
            continue
        for kernel in KERNELS:
            asca_kernels.GATHER_KERNEL = kernel
            a = asca_layer(T, S, H, hs, s)
            ms = timed(lambda: a.attend(q, k, v))
            yield (kind, T, S, f"asca gather ({kernel})", a.diagnostics()["sparsity"], ms, ms / dense)
        asca_kernels.GATHER_KERNEL = default_kernel
        if T <= REFERENCE_MAX_T:  # the T x T definition: what attn_impl='auto' chooses against
            a = asca_layer(T, S, H, hs, s, impl="reference")
            ms = timed(lambda: a.attend(q, k, v))
            yield (kind, T, S, "asca reference", a.diagnostics()["sparsity"], ms, ms / dense)
        if forward_only:  # inductor's CPU flex template skips blocks in the forward (it has no CPU backward)
            a = asca_layer(T, S, H, hs, s, impl="flex")
            try:
                ms = timed(lambda: a.attend(q, k, v))
            except Exception as e:  # a torch without the CPU template: say so in the row, not a traceback
                print(f"flex (compiled, CPU) forward failed at T={T}: {type(e).__name__}: {str(e)[:120]}")
                continue
            yield (kind, T, S, "asca flex (compiled)", a.diagnostics()["sparsity"], ms, ms / dense)


def training_step(model, x, y):
    """The step rows' training step for `model` on the batch x, y (forward, backward, AdamW), as a closure
    (bench_gather_vs_rev.py times the same step)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def step_rows(T, sparsities, iters, tokens):
    B, S = max(1, tokens // T), block_for(T)
    common = dict(n_layer=4, n_head=4, n_embd=256, block_size=T)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (B, T), generator=g)
    y = torch.randint(0, 256, (B, T), generator=g)

    def timed(model):
        return median_ms(training_step(model, x, y), iters), model

    torch.manual_seed(0)
    dense, _ = timed(gpt.make_model(**common))
    yield ("step", T, S, "dense", None, dense, 1.0)
    for s in sparsities:
        if s > reachable(T, S) + 1e-9:
            continue
        for kernel in KERNELS:
            asca_kernels.GATHER_KERNEL = kernel
            torch.manual_seed(0)
            ms, m = timed(asca.make_model(**common, sparse_block_size=S, target_sparsity=s,
                                          sparsity_warmup_iters=0, attn_impl="gather"))
            yield ("step", T, S, f"asca gather ({kernel})", m.diagnostics()["sparsity"], ms, ms / dense)
        asca_kernels.GATHER_KERNEL = default_kernel
        if T <= REFERENCE_MAX_T:
            torch.manual_seed(0)
            ms, m = timed(asca.make_model(**common, sparse_block_size=S, target_sparsity=s,
                                          sparsity_warmup_iters=0, attn_impl="reference"))
            yield ("step", T, S, "asca reference", m.diagnostics()["sparsity"], ms, ms / dense)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.75, 0.875])
    p.add_argument("--rows", nargs="+", default=["attention", "forward", "step"],
                   choices=("attention", "forward", "step"))
    p.add_argument("--tokens", type=int, default=8192, help="B * T of the whole-step rows")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--reference_max_t", type=int, default=REFERENCE_MAX_T,
                   help=f"reference rows up to this T (default {REFERENCE_MAX_T})")
    p.add_argument("--out", default=None, help="also write the table to this file")
    a = p.parse_args(argv)
    globals()["REFERENCE_MAX_T"] = a.reference_max_t  # read by attention_rows and step_rows
    malloc = runtime.keep_freed_memory()  # as a CPU training run sets it (runtime.Runtime)
    head = (f"CPU gather benchmark: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads, fp32, median of {a.iters} after 1 warm-up; "
            f"{'malloc keeps freed memory' if malloc else 'malloc left as it is'}; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(head, flush=True)
    lines = ["| rows | T | S | path | measured sparsity | ms | x dense |", "|---|---|---|---|---|---|---|"]
    for T in a.seq:
        for kind in a.rows:
            rows = (step_rows(T, a.sparsity, a.iters, a.tokens) if kind == "step"
                    else attention_rows(T, a.sparsity, a.iters, forward_only=kind == "forward"))
            for kind_, T_, S, path, sp, ms, rel in rows:
                line = (f"| {kind_} | {T_} | {S} | {path} | {'-' if sp is None else f'{sp:.3f}'} | {ms:,.1f} | "
                        f"{rel:.2f} |")
                print(line, flush=True)
                lines.append(line)
    table = head + "\n\n" + "\n".join(lines) + "\n"
    print("\n" + table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
