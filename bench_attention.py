"""
Benchmark: ASCA attention (predictor + selection + BlockMask + kernel) against dense SDPA flash
attention, forward + backward, and a whole training step of both models. Prints a table last.

    python bench_attention.py                 # CUDA: the full table (a few minutes)
    python bench_attention.py --quick         # small sizes; on CPU it only checks the script runs

Timings: median of --iters runs after --warmup runs (compile and autotuning excluded), CUDA events.
B * T = --tokens (65,536 by default), 8 heads, head dim 64, bf16 on CUDA.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import baseline_model
import novel_model


def timeit(fn, warmup, iters, cuda):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_attention(T, sparsities, args, device, dtype):
    """One module per T, compiled once: the target lives in a buffer, so changing it does not recompile."""
    B, H, hs = max(1, args.tokens // T), args.heads, args.head_dim
    cuda = device == "cuda"
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, T, hs, device=device, dtype=dtype, generator=g).requires_grad_(True)
               for _ in range(3))
    grad = torch.randn(B, H, T, hs, device=device, dtype=dtype, generator=g)

    def dense():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)

    cfg = novel_model.ASCAConfig(block_size=T, n_head=H, n_embd=H * hs, sparse_block_size=args.sparse_block_size,
                                 target_sparsity=max(sparsities), sparsity_warmup_iters=0,
                                 attn_impl="flex" if cuda else "reference")
    attn = novel_model.AdaptiveSparseCausalSelfAttention(cfg).to(device)
    attend = torch.compile(attn.attend) if cuda else attn.attend

    def sparse():
        attend(q, k, v).backward(grad)

    t_dense = timeit(dense, args.warmup, args.iters, cuda)
    rows = []
    for sparsity in sparsities:
        attn.target = sparsity
        attn.set_step(0)
        t_sparse = timeit(sparse, args.warmup, args.iters, cuda)
        d = attn.diagnostics()
        rows.append({"T": T, "B": B, "target": sparsity, "pair_sparsity": d["sparsity"],
                     "skipped_blocks": d["block_sparsity"], "dense_ms": t_dense, "asca_ms": t_sparse,
                     "ratio": t_sparse / t_dense})
    return rows


def bench_step(T, args, device, dtype, kind):
    B = max(1, args.tokens // T)
    cuda = device == "cuda"
    common = dict(n_layer=args.layers, n_head=args.heads, n_embd=args.heads * args.head_dim, block_size=T)
    if kind == "baseline":
        model = baseline_model.make_model(**common)
    else:
        model = novel_model.make_model(**common, sparse_block_size=args.sparse_block_size,
                                       target_sparsity=args.step_sparsity, sparsity_warmup_iters=0,
                                       attn_impl="flex" if cuda else "reference")
    model.to(device)
    opt = model.configure_optimizer(0.1, 1e-4, (0.9, 0.95), device)
    fwd = torch.compile(model) if cuda else model
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, 256, (B, T), device=device, generator=g)
    y = torch.randint(0, 256, (B, T), device=device, generator=g)
    ctx = torch.autocast(device, dtype=dtype) if cuda else torch.autocast("cpu", enabled=False)

    def step():
        with ctx:
            _, loss = fwd(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timeit(step, args.warmup, args.iters, cuda)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (and the only mode that makes sense on CPU)")
    p.add_argument("--seq", type=int, nargs="+", default=[1024, 4096, 8192, 16384])
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.75])
    p.add_argument("--step_seq", type=int, nargs="+", default=[1024, 8192])
    p.add_argument("--step_sparsity", type=float, default=0.75)
    p.add_argument("--tokens", type=int, default=65536, help="B * T")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=6, help="layers of the whole-step models")
    p.add_argument("--sparse_block_size", type=int, default=64)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:
        args.seq, args.step_seq, args.tokens, args.warmup, args.iters, args.layers = [512], [512], 1024, 1, 2, 2
        args.heads, args.head_dim, args.sparse_block_size = 2, 32, 32
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (reference path, not a performance number)"
    rows = []
    for T in args.seq:
        try:
            rows += bench_attention(T, args.sparsity, args, device, dtype)
        except torch.OutOfMemoryError:
            print(f"T={T}: out of memory, skipped")
            if device == "cuda":
                torch.cuda.empty_cache()
    steps = []
    for T in args.step_seq:
        try:
            tb = bench_step(T, args, device, dtype, "baseline")
            ta = bench_step(T, args, device, dtype, "asca")
            steps.append((T, tb, ta))
        except torch.OutOfMemoryError:
            print(f"step T={T}: out of memory, skipped")
        if device == "cuda":
            torch.cuda.empty_cache()

    print(f"\n{name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; B*T={args.tokens}, "
          f"{args.heads} heads x {args.head_dim}, S={args.sparse_block_size}, median of {args.iters}")
    print("attention forward+backward (ASCA = predictor + selection + BlockMask + kernel)")
    print("| T | B | target | pair sparsity | skipped blocks | SDPA ms | ASCA ms | ASCA/SDPA |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['T']} | {r['B']} | {r['target']:.2f} | {r['pair_sparsity']:.3f} | {r['skipped_blocks']:.3f} | "
              f"{r['dense_ms']:.2f} | {r['asca_ms']:.2f} | {r['ratio']:.2f}x |")
    print(f"\nwhole training step ({args.layers} layers, n_embd {args.heads * args.head_dim}, AdamW, "
          f"ASCA target {args.step_sparsity})")
    print("| T | baseline ms | ASCA ms | ASCA/baseline |")
    print("|---|---|---|---|")
    for T, tb, ta in steps:
        print(f"| {T} | {tb:.2f} | {ta:.2f} | {ta / tb:.2f}x |")


if __name__ == "__main__":
    main()
