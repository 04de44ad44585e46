"""
CPU benchmark of ASCA's gather path (asca_kernels.attend_gather) against dense causal SDPA, in one run:
  attention: one layer's forward + backward, B=1, 4 heads, head dim 64 (ASCA: predictor, selection and the
             gather kernel, the whole attend(); dense: F.scaled_dot_product_attention(is_causal=True));
  step:      a whole training step (forward, backward, AdamW) of the default CPU model (4 layers, n_embd 256,
             4 heads, rotary, QK-norm, relu2), B * T = 8192 bytes, dense GPT against ASCA on the gather path.
Rows print as they are measured; the table (markdown) prints last and goes to --out if given.

    OMP_NUM_THREADS=2 python3 scripts/bench_gather_cpu.py              # the grid of docs/results/gather_cpu.md
    python3 scripts/bench_gather_cpu.py --seq 1024 --sparsity 0.5 --iters 2   # a quick look

Timings: median of --iters runs after one warm-up run, fp32, torch.get_num_threads() threads; run it alone
(a second job on a 2-core machine slows it 5-10x).
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


def median_ms(fn, iters):
    fn()  # warm-up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def block_for(T):
    return 64 if T <= 4096 else 128  # S: the grid (S=64 up to 4096, S=128 at 8192)


def attention_rows(T, sparsities, iters):
    H, hs, S = 4, 64, block_for(T)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, T, hs, generator=g).requires_grad_(True) for _ in range(3))
    grad = torch.randn(1, H, T, hs, generator=g)
    dense = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad), iters)
    yield ("attention", T, S, "dense", None, dense, 1.0)
    for s in sparsities:
        if s > asca.max_sparsity(T, S, True) + 1e-9:
            continue
        cfg = asca.ASCAConfig(block_size=T, n_head=H, n_embd=H * hs, sparse_block_size=S, target_sparsity=s,
                                     sparsity_warmup_iters=0, attn_impl="gather", pos_encoding="learned")
        a = asca.AdaptiveSparseCausalSelfAttention(cfg)
        ms = median_ms(lambda: a.attend(q, k, v).backward(grad), iters)
        measured = a.diagnostics()["sparsity"]
        yield ("attention", T, S, "asca gather", measured, ms, ms / dense)


def step_rows(T, sparsities, iters, tokens):
    B, S = max(1, tokens // T), block_for(T)
    common = dict(n_layer=4, n_head=4, n_embd=256, block_size=T)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (B, T), generator=g)
    y = torch.randint(0, 256, (B, T), generator=g)

    def timed(model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            _, loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return median_ms(step, iters), model

    torch.manual_seed(0)
    dense, _ = timed(gpt.make_model(**common))
    yield ("step", T, S, "dense", None, dense, 1.0)
    for s in sparsities:
        if s > asca.max_sparsity(T, S, True) + 1e-9:
            continue
        torch.manual_seed(0)
        ms, m = timed(asca.make_model(**common, sparse_block_size=S, target_sparsity=s,
                                             sparsity_warmup_iters=0, attn_impl="gather"))
        yield ("step", T, S, "asca gather", m.diagnostics()["sparsity"], ms, ms / dense)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.75, 0.875])
    p.add_argument("--rows", nargs="+", default=["attention", "step"], choices=("attention", "step"))
    p.add_argument("--tokens", type=int, default=8192, help="B * T of the whole-step rows")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--out", default=None, help="also write the table to this file")
    a = p.parse_args(argv)
    head = (f"CPU gather benchmark: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads, fp32, median of {a.iters} after 1 warm-up; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(head, flush=True)
    lines = ["| rows | T | S | path | measured sparsity | ms | x dense |", "|---|---|---|---|---|---|---|"]
    for T in a.seq:
        for kind in a.rows:
            rows = (attention_rows(T, a.sparsity, a.iters) if kind == "attention"
                    else step_rows(T, a.sparsity, a.iters, a.tokens))
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
