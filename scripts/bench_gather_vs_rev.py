"""
The gather path against its own code at another git revision, taking turns in one process (paired): the way a
kernel change is measured on a noisy CPU, where two separate runs of the same code differ by 10-20%.

    OMP_NUM_THREADS=2 python3 scripts/bench_gather_vs_rev.py --rev 0123abc            # attention rows
    OMP_NUM_THREADS=2 python3 scripts/bench_gather_vs_rev.py --rev 0123abc --rows step --shapes 4096/64/0.875

The old asca_kernels.py is read with `git show REV:asca_kernels.py` and loaded as a separate module; ASCA's
attend() calls either module's attend_gather (everything else, the selection included, is today's code).
attention: one layer's attend() forward + backward, B=1, 4 heads, head dim 64, with dense causal SDPA timed in
the same rounds; step: forward, backward and AdamW of the 4-layer n_embd 256 CPU model, B x T = 8192. Each
round times old, new, then dense once; the table gives medians and the median of the per-round new/old ratios.
Run it alone.
"""
import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import asca  # noqa: E402
import asca_kernels  # noqa: E402
import gpt  # noqa: E402
from bench_gather_cpu import training_step  # noqa: E402
import runtime  # noqa: E402


def kernels_at(rev):
    """asca_kernels.py as it was at git revision `rev`, loaded as its own module."""
    try:
        src = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:asca_kernels.py"], capture_output=True, text=True,
                             check=True).stdout
    except subprocess.CalledProcessError as e:
        sys.exit(f"bench_gather_vs_rev: cannot read asca_kernels.py at {rev!r}: {e.stderr.strip()}")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "asca_kernels_at_rev.py")
        with open(path, "w") as f:
            f.write(src)
        spec = importlib.util.spec_from_file_location("asca_kernels_at_rev", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return mod


def paired(runs, dense, rounds):
    for r in runs.values():
        r()
        r()
    dense()
    ts, td = {n: [] for n in runs}, []
    for _ in range(rounds):
        for n, r in runs.items():
            t0 = time.perf_counter()
            r()
            ts[n].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        dense()
        td.append(time.perf_counter() - t0)
    ms = {n: statistics.median(x) * 1e3 for n, x in ts.items()}
    return ms, statistics.median(td) * 1e3, statistics.median([b / a for a, b in zip(ts["old"], ts["new"])])


def attention(fns, T, S, s, rounds):
    H, hs = 4, 64
    cfg = asca.ASCAConfig(block_size=T, n_head=H, n_embd=H * hs, sparse_block_size=S, target_sparsity=s,
                          sparsity_warmup_iters=0, attn_impl="gather", pos_encoding="learned")
    a = asca.AdaptiveSparseCausalSelfAttention(cfg)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, T, hs, generator=g).requires_grad_(True) for _ in range(3))
    grad = torch.randn(1, H, T, hs, generator=g)

    def run(f):
        def r():
            asca.attend_gather = f
            a.attend(q, k, v).backward(grad)
        return r
    return paired({n: run(f) for n, f in fns.items()},
                  lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad), rounds)


def step(fns, T, S, s, rounds):
    B = max(1, 8192 // T)
    common = dict(n_layer=4, n_head=4, n_embd=256, block_size=T)
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, 256, (B, T), generator=g) for _ in range(2))

    def run(f):
        torch.manual_seed(0)
        st = training_step(asca.make_model(**common, sparse_block_size=S, target_sparsity=s, sparsity_warmup_iters=0,
                                           attn_impl="gather"), x, y)

        def r():
            asca.attend_gather = f
            st()
        return r
    torch.manual_seed(0)
    return paired({n: run(f) for n, f in fns.items()}, training_step(gpt.make_model(**common), x, y), rounds)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", required=True, help="the git revision whose asca_kernels.py is 'old'")
    p.add_argument("--rows", nargs="+", default=["attention"], choices=("attention", "step"))
    p.add_argument("--shapes", nargs="+", default=["4096/64/0.875", "4096/64/0.75", "2048/64/0.875",
                                                   "8192/128/0.875", "1024/64/0.5"], help="T/S/sparsity")
    p.add_argument("--rounds", type=int, default=7)
    a = p.parse_args(argv)
    try:
        shapes = [(int(t), int(s), float(x)) for t, s, x in (sh.split("/") for sh in a.shapes)]
    except ValueError:
        sys.exit(f"bench_gather_vs_rev: --shapes {' '.join(a.shapes)}: each must be T/S/sparsity, e.g. 4096/64/0.875")
    malloc = runtime.keep_freed_memory()
    fns = {"old": kernels_at(a.rev).attend_gather, "new": asca_kernels.attend_gather}
    print(f"gather kernel at {a.rev} (old) against the working tree (new): torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, fp32, {a.rounds} rounds; "
          f"{'malloc keeps freed memory' if malloc else 'malloc left as it is'}", flush=True)
    lines = ["| rows | T | S | sparsity | old ms | new ms | dense ms | old x dense | new x dense | new / old paired |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for kind in a.rows:
        for T, S, s in shapes:
            ms, md, ratio = (attention if kind == "attention" else step)(fns, T, S, s, a.rounds)
            lines.append(f"| {kind} | {T} | {S} | {s} | {ms['old']:,.2f} | {ms['new']:,.2f} | {md:,.2f} | "
                         f"{ms['old'] / md:.3f} | {ms['new'] / md:.3f} | {ratio:.3f} |")
            print(lines[-1], flush=True)
    print("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
