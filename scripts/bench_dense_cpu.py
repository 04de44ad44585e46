"""The dense training step by part: tokens/s of the project's dense model, of nanoGPT's 2019
architecture at the same size (config/nanogpt_2019.py's keys: learned positions, GELU, tied embeddings, AdamW),
and of the default with one part at a time put back to nanoGPT's, all timed in the same run (table printed last).

    python scripts/bench_dense_cpu.py                    # the CPU config: 4 layers, n_embd 256, B=16, T=256
    python scripts/bench_dense_cpu.py --rounds 3 --steps 2   # quick look

A step is what trainer.py does per iteration: a batch from the data loader, forward, backward, gradient
clipping, the optimizer step. The variants take turns (--rounds rounds of --steps steps each, after a warm-up
round); a variant's tokens/s is the median over rounds of its rounds' median step, and each ratio is the median
of the per-round ratios to nanoGPT's row, paired by round, so the machine's drift cancels. The difference of a
one-part row from the default row is that part's cost. Run it alone: a second process on a 2-core machine
moves every number.
"""
import argparse
import functools
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gpt  # noqa: E402
import runtime  # noqa: E402
import train_config  # noqa: E402
from prepare_dataset import ByteDataset, DataError  # noqa: E402

NANOGPT = dict(pos_encoding="learned", qk_norm=False, mlp_act="gelu", tie_embeddings=True, optimizer="adamw")
VARIANTS = [  # (row, changes to the default model and optimizer)
    ("nanoGPT 2019 architecture, AdamW", NANOGPT),
    ("default (rotary, QK-norm, relu2, untied, Muon)", {}),
    ("default, Muon's Newton-Schulz in float32", dict(muon_ns_dtype="float32")),
    ("default, Muon's Newton-Schulz in bfloat16 (torch's Muon)", dict(muon_ns_dtype="bfloat16")),
    ("default with autograd's relu2 and rotary backward", dict(relu2="autograd", rotary="autograd")),
    ("default, AdamW instead of Muon", dict(optimizer="adamw")),
    ("default, GELU instead of relu2", dict(mlp_act="gelu")),
    ("default, relu2 as autograd's relu().square()", dict(relu2="autograd")),
    ("default, learned positions instead of rotary", dict(pos_encoding="learned")),
    ("default, rotary with autograd's backward", dict(rotary="autograd")),
    ("default, no QK-norm", dict(qk_norm=False)),
    ("default, tied embeddings", dict(tie_embeddings=True)),
]


def autograd_relu2(h):  # the composition gpt.ReluSquared replaced: six passes over the activation, not four
    return F.relu(h).square()


def autograd_rotary(rot, x, offset=0):  # Rotary.forward before gpt._Rotate: autograd differentiates rotate()
    T = x.shape[2]
    return gpt.rotate(x, rot.cos[offset:offset + T].to(x.dtype), rot.sin[offset:offset + T].to(x.dtype))


def build(changes, args):
    changes = dict(changes)
    optimizer = changes.pop("optimizer", "muon")
    ns_dtype = runtime.resolve_muon_ns_dtype(changes.pop("muon_ns_dtype", "auto"), cuda=False)[0]
    relu2 = changes.pop("relu2", None)
    rotary = changes.pop("rotary", None)
    torch.manual_seed(0)
    model = gpt.make_model(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                           block_size=args.block_size, **changes)
    if relu2 == "autograd":
        for block in model.transformer.h:
            block.mlp.act = autograd_relu2
    if rotary == "autograd":
        for block in model.transformer.h:
            block.attn.rotary.forward = functools.partial(autograd_rotary, block.attn.rotary)
    d = train_config.TRAIN_DEFAULTS  # the trainer's optimizer settings (their values do not change the time)
    opt = model.configure_optimizer(d["weight_decay"], d["learning_rate"], (d["beta1"], d["beta2"]), "cpu",
                                    optimizer, d["muon_lr"], d["muon_momentum"], ns_dtype)
    return model, opt


def matmul_gflops(dtype, m=256, k=1024, n=1024, reps=3):
    """This machine's matmul rate in dtype: best of reps of (m x k) @ (k x n), as Muon's Newton-Schulz multiplies."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    best = float("inf")
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best / 1e9


def optimizer_step_ms(args, reps=3):
    """{row: ms} of the optimizer step alone on the default model's gradients: Muon's iteration in each dtype,
    and AdamW for all."""
    out = {}
    for name, changes in (("Muon, Newton-Schulz in float32", dict(muon_ns_dtype="float32")),
                          ("Muon, Newton-Schulz in bfloat16 (torch's)", dict(muon_ns_dtype="bfloat16")),
                          ("AdamW", dict(optimizer="adamw"))):
        model, opt = build(changes, args)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        ts = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            opt.step()
            ts.append(time.perf_counter() - t0)
        out[name] = 1e3 * min(ts[1:])
    return out


def step(model, opt, ds, gen, args):
    x, y = ds.get_batch("train", args.batch_size, args.block_size, gen)
    _, loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="data/excerpt")
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.rounds < 1 or args.steps < 1:
        sys.exit("bench_dense_cpu: --rounds and --steps must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(runtime.keep_freed_memory() or "malloc: left as it is", flush=True)  # as a CPU training run sets it
    try:
        ds = ByteDataset(args.data_dir)
        ds.check_block_size(args.block_size)
    except DataError as e:
        sys.exit(f"bench_dense_cpu: {e}")
    rates = {dt: matmul_gflops(getattr(torch, dt)) for dt in ("float32", "bfloat16")}
    opt_ms = optimizer_step_ms(args)
    built = [(name, *build(changes, args)) for name, changes in VARIANTS]
    gen = torch.Generator().manual_seed(0)
    times = {name: [] for name, *_ in built}
    for r in range(args.rounds + 1):  # round 0 warms up (first-call allocations, optimizer state)
        for name, model, opt in built:
            ts = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                step(model, opt, ds, gen, args)
                ts.append(time.perf_counter() - t0)
            if r:
                times[name].append(statistics.median(ts))
    t_load = []
    for _ in range(20):
        t0 = time.perf_counter()
        ds.get_batch("train", args.batch_size, args.block_size, gen)
        t_load.append(time.perf_counter() - t0)

    tokens = args.batch_size * args.block_size
    ref = times[VARIANTS[0][0]]
    default = times[VARIANTS[1][0]]
    native, why = runtime.cpu_native_bf16()
    print(f"# dense CPU step, {time.strftime('%Y-%m-%d')}: torch {torch.__version__}, {runtime.cpu_model()}, "
          f"{platform.machine()}, {torch.get_num_threads()} threads; {args.n_layer} layers, n_embd {args.n_embd}, "
          f"B={args.batch_size}, T={args.block_size}; median of {args.rounds} rounds x {args.steps} steps")
    print(f"bf16: {'native' if native else 'not native'} ({why}); matmul (256 x 1024) @ (1024 x 1024): float32 "
          f"{rates['float32']:.1f} GFLOP/s, bfloat16 {rates['bfloat16']:.1f} GFLOP/s; muon_ns_dtype=auto -> "
          f"{runtime.resolve_muon_ns_dtype('auto', cuda=False)[0]}")
    print("optimizer step alone (default model, best of 3): "
          + ", ".join(f"{name} {ms:.0f} ms" for name, ms in opt_ms.items()))
    print(f"data loader: {1e3 * statistics.median(t_load):.2f} ms per batch (inside every step below)\n")
    print("| variant | ms/step | tokens/s | vs nanoGPT 2019 | vs default |")
    print("|---|---:|---:|---:|---:|")
    for name, *_ in built:
        t = times[name]
        vs_ref = statistics.median(a / b for a, b in zip(ref, t))  # tokens/s ratio = inverse time ratio
        vs_def = statistics.median(a / b for a, b in zip(default, t))
        print(f"| {name} | {1e3 * statistics.median(t):.0f} | {tokens / statistics.median(t):,.0f} | "
              f"{vs_ref:.2f}x | {vs_def:.2f}x |")


if __name__ == "__main__":
    main()
