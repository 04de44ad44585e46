"""
ASCA's stateless kernels that skip work on any device. Each computes the function the reference path
defines (novel_model.AdaptiveSparseCausalSelfAttention.attend_reference: dense attention under the expanded
block mask, + the gate bias on kept past blocks) but reads only the kept blocks.

attend_gather: for every query tile, gather its kept past blocks' keys and values (per sequence and head),
append its own block under a causal mask, and run one scaled_dot_product_attention per group of tiles over
(own + kept) keys only, padded to the group's largest count with -inf. It trains (autograd through the
gather, the gate bias included), runs on any device and never builds a T x T tensor: its largest tensor is
(B, nh, tiles, S, (K + 1) * S) for a group whose tiles keep at most K past blocks.
"""
import torch
import torch.nn.functional as F

GATHER_GROUPS = 4  # tile groups, each padded to its own largest count: with a fixed budget tile b keeps about
#                    (1 - sparsity) * b blocks, so one group would pad the early tiles to the last one's count


class _BlockAttention(torch.autograd.Function):
    """softmax(q k^T * scale + mask) v over (..., S, L) logits, with the mask's gradient reduced to one value
    per key slot of S keys (the gate bias is constant over a tile's queries and a block's keys). Written out
    (not SDPA's math path, which a grad-requiring mask forces on a CPU) so the logits are computed once,
    with the mask fused into the matmul (baddbmm), and softmax's output is the only saved (n, S, L) tensor."""

    @staticmethod
    def forward(ctx, q, k, v, slot_bias, own, scale, S):
        # q (N, S, hs), k, v (N, L, hs), slot_bias (N, L // S) with -inf on padding, own (S, L) causal part
        mask = slot_bias.repeat_interleave(S, dim=-1)[:, None, :] + own  # (N, S, L)
        p = torch.baddbmm(mask, q, k.transpose(1, 2), alpha=scale)
        p = torch.softmax(p, dim=-1)
        out = torch.bmm(p, v)
        ctx.save_for_backward(q, k, v, p, out)
        ctx.scale, ctx.S = scale, S
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, p, out = ctx.saved_tensors
        scale, S = ctx.scale, ctx.S
        dv = torch.bmm(p.transpose(1, 2), dout)
        dp = torch.bmm(dout, v.transpose(1, 2))
        ds = p * (dp - (dout * out).sum(-1, keepdim=True))  # softmax backward, (N, S, L)
        dq = torch.bmm(ds, k) * scale
        dk = torch.bmm(ds.transpose(1, 2), q) * scale
        dslot = ds.sum(1).view(ds.shape[0], -1, S).sum(-1)  # (N, L // S)
        return dq, dk, dv, dslot, None, None, None


def tile_groups(nb, groups=GATHER_GROUPS):
    """Contiguous tile ranges [(start, end)], about equal in causal work (tile b has b past blocks)."""
    groups = max(1, min(groups, nb))
    bounds = [0]
    for g in range(1, groups):  # equal area under b: the g-th boundary at nb * sqrt(g / groups)
        bounds.append(max(bounds[-1] + 1, min(nb - (groups - g), round(nb * (g / groups) ** 0.5))))
    bounds.append(nb)
    return list(zip(bounds[:-1], bounds[1:]))


def attend_gather(q, k, v, order, n_past, gate_bias, S, dropout_p=0.0, groups=GATHER_GROUPS):
    """ASCA attention over the kept blocks only.

    q, k, v: (B, nh, T, hs), T = nb * S (padded to whole blocks). order: (B, nh, nb, nb) int64, per tile its
    own block first, then the sink, then past blocks by score (Selection.order). n_past: (nb,) or
    (B, nh, nb) past blocks each tile keeps. gate_bias: (B, nh, nb, nb), logsigmoid(score) on kept past
    blocks. Returns (B, nh, T, hs).
    """
    B, H, T, hs = q.shape
    nb = T // S
    dt = q.dtype
    n_past = n_past.expand(B, H, nb) if n_past.dim() == 1 else n_past  # (B, nh, nb)
    qb, kb, vb = (t.view(B, H, nb, S, hs) for t in (q, k, v))
    outs = []
    for t0, t1 in tile_groups(nb, groups):
        n = t1 - t0
        K = int(n_past[..., t0:t1].max())  # the group's largest count of kept past blocks (a host sync)
        # slot 0: the tile's own block (order puts it first), slots 1..K: its kept past blocks, best first,
        # padded to K with -inf; one gather brings their keys and values next to the tile's queries
        idx = order[:, :, t0:t1, :K + 1]  # (B, nh, n, K + 1)
        flat = idx.reshape(B, H, n * (K + 1), 1, 1).expand(B, H, n * (K + 1), S, hs)
        keys = torch.gather(kb, 2, flat).view(B, H, n, (K + 1) * S, hs)
        vals = torch.gather(vb, 2, flat).view(B, H, n, (K + 1) * S, hs)
        valid = torch.arange(K + 1, device=q.device) <= n_past[..., t0:t1, None]  # (B, nh, n, K + 1)
        slot_bias = torch.gather(gate_bias[:, :, t0:t1], 3, idx).to(dt)  # 0 on the own block by construction
        slot_bias = slot_bias.masked_fill(~valid, float("-inf"))  # (B, nh, n, K + 1)
        own = torch.zeros(S, (K + 1) * S, dtype=dt, device=q.device)  # the own block (slot 0) causal
        own[:, :S].masked_fill_(~torch.ones(S, S, dtype=torch.bool, device=q.device).tril(), float("-inf"))
        if dropout_p > 0:  # SDPA's math path draws the dropout
            mask = slot_bias.repeat_interleave(S, dim=-1)[:, :, :, None, :] + own  # (B, nh, n, S, (K + 1) * S)
            outs.append(F.scaled_dot_product_attention(qb[:, :, t0:t1], keys, vals, attn_mask=mask, dropout_p=dropout_p))
            continue
        M = B * H * n
        y = _BlockAttention.apply(qb[:, :, t0:t1].reshape(M, S, hs), keys.reshape(M, (K + 1) * S, hs),
                                  vals.reshape(M, (K + 1) * S, hs), slot_bias.reshape(M, K + 1), own, hs ** -0.5, S)
        outs.append(y.view(B, H, n, S, hs))
    return torch.cat(outs, dim=2).reshape(B, H, T, hs)
