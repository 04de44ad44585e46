"""
ASCA's block selection: which earlier key blocks each query tile keeps, and everything that owns state about
it (adaptive-span style: the module owns its schedule, its controller and its diagnostics; the attention and
the trainer only call it).

    BlockSelector(config)       per layer; the attention calls plan(q, k) -> Selection for the kernels
      .predictor                ContentBasedAdaptiveSparsity: scores (B, nh, nb, nb) from the tiles' first
                                queries and the blocks' mean keys (docs/design.md, "causal by construction")
      scores(q, k)              the predictor's, or a control rule's ('local', 'random', 'pooled', 'oracle':
                                selector key; 'oracle' is an analysis control that saves nothing; 'local_gated'
                                keeps the local rule's blocks with the predictor's gate bias)
      select(q, k)              scores, then rank(): per tile its own block, the sink, then past blocks by score
      counts(scores)            past blocks kept per tile, always (B, nh, nb): the fixed budget's scheduled
                                counts, or the adaptive budget's blocks above the threshold
      set_step / update_budget  the sparsity schedule (its warm-up, and dense from dense_from on), and the
                                adaptive threshold's controller
      last, diagnostics, tallies, flops_per_token

S = sparse_block_size, nb = T / S; tile b = queries b*S .. b*S+S-1, block j = keys likewise.
"""
import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

SELECTORS = ("learned", "local", "random", "pooled", "oracle", "local_gated", "task_oracle", "nsa")
# the selectors whose kept blocks carry the predictor's gate bias (logsigmoid of its score): the learned choice, and
# 'local_gated' (the nearest blocks, scaled by the trained gate: separates the choice from the scaling)
GATED = ("learned", "local_gated")
# the selectors that read the attention's own q and k (as attended), not the predictor's inputs
READS_ATTENDED = ("pooled", "oracle", "nsa")
# the selectors that read the input bytes (see_tokens): 'task_oracle' knows the synthetic recall task's layout
READS_TOKENS = ("task_oracle",)
# attention recall is measured for the run's own selection and for these two at the same counts
RECALL_CHOICES = ("own", "local", "oracle")


# ----------------------------------------------------------------------------- schedule arithmetic

def forced_past(nb, keep_first, local=0, device=None):
    """(nb, nb) bool: the past blocks every tile keeps whatever its budget: the sink (block 0, with keep_first)
    and the `local` nearest past blocks (local_blocks: every byte then sees at least local * S bytes
    back). They count in the budget; the budget decides on the other past blocks."""
    b = torch.arange(nb, device=device)
    d = b[:, None] - b[None, :]  # tile minus block
    forced = (d >= 1) & (d <= local)
    if keep_first:
        forced |= (b[None, :] == 0) & (d >= 1)
    return forced


def _skippable(nb, keep_first, local=0, cap=None):
    """(nb,) past blocks of tile b that may be skipped: all but the forced ones; with an absolute budget (cap: the
    past blocks a tile keeps at most, keep_tokens) only those beyond the cap, so a tile with cap or fewer past
    blocks stays dense."""
    b = torch.arange(nb)
    free = b - forced_past(nb, keep_first, local).sum(-1)
    return free if cap is None else torch.minimum(free, (b - cap).clamp(min=0))


def max_sparsity(T, S, keep_first, local=0, cap=None):
    nb = -(-T // S)
    return _skippable(nb, keep_first, local, cap).sum().item() * S * S / (T * (T + 1) / 2)


def padded_length(T, S, bucket_max=None):
    """T rounded up to whole blocks of S; with bucket_max, to S * 2^k blocks (capped at bucket_max)."""
    Tp = -(-T // S) * S
    if bucket_max is not None and Tp < bucket_max:
        Tp = min(bucket_max, S * (1 << (Tp // S - 1).bit_length()))
    return Tp


def blocks_to_skip(sparsity, T, S, skippable):
    """How many past blocks a fixed budget skips at this sparsity over all tiles: round(sparsity * causal pairs /
    S^2), at most the `skippable` ones in all (forced_past's never are). Pure Python: set_step calls it per step."""
    return min(skippable, round(sparsity * T * (T + 1) / 2 / (S * S)))


def count_rows(nb, keep_first, local, ns, cap=None):
    """(len(ns), nb) int64: row i is the keep counts of tiles 0..nb-1 when ns[i] blocks are skipped in all, spread
    over tiles in proportion to how many each may skip (cumulative rounding), so every tile keeps about the same
    fraction (with a cap: all skipped, each tile keeps min(b, cap))."""
    skippable = _skippable(nb, keep_first, local, cap)
    total = int(skippable.sum())
    n = torch.tensor(list(ns), dtype=torch.float64)[:, None]
    cum = torch.round(n * torch.cumsum(skippable, 0).double() / max(total, 1)).long()  # (len(ns), nb)
    return torch.arange(nb) - torch.diff(cum, dim=1, prepend=torch.zeros(len(ns), 1, dtype=torch.long))


def keep_counts(nb, S, T, sparsity, keep_first, local=0, cap=None):
    """Past blocks kept per query tile (own block not counted), LongTensor (nb,): count_rows' row for
    blocks_to_skip at this sparsity. Never drops one of forced_past's blocks."""
    n = blocks_to_skip(sparsity, T, S, int(_skippable(nb, keep_first, local, cap).sum()))
    return count_rows(nb, keep_first, local, [n], cap)[0]


COUNT_TABLE_MAX = 1 << 22  # entries of a layer's count table (16 MB in int32); a larger one keeps dense and target


def block_masks(nb, device, keep_first=False, local=0):
    """The block-level masks every part of ASCA reads, (nb, nb) bool each: causal (j <= b), past (j < b: the
    complete blocks before tile b) and candidates (past blocks a budget decides on: forced_past's excepted)."""
    b = torch.arange(nb, device=device)
    causal = b[None, :] <= b[:, None]
    past = b[None, :] < b[:, None]
    return causal, past, past & ~forced_past(nb, keep_first, local, device)


@dataclass
class Selection:
    """One layer's block choice in one forward: the record the kernels, diagnostics, extraction.py and
    the tests all read (nb = padded length / S; tile b = queries b*S .. b*S+S-1; block j = keys likewise)."""
    scores: torch.Tensor  # (B, nh, nb, nb) predictor scores; meaningful for j < b only
    order: torch.Tensor  # (B, nh, nb, nb) int64: own block first, then the sink, then past blocks by score
    n_past: torch.Tensor  # (B, nh, nb) int64: past blocks each tile keeps (own block not counted)
    selected: torch.Tensor  # (B, nh, nb, nb) bool: kept blocks, own block included
    gate_bias: torch.Tensor  # (B, nh, nb, nb) >= fp32: logsigmoid(score) on kept past blocks, 0 elsewhere
    seq_len: int  # real tokens; blocks past them are padding

    def detach(self):
        return Selection(*(t.detach() for t in (self.scores, self.order, self.n_past, self.selected, self.gate_bias)),
                         self.seq_len)


@torch.no_grad()
def first_query_block_mass(q, k, S):
    """(B, nh, nb, nb) float32: the attention of each tile's first query (position b*S) over the keys before its
    tile, summed per key block and renormalised to 1 over those blocks (rows with no past block: 0). q and k as
    attended (rotated), (B, nh, T, hs), T % S == 0. Cost per head: nb x T (one query per tile)."""
    B, H, T, hs = q.shape
    nb = T // S
    qt = q[:, :, ::S].float()  # (B, nh, nb, hs)
    logits = qt @ k.float().transpose(-1, -2) / math.sqrt(hs)  # (B, nh, nb, T)
    before = torch.arange(T, device=q.device)[None, :] < (torch.arange(nb, device=q.device) * S)[:, None]
    probs = torch.softmax(logits.masked_fill(~before, float("-inf")), dim=-1).nan_to_num(0.0)  # row 0: nothing before
    return probs.view(B, H, nb, nb, S).sum(-1)


def compressed_block_probs(q, k, S, ck):
    """(B, nh, nb, nb) float32: NSA's selection scores. Each tile's first query's attention probabilities over the
    compressed tokens of the blocks before its tile (a block's mean key, through the compressed branch's own key
    projection ck (nh, hs, hs)), renormalised over those blocks; rows with no past block: 0. One compressed token per
    block, so a block's score is its token's probability. Causal: block j < b summarises keys before position b*S."""
    B, H, T, hs = q.shape
    nb = T // S
    kb = k.float().reshape(B, H, nb, S, hs).mean(3) @ ck.float()[None]  # (B, nh, nb, hs)
    logits = q[:, :, ::S].float() @ kb.transpose(-1, -2) / math.sqrt(hs)  # (B, nh, nb, nb)
    past = torch.arange(nb, device=q.device)[None, :] < torch.arange(nb, device=q.device)[:, None]
    return torch.softmax(logits.masked_fill(~past, float("-inf")), dim=-1).nan_to_num(0.0)


def pooled_scores(q, k, S):
    """(B, nh, nb, nb) float32: the first query of each tile (position b*S) dotted with each block's mean key, scaled
    as attention logits (MoBA's gate). Meaningful for blocks before the tile; q, k as attended, T % S == 0."""
    B, H, T, hs = q.shape
    qt = q[:, :, ::S].float()  # (B, nh, nb, hs)
    kb = k.float().view(B, H, T // S, S, hs).mean(dim=3)  # (B, nh, nb, hs)
    return qt @ kb.transpose(-1, -2) / math.sqrt(hs)


# ----------------------------------------------------------------------------- predictor

class ContentBasedAdaptiveSparsity(nn.Module):
    """Scores (B, nh, nb, nb): for query tile b and key block j < b, how much tile b wants block j.

    score[b, j] = <MLP_h(q at b*S), W_h mean(k of block j)> / sqrt(gate_dim) + dist_h[b - j - 1] + c_h
                  [+ a_h <q at b*S, mean(k of block j)> / sqrt(hs)   with pooled=True: MoBA's affinity, learned weight]
    Entries with j >= b are meaningless and masked by the caller.
    """

    def __init__(self, n_head, head_size, gate_dim, n_blocks, dist_bias=True, pooled=False, key_pool="mean"):
        super().__init__()
        self.gate_dim = gate_dim
        self.key_pool = key_pool  # how a block's keys are summarised: 'mean', or 'max' per dimension
        self.head_size = head_size
        self.wq1 = nn.Parameter(torch.empty(n_head, head_size, gate_dim))
        self.wq2 = nn.Parameter(torch.empty(n_head, gate_dim, gate_dim))
        self.wk = nn.Parameter(torch.empty(n_head, head_size, gate_dim))
        # index: b - j - 1; without it the scores see no distance (a content-only gate)
        self.dist_bias = nn.Parameter(torch.zeros(n_head, max(1, n_blocks))) if dist_bias else None
        self.offset = nn.Parameter(torch.empty(n_head))
        # the raw pooled affinity (selector='pooled''s score) as one more input, its weight per head learned
        self.pooled_weight = nn.Parameter(torch.empty(n_head)) if pooled else None
        self.reset_parameters()

    def reset_parameters(self):
        # nn.Parameters, not Linear/Embedding: GPT._init_weights leaves them to this
        for w in (self.wq1, self.wq2, self.wk):
            nn.init.normal_(w, std=1.0 / math.sqrt(w.shape[1]))
        if self.dist_bias is not None:
            nn.init.zeros_(self.dist_bias)
        # start near-neutral: logsigmoid(2) = -0.13 on every past block
        nn.init.constant_(self.offset, 2.0)
        if self.pooled_weight is not None:  # starts as pooled's ranking plus the MLP's; training may turn it down
            nn.init.ones_(self.pooled_weight)

    def forward(self, q, k, S):
        B, H, T, hs = q.shape
        nb = T // S
        qt = q[:, :, ::S, :]  # (B, nh, nb, hs): first query of each tile
        kb = self.pool_keys(k.view(B, H, nb, S, hs))  # (B, nh, nb, hs): each block's key summary
        return self.score(qt, kb, torch.arange(nb, device=q.device))

    def pool_keys(self, blocks):
        """(..., n, hs) summaries of key blocks (..., n, S, hs): the mean, or the per-dimension max, which keeps a
        block's one distinctive key from being averaged away by the others (SeerAttention, Quest pool this way)."""
        return blocks.amax(dim=-2) if self.key_pool == "max" else blocks.mean(dim=-2)

    def score(self, qt, kb, rows):
        """Scores (B, nh, r, n) of tiles `rows` (r,), whose first queries are qt (B, nh, r, hs), for the
        blocks 0..n-1 whose mean keys are kb (B, nh, n, hs). Decoding asks for one row. The inputs are cast to
        the weights' dtype: bf16 q and k from a module kept in fp32 (bench_attention, a test outside autocast)
        must not fail, and under autocast the einsums cast both again as they always did."""
        qt, kb = qt.to(self.wq1.dtype), kb.to(self.wq1.dtype)
        gq = torch.einsum("bhng,hgf->bhnf", F.gelu(torch.einsum("bhnd,hdg->bhng", qt, self.wq1)), self.wq2)
        gk = torch.einsum("bhnd,hdg->bhng", kb, self.wk)
        scores = gq @ gk.transpose(-1, -2) / math.sqrt(self.gate_dim)  # (B, nh, r, n)
        scores = scores + self.offset[None, :, None, None]
        if self.pooled_weight is not None:
            pooled = qt @ kb.transpose(-1, -2) / math.sqrt(self.head_size)  # (B, nh, r, n), as pooled_scores
            scores = scores + self.pooled_weight[None, :, None, None] * pooled
        if self.dist_bias is None:
            return scores
        j = torch.arange(kb.shape[2], device=kb.device)
        dist = (rows[:, None] - j[None, :] - 1).clamp(0, self.dist_bias.shape[1] - 1)  # (r, n)
        return scores + self.dist_bias[:, dist][None]


# ----------------------------------------------------------------------------- the selector

class BlockSelector(nn.Module):
    """Per layer: the predictor, the sparsity schedule, the budget (fixed or adaptive) and its controller,
    the last Selection, and what is measured from it (diagnostics, tallies)."""

    def __init__(self, config, layer=0):
        super().__init__()
        self.S = S = config.sparse_block_size
        self.keep_first = config.keep_first_block
        self.local = config.local_blocks  # the nearest past blocks always kept (forced_past)
        self.layer = layer
        self.target = config.layer_targets()[layer]  # this layer's share of the budget (layer_sparsity, keep_tokens)
        self.cap = config.keep_cap()  # keep_tokens: past blocks a tile keeps at most (None: a ratio budget)
        self.dense_from = config.dense_from  # from this fraction of the run on, every block is kept
        self.gate_loss = config.gate_loss  # weight of the distillation loss (aux_loss); 0 = none
        self.aux_inputs, self.last_kl = None, None  # for aux_loss: the last training forward's inputs; its KL
        self.warmup = config.sparsity_warmup_iters
        self.block_size = config.block_size
        self.n_head = config.n_head
        self.head_size = config.n_embd // config.n_head
        self.predictor = ContentBasedAdaptiveSparsity(config.n_head, self.head_size, config.gate_dim,
                                                      config.block_size // S, dist_bias=config.gate_dist_bias,
                                                      pooled=config.gate_pooled, key_pool=config.gate_key_pool)
        self.rule = config.selector  # 'local' and 'random' are fixed rules: no predictor call, no gate bias
        self.trained_rule = None  # the rule the model trained with, once swap_choice put another in its place
        self.tokens = None  # the forward's input bytes, for a rule that reads them (READS_TOKENS; see_tokens)
        self.nsa_ck = None  # 'nsa': the compressed branch's key projection (nh, hs, hs), which the scores read
        if self.rule == "nsa":
            self.nsa_ck = nn.Parameter(torch.eye(self.head_size).repeat(self.n_head, 1, 1))
        self.distance_cost = config.rank_distance_cost  # learned choice: ranks by score - cost x blocks between
        self.explore = config.explore_noise  # learned choice, training: ranks by score + explore x Gumbel noise
        # per-tile keep counts at T = block_size live in a buffer, so a changing schedule never changes Python
        # values that torch.compile would guard on (no recompiles during warm-up). The counts of every integer step
        # of the warm-up are rows of a table on the same device, made once: set_step copies a row device to device,
        # never from host memory, which on a GPU would wait for it at each step. A position
        # between steps (a time budget's schedule) copies its counts from the host.
        nb = config.block_size // S
        self.skippable = int(_skippable(nb, self.keep_first, self.local, self.cap).sum())
        ns = sorted({self.skips_at(i) for i in range(min(self.warmup, 100_000) + 1)} | {0, self.skips_at(math.inf)})
        if len(ns) * nb > COUNT_TABLE_MAX:
            ns = [0, self.skips_at(math.inf)]
        self._rows = {n: i for i, n in enumerate(ns)}
        self.register_buffer("count_table", count_rows(nb, self.keep_first, self.local, ns, self.cap).int(),
                             persistent=False)
        self.register_buffer("n_keep", self.count_table[0].long(), persistent=False)
        self.sparsity, self._skips, self._cand_index = 0.0, 0, {}
        self.set_step(0)
        self.last = None  # Selection of the last forward
        self.replay = None  # (order, n_past) another forward chose: rank() returns it (replaying(); checks only)
        self.adaptive = config.budget == "adaptive"
        self.budget_ema = config.budget_ema
        self.per_head = config.budget_scope == "head"
        if self.adaptive:  # per head: keep a past block if its score > threshold; -inf = keep all; in checkpoints
            self.register_buffer("threshold", torch.full((config.n_head,), float("-inf")))
        self.tally, self.counting = None, False  # sums over forwards between start_tally and end_tally
        self.recall_sum = None  # (sums (3, nh), forwards) of recall() in a tally

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "threshold"  # checkpoints from before budget_scope hold one threshold per layer
        if self.adaptive and key in state_dict and state_dict[key].dim() == 0:
            state_dict[key] = state_dict[key].expand(self.threshold.shape).clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # --- schedule (the trainer calls set_step with its schedule position)
    def sparsity_at(self, iter_num):
        frac = 1.0 if self.warmup == 0 else min(1.0, iter_num / self.warmup)
        return self.target * frac

    def skips_at(self, iter_num):
        """Past blocks the fixed budget skips over all tiles at this schedule position."""
        return blocks_to_skip(self.sparsity_at(iter_num), self.block_size, self.S, self.skippable)

    def set_step(self, iter_num, progress=None):
        """The schedule position (iterations) and the run's progress in [0, 1] (None: not known, e.g. the start-up
        check's end of the warm-up): from progress dense_from on, the sparse-then-dense recipe keeps every block."""
        self.step_pos, self.progress = iter_num, progress
        dense = progress is not None and self.dense_from < 1.0 and progress >= self.dense_from  # 1 = never
        self.sparsity = 0.0 if dense else self.sparsity_at(iter_num)
        n = blocks_to_skip(self.sparsity, self.block_size, self.S, self.skippable)
        if n != self._skips:  # each step of the warm-up, then never
            row = self._rows.get(n)
            self.n_keep.copy_(self.count_table[row] if row is not None else
                              count_rows(self.block_size // self.S, self.keep_first, self.local, [n], self.cap)[0])
            self._skips = n

    # --- selection
    def scores(self, q, k):
        """(B, nh, nb, nb) scores for padded q, k (B, nh, T, hs), T % S == 0: the predictor's (it learns
        through the gate bias, so it reads q and k detached) or a control rule's. 'pooled' and 'oracle' read the
        attention's own q and k (the caller passes them as attended), 'learned' the predictor's inputs.
        - 'pooled' (MoBA's gate, no parameters): the tile's first query's dot product with each block's mean key;
        - 'oracle' (the ceiling at the same counts, an analysis control: it computes a dense row per tile, so it
          saves nothing): the dense attention mass the tile's first query puts on each block before its tile.
        Both read only the first query of a tile and keys before it, as the predictor does: causal by construction."""
        if q.shape[2] > self.block_size:
            raise ValueError(f"sequence length {q.shape[2]} exceeds block_size {self.block_size}")
        if self.rule in GATED:
            return self.predictor(q.detach(), k.detach(), self.S)
        if self.rule == "pooled":
            return pooled_scores(q.detach(), k.detach(), self.S)
        if self.rule == "oracle":
            return first_query_block_mass(q.detach(), k.detach(), self.S)
        if self.rule == "nsa":  # the compressed branch's attention of the tile's first query (its key projection)
            return compressed_block_probs(q.detach(), k.detach(), self.S, self.nsa_ck.detach())
        if self.rule == "task_oracle":  # the block holding the record the tile's first byte asks for (recall_task.py)
            import recall_task
            if self.tokens is None:
                raise ValueError("selector='task_oracle' reads the input bytes: call the model, not the attention")
            nb = q.shape[2] // self.S
            scores = recall_task.task_oracle_scores(self.tokens, self.S, nb).to(q.device)
            return scores[:, None].expand(q.shape[0], q.shape[1], nb, nb)
        return self.rule_scores(q.shape[0], q.shape[1], q.shape[2] // self.S, q.device)

    def rule_scores(self, B, H, nb, device, rule=None):
        """The control rules' scores (B, nh, nb, nb), read by rank() as the predictor's are: 'local' ranks a
        tile's past blocks by nearness (score j - b); 'random' by a uniform draw from torch's generator (the
        trainer seeds it from the run's seed and checkpoints it), new each forward. Neither reads the
        content, so both are causal by construction."""
        if (rule or self.rule) == "local":
            b = torch.arange(nb, device=device, dtype=torch.float32)
            return (b[None, :] - b[:, None]).expand(B, H, nb, nb)
        return torch.rand(B, H, nb, nb, device=device)

    def select(self, q, k, own_inputs=None):
        """(scores, order, n_past) for padded q, k: the scores, then rank()'s order and counts. own_inputs: the
        trained predictor's padded inputs where another rule chooses (swap_choice) at the model's adaptive counts."""
        scores = self.scores(q, k)
        order, n_past = self.rank(scores)
        if own_inputs is not None:
            n_past = self.counts(self.predictor(*(t.detach() for t in own_inputs), self.S))
        return scores, order, n_past

    def swap_choice(self, rule):
        """Score the trained model with another rule's choice of blocks at its own counts (eval_selector): the fixed
        budget's counts are the schedule's anyway; an adaptive budget's come from the trained predictor's scores
        against its thresholds, which the attention passes as own_inputs (trained_rule says to)."""
        self.trained_rule, self.rule = self.rule, rule

    def candidates(self, nb, device):
        """(nb, nb) bool: the blocks a budget decides on: complete past blocks, the forced ones excepted."""
        return block_masks(nb, device, self.keep_first, self.local)[2]

    def forced(self, nb, device):
        """(nb, nb) bool: the past blocks kept whatever the budget (the sink, the local blocks)."""
        return forced_past(nb, self.keep_first, self.local, device)

    def candidate_index(self, nb, device):
        """The candidates' flat positions in an (nb, nb) grid, row-major (boolean indexing's order), made once per
        nb and device: indexing with a boolean mask on a GPU asks the host for the count, a sync per layer."""
        key = (nb, str(device))
        if key not in self._cand_index:
            self._cand_index[key] = self.candidates(nb, "cpu").flatten().nonzero().squeeze(1).to(device)
        return self._cand_index[key]

    def counts(self, scores):
        """Past blocks each tile keeps, (B, nh, nb) int64 (own block not counted). Fixed budget: the
        scheduled counts (a shorter sequence uses the first tiles': tile b's choice never depends on the
        length). Adaptive: the forced blocks (sink, local) plus every other past block scoring above the threshold."""
        B, H, nb = scores.shape[:3]
        if not self.adaptive:
            return self.n_keep[:nb].expand(B, H, nb)
        acc = torch.promote_types(scores.dtype, torch.float32)  # as budget_estimate: no rounding either side
        above = (scores.detach().to(acc) > self.threshold.to(acc)[:, None, None]) & self.candidates(nb, scores.device)
        return above.sum(-1) + self.forced(nb, scores.device).sum(-1)

    def rank(self, scores):
        """(order, n_past) from the scores (B, nh, nb, nb) alone: per tile its own block first, then the forced
        blocks (the sink, then the local ones, by index), then past blocks by descending score; and counts(scores)."""
        if self.replay is not None:
            return self.replay
        if self.rule == "local_gated":  # the local rule's order; the scores only scale the kept blocks (gate_bias)
            B, H, nb = scores.shape[:3]
            return self.order_by(self.rule_scores(B, H, nb, scores.device, "local")), self.counts(scores)
        prio = scores
        if self.distance_cost:  # the learned choice, nearness-biased: ranked by score - cost x (blocks between)
            prio = scores.detach().float() - self.distance_penalty(scores.shape[-1], scores.device)
        if self.explore and self.training:  # Gumbel-top-k: a sample without replacement, not the top scores
            u = torch.rand(prio.shape, device=prio.device).clamp_min(torch.finfo(torch.float32).tiny)
            prio = prio.detach().float() - self.explore * torch.log(-torch.log(u))
        return self.order_by(prio), self.counts(scores)

    def distance_penalty(self, nb, device):
        """(nb, nb) float32: rank_distance_cost x (b - j - 1) for tile b and block j < b, 0 elsewhere: what ranking
        costs a block for each block between it and its tile."""
        b = torch.arange(nb, device=device, dtype=torch.float32)
        return self.distance_cost * (b[:, None] - b[None, :] - 1).clamp(min=0)

    def order_by(self, scores):
        """rank()'s order for these scores (B, nh, nb, nb), whatever the budget."""
        nb = scores.shape[-1]
        device = scores.device
        past = block_masks(nb, device)[1]
        prio = scores.detach().float().masked_fill(~past, float("-inf"))
        prio = prio.masked_fill(torch.eye(nb, dtype=torch.bool, device=device), float("inf"))
        prio = prio.masked_fill(self.forced(nb, device), torch.finfo(torch.float32).max)  # after own, before the rest
        return torch.argsort(prio, dim=-1, descending=True, stable=True)

    @contextlib.contextmanager
    def replaying(self, sel):
        """rank() returns Selection `sel`'s order and counts instead of its own: a check compares two paths' function
        on one block choice. In bf16 two graphs round q and k differently, and a near-tie between two blocks' scores
        picks another block in about 8% of seeds: a difference of choice, not of the function. The
        scores stay this path's own, so the predictor's gradient is its own too."""
        self.replay = (sel.order, sel.n_past)
        try:
            yield
        finally:
            self.replay = None

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
        acc = torch.promote_types(scores.dtype, torch.float32)
        if self.rule not in GATED:
            return torch.zeros(scores.shape, dtype=acc, device=scores.device)
        past = block_masks(scores.shape[-1], scores.device)[1]
        zero = torch.zeros((), dtype=acc, device=scores.device)
        return torch.where(selected & past, F.logsigmoid(scores.to(acc)), zero)

    def choose_row(self, row, b):
        """Tile b's choice from its scores row (B, nh, b) over the b blocks before it, as rank() and gate_bias()
        make it in a forward of b + 1 blocks, computed for that row only (decoding chooses one tile at a time;
        ranking the full (b+1, b+1) grid was about a third of a tile's choice at 8k, docs/results/decoding_cpu.md).
        Returns (blocks, n, bias): blocks (B, nh, m) the kept past blocks in rank order (the forced ones first),
        n (B, nh) each head's count, m the largest, and bias (B, nh, m) the gate bias of each, -inf beyond a
        head's count (a padded slot)."""
        nb = b + 1
        forced = self.forced(nb, row.device)[b, :b]  # (b,)
        if self.rule == "local_gated":  # as rank()'s: the local rule's order (nearest first); the scores only gate
            prio = self.rule_scores(1, 1, nb, row.device, "local")[0, 0, b, :b].expand(row.shape)
        else:  # the scores (less the distance cost, if any), as rank()'s
            prio = row.detach().float()
            if self.distance_cost:
                prio = prio - self.distance_penalty(nb, row.device)[b, :b]
        prio = prio.masked_fill(forced, torch.finfo(torch.float32).max)  # as order_by's row b
        order = torch.argsort(prio, dim=-1, descending=True, stable=True)  # (B, nh, b)
        acc = torch.promote_types(row.dtype, torch.float32)
        if self.adaptive:  # as counts(): forced blocks plus candidates above the threshold
            above = (row.detach().to(acc) > self.threshold.to(acc)[:, None]) & self.candidates(nb, row.device)[b, :b]
            n = above.sum(-1) + forced.sum()
        else:
            n = self.n_keep[b].expand(row.shape[:2])
        m = int(n.max()) if n.numel() else 0
        blocks = order[..., :m]
        bias = (F.logsigmoid(row.to(acc)).gather(-1, blocks) if self.rule in GATED
                else torch.zeros(blocks.shape, dtype=acc, device=row.device))
        unused = torch.arange(m, device=row.device) >= n[..., None]
        return blocks, n, bias.masked_fill(unused, float("-inf"))

    def selection(self, scores, order, n_past, seq_len):
        selected = self.block_selection(order, n_past)
        return Selection(scores, order, n_past, selected, self.gate_bias(scores, selected), seq_len)

    def plan(self, q, k, seq_len=None, own_inputs=None):
        """The Selection for padded q, k (B, nh, T, hs), T % S == 0: everything the kernels need."""
        chosen = self.select(q, k) if own_inputs is None else self.select(q, k, own_inputs)
        return self.selection(*chosen, q.shape[2] if seq_len is None else seq_len)

    def remember(self, sel):
        self.last = sel.detach()  # diagnostics(), the budget controller, extraction.py and tests read it

    # --- the distillation loss (gate_loss; DeepSeek's sparse attention trains its indexer this way)
    def remember_inputs(self, q, k, gq, gk, seq_len):
        """Keep the last training forward's padded q, k as attended and the predictor's inputs, detached, for
        aux_loss (which runs outside the model's forward, so a compiled forward returns no grad-carrying state)."""
        if self.gate_loss > 0 and self.rule == "learned" and torch.is_grad_enabled():
            self.aux_inputs = (*(t.detach() for t in (q, k, gq, gk)), seq_len)

    def aux_loss(self):
        """gate_loss * KL(target || the predictor's softmax) over each tile's past blocks, from the last training
        forward; None when off. The target is first_query_block_mass: where the tile's first query (the one the
        selection reads) puts its dense attention over the blocks before its tile, detached. Tiles with fewer than
        two past blocks have nothing to learn and are left out. Only the predictor's parameters get its gradient."""
        if self.aux_inputs is None:
            return None
        q, k, gq, gk, seq_len = self.aux_inputs
        self.aux_inputs = None
        S = self.S
        rows = slice(2, -(-seq_len // S))  # tiles holding real queries, with >= 2 past blocks
        target = first_query_block_mass(q, k, S)[:, :, rows]  # (B, nh, r, nb)
        scores = self.predictor(gq, gk, S)[:, :, rows].float()
        nb = scores.shape[-1]
        past = block_masks(nb, scores.device)[1][rows]  # (r, nb)
        if past.shape[0] == 0:
            return None
        logq = F.log_softmax(scores.masked_fill(~past, float("-inf")), dim=-1)
        kl = torch.where(past, torch.xlogy(target, target) - target * logq, torch.zeros((), device=scores.device))
        kl = kl.sum(-1).mean()
        self.last_kl = kl.detach()  # diagnostics() reads it (no host sync here)
        return self.gate_loss * kl

    # --- the adaptive budget's controller
    @torch.no_grad()
    def budget_estimate(self):
        """(nh,) thresholds that would have skipped exactly the scheduled number of blocks in the last
        forward: the midpoint between the K-th and (K+1)-th lowest candidate score of a pool. The pool is
        the layer's (all sequences and heads: heads and inputs share the budget unevenly) or, with
        budget_scope='head', each head's own (its sequences and tiles share it). -inf: nothing to skip."""
        sel = self.last
        S, T = self.S, sel.seq_len
        nb = T // S  # complete tiles (training windows are whole blocks)
        B, H = sel.scores.shape[:2]
        per_seq = int((torch.arange(nb) - keep_counts(nb, S, T, self.sparsity, self.keep_first, self.local,
                                                      self.cap)).sum())
        acc = torch.promote_types(sel.scores.dtype, torch.float32)
        cand = self.candidate_index(nb, sel.scores.device)
        vals = sel.scores[..., :nb, :nb].to(acc).flatten(-2).index_select(-1, cand)
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
        if not self.adaptive or self.last is None:
            return
        est = self.budget_estimate()
        if reduce is not None:
            est = reduce(est)
        t = self.threshold
        self.threshold.copy_(torch.where(torch.isfinite(t) & torch.isfinite(est), t + self.budget_ema * (est - t), est))

    # --- diagnostics (the trainer logs whatever this returns)
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
        causal, past = (m.float() for m in block_masks(nb, sel.device)[:2])
        n_past = (sel * past).sum(-1).long()  # (B, nh, nb)
        return (sel * pairs * causal).sum(dim=(-1, -2)), (pairs * causal).sum().item(), n_past, sel, causal, past

    def diagnostics(self):
        """Measured from the last forward's selection: pair sparsity (fraction of causal query-key pairs
        skipped), skipped-block fraction (of causal blocks, own block included), per head; the
        scheduled target; mean kept-block distance (in blocks) per head; mean gate of kept blocks; with an
        adaptive budget the threshold and the spread of kept past blocks over tiles and sequences."""
        if self.last is None:
            return {}
        last = self.last
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
        if self.last_kl is not None:
            out["gate_kl"] = self.last_kl.item()  # the distillation loss's KL (nats), before its weight
        if self.adaptive:
            t = self.threshold.tolist()  # None: -inf, every block kept (strict JSON has no -inf)
            out["budget_threshold"] = sum(t) / len(t) if all(map(math.isfinite, t)) else None
            out["budget_threshold_per_head"] = [x if math.isfinite(x) else None for x in t]
            out["kept_blocks_sd"] = n_past.float().std().item() if n_past.numel() > 1 else 0.0
        return out

    # --- a tally over many forwards (the trainer counts the test split with it)
    def start_tally(self):
        self.tally, self.recall_sum = None, None
        self.counting = True

    @torch.no_grad()
    def recall(self, q, k, sel):
        """(3, nh) float64, for the first sequence of a forward: per head, the mean over its real queries of the dense
        attention mass (softmax of the query's q.k over every earlier position, q and k as attended) that lies in
        its tile's kept blocks: for this Selection, and for the blocks the local rule and the oracle would keep at
        the same counts (RECALL_CHOICES). Causal softmax per head: (nh, T, T) floats for one sequence."""
        S, T0 = self.S, sel.seq_len
        acc = torch.promote_types(q.dtype, torch.float32)
        q0, k0 = q[:1].to(acc), k[:1].to(acc)  # (1, nh, T, hs)
        _, H, T, hs = q0.shape
        nb = T // S
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        probs = torch.softmax((q0 @ k0.transpose(-1, -2) / math.sqrt(hs)).masked_fill(~causal, float("-inf")), -1)
        block_mass = probs[0].view(H, T, nb, S).sum(-1)  # (nh, T, nb): each query's mass per key block
        blocks = torch.arange(nb, device=q.device, dtype=acc)
        local = (blocks[None, :] - blocks[:, None]).expand(1, H, nb, nb)  # nearest first, as the local rule
        out = []
        for choice in RECALL_CHOICES:
            selected = sel.selected[:1] if choice == "own" else self.block_selection(
                self.order_by(local if choice == "local" else first_query_block_mass(q0, k0, S)), sel.n_past[:1])
            kept = selected[0].repeat_interleave(S, dim=1).to(acc)  # (nh, T, nb): the query's tile's kept blocks
            out.append((block_mass * kept).sum(-1)[:, :T0].mean(-1))
        return torch.stack(out).double()

    def add_recall(self, q, k, sel):
        """In a tally (evaluation): add this forward's recall (recall()) to the sums end_tally averages."""
        r = self.recall(q, k, sel)
        self.recall_sum = (r, 1) if self.recall_sum is None else (self.recall_sum[0] + r, self.recall_sum[1] + 1)

    def tally_step(self, rows=None):
        """Add the last forward's selection to the tally: kept and causal pairs per head, and a histogram
        per head of how many past blocks the tiles kept (the sink counts; the own block does not). rows: only the
        first `rows` sequences of the batch count (the others filled a short last batch up)."""
        if not self.counting or self.last is None:
            return
        last = self.last
        if rows is not None:
            last = Selection(*(t[:rows] for t in (last.scores, last.order, last.n_past, last.selected, last.gate_bias)),
                             last.seq_len)
        kept_pairs, total_pairs, n_past, _, _, _ = self.selection_stats(last)
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
        r, self.recall_sum = getattr(self, "recall_sum", None), None
        if t is None:
            return {}
        per_head = 1 - t["kept"] / t["total"]
        out = {"sparsity": per_head.mean().item(), "sparsity_per_head": per_head.tolist(),
               "kept_blocks_hist_per_head": t["hist"].tolist()}
        if r is not None:  # recall of this selection, of the local rule's and of the oracle's at the same counts
            mean = (r[0] / r[1]).cpu()
            for choice, row in zip(RECALL_CHOICES, mean):
                name = "recall" if choice == "own" else f"recall_{choice}"
                out[name], out[f"{name}_per_head"] = row.mean().item(), row.tolist()
        return out

    def kept_fraction(self, T):
        """Kept share of the causal pairs at length T under the schedule now (fixed budget's counts)."""
        nb = T // self.S
        return (keep_counts(nb, self.S, T, self.sparsity, self.keep_first, self.local, self.cap).sum().item()
                * self.S ** 2
                + nb * self.S * (self.S + 1) / 2) / (T * (T + 1) / 2)

    def window_selection(self, B, H, nb, device, seq_len):
        """NSA's window branch as a Selection: each tile's own block and its local_blocks nearest past blocks, no gate
        bias (the kernels compute it as any other choice)."""
        order = self.order_by(self.rule_scores(B, H, nb, device, "local"))
        n_past = torch.arange(nb, device=device).clamp(max=self.local).expand(B, H, nb)
        scores = torch.zeros(B, H, nb, nb, device=device)
        selected = self.block_selection(order, n_past)
        return Selection(scores, order, n_past, selected, torch.zeros_like(scores), seq_len)

    def window_fraction(self, T):
        """The window branch's share of the causal pairs at length T (its own block and local_blocks nearest)."""
        nb = T // self.S
        kept = sum(min(b, self.local) for b in range(nb)) * self.S ** 2 + nb * self.S * (self.S + 1) / 2
        return kept / (T * (T + 1) / 2)

    def flops_per_token(self, T):
        """The predictor's (small) matmuls per head and sequence: q MLP (hs*g + g*g) and key projection (hs*g)
        on nb rows each, and the nb x nb score matrix (g*nb per row; hs*nb more with gate_pooled); x2 for
        multiply-add, x3 for forward + backward = 6, spread over the T tokens of the sequence."""
        nb = T // self.S
        g, hs = self.predictor.gate_dim, self.head_size
        pooled = hs * nb if self.predictor.pooled_weight is not None else 0  # gate_pooled: the nb x nb affinities
        return 6 * self.n_head * (nb * (hs * g * 2 + g * g + g * nb + pooled) / T)
