"""QK-norm on a CPU: F.rms_norm against a hand-written RMS norm (one vector_norm pass forward, the
derivative written out backward), forward + backward on the CPU config's (B, T, 2, nh, hs) slice of qkv. Prints the
largest differences and a table of medians of per-round times, the two taking turns in each round.
Not used by the model: F.rms_norm stays (docs/results/dense_cpu.md: the whole step measured no faster with it).

    python3 scripts/bench_rms_norm_cpu.py [--threads=2] [--rounds=10]
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F


class HandRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eps):
        xf = x.float()
        r = torch.rsqrt(torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps))
        y = xf * r
        ctx.save_for_backward(y, r)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        y, r = ctx.saved_tensors
        gf = g.float()
        return (gf - y * (gf * y).mean(-1, keepdim=True)).mul_(r).to(g.dtype), None


def hand(x):
    return HandRMSNorm.apply(x, torch.finfo(x.dtype).eps)


def torch_rms(x):
    return F.rms_norm(x, (x.shape[-1],))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(16, 256, 3, 4, 64, requires_grad=True)  # c_attn's output as qkv() views it
    g = torch.randn(16, 256, 2, 4, 64)
    a, b = torch_rms(x[:, :, :2]), hand(x[:, :, :2])
    ga, = torch.autograd.grad(a, x, g)
    gb, = torch.autograd.grad(b, x, g)
    print(f"largest difference: forward {(a - b).abs().max().item():.2e}, gradient {(ga - gb).abs().max().item():.2e}")

    def timed(f):
        t0 = time.perf_counter()
        for _ in range(5):
            f(x[:, :, :2]).backward(g)
        return (time.perf_counter() - t0) / 5 * 1e3

    timed(torch_rms), timed(hand)  # warm-up
    rows = [(timed(torch_rms), timed(hand)) for _ in range(args.rounds)]
    print("\n| norm | ms (fwd+bwd) | vs F.rms_norm |\n|---|---:|---:|")
    print(f"| F.rms_norm | {statistics.median(r[0] for r in rows):.2f} | 1.00x |")
    print(f"| hand-written | {statistics.median(r[1] for r in rows):.2f} | "
          f"{statistics.median(r[1] / r[0] for r in rows):.2f}x |")


if __name__ == "__main__":
    main()
