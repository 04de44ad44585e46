"""Minimal reproduction (torch 2.13 CPU, inductor): FlexAttention gives wrong output when its mask_mod reads
a boolean tensor computed inside the same compiled graph.

    python scripts/repro_flex_cpu_captured_mask.py sel      # mask_mod reads `sel`: compiled output is wrong
    python scripts/repro_flex_cpu_captured_mask.py causal   # causal-only mask_mod, selection in the block lists: exact

Measured 2026-11-28, torch 2.13.0+cpu, this repository's 2-core CPU machine:
    sel     eager err 0.0     compiled err 2.25
    causal  eager err 1.73    compiled err 2.4e-07   (eager flex ignores the block lists: dense, as documented)
The same selection passed in as a graph input (flex compiled alone) is exact. asca_kernels.attend_flex
therefore passes the causal-only mask_mod when it is traced into a compiled model.
"""
import torch
import sys
from torch.nn.attention.flex_attention import flex_attention, BlockMask
torch.manual_seed(0)
B, H, T, D, S = 1, 1, 128, 16, 16
nb = T // S
q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
r = torch.randn(B, H, nb, nb)
mode = sys.argv[1]
def plan(r):
    past = torch.ones(nb, nb, dtype=torch.bool).tril(-1)
    prio = r.masked_fill(~past, float("-inf")).masked_fill(torch.eye(nb, dtype=torch.bool), float("inf"))
    order = torch.argsort(prio, dim=-1, descending=True, stable=True)
    n_past = torch.arange(nb) // 2
    rank_kept = torch.arange(nb) < (n_past + 1)[:, None]
    sel = torch.zeros(order.shape, dtype=torch.bool).scatter(-1, order, rank_kept.expand(order.shape))
    return order, n_past, sel
def f(q, k, v, r):
    order, n_past, sel = plan(r)
    def mask_mod(b, h, qi, ki):
        if mode == "causal":
            return qi >= ki
        return (qi >= ki) & sel[b, h, qi // S, ki // S]
    idx = order.to(torch.int32)
    bm = BlockMask.from_kv_blocks(torch.ones(B, H, nb, dtype=torch.int32), idx.contiguous(),
                                  n_past.to(torch.int32).expand(B, H, nb).contiguous(),
                                  torch.roll(idx, -1, -1).contiguous(), BLOCK_SIZE=S, mask_mod=mask_mod,
                                  seq_lengths=(T, T))
    return flex_attention(q, k, v, block_mask=bm)
sel = plan(r)[2]
m = sel.repeat_interleave(S, -2).repeat_interleave(S, -1) & torch.ones(T, T, dtype=torch.bool).tril()
ref = torch.softmax((q @ k.transpose(-1, -2) / D ** 0.5).masked_fill(~m, float("-inf")), -1) @ v
print(torch.__version__, mode, "eager err", (f(q, k, v, r) - ref).abs().max().item(),
      "compiled err", (torch.compile(f, fullgraph=True)(q, k, v, r) - ref).abs().max().item())
