"""
Adaptive Sparse Causal Attention (ASCA): the baseline GPT with an attention that keeps, per query
tile, only the earlier key blocks a small learned network scores highest, and skips the rest.

    python novel_model.py config/train_enwik8_novel.py --target_sparsity=0.75

How one layer works (S = sparse_block_size, nb = T / S blocks; query tile b = queries b*S..b*S+S-1):
1. ContentBasedAdaptiveSparsity scores every complete past key block j < b for tile b from
   - the query at the tile's FIRST position b*S (the only query every member of the tile has seen),
   - the mean of block j's keys (all at positions < b*S), and a learned per-head block-distance bias.
   So the decision for any query i in tile b uses positions <= b*S <= i only: strictly causal.
   (Pooling the tile's queries would leak the future into its earlier members.)
2. The tile keeps its own block (causal inside), block 0 if keep_first_block (an attention sink),
   and some of its other past blocks, best-scored first. How many:
   - budget='fixed': n_keep[b], fixed per tile by target_sparsity (spread evenly over tiles), so the
     compute saved is exactly what was asked; the content decides WHICH blocks.
   - budget='adaptive': every block scoring above a threshold (one per layer, or per head with
     budget_scope='head'), so the content also decides HOW MANY, per head and tile. The threshold is controller state, not a function of the sequence
     (a per-sequence quantile would leak the future into earlier tiles): after each optimizer step it
     moves towards the threshold that would have met the scheduled sparsity on the last training
     batch (update_budget), so the mean over heads, tiles and inputs is held at the target.
   The schedule ramps from dense to the target over sparsity_warmup_iters.
3. Trainable end to end: each kept past block's logits get + logsigmoid(score), so the LM loss
   differentiates the gate (routers do the same with top-k gate values). Skipped blocks get nothing.
4. Two paths compute that one function: 'reference' (dense attention under the expanded mask, any
   device) and 'flex' (CUDA: FlexAttention with a BlockMask built from the selected block indices,
   so skipped blocks are never loaded or computed).
Sharing the decision per query tile is what lets the kernel skip work: FlexAttention visits a KV
tile if any query in the Q tile needs it (DESIGN.md section 5).
"""
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from asca_kernels import attend_gather
from baseline_model import CausalSelfAttention, GPTConfig, ModelKind, register

ATTN_IMPLS = ("auto", "reference", "flex", "gather")
SELECTORS = ("learned", "local", "random")
# attn_impl='auto' on a CPU takes the gather path from this sequence length on: measured 0.17-0.43x the
# reference's time at T=1024 and 4096, sparsity 0.25-0.75 (README). Shorter sequences (the main job, the CPU
# tables at T <= 512) stay on the reference, so their measured results stay bit for bit what they were.
GATHER_MIN_T = 1024


@dataclass
class ASCAConfig(GPTConfig):
    sparse_block_size: int = 128  # S: key blocks and query tiles, in tokens (128: see flex_backward_problem)
    target_sparsity: float = 0.5  # fraction of causal query-key pairs skipped after warm-up
    sparsity_warmup_iters: int = 1000  # linear ramp from dense (0 = target from the first step)
    keep_first_block: bool = True  # block 0 always kept (attention sink)
    gate_dim: int = 32  # width of the sparsity predictor per head
    gate_input: str = "rotated"  # the predictor reads q, k 'rotated' (as attended) or 'unrotated' (position-free; rope only)
    gate_dist_bias: bool = True  # a learned per-head bias by block distance in the predictor's scores
    budget: str = "fixed"  # 'fixed': every tile keeps the scheduled count; 'adaptive': blocks scoring above a
    #                        per-layer threshold, the threshold steered between steps to the scheduled sparsity
    budget_ema: float = 0.5  # adaptive: weight of the last step's estimate in the threshold's moving average
    budget_scope: str = "layer"  # adaptive: one threshold per 'layer' (its heads share the budget) or per 'head'
    selector: str = "learned"  # which past blocks a tile keeps: 'learned' (the predictor); controls at the same
    #                            budget: 'local' (the nearest, plus the sink) or 'random' (a new draw each forward)
    attn_impl: str = "auto"  # 'auto' (flex on CUDA; CPU: see resolved_impl); 'reference'; 'flex'; 'gather' (any device)

    RUNTIME_KEYS = ("dropout", "attn_impl", "target_sparsity", "sparsity_warmup_iters", "budget_ema")
    DEVICE_DEFAULTS = {"attn_impl": "auto"}
    LEGACY = {**GPTConfig.LEGACY, "gate_input": "unrotated", "gate_dist_bias": True, "budget": "fixed"}

    def validate(self):
        super().validate()
        S = self.sparse_block_size
        if S < 1 or self.block_size % S:
            raise ValueError(f"block_size={self.block_size} must be a multiple of sparse_block_size={S}")
        if not 0.0 <= self.target_sparsity < 1.0:
            raise ValueError(f"target_sparsity={self.target_sparsity} must be in [0, 1)")
        top = max_sparsity(self.block_size, S, self.keep_first_block)
        if self.target_sparsity > top + 1e-9:
            raise ValueError(f"target_sparsity={self.target_sparsity} is out of reach at block_size={self.block_size}, "
                             f"sparse_block_size={S}, keep_first_block={self.keep_first_block}: the maximum is "
                             f"{top:.4f} (own block and sink always kept); use smaller blocks or a longer block_size")
        if self.sparsity_warmup_iters < 0 or self.gate_dim < 1:
            raise ValueError("sparsity_warmup_iters must be >= 0 and gate_dim >= 1")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl={self.attn_impl!r} must be one of {', '.join(ATTN_IMPLS)}")
        if self.gate_input not in ("unrotated", "rotated"):
            raise ValueError(f"gate_input={self.gate_input!r} must be 'unrotated' or 'rotated'")
        if self.budget not in ("fixed", "adaptive"):
            raise ValueError(f"budget={self.budget!r} must be 'fixed' or 'adaptive'")
        if self.attn_impl == "gather" and self.budget == "adaptive" and self.dropout > 0:
            # the gather path pads each group of tiles to its largest count, which the adaptive budget lets
            # later tiles' content set: dropout's random draws would then depend on later bytes
            raise ValueError("attn_impl='gather' with budget='adaptive' has no attention dropout: set dropout=0, "
                             "or attn_impl='reference'")
        if self.selector not in SELECTORS:
            raise ValueError(f"selector={self.selector!r} must be one of {', '.join(SELECTORS)}")
        if self.budget_scope not in ("layer", "head"):
            raise ValueError(f"budget_scope={self.budget_scope!r} must be 'layer' or 'head'")
        if not 0.0 < self.budget_ema <= 1.0:
            raise ValueError(f"budget_ema={self.budget_ema} must be in (0, 1]")

    def check_device(self, device_type, dtype, training):
        """Start-up checks that need the device: a path this device lacks is a one-line ValueError."""
        if self.attn_impl == "flex":
            if device_type != "cuda":
                raise ValueError(f"attn_impl='flex' needs a CUDA device (this run uses {device_type}); "
                                 f"use attn_impl='reference' or 'auto'")
            if self.sparse_block_size % 16:  # FlexAttention's smallest kernel tile is 16: tiles must divide S
                raise ValueError(f"attn_impl='flex' needs sparse_block_size to be a multiple of 16, "
                                 f"got {self.sparse_block_size}")
        if self.attn_impl in ("flex", "auto") and device_type == "cuda":
            if self.dropout > 0:
                raise ValueError("the flex path has no attention dropout: set dropout=0, or attn_impl='reference'")
            why = flex_backward_problem(self.sparse_block_size, self.n_embd // self.n_head, dtype) if training else None
            if why:
                raise ValueError(why)


# ----------------------------------------------------------------------------- schedule

def _skippable(nb, keep_first):
    b = torch.arange(nb)
    return b - ((b >= 1) & keep_first).long()  # past blocks of tile b that may be skipped


def max_sparsity(T, S, keep_first):
    nb = -(-T // S)
    return _skippable(nb, keep_first).sum().item() * S * S / (T * (T + 1) / 2)


def padded_length(T, S, bucket_max=None):
    """T rounded up to whole blocks of S; with bucket_max, to S * 2^k blocks (capped at bucket_max)."""
    Tp = -(-T // S) * S
    if bucket_max is not None and Tp < bucket_max:
        Tp = min(bucket_max, S * (1 << (Tp // S - 1).bit_length()))
    return Tp


def keep_counts(nb, S, T, sparsity, keep_first):
    """Past blocks kept per query tile (own block not counted), LongTensor (nb,).

    Skips round(sparsity * causal_pairs / S^2) blocks in all, spread over tiles in proportion to
    how many each may skip (cumulative rounding), so every tile keeps about the same fraction.
    """
    skippable = _skippable(nb, keep_first)
    total = int(skippable.sum())
    n_skip = min(total, round(sparsity * T * (T + 1) / 2 / (S * S)))
    if total == 0 or n_skip == 0:
        return torch.arange(nb)
    cum = torch.round(n_skip * torch.cumsum(skippable, 0).double() / total).long()
    skip = torch.diff(cum, prepend=torch.zeros(1, dtype=torch.long))
    return torch.arange(nb) - skip


@dataclass
class Selection:
    """One layer's block choice in one forward: the record the kernels, diagnostics, extraction.py and
    the tests all read (nb = padded length / S; tile b = queries b*S .. b*S+S-1; block j = keys likewise)."""
    scores: torch.Tensor  # (B, nh, nb, nb) predictor scores; meaningful for j < b only
    order: torch.Tensor  # (B, nh, nb, nb) int64: own block first, then the sink, then past blocks by score
    n_past: torch.Tensor  # (nb,) or adaptive (B, nh, nb) int64: past blocks each tile keeps (own block not counted)
    selected: torch.Tensor  # (B, nh, nb, nb) bool: kept blocks, own block included
    gate_bias: torch.Tensor  # (B, nh, nb, nb) >= fp32: logsigmoid(score) on kept past blocks, 0 elsewhere
    seq_len: int  # real tokens; blocks past them are padding

    def detach(self):
        return Selection(*(t.detach() for t in (self.scores, self.order, self.n_past, self.selected, self.gate_bias)),
                         self.seq_len)


# ----------------------------------------------------------------------------- predictor

class ContentBasedAdaptiveSparsity(nn.Module):
    """Scores (B, nh, nb, nb): for query tile b and key block j < b, how much tile b wants block j.

    score[b, j] = <MLP_h(q at b*S), W_h mean(k of block j)> / sqrt(gate_dim) + dist_h[b - j - 1] + c_h
    Entries with j >= b are meaningless and masked by the caller.
    """

    def __init__(self, n_head, head_size, gate_dim, n_blocks, dist_bias=True):
        super().__init__()
        self.gate_dim = gate_dim
        self.wq1 = nn.Parameter(torch.empty(n_head, head_size, gate_dim))
        self.wq2 = nn.Parameter(torch.empty(n_head, gate_dim, gate_dim))
        self.wk = nn.Parameter(torch.empty(n_head, head_size, gate_dim))
        # index: b - j - 1; without it the scores see no distance (a content-only gate)
        self.dist_bias = nn.Parameter(torch.zeros(n_head, max(1, n_blocks))) if dist_bias else None
        self.offset = nn.Parameter(torch.empty(n_head))
        self.reset_parameters()

    def reset_parameters(self):
        # nn.Parameters, not Linear/Embedding: GPT._init_weights leaves them to this
        for w in (self.wq1, self.wq2, self.wk):
            nn.init.normal_(w, std=1.0 / math.sqrt(w.shape[1]))
        if self.dist_bias is not None:
            nn.init.zeros_(self.dist_bias)
        # start near-neutral: logsigmoid(2) = -0.13 on every past block
        nn.init.constant_(self.offset, 2.0)

    def forward(self, q, k, S):
        B, H, T, hs = q.shape
        nb = T // S
        qt = q[:, :, ::S, :]  # (B, nh, nb, hs): first query of each tile
        kb = k.view(B, H, nb, S, hs).mean(dim=3)  # (B, nh, nb, hs): mean key of each block
        return self.score(qt, kb, torch.arange(nb, device=q.device))

    def score(self, qt, kb, rows):
        """Scores (B, nh, r, n) of tiles `rows` (r,), whose first queries are qt (B, nh, r, hs), for the
        blocks 0..n-1 whose mean keys are kb (B, nh, n, hs). Decoding asks for one row."""
        gq = torch.einsum("bhng,hgf->bhnf", F.gelu(torch.einsum("bhnd,hdg->bhng", qt, self.wq1)), self.wq2)
        gk = torch.einsum("bhnd,hdg->bhng", kb, self.wk)
        scores = gq @ gk.transpose(-1, -2) / math.sqrt(self.gate_dim)  # (B, nh, r, n)
        scores = scores + self.offset[None, :, None, None]
        if self.dist_bias is None:
            return scores
        j = torch.arange(kb.shape[2], device=kb.device)
        dist = (rows[:, None] - j[None, :] - 1).clamp(0, self.dist_bias.shape[1] - 1)  # (r, n)
        return scores + self.dist_bias[:, dist][None]


# ----------------------------------------------------------------------------- attention

class AdaptiveSparseCausalSelfAttention(CausalSelfAttention):
    """Causal self-attention over the own block, the sink, and the predictor's top past blocks."""

    def __init__(self, config):
        super().__init__(config)
        self.S = config.sparse_block_size
        self.keep_first = config.keep_first_block
        self.target = config.target_sparsity
        self.warmup = config.sparsity_warmup_iters
        self.impl = config.attn_impl
        self.block_size = config.block_size
        self.predictor = ContentBasedAdaptiveSparsity(config.n_head, config.n_embd // config.n_head,
                                                      config.gate_dim, config.block_size // self.S,
                                                      dist_bias=config.gate_dist_bias)
        # with rotary positions the predictor reads the rotated q and k by default (measured better on CPU,
        # README), or the position-free ones, leaving position to its distance bias
        self.gate_rotated = config.gate_input == "rotated"
        self.selector = config.selector  # 'local' and 'random' are fixed rules: no predictor call, no gate bias
        nb = config.block_size // self.S
        # per-tile keep counts at T = block_size live in a buffer, so a changing schedule never
        # changes Python values that torch.compile would guard on (no recompiles during warm-up)
        self.register_buffer("n_keep", keep_counts(nb, self.S, config.block_size, 0.0, self.keep_first),
                             persistent=False)
        self.sparsity = 0.0
        self.set_step(0)
        self.last_selection = None  # Selection of the last forward
        self.adaptive = config.budget == "adaptive"
        self.budget_ema = config.budget_ema
        self.per_head = config.budget_scope == "head"
        if self.adaptive:  # per head: keep a past block if its score > threshold; -inf = keep all; in checkpoints
            self.register_buffer("threshold", torch.full((config.n_head,), float("-inf")))
        self.tally, self.counting = None, False  # sums over forwards between start_tally and end_tally

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "threshold"  # checkpoints from before budget_scope hold one threshold per layer
        if self.adaptive and key in state_dict and state_dict[key].dim() == 0:
            state_dict[key] = state_dict[key].expand(self.threshold.shape).clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # --- schedule (owned here, adaptive-span style; the trainer only calls set_step)
    def set_step(self, iter_num):
        frac = 1.0 if self.warmup == 0 else min(1.0, iter_num / self.warmup)
        self.sparsity = self.target * frac
        nb = self.block_size // self.S
        self.n_keep.copy_(keep_counts(nb, self.S, self.block_size, self.sparsity, self.keep_first))

    def resolved_impl(self, device, T=0):
        """The path for this forward. 'auto': flex on CUDA; on a CPU the gather path from T >= GATHER_MIN_T
        (uncompiled), else the reference. Both compute one function (tests/test_kernels.py)."""
        if self.impl != "auto":
            return self.impl
        if device.type == "cuda":
            return "flex"
        if T < GATHER_MIN_T or torch.compiler.is_compiling():  # compiled CPU runs keep the compiled reference
            return "reference"
        no_gather = self.adaptive and self.training and self.dropout > 0  # the gather path refuses that
        return "reference" if no_gather else "gather"

    # --- selection
    def select(self, q, k):
        """Scores, per-tile order of blocks and counts. q, k: (B, nh, T, hs) with T % S == 0.

        Returns scores (B, nh, nb, nb), order (B, nh, nb, nb) int64 (own block first, then the sink,
        then past blocks by descending score), n_past = past blocks kept per tile: (nb,) with a fixed
        budget, (B, nh, nb) with an adaptive one.
        """
        if q.shape[2] > self.block_size:
            raise ValueError(f"sequence length {q.shape[2]} exceeds block_size {self.block_size}")
        if self.selector == "learned":
            scores = self.predictor(q.detach(), k.detach(), self.S)  # the predictor learns via the gate bias
        else:
            scores = self.rule_scores(q.shape[0], q.shape[1], q.shape[2] // self.S, q.device)
        return (scores, *self.rank(scores))

    def rule_scores(self, B, H, nb, device):
        """The control rules' scores (B, nh, nb, nb), read by rank() as the predictor's are: 'local' ranks a
        tile's past blocks by nearness (score j - b); 'random' by a uniform draw from torch's generator (the
        trainer seeds it from the run's seed and checkpoints it), new each forward. Neither reads the
        content, so both are causal by construction."""
        if self.selector == "local":
            b = torch.arange(nb, device=device, dtype=torch.float32)
            return (b[None, :] - b[:, None]).expand(B, H, nb, nb)
        return torch.rand(B, H, nb, nb, device=device)

    def rank(self, scores):
        """(order, n_past) of select() from the scores (B, nh, nb, nb) alone."""
        nb = scores.shape[-1]
        device = scores.device
        b = torch.arange(nb, device=device)
        past = b[None, :] < b[:, None]  # (nb, nb): block j is complete and before tile b
        if self.adaptive:  # (B, nh, nb): the sink plus every other past block above the threshold
            acc = torch.promote_types(scores.dtype, torch.float32)  # as budget_estimate: no rounding either side
            above = (scores.detach().to(acc) > self.threshold.to(acc)[:, None, None]) & self.candidates(nb, device)
            n_past = above.sum(-1) + ((b >= 1) & self.keep_first).long()
        else:  # a shorter sequence uses the first tiles' counts: tile b's choice never depends on the length
            n_past = self.n_keep[:nb]
        prio = scores.detach().float().masked_fill(~past, float("-inf"))
        prio = prio.masked_fill(torch.eye(nb, dtype=torch.bool, device=device), float("inf"))
        if self.keep_first and nb > 1:
            prio[..., 1:, 0] = torch.finfo(torch.float32).max  # sink: after own block, before the rest
        order = torch.argsort(prio, dim=-1, descending=True, stable=True)
        return order, n_past

    def candidates(self, nb, device):
        """(nb, nb) bool: the blocks a budget decides on: complete past blocks, the sink excepted."""
        b = torch.arange(nb, device=device)
        cand = b[None, :] < b[:, None]
        if self.keep_first:
            cand[:, 0] = False
        return cand

    @torch.no_grad()
    def budget_estimate(self):
        """(nh,) thresholds that would have skipped exactly the scheduled number of blocks in the last
        forward: the midpoint between the K-th and (K+1)-th lowest candidate score of a pool. The pool is
        the layer's (all sequences and heads: heads and inputs share the budget unevenly) or, with
        budget_scope='head', each head's own (its sequences and tiles share it). -inf: nothing to skip."""
        sel = self.last_selection
        S, T = self.S, sel.seq_len
        nb = T // S  # complete tiles (training windows are whole blocks)
        B, H = sel.scores.shape[:2]
        per_seq = int((torch.arange(nb) - keep_counts(nb, S, T, self.sparsity, self.keep_first)).sum())
        acc = torch.promote_types(sel.scores.dtype, torch.float32)
        vals = sel.scores[..., :nb, :nb].to(acc)[..., self.candidates(nb, sel.scores.device)]  # (B, nh, n)
        vals = vals.transpose(0, 1).reshape(H, -1) if self.per_head else vals.reshape(1, -1)  # (pools, m)
        K = per_seq * B * (1 if self.per_head else H)  # blocks the fixed budget would skip, per pool
        if K == 0 or vals.shape[1] == 0:
            est = vals.new_full((vals.shape[0],), float("-inf"))
        elif K >= vals.shape[1]:
            est = vals.max(dim=1).values
        else:
            low = vals.sort(dim=1).values
            est = (low[:, K - 1] + low[:, K]) / 2
        return est.expand(H)

    @torch.no_grad()
    def update_budget(self, reduce=None):
        """Between optimizer steps (the trainer calls it after each one): move the threshold towards
        budget_estimate() of the last training forward; `reduce` averages it over DDP ranks."""
        if not self.adaptive or self.last_selection is None:
            return
        est = self.budget_estimate()
        if reduce is not None:
            est = reduce(est)
        t = self.threshold
        self.threshold.copy_(torch.where(torch.isfinite(t) & torch.isfinite(est), t + self.budget_ema * (est - t), est))

    @staticmethod
    def block_selection(order, n_past):
        """Boolean (B, nh, nb, nb): which key blocks each query tile keeps (own block included)."""
        nb = order.shape[-1]
        rank_kept = (torch.arange(nb, device=order.device) < (n_past + 1)[..., None])  # (..., nb, nb) by rank
        return torch.zeros(order.shape, dtype=torch.bool, device=order.device).scatter(
            -1, order, rank_kept.expand(order.shape))

    def gate_bias(self, scores, selected):
        """logsigmoid(score) on kept PAST blocks, 0 on the own block; (B, nh, nb, nb) float32. The control rules
        add nothing: their blocks enter the attention as the dense model's do."""
        nb = scores.shape[-1]
        if self.selector != "learned":
            return torch.zeros(scores.shape, dtype=torch.promote_types(scores.dtype, torch.float32), device=scores.device)
        past = torch.ones(nb, nb, dtype=torch.bool, device=scores.device).tril(-1)
        acc = torch.promote_types(scores.dtype, torch.float32)
        return torch.where(selected & past, F.logsigmoid(scores.to(acc)), torch.zeros((), dtype=acc, device=scores.device))

    def plan(self, q, k, seq_len=None):
        """The Selection for padded q, k (B, nh, T, hs), T % S == 0: everything the kernels need."""
        scores, order, n_past = self.select(q, k)
        return self.selection(scores, order, n_past, q.shape[2] if seq_len is None else seq_len)

    def selection(self, scores, order, n_past, seq_len):
        selected = self.block_selection(order, n_past)
        return Selection(scores, order, n_past, selected, self.gate_bias(scores, selected), seq_len)

    def pad_to_blocks(self, *ts, bucket=False):
        """Pad (B, nh, T, hs) tensors to whole blocks; padded keys lie in every real query's future.

        bucket=True (flex path) pads further, to a power-of-two number of blocks (at most block_size),
        so the compiled kernel (static shapes) sees about log2(block_size / S) lengths, not one per
        sampled byte: past torch's recompile limit (8) it would fall back to slow eager attention.
        Padding never changes a real position's output: tile b's choice reads tiles <= b only."""
        T = ts[0].shape[2]
        Tp = padded_length(T, self.S, self.block_size if bucket else None)
        return [F.pad(t, (0, 0, 0, Tp - T)) for t in ts] if Tp > T else list(ts)

    # --- attention paths
    def attend(self, q, k, v):
        T0 = q.shape[2]
        impl = self.resolved_impl(q.device, T0)
        qr, kr = self.position(q, k)  # rotary positions (learned positions: unchanged)
        gq, gk = (qr, kr) if self.gate_rotated else (q, k)
        qr, kr, v, gq, gk = self.pad_to_blocks(qr, kr, v, gq, gk, bucket=impl == "flex")
        sel = self.plan(gq, gk, T0)
        if impl == "flex":
            y = self.attend_flex(qr, kr, v, sel)
        elif impl == "gather":  # the kept blocks only, any device (asca_kernels.py)
            y = attend_gather(qr, kr, v, sel.order, sel.n_past, sel.gate_bias, self.S,
                              dropout_p=self.dropout if self.training else 0.0)
        else:
            y = self.attend_reference(qr, kr, v, sel)
        self.last_selection = sel.detach()  # diagnostics(), extraction.py and tests read it
        return y[:, :, :T0]

    def reference_probs(self, q, k, sel):
        """(keep mask (B, nh, T, T) bool, attention probabilities (B, nh, T, T) in >= fp32)."""
        T = q.shape[2]
        S = self.S
        selected, bias = sel.selected, sel.gate_bias
        mask = selected.repeat_interleave(S, dim=-2).repeat_interleave(S, dim=-1)  # (B, nh, T, T)
        mask = mask & torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        acc = torch.promote_types(q.dtype, torch.float32)  # logits and softmax in >= fp32
        add = bias.repeat_interleave(S, dim=-2).repeat_interleave(S, dim=-1).to(acc)
        att = (q @ k.transpose(-2, -1)).to(acc) * (1.0 / math.sqrt(q.shape[-1])) + add
        return mask, F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1)

    def attend_reference(self, q, k, v, sel):
        """Dense attention under the expanded block mask: any device, the definition of the function."""
        att = self.reference_probs(q, k, sel)[1].to(q.dtype)
        if self.training and self.dropout > 0:
            att = F.dropout(att, p=self.dropout)
        return att @ v

    @torch.no_grad()
    def attention_map(self, x):
        """For analysis (extraction.py): attention probabilities, keep mask, block selection and gate
        scores for layer input x (B, T, C), as the reference path computes them."""
        q, k, _ = self.qkv(x)
        T0 = q.shape[2]
        qr, kr = self.position(q, k)
        gq, gk = (qr, kr) if self.gate_rotated else (q, k)
        qr, kr, gq, gk = self.pad_to_blocks(qr, kr, gq, gk)
        sel = self.plan(gq, gk, T0)
        mask, probs = self.reference_probs(qr, kr, sel)
        return {"attention": probs[..., :T0, :T0], "keep_mask": mask[..., :T0, :T0],
                "block_selection": sel.selected, "gate_scores": sel.scores.float()}

    def attend_flex(self, q, k, v, sel, compiled=True):
        """FlexAttention over the selected blocks only (see build_block_mask), gate bias in score_mod."""
        if self.training and self.dropout > 0:
            raise ValueError("attn_impl='flex' has no attention dropout; use dropout=0 or attn_impl='reference'")
        S, bias = self.S, sel.gate_bias

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[b, h, q_idx // S, kv_idx // S]

        # traced into a compiled model: the kernel is compiled for sure, the block lists state the selection
        block_mask = build_block_mask(sel, S, state_selection=not torch.compiler.is_compiling())
        return flex_attention_fn(compiled)(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                           kernel_options=flex_kernel_options(S, q.device.type))

    # --- decoding with a KV cache (sample.py): a tile's blocks are chosen once, at its first byte
    def gate_query(self, q, qr):
        return qr if self.gate_rotated else q

    def after_prefill(self, q, qr, lc):
        """After a prompt of L bytes, the tile holding position L needs its choice if it has begun: made
        from its first query, which only the prefill saw."""
        if self.selector != "learned":
            raise ValueError(f"cached decoding supports selector='learned' only (this model: {self.selector!r}); "
                             f"sample with --kv_cache=false")
        L, S = q.shape[2], self.S
        lc.tile = self.choose_tile(lc, L // S, self.gate_query(q, qr)[:, :, (L // S) * S]) if L % S else None

    def choose_tile(self, lc, b, q_first):
        """Tile b's decoding state, chosen by the training forward's own plan() from the tile's first query
        q_first (B, nh, hs) and the b complete blocks before it: (b, keys, values, additive mask, m*S) with
        keys/values (B, nh, m*S + S, hs) = the m kept past blocks gathered once (m: the largest count over
        heads; a head that keeps fewer has -inf on the rest), then S slots for the tile's own bytes, which
        the steps fill in place; the mask (B, nh, m*S + S) = logsigmoid(score) per kept block, 0 on the own
        block."""
        S = self.S
        B, H, _, hs = lc.k.shape
        keys = lc.k if self.gate_rotated else lc.k_raw
        kb = keys[:, :, :b * S].reshape(B, H, b, S, hs).mean(dim=3)  # (B, nh, b, hs): as the forward's
        row = self.predictor.score(q_first[:, :, None], kb, torch.tensor([b], device=kb.device))  # (B, nh, 1, b)
        scores = row.new_zeros(B, H, b + 1, b + 1)  # rows < b are never read for tile b: rank() ranks per row
        scores[:, :, b, :b] = row[:, :, 0]
        sel = self.selection(scores, *self.rank(scores), (b + 1) * S)
        n = sel.n_past[..., b]  # () fixed or (B, nh) adaptive: each head its own count, padded to the largest
        blocks = sel.order[:, :, b, 1:1 + int(n.max())]  # (B, nh, m): the order starts with the own block
        m = blocks.shape[-1]
        bias = sel.gate_bias[:, :, b].gather(-1, blocks)  # (B, nh, m)
        unused = torch.arange(m, device=blocks.device) >= n[..., None]  # beyond a head's count
        bias = bias.masked_fill(unused, float("-inf"))  # -inf: a padded block gets no probability
        bi = torch.arange(B, device=blocks.device)[:, None, None]
        hi = torch.arange(H, device=blocks.device)[None, :, None]
        k_buf, v_buf = lc.k.new_empty(B, H, m * S + S, hs), lc.v.new_empty(B, H, m * S + S, hs)
        for buf, src in ((k_buf, lc.k), (v_buf, lc.v)):  # whole blocks: (B, nh, m, S, hs) by block index
            buf[:, :, :m * S] = src[:, :, :b * S].reshape(B, H, b, S, hs)[bi, hi, blocks].reshape(B, H, m * S, hs)
        have = lc.len - b * S  # the tile's bytes already cached (a prefill that ended inside it)
        k_buf[:, :, m * S:m * S + have], v_buf[:, :, m * S:m * S + have] = lc.k[:, :, b * S:], lc.v[:, :, b * S:]
        mask = torch.cat([bias.repeat_interleave(S, dim=-1), bias.new_zeros(B, H, S)], dim=-1)
        return b, k_buf, v_buf, mask.to(lc.k.dtype), m * S

    def attend_step(self, q, qr, lc, pos0):
        """One new query at pos0 over its tile's kept blocks (gathered once per tile) and its own block so
        far: one fused SDPA call with the gate bias as its additive mask."""
        if qr.shape[2] != 1:
            raise ValueError("ASCA decodes one byte per step after the prefill")
        S = self.S
        b = pos0 // S
        if lc.tile is None or lc.tile[0] != b:
            if pos0 % S:
                raise RuntimeError(f"decoding state lost: position {pos0} is inside tile {b}, whose choice is unknown")
            lc.tile = self.choose_tile(lc, b, self.gate_query(q, qr)[:, :, 0])
        _, keys, vals, mask, start = lc.tile
        n = start + pos0 + 1 - b * S
        keys[:, :, n - 1], vals[:, :, n - 1] = lc.k[:, :, pos0], lc.v[:, :, pos0]
        return F.scaled_dot_product_attention(qr, keys[:, :, :n], vals[:, :, :n], attn_mask=mask[:, :, None, :n])

    # --- diagnostics and FLOPs (the trainer logs whatever this returns)
    def selection_stats(self, last):
        """Per (sequence, head) of one forward's Selection: kept causal pairs (B, nh), all causal pairs (a
        float), kept past blocks per real tile (B, nh, nb), the kept/causal/past block masks (nb, nb)."""
        selected, T = last.selected, last.seq_len
        S = self.S
        nb = -(-T // S)  # blocks holding real tokens (the flex path may pad further)
        sel = selected[..., :nb, :nb].float()
        lens = torch.full((nb,), float(S), device=sel.device)
        lens[-1] = T - S * (nb - 1)  # real tokens in each block (the last may be padded)
        pairs = lens[:, None] * lens[None, :]
        eye = torch.eye(nb, dtype=torch.bool, device=sel.device)
        pairs = torch.where(eye, lens[:, None] * (lens[:, None] + 1) / 2, pairs)
        causal = torch.ones(nb, nb, device=sel.device).tril()
        past = torch.ones(nb, nb, device=sel.device).tril(-1)
        n_past = (sel * past).sum(-1).long()  # (B, nh, nb)
        return (sel * pairs * causal).sum(dim=(-1, -2)), (pairs * causal).sum().item(), n_past, sel, causal, past

    def diagnostics(self):
        """Measured from the last forward's selection: pair sparsity (fraction of causal query-key pairs
        skipped), skipped-block fraction (of causal blocks, own block included), per head; the
        scheduled target; mean kept-block distance (in blocks) per head; mean gate of kept blocks; with an
        adaptive budget the threshold and the spread of kept past blocks over tiles and sequences."""
        if self.last_selection is None:
            return {}
        last = self.last_selection
        kept_pairs, total_pairs, n_past, sel, causal, past = self.selection_stats(last)
        nb = sel.shape[-1]
        pair_sparsity = (1 - kept_pairs / total_pairs).mean(0)  # (nh,)
        block_sparsity = (1 - (sel * causal).sum(dim=(-1, -2)) / causal.sum()).mean(0)
        dist = (torch.arange(nb, device=sel.device)[:, None] - torch.arange(nb, device=sel.device)[None, :]).float()
        kept_past = sel * past
        mean_dist = ((kept_past * dist).sum(dim=(-1, -2)) / kept_past.sum(dim=(-1, -2)).clamp(min=1)).mean(0)
        bias = last.gate_bias[..., :nb, :nb]
        gate = (bias.exp() * kept_past).sum() / kept_past.sum().clamp(min=1)
        out = {"sparsity": pair_sparsity.mean().item(), "block_sparsity": block_sparsity.mean().item(),
               "sparsity_target_now": self.sparsity, "sparsity_per_head": pair_sparsity.tolist(),
               "block_sparsity_per_head": block_sparsity.tolist(), "kept_block_distance": mean_dist.mean().item(),
               "kept_block_distance_per_head": mean_dist.tolist(), "gate_mean": gate.item()}
        if self.adaptive:
            t = self.threshold.tolist()  # None: -inf, every block kept (strict JSON has no -inf)
            out["budget_threshold"] = sum(t) / len(t) if all(map(math.isfinite, t)) else None
            out["budget_threshold_per_head"] = [x if math.isfinite(x) else None for x in t]
            out["kept_blocks_sd"] = n_past.float().std().item() if n_past.numel() > 1 else 0.0
        return out

    # --- a tally over many forwards (the trainer counts the test split with it)
    def start_tally(self):
        self.tally = None
        self.counting = True

    def tally_step(self):
        """Add the last forward's selection to the tally: kept and causal pairs per head, and a histogram
        per head of how many past blocks the tiles kept (the sink counts; the own block does not)."""
        if not self.counting or self.last_selection is None:
            return
        kept_pairs, total_pairs, n_past, _, _, _ = self.selection_stats(self.last_selection)
        hist = F.one_hot(n_past, self.block_size // self.S).sum(dim=(0, 2))  # (nh, max past blocks + 1)
        if self.tally is None:
            self.tally = {"kept": kept_pairs.new_zeros(kept_pairs.shape[1], dtype=torch.float64), "total": 0.0,
                          "hist": torch.zeros_like(hist)}
        self.tally["kept"] += kept_pairs.double().sum(0)
        self.tally["total"] += total_pairs * n_past.shape[0]
        self.tally["hist"] += hist

    def end_tally(self):
        """{'sparsity', 'sparsity_per_head', 'kept_blocks_hist_per_head'} over the tallied forwards."""
        self.counting = False
        t, self.tally = self.tally, None
        if t is None:
            return {}
        per_head = 1 - t["kept"] / t["total"]
        return {"sparsity": per_head.mean().item(), "sparsity_per_head": per_head.tolist(),
                "kept_blocks_hist_per_head": t["hist"].tolist()}

    def attn_flops_per_token(self, T):
        """Dense causal FLOPs (6 C T) scaled by the kept fraction of causal pairs under the schedule,
        plus the predictor's (small) matmuls."""
        nb = T // self.S
        kept = (keep_counts(nb, self.S, T, self.sparsity, self.keep_first).sum().item() * self.S ** 2
                + nb * self.S * (self.S + 1) / 2) / (T * (T + 1) / 2)
        g = self.predictor.gate_dim
        hs = self.n_embd // self.n_head
        # predictor per head and sequence: q MLP (hs*g + g*g) and key projection (hs*g) on nb rows each, and
        # the nb x nb score matrix (g*nb per row); x2 for multiply-add, x3 for forward + backward = 6,
        # spread over the T tokens of the sequence
        gate = 6 * self.n_head * (nb * (hs * g * 2 + g * g + g * nb) / T)
        return 6 * self.n_embd * T * kept + gate


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


# ----------------------------------------------------------------------------- registry

ASCA = register(ModelKind("asca", ASCAConfig, AdaptiveSparseCausalSelfAttention, "novel_model.py", "out/novel"))
make_model = ASCA.make_model

if __name__ == "__main__":  # python novel_model.py [config/X.py ...] [--key=value ...]
    import trainer
    sys.exit(trainer.main(sys.argv[1:], "asca"))
