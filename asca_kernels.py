"""
ASCA's stateless kernels: given q, k, v and one layer's block choice (a Selection, asca_selector.py), each
computes one function, attend_reference's: softmax attention over the kept blocks (the own block under a
causal mask), with the gate bias added to the logits of kept past blocks. They differ in what they read.

attend_reference: dense attention under the expanded (T x T) block mask, any device: the definition.
attend_flex: FlexAttention (CUDA) with a BlockMask built from the selected block indices, so skipped blocks
are never loaded; plus the torch-version workarounds it needs (flex_kernel_options, flex_backward_problem),
the part most likely to change with a new torch.

attend_gather: for every query tile, gather its kept past blocks' keys and values (per sequence and head),
append its own block under a causal mask, and run one scaled_dot_product_attention per group of tiles over
(own + kept) keys only, padded to the group's largest count with -inf. It trains (autograd through the
gather, the gate bias included), runs on any device and never builds a T x T tensor: its largest tensor is
(B, nh, tiles, S, (K + 1) * S) for a group whose tiles keep at most K past blocks.
"""
import math

import torch
import torch.nn.functional as F

# Tiles go to the kernel in groups of contiguous tiles, each padded to its largest count of kept blocks: with a
# fixed budget tile b keeps about (1 - sparsity) * b, so one group would pad the early tiles to the last one's count,
# and one group per tile would pay a call's fixed cost (about 30 ops forward and backward) nb times. count_groups
# joins the next tile to the current group while the padding that adds costs less than a call: GATHER_CALL_FLOPS,
# about 0.5 ms of fp32 matmul on the 2-core CPU the gather path was tuned on (docs/results/gather_cpu.md; 20e6 and
# 80e6 measured level, 0 and 320e6 slower).
GATHER_CALL_FLOPS = 64e6


class _BlockAttention(torch.autograd.Function):
    """softmax(q k^T * scale + mask) v over (..., S, L) logits, with the mask's gradient reduced to one value
    per key slot of S keys (the gate bias is constant over a tile's queries and a block's keys). Written out
    (not SDPA's math path, which a grad-requiring mask forces on a CPU) so the logits are computed once,
    with the mask fused into the matmul (baddbmm), and softmax's output is the only saved (n, S, L) tensor.

    Its dtypes are its own, not an autocast policy's: CUDA's autocast runs softmax in float32 and the
    CPU's in bf16, so a backward that mixed the saved probabilities with the incoming gradient crashed on the first
    CUDA step only. The matmuls run in the logits' dtype (cdt: bf16 under either autocast, else the inputs'), the
    softmax and its backward's elementwise part in at least float32, and each gradient returns in its input's dtype."""

    @staticmethod
    def forward(ctx, q, k, v, slot_bias, own, scale, S):
        # q (N, S, hs), k, v (N, L, hs), slot_bias (N, L // S) with -inf on padding, own (S, S) causal part of
        # slot 0 (0 or -inf). The bias goes in as baddbmm's broadcast input (N, 1, L), not as an (N, S, L) mask
        # tensor, and own is added to slot 0's columns only: one (N, S, L) write and read fewer. The same values
        # bit for bit (tested): an allowed logit is bias + scale * qk either way (own adds an exact 0 there)
        logits = torch.baddbmm(slot_bias.repeat_interleave(S, dim=-1)[:, None, :], q, k.transpose(1, 2), alpha=scale)
        logits[:, :, :S] += own
        cdt = logits.dtype
        p = torch.softmax(logits, dim=-1, dtype=torch.promote_types(cdt, torch.float32)).to(cdt)
        out = torch.bmm(p, v.to(cdt))
        ctx.save_for_backward(q, k, v, p, out)
        ctx.scale, ctx.S, ctx.bias_dtype = scale, S, slot_bias.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, p, out = ctx.saved_tensors
        scale, S = ctx.scale, ctx.S
        cdt = p.dtype  # the forward's matmul dtype
        acc = torch.promote_types(cdt, torch.float32)
        qc, kc, vc, dout = (t.to(cdt) for t in (q, k, v, dout))
        dv = torch.bmm(p.transpose(1, 2), dout)
        dp = torch.bmm(dout, vc.transpose(1, 2))
        delta = (dout.to(acc) * out.to(acc)).sum(-1, keepdim=True)
        # softmax backward p * (dp - delta), (N, S, L), in place on dp (this call's own product, or its float32
        # copy): two fresh (N, S, L) tensors fewer per call, 0.82x the attention's forward + backward at T=4096 and
        # 0.875 on the CPU (docs/results/gather_cpu.md); the same values bit for bit
        ds = dp.to(acc).sub_(delta).mul_(p)
        dslot = ds.sum(1).view(ds.shape[0], -1, S).sum(-1)  # (N, L // S)
        ds = ds.to(cdt)
        dq = torch.bmm(ds, kc).mul_(scale)
        dk = torch.bmm(ds.transpose(1, 2), qc).mul_(scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dslot.to(ctx.bias_dtype), None, None, None


def count_groups(counts, S, hs, heads, call_flops=None):
    """Contiguous tile groups [(start, end, K)] for counts[b], the most past blocks tile b keeps in any sequence and
    head, K each group's largest. One pass: tile b joins the current group if the padding it adds (its own, or the
    group's tiles padded up to its count) costs at most call_flops, at 6 matmuls of S x S x hs per tile and slot
    in each of `heads` (batch x heads) slices, forward and backward. call_flops: GATHER_CALL_FLOPS unless given."""
    call_flops = GATHER_CALL_FLOPS if call_flops is None else call_flops
    slot = 12 * hs * S * S * heads
    groups = []
    for b, c in enumerate(counts):
        if groups:
            t0, _, K = groups[-1]
            added = (b - t0) * (c - K) if c > K else K - c
            if added * slot <= call_flops:
                groups[-1] = (t0, b + 1, max(K, c))
                continue
        groups.append((b, b + 1, c))
    return groups


def tile_groups(nb, groups):
    """`groups` contiguous tile ranges [(start, end)], about equal in causal work (tile b has b past blocks): a
    fixed grouping (attend_gather's groups=N; tests check that the grouping does not change the result)."""
    groups = max(1, min(groups, nb))
    bounds = [0]
    for g in range(1, groups):  # equal area under b: the g-th boundary at nb * sqrt(g / groups)
        bounds.append(max(bounds[-1] + 1, min(nb - (groups - g), round(nb * (g / groups) ** 0.5))))
    bounds.append(nb)
    return list(zip(bounds[:-1], bounds[1:]))


GATHER_KERNELS = ("auto", "sdpa", "block")
GATHER_KERNEL = "auto"  # attend_gather's kernel when none is named (tests and the benchmark set it)
# 'auto' on a CPU: the written-out 'block' kernel, faster than 'sdpa' at every shape the benchmark measured
# (docs/results/raw/bench_gather_cpu_2026-12-04.md) but one: T=8192, S=128, sparsity 0.5, where sdpa's step took 0.64x
# block's (forward 0.75x). There a tile group's score tile, S x (K + 1) * S fp32 values, reaches 1.4-2.1 MB; at every
# shape block won it is at most 1 MB (T=8192, S=128, 0.75: 0.94 MB), this CPU's L2 per core. Block materialises
# that tile (scores, then probabilities, forward and backward); the flash kernel streams it. So a group whose tile
# exceeds GATHER_SDPA_MIN_SCORES values takes sdpa. Elsewhere (CUDA): block.
GATHER_SDPA_MIN_SCORES = 1 << 18  # 1 MiB of fp32
NEG_BIAS = -1e4  # a padding slot's bias on the SDPA kernel: exp() gives 0, and no infinity meets a 0 in the backward


def choose_gather_kernel(kernel, device_type, S, K):
    """The kernel for a tile group of K kept past blocks of S (the tile's own block besides): 'sdpa' or 'block'."""
    if kernel != "auto":
        return kernel
    return "sdpa" if device_type == "cpu" and S * (K + 1) * S > GATHER_SDPA_MIN_SCORES else "block"


def sdpa_block_attention(q, k, v, slot_bias, S, scale):
    """_BlockAttention's function on PyTorch's fused flash kernel: softmax(q k^T * scale + bias) v with
    the tile's own block (slot 0, keys 0..S-1) causal, q (N, S, hs), k, v (N, L, hs), slot_bias (N, L // S) finite
    (NEG_BIAS on padding). The flash kernel takes no mask gradient, so the bias rides in the dot product: each query
    gets a last coordinate 1 and each key its slot's bias / scale, and q.k then carries the bias and its gradient.
    Inputs are 4-D (N, 1, ., hs + 1): the CPU flash kernel is only taken for 4-D q, k, v (sdp_utils.h,
    check_tensor_shapes); 3-D ones silently get the unfused math path."""
    N, L, hs = k.shape
    qa = torch.cat([q, q.new_ones(N, S, 1)], dim=-1)
    kb = (slot_bias / scale).to(k.dtype).repeat_interleave(S, dim=-1)[..., None]  # (N, L, 1)
    ka = torch.cat([k, kb], dim=-1)
    va = F.pad(v, (0, 1))  # the flash kernel wants one head dim for q, k and v
    allowed = torch.ones(S, L, dtype=torch.bool, device=q.device)
    allowed[:, :S] = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    y = F.scaled_dot_product_attention(qa[:, None], ka[:, None], va[:, None], attn_mask=allowed, scale=scale)
    return y[:, 0, :, :hs]


class _GatherRows(torch.autograd.Function):
    """src.index_select(0, i) for each index i in one call, and one gradient buffer for all of them: each group's
    own index_select would add its rows back into a fresh zero-filled copy of src, summed across groups (a fill,
    a scatter and an add of the whole K or V per group), and one index_select of all groups' rows at once would
    allocate, and its backward concatenate, one tensor as large as every group's together (tens of MB at T=4096,
    freshly faulted in each step on this CPU)."""

    @staticmethod
    def forward(ctx, src, *idxs):
        ctx.save_for_backward(*idxs)
        ctx.shape = src.shape
        return tuple(src.index_select(0, i) for i in idxs)

    @staticmethod
    def backward(ctx, *grads):
        g = grads[0].new_zeros(ctx.shape)
        for i, gr in zip(ctx.saved_tensors, grads):
            if gr is not None:
                g.index_add_(0, i, gr)
        return (g,) + (None,) * len(grads)


def attend_gather(q, k, v, order, n_past, gate_bias, S, dropout_p=0.0, groups=None, kernel=None):
    """ASCA attention over the kept blocks only.

    q, k, v: (B, nh, T, hs), T = nb * S (padded to whole blocks). order: (B, nh, nb, nb) int64, per tile its
    own block first, then the sink, then past blocks by score (Selection.order). n_past: (nb,) or
    (B, nh, nb) past blocks each tile keeps. gate_bias: (B, nh, nb, nb), logsigmoid(score) on kept past
    blocks. kernel: 'sdpa' (the fused flash kernel, sdpa_block_attention), 'block' (_BlockAttention, written
    out) or 'auto' (per tile group, choose_gather_kernel); with dropout, SDPA's math path. groups: None (by
    count_groups) or a number of fixed tile ranges (tile_groups). Returns (B, nh, T, hs).
    """
    B, H, T, hs = q.shape
    nb = T // S
    dt = q.dtype
    kernel = kernel or GATHER_KERNEL
    if kernel not in GATHER_KERNELS:
        raise ValueError(f"gather kernel {kernel!r} must be one of {', '.join(GATHER_KERNELS)}")
    n_past = n_past.expand(B, H, nb) if n_past.dim() == 1 else n_past  # (B, nh, nb)
    counts = n_past.amax(dim=(0, 1)).tolist()  # the most past blocks each tile keeps (the one host sync)
    if groups is None:
        plan = count_groups(counts, S, hs, B * H)
    else:
        plan = [(t0, t1, max(counts[t0:t1])) for t0, t1 in tile_groups(nb, groups)]
    # each group's queries, (B, nh, n, S, hs): one split, whose backward writes q's gradient once (a slice per group
    # would zero-fill a q-sized gradient per group and add them up)
    q_groups = q.reshape(B, H, nb, S, hs).split([t1 - t0 for t0, t1, _ in plan], dim=2)
    # slot 0: the tile's own block (order puts it first), slots 1..K: its kept past blocks, best first, padded to
    # the group's K. Each (sequence, head, block) is one row of S * hs: a tile's blocks come with one index_select
    # of whole rows (its backward adds rows back), not an element-wise gather with an index as large as the keys
    idxs = [order[:, :, t0:t1, :K + 1] for t0, t1, K in plan]  # (B, nh, n, K + 1) each
    base = (torch.arange(B * H, device=q.device) * nb).view(B, H, 1, 1)
    rows = [(idx + base).reshape(-1) for idx in idxs]
    k_groups = _GatherRows.apply(k.reshape(B * H * nb, S * hs), *rows)
    v_groups = _GatherRows.apply(v.reshape(B * H * nb, S * hs), *rows)
    own = torch.zeros(S, S, dtype=dt, device=q.device)  # the own block (slot 0) causal
    own.masked_fill_(~torch.ones(S, S, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    slots = torch.arange(max(K for _, _, K in plan) + 1, device=q.device)
    outs = []
    for (t0, t1, K), idx, qg, keys, vals in zip(plan, idxs, q_groups, k_groups, v_groups):
        M = B * H * (t1 - t0)
        keys, vals = keys.view(M, (K + 1) * S, hs), vals.view(M, (K + 1) * S, hs)
        valid = slots[:K + 1] <= n_past[..., t0:t1, None]  # (B, nh, n, K + 1)
        slot_bias = torch.gather(gate_bias[:, :, t0:t1], 3, idx).to(dt)  # 0 on the own block by construction
        queries = qg.reshape(M, S, hs)
        if dropout_p == 0 and choose_gather_kernel(kernel, q.device.type, S, K) == "sdpa":
            slot_bias = slot_bias.masked_fill(~valid, NEG_BIAS)
            outs.append(sdpa_block_attention(queries, keys, vals, slot_bias.reshape(M, K + 1), S, hs ** -0.5))
            continue
        slot_bias = slot_bias.masked_fill(~valid, float("-inf")).reshape(M, K + 1)
        if dropout_p > 0:  # SDPA's math path draws the dropout
            mask = slot_bias.repeat_interleave(S, dim=-1)[:, None, :].repeat(1, S, 1)
            mask[:, :, :S] += own  # (M, S, (K + 1) * S)
            outs.append(F.scaled_dot_product_attention(queries, keys, vals, attn_mask=mask, dropout_p=dropout_p))
            continue
        outs.append(_BlockAttention.apply(queries, keys, vals, slot_bias, own, hs ** -0.5, S))
    return torch.cat([o.view(B, H, -1, S, hs) for o in outs], dim=2).reshape(B, H, T, hs)


# ----------------------------------------------------------------------------- reference

def reference_probs(q, k, selected, gate_bias, S):
    """(keep mask (B, nh, T, T) bool, attention probabilities (B, nh, T, T) in >= fp32) for padded q, k
    (B, nh, T, hs) and a Selection's selected / gate_bias (B, nh, nb, nb)."""
    T = q.shape[2]
    mask = selected.repeat_interleave(S, dim=-2).repeat_interleave(S, dim=-1)  # (B, nh, T, T)
    mask = mask & torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    acc = torch.promote_types(q.dtype, torch.float32)  # logits and softmax in >= fp32
    add = gate_bias.repeat_interleave(S, dim=-2).repeat_interleave(S, dim=-1).to(acc)
    att = (q @ k.transpose(-2, -1)).to(acc) * (1.0 / math.sqrt(q.shape[-1])) + add
    return mask, F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1)


def attend_reference(q, k, v, sel, S, dropout_p=0.0):
    """Dense attention under the expanded block mask: any device, the definition of the function."""
    att = reference_probs(q, k, sel.selected, sel.gate_bias, S)[1].to(q.dtype)
    if dropout_p > 0:
        att = F.dropout(att, p=dropout_p)
    return att @ v


def attend_compressed(q, k, v, S, ck=None, cv=None):
    """The compressed branch (compressed_branch; NSA's compression branch with a block's mean as its summary): each
    query of tile b attends to one summary key and value per block j < b, the means of the block's keys and values
    (with ck, cv (nh, hs, hs): through the branch's own projections, selector='nsa'), with a softmax over those
    blocks; tile 0 has none and gets 0. Every summary lies before the
    query's tile: causal by construction. q, k, v (B, nh, T, hs), T % S == 0; cost per head T x (T/S)."""
    B, H, T, hs = q.shape
    nb = T // S
    if nb < 2:
        return torch.zeros_like(q)
    kb = k.reshape(B, H, nb, S, hs).mean(dim=3)  # (B, nh, nb, hs): one summary per block
    vb = v.reshape(B, H, nb, S, hs).mean(dim=3)
    if ck is not None:  # NSA: the branch's own key and value projections of the summaries, per head
        kb, vb = kb @ ck.to(kb.dtype)[None], vb @ cv.to(vb.dtype)[None]
    tile = torch.arange(S, T, device=q.device) // S  # the tiles of queries S.. (tile 0 has no complete block before it)
    before = torch.arange(nb, device=q.device)[None, :] < tile[:, None]  # (T - S, nb)
    acc = torch.promote_types(q.dtype, torch.float32)  # softmax in at least fp32 (bf16 under autocast)
    logits = (q[:, :, S:] @ kb.transpose(-1, -2)).to(acc) / math.sqrt(hs)  # (B, nh, T - S, nb)
    p = torch.softmax(logits.masked_fill(~before, float("-inf")), dim=-1).to(v.dtype)
    return torch.cat([q.new_zeros(B, H, S, hs), p @ vb], dim=2)


# ----------------------------------------------------------------------------- flex (CUDA)

GATE_BIAS_LAYOUTS = ("auto", "key", "block")


def gate_score_mod(gate_bias, S, layout="key"):
    """The score_mod adding the gate bias (B, nh, nb, nb) to each logit of tile q_idx // S and block kv_idx // S.

    layout='key' reads it from a copy indexed by key position, (B, nh, nb, T) (repeat_interleave): in FlexAttention's
    backward every logit's gradient is an atomic add into the buffer entry it read, so 'block' (the bias itself)
    sends all S * S logits of a block to one address, 'key' only the S of a tile row (about
    0.57 G contended fp32 atomics per layer at T=8192 and 0.75 with 'block'). The same function and gradient either
    way (tests/test_kernels.py); bench_attention.py --gate_grad times both. 'auto': 'key' on CUDA, 'block' on a CPU,
    where inductor's C++ flex template cannot lower the key-indexed copy inside a compiled model (torch 2.13:
    "All the buffers in the score and mask subgraph should be in kernel_group.args.input_buffers")."""
    if layout == "auto":
        layout = "key" if gate_bias.is_cuda else "block"
    if layout == "key":
        bias_k = gate_bias.repeat_interleave(S, dim=-1)  # (B, nh, nb, T)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias_k[b, h, q_idx // S, kv_idx]
    elif layout == "block":
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + gate_bias[b, h, q_idx // S, kv_idx // S]
    else:
        raise ValueError(f"flex_gate_bias={layout!r} must be one of {', '.join(GATE_BIAS_LAYOUTS)}")
    return score_mod


def attend_flex(q, k, v, sel, S, compiled=True, layout="auto"):
    """FlexAttention over the selected blocks only (see build_block_mask), gate bias in score_mod. No dropout."""
    score_mod = gate_score_mod(sel.gate_bias, S, layout)
    if q.device.type == "cpu":
        # inductor's C++ flex template (torch 2.13) names each input pointer by its storage buffer and drops a view's
        # storage offset unless two inputs share that buffer: v, a view at offset 2C of the qkv projection, was read
        # from offset 0 (the raw q) whenever rotary or QK-norm made q and k computed buffers. Distinct buffers avoid
        # it (scripts/repro_flex_cpu_view_offset.py). CUDA lowers through the Triton template.
        q, k, v = (t.contiguous() for t in (q, k, v))
    # traced into a compiled model: the kernel is compiled for sure, the block lists state the selection
    block_mask = build_block_mask(sel, S, state_selection=not torch.compiler.is_compiling())
    return flex_attention_fn(compiled)(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                       kernel_options=flex_kernel_options(S, q.device.type))

def build_block_mask(sel, S, state_selection=True):
    """The FlexAttention BlockMask of a Selection, from its block indices (no mask evaluated over T x T).

    Partial (masked) blocks: each tile's own block. Full blocks: its kept past blocks, best first. A
    compiled kernel visits exactly these blocks and applies mask_mod to the partial ones only, where
    causality is the whole rule. Uncompiled flex_attention ignores the lists and applies only the
    mask_mod, so with state_selection=True the mask_mod also states the selection (the function is the
    same either way). Inside a torch.compile'd model pass False: inductor's CPU flex template computes
    wrong attention when a mask_mod reads a tensor made in the same graph (torch 2.13,
    scripts/repro_flex_cpu_captured_mask.py); the block lists carry the selection there.
    """
    from torch.nn.attention.flex_attention import BlockMask
    B, H, nb, _ = sel.order.shape
    idx = sel.order.to(torch.int32)
    partial_num = torch.ones(B, H, nb, dtype=torch.int32, device=idx.device)
    full_num = sel.n_past.to(torch.int32).expand(B, H, nb).contiguous()
    full_idx = torch.roll(idx, shifts=-1, dims=-1)  # kept past blocks first (the own block was first)
    selected = sel.selected

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def causal_and_selected(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & selected[b, h, q_idx // S, kv_idx // S]

    return BlockMask.from_kv_blocks(partial_num, idx.contiguous(), full_num, full_idx.contiguous(), BLOCK_SIZE=S,
                                    mask_mod=causal_and_selected if state_selection else causal,
                                    seq_lengths=(nb * S, nb * S))


def flex_kernel_options(S, device_type="cuda"):
    """Kernel tiles must divide the BlockMask blocks (S x S); the CUDA defaults (BLOCK_M 128) do not
    when S < 128. None keeps the defaults (always on CPU, whose template takes no tile options)."""
    if S >= 128 or device_type != "cuda":
        return None
    n = min(S, 64)
    return {"fwd_BLOCK_M": n, "fwd_BLOCK_N": n, "bwd_BLOCK_M1": min(32, n), "bwd_BLOCK_N1": n,
            "bwd_BLOCK_M2": n, "bwd_BLOCK_N2": min(32, n)}


def flex_backward_problem(S, head_dim, dtype):
    """None if FlexAttention's backward can compile for S x S mask blocks on this CUDA device, else why.

    torch before 2.14.1 checks the mask block size against inductor's DEFAULT backward tiles before
    any bwd_* kernel option is applied (pytorch issue 176025; torch 2.11 and 2.13
    _inductor/kernel/flex/flex_attention.py, the `for conf in configs` loop of the backward lowering).
    On an H100/H200 in bf16 with head dim 64-128 the only default is (64, 128, 128, 64), so S=64 leaves
    no candidate and compilation ends in NoValidChoicesError. We ask inductor for the same list."""
    from torch.torch_version import TorchVersion
    if TorchVersion(torch.__version__.split("+")[0]) >= "2.14.1":
        return None
    try:
        from torch._inductor.choices import InductorChoices
        configs = InductorChoices().get_flex_attention_bwd_configs(head_dim, dtype, "cuda")
        tiles = [(c.block_m1, c.block_n1, c.block_m2, c.block_n2) for c in configs]
    except Exception:  # private API moved: assume the sm90 default, the strictest we know
        tiles = [(64, 128, 128, 64)]
    if any(all(S % t == 0 for t in tile) for tile in tiles):
        return None
    need = min(max(tile) for tile in tiles)
    return (f"sparse_block_size={S} cannot compile FlexAttention's backward with torch {torch.__version__} on this GPU "
            f"(its backward tiles {sorted(set(tiles))} must divide S; pytorch issue 176025, fixed in 2.14.1): "
            f"use sparse_block_size={need} (or a multiple), or attn_impl='reference'")


def flex_short_problem(S, block_size):
    """None if every sequence shorter than 128 that this model can run compiles with FlexAttention on CUDA, else why.

    Inductor runs a query shorter than 128 through its flex-decoding kernel, whose query tile is the next power of two
    of the (padded) length, at least 16, and must divide the mask's block size S; otherwise it skips every config and
    compilation ends in NoValidChoicesError (torch 2.11 and 2.13 _inductor/kernel/flex/flex_decoding.py,
    `SPARSE_Q_BLOCK_SIZE % kernel_options["BLOCK_M"]`). The flex path pads a sequence to S * 2^k (padded_length's
    buckets), so the lengths to check are S, 2S, ... below 128 and up to block_size."""
    Tp, bad = S, []
    while Tp < 128 and Tp <= block_size:
        tile = max(16, 1 << (Tp - 1).bit_length())
        if S % tile:
            bad.append((Tp, tile))
        Tp *= 2
    if not bad:
        return None
    (Tp, tile), = bad[:1]
    return (f"sparse_block_size={S} cannot compile FlexAttention on CUDA for a sequence padded to {Tp} (under 128 "
            f"bytes inductor's decoding kernel takes a query tile of {tile}, which must divide S): use a power-of-two "
            f"sparse_block_size of 64 or more, or attn_impl='gather'")


_FLEX_COMPILED = None


def flex_attention_fn(compiled=True):
    """flex_attention, compiled once: uncompiled it runs a dense math path that skips nothing.
    Inside a torch.compile'd model the plain function is traced into the model's graph."""
    global _FLEX_COMPILED
    from torch.nn.attention.flex_attention import flex_attention
    if not compiled or torch.compiler.is_compiling():
        return flex_attention
    if _FLEX_COMPILED is None:
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED
