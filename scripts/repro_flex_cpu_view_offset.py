"""Minimal reproduction (no project code): on a CPU, inductor's C++ FlexAttention template reads an input that is
a view at a storage offset from offset 0, when that input's buffer is not shared with another input.

    python scripts/repro_flex_cpu_view_offset.py          # CPU
    python scripts/repro_flex_cpu_view_offset.py cuda     # the same on a GPU (expected exact: another lowering)

One qkv projection, split into q, k, v views (offsets 0, C, 2C), then FlexAttention with a block-sparse BlockMask,
the whole function compiled (as torch.compile(model) does). Variants:
    views        q, k, v all views of the projection                    -> exact
    q,k scaled   q*1.5, k*0.7 (as rotary or RMS-norm make q, k computed) -> wrong: v is read at offset 0 (the raw q)
    + v copied   the same with v.contiguous()                            -> exact
flex compiled alone on the same q, k, v values is exact in every variant.

Why (torch 2.13, torch/_inductor/kernel/flex/flex_cpu.py, lower_cpu): the C++ template names its pointer arguments
by storage buffer, and only inputs that SHARE a buffer are copied into their own (_realize_duplicate_buffer_inputs).
With all three views of one buffer all three are copied (exact); once q and k are computed buffers, v is the only
view of the projection, is not copied, and the template passes the projection's base pointer without v's offset.
On CUDA flex lowers through the Triton template (kernel/flex/flex_attention.py), not lower_cpu: this path is not
taken there, and test_cuda_compiled_whole_model_flex_matches_reference_forward_backward checks the result.
asca_kernels.attend_flex therefore passes contiguous q, k, v on a CPU.

Measured 2026-12-01, torch 2.13.0+cpu, this repository's 2-core CPU machine (max abs error against a masked
softmax reference; 'alone' = flex compiled on its own with the same inputs):
    views          in-graph 3.6e-07   alone 3.6e-07
    q,k scaled     in-graph 3.39      alone 3.6e-07   (equal to the reference with v := raw q: 3.6e-07)
    + v copied     in-graph 3.6e-07   alone 3.6e-07
"""
import sys

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

dev = sys.argv[1] if len(sys.argv) > 1 else "cpu"
torch.manual_seed(0)
B, H, T, D, S = 1, 2, 128, 16, 16
nb = T // S
x = torch.randn(B, T, H * D).to(dev)
W = (torch.randn(H * D, 3 * H * D) / (H * D) ** 0.5).to(dev)
# every tile: its own block (partial, causal) and its b // 2 nearest past blocks (full)
idx = torch.stack([torch.cat([torch.tensor([b]), torch.arange(b - 1, -1, -1), torch.arange(b + 1, nb)])
                   for b in range(nb)]).to(torch.int32)[None, None].expand(B, H, nb, nb).contiguous().to(dev)
n_full = (torch.arange(nb) // 2).to(torch.int32)[None, None].expand(B, H, nb).contiguous().to(dev)


def block_mask():
    return BlockMask.from_kv_blocks(torch.ones(B, H, nb, dtype=torch.int32, device=dev), idx, n_full,
                                    torch.roll(idx, -1, -1).contiguous(), BLOCK_SIZE=S,
                                    mask_mod=lambda b, h, qi, ki: qi >= ki, seq_lengths=(T, T))


def qkv(x):
    q, k, v = (x @ W).split(H * D, dim=2)
    return [t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v)]  # (B, H, T, D) views at offsets 0, C, 2C


def reference(q, k, v):
    keep = torch.zeros(nb, nb, dtype=torch.bool)
    for b in range(nb):
        keep[b, [b, *idx[0, 0, b, 1:1 + int(n_full[0, 0, b])].tolist()]] = True
    m = (keep.repeat_interleave(S, 0).repeat_interleave(S, 1) & torch.ones(T, T, dtype=torch.bool).tril()).to(dev)
    return torch.softmax((q @ k.transpose(-1, -2) / D ** 0.5).masked_fill(~m, float("-inf")), -1) @ v


VARIANTS = {
    "views": lambda q, k, v: (q, k, v),
    "q,k scaled": lambda q, k, v: (q * 1.5, k * 0.7, v),
    "+ v copied": lambda q, k, v: (q * 1.5, k * 0.7, v.contiguous()),
}
print(torch.__version__, dev)
with torch.no_grad():
    for name, fn in VARIANTS.items():
        q, k, v = fn(*qkv(x))
        ref = reference(q, k, v)
        torch._dynamo.reset()
        in_graph = torch.compile(lambda x: flex_attention(*fn(*qkv(x)), block_mask=block_mask()), fullgraph=True)(x)
        torch._dynamo.reset()
        alone = torch.compile(lambda a, b, c: flex_attention(a, b, c, block_mask=block_mask()), fullgraph=True)(
            q.clone(), k.clone(), v.clone())
        off = lambda a, b: (a - b).abs().max().item()
        line = f"{name:12s}  in-graph {off(in_graph, ref):.2g}   alone {off(alone, ref):.2g}"
        if name == "q,k scaled":
            raw_q = qkv(x)[0]
            line += f"   (in-graph vs the reference with v := raw q: {off(in_graph, reference(q, k, raw_q)):.2g})"
        print(line, flush=True)
