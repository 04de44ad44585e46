"""
Adaptive Sparse Causal Attention (ASCA): the baseline GPT (gpt.py) with an attention that keeps, per query
tile, only the earlier key blocks a small learned network scores highest, and skips the rest. Train it with
novel_model.py:

    python novel_model.py config/train_enwik8_novel.py --target_sparsity=0.75

How one layer works (S = sparse_block_size, nb = T / S blocks; query tile b = queries b*S..b*S+S-1):
1. ContentBasedAdaptiveSparsity scores every complete past key block j < b for tile b from
   - the query at the tile's FIRST position b*S (the only query every member of the tile has seen),
   - the mean of block j's keys (all at positions < b*S), and a learned per-head block-distance bias.
   So the decision for any query i in tile b uses positions <= b*S <= i only: strictly causal.
   (Pooling the tile's queries would leak the future into its earlier members.)
2. The tile keeps its own block (causal inside), its local_blocks nearest past blocks (default 1: every
   byte sees at least S bytes back), block 0 if keep_first_block (an attention sink; off by default: at 0.75
   the nearest block is worth more, docs/results/cpu_quality.md), and some of its other past blocks,
   best-scored first. How many:
   - budget='fixed': n_keep[b], fixed per tile by target_sparsity (spread evenly over tiles), so the
     compute saved is exactly what was asked; the content decides WHICH blocks.
   - budget='adaptive': every block scoring above a threshold (one per layer, or per head with
     budget_scope='head'), so the content also decides HOW MANY, per head and tile. The threshold is
     controller state, not a function of the sequence (a per-sequence quantile would leak the future into
     earlier tiles): after each optimizer step it moves towards the threshold that would have met the
     scheduled sparsity on the last training batch (update_budget), so the mean over heads, tiles and
     inputs is held at the target.
   The schedule ramps from dense to the target over sparsity_warmup_iters.
3. Trainable end to end: each kept past block's logits get + logsigmoid(score), so the LM loss
   differentiates the gate (routers do the same with top-k gate values). Skipped blocks get nothing.
4. Three kernels compute that one function (asca_kernels.py): 'reference' (dense attention under the
   expanded mask, any device), 'gather' (the kept blocks' keys and values gathered per tile, any device)
   and 'flex' (CUDA: FlexAttention with a BlockMask built from the selected block indices, so skipped
   blocks are never loaded or computed).
Sharing the decision per query tile is what lets a kernel skip work: FlexAttention visits a KV tile if any
query in the Q tile needs it (docs/design.md, "why tiles").

Where things live: the selection, its schedule, budget, controller and diagnostics in asca_selector.py
(BlockSelector); the kernels in asca_kernels.py; this file holds the config and the attention that glues
them: q, k, v, positions, the predictor's inputs, padding, plan, kernel; plus attention maps and decoding.
"""
import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import asca_kernels
from asca_kernels import attend_gather, build_block_mask, flex_backward_problem, flex_kernel_options  # noqa: F401
from asca_decoding import CachedDecoding, TileState  # noqa: F401
from asca_selector import (GATED, READS_ATTENDED, READS_TOKENS, SELECTORS, BlockSelector,  # noqa: F401
                           ContentBasedAdaptiveSparsity, Selection, keep_counts, max_sparsity, padded_length)
from config_keys import key
from gpt import GPT, CausalSelfAttention, GPTConfig

ATTN_IMPLS = ("auto", "reference", "flex", "gather")
# attn_impl='auto' on a CPU, by the gather benchmark's table (scripts/bench_gather_cpu.py; the table this
# rule was read from, docs/results/raw/bench_gather_cpu_2026-12-04.md, is checked against it by tests/test_kernels.py):
# - from T = GATHER_MIN_T the gather path at any sparsity: 0.4-0.5x the reference's step at T=1024-8192;
# - from T = GATHER_SPARSE_MIN_T, once the scheduled sparsity reaches GATHER_MIN_SPARSITY (the least measured): at
#   T=512 the gather step took 0.64x (0.5) and 0.57x (0.75) the reference's, its forward 0.73x and 0.51x;
# - below, the reference. At T=256 (the main job) the table's step row had the gather path 12% faster, its forward
#   33% slower, and three paired 40-iteration runs of the main job's own config measured the two paths level
#   (+6%, +1%, -7% tokens/s, 2026-12-04): so the main job keeps the reference and its results stay bit for bit.
GATHER_MIN_T = 1024
GATHER_SPARSE_MIN_T = 512
GATHER_MIN_SPARSITY = 0.5
MAX_BLOCKS = 8192  # key blocks per sequence (block_size / sparse_block_size): each (nb, nb) mask is then <= 64 MB


@dataclass
class ASCAConfig(GPTConfig):
    """ASCA's keys, each declared once with its rules (config_keys.Key; GPTConfig's docstring)."""
    sparse_block_size: int = key(128, help="S: the key blocks and query tiles, in tokens (128: see "
                                           "flex_backward_problem)")
    target_sparsity: float = key(0.5, resume="free", help="fraction of the causal query-key pairs skipped after "
                                                          "the warm-up")
    sparsity_warmup_iters: int = key(1000, resume="free", help="a linear ramp from dense to target_sparsity (0 = the "
                                                               "target from the first step)")
    # in every checkpoint's model_args: its old default True needs no legacy
    keep_first_block: bool = key(False, help="block 0 always kept (an attention sink); off, its budget buys the "
                                             "nearest block")
    local_blocks: int = key(1, legacy=0, help="the nearest past blocks always kept, counted in the budget (every "
                                              "byte sees at least local_blocks x S back)")
    layer_sparsity: str = key("", help="per-layer targets, e.g. '0.5,0.83,0.83,0.84' (mean = target_sparsity; a 0 "
                                       "keeps that layer dense, with the gate; '' = target_sparsity everywhere)")
    # each query tile keeps its own block, the forced and the chosen blocks: keep_tokens // S blocks, so T <=
    # keep_tokens is dense and the sparsity follows from T
    keep_tokens: int = key(0, legacy=0, excludes=("target_sparsity", "layer_sparsity"),
                           help="an absolute budget instead of target_sparsity: each tile keeps at most this many "
                                "keys (0 = off)")
    # MoBA's recipe; the trained model is dense, so this saves training cost only
    dense_from: float = key(1.0, legacy=1.0, help="from this fraction of the run (iterations or max_time_s) on, every "
                                                  "block is kept, with the gate (1 = never)")
    gate_loss: float = key(0.0, help="weight of the predictor's distillation loss toward the dense attention's block "
                                     "mass")
    compressed_branch: bool = key(False, help="every query also attends to one mean key/value per complete past "
                                              "block, mixed in by a learned gate (NSA's gated sum)")
    gate_dim: int = key(32, help="the sparsity predictor's width per head")
    gate_input: str = key("rotated", legacy="unrotated", choices=("unrotated", "rotated"),
                          help="the predictor reads q and k 'rotated' (as attended) or 'unrotated' (position-free; "
                               "rope only)")
    gate_dist_bias: bool = key(True, legacy=True, help="a learned per-head bias by block distance in the predictor's "
                                                       "scores")
    # the gate bias stays logsigmoid(score); large costs give the nearest blocks (local_gated's). Fixed budget only
    rank_distance_cost: float = key(0.0, legacy=0.0, help="the learned choice ranks blocks by score - cost x (blocks "
                                                          "between block and tile); 0 = by score alone")
    # the pooled affinity: the tile's first query against each block's mean key, as it reads them
    gate_pooled: bool = key(False, legacy=False, help="the predictor's scores add the pooled affinity, with a learned "
                                                      "weight per head")
    gate_key_pool: str = key("mean", legacy="mean", choices=("mean", "max"),
                             help="the predictor's summary of a block's keys: their 'mean', or the per-dimension "
                                  "'max' (one distinctive key stays visible)")
    # Gumbel-top-k: a sample of blocks without replacement, each in proportion to exp(score / explore_noise), so
    # blocks the predictor would not keep get kept now and then, and the gate bias's gradient reaches their scores
    explore_noise: float = key(0.0, legacy=0.0, help="training only: the learned choice ranks by score + "
                                                     "explore_noise x Gumbel noise; evaluation by score (0 = off)")
    # adaptive: the threshold is steered between steps to the scheduled sparsity
    budget: str = key("fixed", legacy="fixed", choices=("fixed", "adaptive"),
                      help="'fixed': every tile keeps the scheduled count; 'adaptive': the blocks scoring above a "
                           "threshold")
    budget_ema: float = key(0.5, resume="free", help="adaptive: the last step's weight in the threshold's moving "
                                                     "average")
    budget_scope: str = key("layer", choices=("layer", "head"), help="adaptive: one threshold per 'layer' or per "
                                                                     "'head'")
    # controls at the same budget, no gate bias: 'local' (the nearest, plus the sink if kept), 'random' (a new draw
    # each forward), 'pooled' (the first query against each block's mean key, no parameters), 'oracle' (the first
    # query's dense attention mass per block: the ceiling; saves nothing); 'local_gated': the local rule's blocks
    # with the learned gate bias; 'nsa': NSA's three gated branches; 'task_oracle' (analysis, the recall task only):
    # the block holding the record the tile's first byte asks for
    selector: str = key("learned", choices=SELECTORS, help="which past blocks a tile keeps: 'learned' (the "
                                                           "predictor), or a control (docs/usage.md)")
    attn_impl: str = key("auto", type=str, resume="this_run", device=True, choices=ATTN_IMPLS,
                         help="the kernel: 'flex' (CUDA), 'gather' (any device), 'reference' ('auto' = flex on CUDA, "
                              "by T and sparsity on a CPU)")
    # the same function; fewer contended atomics in backward with 'key'
    flex_gate_bias: str = key("auto", type=str, resume="free", choices=asca_kernels.GATE_BIAS_LAYOUTS,
                              help="flex path: the gate bias read per 'key' position or per 'block' ('auto' = key on "
                                   "CUDA, block on a CPU)")

    def validate(self):
        super().validate()
        S = self.sparse_block_size
        if S < 1 or self.block_size % S:
            raise ValueError(f"block_size={self.block_size} must be a multiple of sparse_block_size={S}")
        if self.block_size // S > MAX_BLOCKS:  # the selection holds (blocks x blocks) masks per sequence and head
            raise ValueError(f"block_size / sparse_block_size = {self.block_size // S:,} blocks, more than "
                             f"{MAX_BLOCKS:,}: use sparse_block_size={self.block_size // MAX_BLOCKS} or more")
        if not 0.0 <= self.target_sparsity < 1.0:
            raise ValueError(f"target_sparsity={self.target_sparsity} must be in [0, 1)")
        if not 0.0 <= self.dense_from <= 1.0:
            raise ValueError(f"dense_from={self.dense_from} must be in [0, 1]: the fraction of the run after which "
                             f"attention is dense (1 = never)")
        if self.dense_from < 1.0 and self.budget != "fixed":
            raise ValueError("dense_from keeps every block through the fixed budget's counts: set budget='fixed'")
        self.check_keep_tokens()
        if self.local_blocks < 0:
            raise ValueError(f"local_blocks={self.local_blocks} must be >= 0")
        top = max_sparsity(self.block_size, S, self.keep_first_block, self.local_blocks)
        for i, target in enumerate(self.layer_targets()):
            if target > top + 1e-9:
                what = f"layer {i}'s target {target}" if self.layer_sparsity else f"target_sparsity={target}"
                raise ValueError(f"{what} is out of reach at block_size={self.block_size}, sparse_block_size={S}, "
                                 f"keep_first_block={self.keep_first_block}, local_blocks={self.local_blocks}: the "
                                 f"maximum is {top:.4f} (own block, sink and local blocks always kept); use smaller "
                                 f"blocks, fewer local_blocks or a longer block_size")
        if self.gate_loss < 0:
            raise ValueError(f"gate_loss={self.gate_loss} must be >= 0 (0 = no distillation loss)")
        if self.gate_loss > 0 and self.selector != "learned":
            raise ValueError(f"gate_loss trains the learned predictor's choice; selector={self.selector!r} does not "
                             f"choose by it: set gate_loss=0")
        if self.rank_distance_cost < 0 or (self.rank_distance_cost and (self.selector != "learned"
                                                                        or self.budget != "fixed")):
            raise ValueError(f"rank_distance_cost={self.rank_distance_cost} biases the learned choice at the fixed "
                             f"budget toward near blocks: it must be >= 0, with selector='learned' and budget='fixed' "
                             f"(this run: selector={self.selector!r}, budget={self.budget!r})")
        if not (0.0 <= self.explore_noise < float("inf")) or (self.explore_noise and self.selector != "learned"):
            raise ValueError(f"explore_noise={self.explore_noise} samples the learned choice in training: it must be a "
                             f"finite number >= 0, with selector='learned' (this run: selector={self.selector!r})")
        if self.gate_pooled and self.selector not in GATED:
            raise ValueError(f"gate_pooled adds to the learned predictor's scores; selector={self.selector!r} does not "
                             f"use them: set gate_pooled=False, or selector='learned' or 'local_gated'")
        if self.selector == "nsa" and (self.budget != "fixed" or self.local_blocks < 1 or self.compressed_branch):
            raise ValueError("selector='nsa' keeps the fixed budget's counts, takes its window branch from "
                             "local_blocks (at least 1) and has its own compressed branch: set budget='fixed', "
                             "local_blocks >= 1 and compressed_branch=False")
        if self.selector == "local_gated" and self.budget != "fixed":
            raise ValueError("selector='local_gated' keeps the local rule's blocks at the fixed budget's counts: set "
                             "budget='fixed'")
        if self.sparsity_warmup_iters < 0 or self.gate_dim < 1:
            raise ValueError("sparsity_warmup_iters must be >= 0 and gate_dim >= 1")
        if self.attn_impl == "gather" and self.budget == "adaptive" and self.dropout > 0:
            # the gather path pads each group of tiles to its largest count, which the adaptive budget lets
            # later tiles' content set: dropout's random draws would then depend on later bytes
            raise ValueError("attn_impl='gather' with budget='adaptive' has no attention dropout: set dropout=0, "
                             "or attn_impl='reference'")
        if not 0.0 < self.budget_ema <= 1.0:
            raise ValueError(f"budget_ema={self.budget_ema} must be in (0, 1]")

    def keep_cap(self):
        """keep_tokens as the past blocks a tile keeps at most (its own block aside), or None (a ratio budget)."""
        return self.keep_tokens // self.sparse_block_size - 1 if self.keep_tokens else None

    def check_keep_tokens(self):
        if not self.keep_tokens:
            return
        S, forced = self.sparse_block_size, 1 + self.local_blocks + int(self.keep_first_block)
        if self.keep_tokens < forced * S:
            raise ValueError(f"keep_tokens={self.keep_tokens} is below the blocks every tile keeps ({forced} x "
                             f"sparse_block_size={S}: its own block, {self.local_blocks} local"
                             f"{', the sink' if self.keep_first_block else ''}): use keep_tokens={forced * S} or more")
        if self.layer_sparsity or self.budget != "fixed":
            raise ValueError("keep_tokens is a fixed absolute budget for every layer: it cannot be combined with "
                             "layer_sparsity or budget='adaptive'; drop one of them")

    def layer_targets(self):
        """Each layer's target sparsity: layer_sparsity's list, or target_sparsity everywhere; with keep_tokens, the
        sparsity its cap gives at block_size, in every layer. The list must have one value per layer, each in
        [0, 1), with mean target_sparsity (so a run's label states its compute)."""
        if self.keep_tokens:
            return [max_sparsity(self.block_size, self.sparse_block_size, self.keep_first_block, self.local_blocks,
                                 self.keep_cap())] * self.n_layer
        if not self.layer_sparsity:
            return [self.target_sparsity] * self.n_layer
        try:
            vals = [float(x) for x in self.layer_sparsity.split(",")]
        except ValueError:
            raise ValueError(f"layer_sparsity={self.layer_sparsity!r} must be comma-separated numbers, one per layer, "
                             f"such as '0.5,0.8,0.8,0.9'") from None
        if len(vals) != self.n_layer:
            raise ValueError(f"layer_sparsity has {len(vals)} values for n_layer={self.n_layer}: give one per layer")
        if not all(0.0 <= v < 1.0 for v in vals):
            raise ValueError(f"layer_sparsity={self.layer_sparsity!r}: every value must be in [0, 1)")
        mean = sum(vals) / len(vals)
        if abs(mean - self.target_sparsity) > 1e-3:
            raise ValueError(f"layer_sparsity's mean is {mean:.4f} but target_sparsity={self.target_sparsity}: set "
                             f"--target_sparsity={mean:.4f} or change the list")
        return vals

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
            why = why or asca_kernels.flex_short_problem(self.sparse_block_size, self.block_size)
            if why:
                raise ValueError(why)


    def check_memory(self, batch_size, device_type, compile, free_bytes):
        """The gather path's memory grows with the kept blocks, (B, nh, T, (K + 1) * S) per layer: a run whose
        estimate (gather_step_bytes) exceeds the free memory stops at start-up, naming a batch or T that fits."""
        if free_bytes is None or self.attn_impl not in ("gather", "auto") or device_type == "cuda":
            return
        if self.attn_impl == "auto" and (self.block_size < GATHER_SPARSE_MIN_T or compile):
            return  # auto takes the reference path there
        # the largest step of the schedule: its first, dense while the sparsity warms up
        first = 0.0 if self.sparsity_warmup_iters > 0 else None
        need = gather_step_bytes(self, batch_size, sparsity=first)
        if need <= 0.9 * free_bytes:
            return
        at_target = gather_step_bytes(self, batch_size)
        fit_b = max(0, int(batch_size * 0.9 * free_bytes / need))
        fix = (f"batch_size={fit_b}" if fit_b >= 1 else f"block_size={self.block_size // 2} (or less)")
        if first is not None and at_target <= 0.9 * free_bytes:
            raise ValueError(f"the gather path needs about {size_text(need)} for the first steps of the "
                             f"sparsity warm-up (dense at its start) at batch_size={batch_size}, "
                             f"block_size={self.block_size}, "
                             f"but {size_text(free_bytes)} are free; the target's steps need "
                             f"{size_text(at_target)}: use sparsity_warmup_iters=0 (the target from the first "
                             f"step) or {fix}")
        where = "the first step (dense: the sparsity warms up from 0)" if first is not None else "a step"
        # a higher target cannot shrink a dense first step: only without a warm-up is it worth naming
        also = " or a higher target_sparsity" if first is None else ""
        raise ValueError(f"the gather path needs about {size_text(need)} for {where} at "
                         f"batch_size={batch_size}, block_size={self.block_size}, "
                         f"target_sparsity={self.target_sparsity} but "
                         f"{size_text(free_bytes)} are free: use {fix}{also}")


# the keys that give an ASCA predictor's weights their meaning: an ASCA checkpoint starts an ASCA run only where they
# match (a dense one starts it with a fresh predictor)
PREDICTOR_KEYS = ("sparse_block_size", "gate_dim", "gate_dist_bias", "gate_pooled", "gate_input",
                  "compressed_branch", "gate_key_pool")


def warm_start_problem(args, cfg, path):
    """Why an ASCA checkpoint (model_args `args`) cannot start this ASCA run, or None: its predictor is sized for its
    number of key blocks."""
    T0, T, S = args["block_size"], cfg["block_size"], args["sparse_block_size"]
    if T != T0:
        return (f"{path}'s ASCA predictor is sized for {T0 // S} key blocks (block_size={T0}), this run has {T // S}: "
                f"continue it at block_size={T0}, or start ASCA from a dense checkpoint (its predictor starts fresh)")
    return None


def size_text(n):
    """A byte count as a person reads it: GiB from 1 GiB, MiB below, KiB below 1 MiB (never '0.0 GiB')."""
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 2 ** 10:.1f} KiB"


def gather_attention_bytes(cfg, batch_size, elem=4, sparsity=None):
    """(bytes one layer's gather attention keeps for backward, its largest transient) for one forward at
    T = block_size and the target sparsity (or `sparsity`: 0.0 for a warm-up's first, dense step), from the shapes
    alone: per tile group, the gathered keys and values (B, nh, n, (K+1)*S, hs) each, the probabilities
    (B, nh, n, S, (K+1)*S) and the output; transient: the mask and, in backward, the logits' gradient, of the
    probabilities' size (asca_kernels._BlockAttention)."""
    from asca_kernels import count_groups
    S, T, H = cfg.sparse_block_size, cfg.block_size, cfg.n_head
    hs, nb = cfg.n_embd // H, cfg.block_size // cfg.sparse_block_size
    low = min(cfg.layer_targets()) if sparsity is None else sparsity  # the layer keeping most
    counts = keep_counts(nb, S, T, low, cfg.keep_first_block, cfg.local_blocks, cfg.keep_cap())
    saved, transient = 0, 0
    for t0, t1, K in count_groups(counts.tolist(), S, hs, batch_size * H):  # attend_gather's groups
        n, L = t1 - t0, (K + 1) * S
        probs = batch_size * H * n * S * L
        saved += 2 * batch_size * H * n * L * hs + probs + batch_size * H * n * S * hs
        transient = max(transient, 2 * probs)
    return saved * elem, transient * elem


def gather_step_bytes(cfg, batch_size, elem=4, sparsity=None):
    """A training step's peak estimate on the gather path: every layer's attention saved for backward, the rest
    of a layer's activations (about 20 B*T*C values: norms, q/k/v, rotary, projections, the 4C MLP twice), the
    logits three times (logits, fp32 copy, softmax), the largest transient, and the weights with Adam's state."""
    attn, transient = gather_attention_bytes(cfg, batch_size, elem, sparsity)
    btc = batch_size * cfg.block_size * cfg.n_embd
    weights = 12 * cfg.n_layer * cfg.n_embd ** 2 + 2 * 256 * cfg.n_embd
    return (cfg.n_layer * (attn + 20 * btc * elem) + 3 * batch_size * cfg.block_size * 256 * elem + transient
            + 4 * weights * elem)


# ----------------------------------------------------------------------------- attention

class AdaptiveSparseCausalSelfAttention(CachedDecoding, CausalSelfAttention):
    """Causal self-attention over each tile's own block, its forced past blocks (the local_blocks nearest, and
    block 0 if keep_first_block) and the selector's best other past blocks."""

    def __init__(self, config, layer=0):
        super().__init__(config, layer)
        self.S = config.sparse_block_size
        self.impl = config.attn_impl
        self.flex_layout = config.flex_gate_bias
        self.block_size = config.block_size
        self.selector = BlockSelector(config, layer)
        self.compressed = config.compressed_branch
        if self.compressed:  # the branch's gate per head: sigmoid(<q, w_h> + c_h), 0.5 at the start
            hs = config.n_embd // config.n_head
            self.cmp_gate_w = torch.nn.Parameter(torch.zeros(config.n_head, hs))
            self.cmp_gate_b = torch.nn.Parameter(torch.zeros(config.n_head))
        self.nsa = config.selector == "nsa"
        if self.nsa:  # NSA's branches: the compressed one's value projection (its key projection is the selector's,
            # which scores with it) and a sigmoid gate per branch (selected, window, compressed) and head: 0.5 each
            hs = config.n_embd // config.n_head
            self.nsa_cv = torch.nn.Parameter(torch.eye(hs).repeat(config.n_head, 1, 1))
            self.nsa_gate_w = torch.nn.Parameter(torch.zeros(config.n_head, 3, hs))
            self.nsa_gate_b = torch.nn.Parameter(torch.zeros(config.n_head, 3))
        # with rotary positions the predictor reads the rotated q and k by default (measured better on CPU,
        # docs/results/cpu_architecture.md), or the position-free ones, leaving position to its distance bias
        self.gate_rotated = config.gate_input == "rotated"
        # decoding: the cache keeps the keys before rotation where the predictor reads them
        self.caches_raw_keys = not self.gate_rotated and not self.nsa

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before the selector had its own module (2026-12-01) hold attn.predictor.* and
        # attn.threshold: the same tensors, now under attn.selector.
        for name in [k for k in state_dict if k.startswith(prefix + "predictor.") or k == prefix + "threshold"]:
            state_dict[prefix + "selector." + name[len(prefix):]] = state_dict.pop(name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # --- the hooks the trainer calls (CausalSelfAttention declares them): the selector owns the behaviour
    def set_step(self, iter_num, progress=None):
        self.selector.set_step(iter_num, progress)

    def update_budget(self, reduce=None):
        self.selector.update_budget(reduce)

    measures_recall = True

    def swap_choice(self, rule):
        self.selector.swap_choice(rule)

    def eval_note(self):
        random = "selector='random' draws new blocks at every forward: this score differs from the one at the end of "
        return random + "training in about the 4th decimal" if self.selector.rule == "random" else None

    def diagnostics(self):
        return self.selector.diagnostics()

    def start_tally(self):
        self.selector.start_tally()

    def tally_step(self, rows=None):
        self.selector.tally_step(rows)

    def end_tally(self):
        return self.selector.end_tally()

    def aux_loss(self):
        return self.selector.aux_loss()

    def for_sampling(self):
        # prefills run attend(); on CUDA 'auto' would compile the flex kernel before the first byte (and again for
        # each bucketed prefill length). The gather path computes the same function uncompiled.
        if self.impl in ("auto", "flex"):
            self.impl = "gather"

    @property
    def reads_tokens(self):
        return self.selector.rule in READS_TOKENS

    def see_tokens(self, idx):
        self.selector.tokens = idx

    @contextlib.contextmanager
    def eager_path(self):
        # the gather path computes the flex path's function uncompiled: an eager measurement on CUDA (recall on a
        # sample) then costs no FlexAttention compile of its own
        impl = self.impl
        if impl in ("auto", "flex"):
            self.impl = "gather"
        try:
            yield
        finally:
            self.impl = impl

    @property
    def last_selection(self):
        return self.selector.last

    def attn_flops_per_token(self, T):
        """Dense causal FLOPs (6 C T) scaled by the kept fraction of causal pairs under the schedule,
        plus the predictor's (small) matmuls."""
        branch = 6 * self.n_embd * (T // self.S) if (self.compressed or self.nsa) else 0  # T x nb scores and mixes
        window = 6 * self.n_embd * T * self.selector.window_fraction(T) if self.nsa else 0  # NSA's window branch
        return (6 * self.n_embd * T * self.selector.kept_fraction(T) + self.selector.flops_per_token(T) + branch
                + window)

    def resolved_impl(self, device, T=0):
        """The path for this forward. 'auto': flex on CUDA; on a CPU (uncompiled) the gather path where the
        benchmark measured it faster (GATHER_MIN_T, GATHER_SPARSE_MIN_T above), else the reference. All compute one
        function (tests/test_kernels.py)."""
        if self.impl != "auto":
            return self.impl
        if device.type == "cuda":
            return "flex"
        sparse_enough = T >= GATHER_SPARSE_MIN_T and self.selector.sparsity >= GATHER_MIN_SPARSITY - 1e-9
        if not (T >= GATHER_MIN_T or sparse_enough) or torch.compiler.is_compiling():
            return "reference"  # compiled CPU runs keep the compiled reference
        no_gather = self.selector.adaptive and self.training and self.dropout > 0  # the gather path refuses that
        return "reference" if no_gather else "gather"

    def pad_to_blocks(self, *ts, bucket=False):
        """Pad (B, nh, T, hs) tensors to whole blocks; padded keys lie in every real query's future.

        bucket=True (flex path) pads further, to a power-of-two number of blocks (at most block_size),
        so the compiled kernel (static shapes) sees about log2(block_size / S) lengths, not one per
        sampled byte: past torch's recompile limit (8) it would fall back to slow eager attention.
        Padding never changes a real position's output: tile b's choice reads tiles <= b only."""
        T = ts[0].shape[2]
        Tp = padded_length(T, self.S, self.block_size if bucket else None)
        return [F.pad(t, (0, 0, 0, Tp - T)) for t in ts] if Tp > T else list(ts)

    def prepare(self, q, k, v=None, bucket=False):
        """Rotated q, k (and v), the predictor's inputs, all padded to whole blocks, and their Selection."""
        T0 = q.shape[2]
        qr, kr = self.position(q, k)  # rotary positions (learned positions: unchanged)
        pq, pk = (qr, kr) if self.gate_rotated else (q, k)  # the predictor's inputs
        gq, gk = (qr, kr) if self.selector.rule in READS_ATTENDED else (pq, pk)  # pooled, oracle: q, k as attended
        own = self.selector.adaptive and self.selector.trained_rule is not None  # a swapped choice at own counts
        ts = self.pad_to_blocks(*((qr, kr) if v is None else (qr, kr, v)), *((pq, pk) if own else ()), gq, gk,
                                bucket=bucket)
        sel = self.selector.plan(ts[-2], ts[-1], T0, own_inputs=tuple(ts[-4:-2]) if own else None)
        ts = ts[:-4] + ts[-2:] if own else ts
        if self.training:
            self.selector.remember_inputs(ts[0], ts[1], ts[-2], ts[-1], T0)
        return ts[:-2], sel

    def attend(self, q, k, v):
        T0 = q.shape[2]
        impl = self.resolved_impl(q.device, T0)
        (qr, kr, v), sel = self.prepare(q, k, v, bucket=impl == "flex")
        y = self.kernel(impl, qr, kr, v, sel, self.dropout if self.training else 0.0)
        if self.nsa:
            y = self.nsa_branches(impl, qr, kr, v, sel, y)
        if self.compressed:
            y = y + self.compressed_gate(qr) * asca_kernels.attend_compressed(qr, kr, v, self.S)
        if self.selector.counting and not self.training and not torch.compiler.is_compiling():
            self.selector.add_recall(qr, kr, sel)  # evaluation: how much dense attention mass the choice keeps
        self.selector.remember(sel)
        return y[:, :, :T0]

    def kernel(self, impl, q, k, v, sel, dropout):
        """One kernel's output (B, nh, T, hs) for padded, rotated q, k and v and the Selection (asca_kernels.py)."""
        if impl == "flex":
            if dropout > 0:
                raise ValueError("attn_impl='flex' has no attention dropout; use dropout=0 or attn_impl='reference'")
            return asca_kernels.attend_flex(q, k, v, sel, self.S, layout=self.flex_layout)
        if impl == "gather":  # the kept blocks only, any device
            return attend_gather(q, k, v, sel.order, sel.n_past, sel.gate_bias, self.S, dropout_p=dropout)
        return asca_kernels.attend_reference(q, k, v, sel, self.S, dropout_p=dropout)

    def nsa_branches(self, impl, q, k, v, sel, y_sel):
        """NSA's gated sum (Yuan et al. 2025) for padded, rotated q, k, v: the selected blocks' attention y_sel (the
        blocks ranked by the compressed branch's attention: compressed_block_probs), the window's (the tile's own
        block and its local_blocks nearest, a softmax of its own) and the compressed branch's, each times a sigmoid
        gate per head from the query. The compressed branch carries the LM loss's gradient to the projection the
        selection scores with."""
        B, H, T, _ = q.shape
        dropout = self.dropout if self.training else 0.0
        y_win = self.kernel(impl, q, k, v, self.selector.window_selection(B, H, T // self.S, q.device, sel.seq_len),
                            dropout)
        y_cmp = asca_kernels.attend_compressed(q, k, v, self.S, self.selector.nsa_ck, self.nsa_cv)
        g = torch.sigmoid(torch.einsum("bhtd,hkd->bhtk", q, self.nsa_gate_w.to(q.dtype))
                          + self.nsa_gate_b.to(q.dtype)[None, :, None, :])  # (B, nh, T, 3)
        return g[..., 0:1] * y_sel + g[..., 1:2] * y_win + g[..., 2:3] * y_cmp

    def compressed_gate(self, q):
        """(B, nh, T, 1): the compressed branch's weight for each query, from the query (as attended)."""
        w = self.cmp_gate_w.to(q.dtype)
        b = self.cmp_gate_b.to(q.dtype)[None, :, None, None]
        return torch.sigmoid((q * w[None, :, None, :]).sum(-1, keepdim=True) + b)

    @torch.no_grad()
    def attention_map(self, x):
        """For analysis (extraction.py): attention probabilities, keep mask, block selection and gate
        scores for layer input x (B, T, C), as the reference path computes them."""
        q, k, _ = self.qkv(x)
        T0 = q.shape[2]
        (qr, kr), sel = self.prepare(q, k)
        mask, probs = asca_kernels.reference_probs(qr, kr, sel.selected, sel.gate_bias, self.S)
        return {"attention": probs[..., :T0, :T0], "keep_mask": mask[..., :T0, :T0],
                "block_selection": sel.selected, "gate_scores": sel.scores.float()}


# ----------------------------------------------------------------------------- start-up self-check

# Tolerances of the start-up check, each relative to the reference's own scale. fp32: rounding only. bf16/fp16:
# about 3x the largest difference a correct model showed over many seeds (the noise floor), and far under what
# a wrong block or a dropped gate bias gives; both measured by `python3 scripts/startup_noise.py`
# (docs/results/startup_noise.md). 'grad' is per element, over every parameter but the predictor's, whose
# gradients are sums that nearly cancel (their largest element differed by up to 0.14 in bf16 with
# nothing wrong); 'grad_l2' is the relative L2 norm over all gradients and over the predictor's, which a fault
# in the gate bias moves.
STARTUP_TOL = {False: {"logits": 1e-4, "grad": 1e-4, "grad_l2": 1e-4},
               True: {"logits": 4e-2, "grad": 7e-2, "grad_l2": 7e-2}}


def _rel_max(a, b):
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-6)


def _rel_l2(a, b):
    return (a - b).norm().item() / max(b.norm().item(), 1e-12)


def startup_check(model, fwd, x, y, ctx, low_precision):
    """Compare the path this run trains on with an independent one, on one batch, before the first step (issues
    23, 30): the compiled flex path against the gather path (or the gather path against the reference), logits and
    every parameter's gradient.
    - At the target sparsity (the schedule is set to its end, an adaptive budget's unset thresholds from one
      forward; both restored after), so the skipping is what is checked.
    - The reference replays the fast path's block choice (BlockSelector.replaying): one choice, two computations.
    - In training mode, so the compiled graph checked is the one training runs (eval mode when dropout > 0: the
      paths cannot share dropout draws); the same RNG draws on both sides, the global RNG left as it was.
    Returns None when the run uses the reference path (nothing to compare), else a dict: 'ok', 'fast',
    'reference', 'logits', 'grad' (worst per element, predictor excepted) and 'worst' (its parameter),
    'grad_l2' and 'worst_l2' (the worse of all gradients and the predictor's), 'tol' (STARTUP_TOL's)."""
    import copy
    import math
    attns = model.attention_modules()
    fast = {a.resolved_impl(x.device, x.shape[1]) for a in attns}
    if fast == {"reference"}:
        return None
    ref_impl = "gather" if "flex" in fast else "reference"
    ref = copy.deepcopy(model)
    for a in ref.attention_modules():
        a.impl = ref_impl
    was_training, steps = model.training, [(a.selector.step_pos, a.selector.progress) for a in attns]
    thresholds = [a.selector.threshold.clone() if a.selector.adaptive else None for a in attns]
    for m in (model, ref):
        m.set_step(math.inf)  # the end of the sparsity warm-up
    if any(t is not None and not torch.isfinite(t).all() for t in thresholds):
        # an adaptive budget that has not yet moved keeps every block: set its thresholds from one forward, as the
        # first training step's update would at the target
        with torch.no_grad(), ctx:
            ref(x)
        ref.update_budgets()
        for a, r in zip(attns, ref.attention_modules()):
            if r.selector.adaptive:
                a.selector.threshold.copy_(r.selector.threshold)
    outs = []
    try:
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            for m, call in ((model, fwd), (ref, ref)):
                m.train(model.config.dropout == 0)
                torch.manual_seed(0)
                with contextlib.ExitStack() as replay:
                    if m is ref:
                        for a, chosen in zip(ref.attention_modules(), attns):
                            replay.enter_context(a.selector.replaying(chosen.last_selection))
                    with ctx:
                        logits, loss = call(x, y)
                params = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
                grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
                outs.append((logits.detach().float(), {n: (torch.zeros_like(p) if g is None else g).float()
                                                       for (n, p), g in zip(params, grads)}))
    finally:
        model.train(was_training)
        for a, step, t in zip(attns, steps, thresholds):
            a.set_step(*step)
            if t is not None:
                a.selector.threshold.copy_(t)
    (lf, gf), (lr, gr) = outs
    grad = {n: _rel_max(gf[n], gr[n]) for n in gr if ".predictor." not in n}
    pred = [n for n in gr if ".predictor." in n]
    l2 = {"all gradients": _rel_l2(torch.cat([gf[n].flatten() for n in gr]), torch.cat([gr[n].flatten() for n in gr]))}
    if pred:
        l2["the predictor's gradients"] = _rel_l2(torch.cat([gf[n].flatten() for n in pred]),
                                                  torch.cat([gr[n].flatten() for n in pred]))
    worst, worst_l2 = max(grad, key=grad.get, default=None), max(l2, key=l2.get)
    tol = STARTUP_TOL[bool(low_precision)]
    r = {"fast": "compiled " + "/".join(sorted(fast)) if fwd is not model else "/".join(sorted(fast)),
         "reference": ref_impl, "logits": _rel_max(lf, lr), "grad": grad.get(worst, 0.0), "worst": worst,
         "grad_l2": l2[worst_l2], "worst_l2": worst_l2, "tol": tol}
    r["ok"] = r["logits"] <= tol["logits"] and r["grad"] <= tol["grad"] and r["grad_l2"] <= tol["grad_l2"]
    return r


def make_model(**overrides):
    """An ASCA GPT from the defaults plus model-config overrides (an unknown key is a TypeError)."""
    return GPT(ASCAConfig(**overrides), attn_cls=AdaptiveSparseCausalSelfAttention)

