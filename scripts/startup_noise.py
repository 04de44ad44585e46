"""
The start-up check's bf16 noise floor, and what real faults give, on a CPU under CUDA's autocast policy.

For each seed: a freshly initialised ASCA model, one random batch, and asca.startup_check comparing the
gather path (bf16, CUDA's float32 ops emulated: runtime.cuda_autocast_on_cpu) with the reference path replaying
its block choice. Then the same with two injected faults on the gather path: a wrong block (the last tile
reads its best skipped block instead of its best kept one) and a dropped gate bias. Prints one row per seed and
case, then the largest value of each measure per case: the tolerances in asca.STARTUP_TOL must lie
above the 'correct' row and below both fault rows.

    python3 scripts/startup_noise.py                        # the GPU config's shape: 12 x 512, T=1024, S=128, 0.5
    python3 scripts/startup_noise.py --n_layer 2 --n_embd 64 --n_head 2 --block_size 256 --S 16 --seeds 20
"""
import argparse
import dataclasses
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gpt import GPT  # noqa: E402
from asca import ASCAConfig, AdaptiveSparseCausalSelfAttention, startup_check  # noqa: E402
from runtime import cuda_autocast_on_cpu  # noqa: E402


class WrongBlock(AdaptiveSparseCausalSelfAttention):
    """The fault of a kernel that reads the wrong block: on the gather path the last tile swaps its best kept past
    block for its best skipped one (the selection it reports stays right)."""

    def kernel(self, impl, q, k, v, sel, dropout):
        if impl == "gather":
            b = sel.order.shape[-1] - 1
            n = int(sel.n_past[..., b].min())
            if 1 <= n < b:
                order = sel.order.clone()
                order[..., b, [1, n + 1]] = sel.order[..., b, [n + 1, 1]]
                sel = dataclasses.replace(sel, order=order)
        return super().kernel(impl, q, k, v, sel, dropout)


class DroppedGateBias(AdaptiveSparseCausalSelfAttention):
    """The fault of a kernel that drops the gate bias on the gather path (the predictor then learns nothing)."""

    def kernel(self, impl, q, k, v, sel, dropout):
        if impl == "gather":
            sel = dataclasses.replace(sel, gate_bias=torch.zeros_like(sel.gate_bias))
        return super().kernel(impl, q, k, v, sel, dropout)


FAULTS = {"correct": AdaptiveSparseCausalSelfAttention, "wrong block": WrongBlock, "dropped gate bias": DroppedGateBias}
MEASURES = ("logits", "grad", "grad_l2")


def check_once(attn_cls, seed, shape, batch=1, rms_norm_fp32=True):
    """startup_check's dict for one freshly initialised model (gather path, bf16 under CUDA's policy) and batch."""
    torch.manual_seed(seed)
    model = GPT(ASCAConfig(**shape, attn_impl="gather", sparsity_warmup_iters=1000), attn_cls=attn_cls)
    g = torch.Generator().manual_seed(seed)
    T = shape["block_size"]
    x, y = (torch.randint(0, 256, (batch, T), generator=g) for _ in range(2))
    return startup_check(model, model, x, y, cuda_autocast_on_cpu(rms_norm_fp32=rms_norm_fp32), low_precision=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--n_embd", type=int, default=512)
    p.add_argument("--n_head", type=int, default=8)
    p.add_argument("--block_size", type=int, default=1024)
    p.add_argument("--S", type=int, default=128)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--rms_norm_fp32", type=int, default=1, help="1: torch 2.13's CUDA policy, 0: torch 2.11's")
    a = p.parse_args()
    shape = dict(n_layer=a.n_layer, n_embd=a.n_embd, n_head=a.n_head, block_size=a.block_size,
                 sparse_block_size=a.S, target_sparsity=a.sparsity)
    print(f"# startup_check noise floor: {shape}, batch {a.batch}, {a.seeds} seeds, torch {torch.__version__}, "
          f"CUDA policy emulated ({'rms_norm fp32' if a.rms_norm_fp32 else 'rms_norm bf16'}), "
          f"{time.strftime('%Y-%m-%d')}")
    worst = {case: dict.fromkeys(MEASURES, 0.0) for case in FAULTS}
    least = {case: dict.fromkeys(MEASURES, float("inf")) for case in FAULTS}
    print("| case | seed | logits | grad (per element) | worst | grad_l2 | over |")
    print("|---|---|---|---|---|---|---|")
    for seed in range(a.seeds):
        for case, cls in FAULTS.items():
            r = check_once(cls, seed, shape, a.batch, bool(a.rms_norm_fp32))
            for m in MEASURES:
                worst[case][m] = max(worst[case][m], r[m])
                least[case][m] = min(least[case][m], r[m])
            print(f"| {case} | {seed} | {r['logits']:.4f} | {r['grad']:.4f} | {r['worst']} | {r['grad_l2']:.4f} | "
                  f"{r['worst_l2']} |", flush=True)
    print("\n| case | over seeds | " + " | ".join(MEASURES) + " |")
    print("|---|---|" + "---|" * len(MEASURES))
    for case in FAULTS:
        stat, table = ("largest", worst) if case == "correct" else ("smallest", least)
        print(f"| {case} | {stat} | " + " | ".join(f"{table[case][m]:.4f}" for m in MEASURES) + " |")


if __name__ == "__main__":
    main()
