"""
Dense causal GPT over raw bytes (vocab 256), in the nanoGPT mould. Train it with baseline_model.py:

    python baseline_model.py config/train_enwik8.py --max_time_s=600

The attention class is a constructor argument, so asca.py swaps in the sparse attention without copying
this model; both training scripts share the loop in trainer.py.
References: nanoGPT model.py (Karpathy), GPT-2 (Radford et al. 2019) for the init.
"""
import contextlib
import inspect
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from config_keys import declarations, key
from muon import Muon


# The largest shapes a config may ask for: far beyond what one GPU trains, small enough that a damaged or mistyped
# value (n_layer=10**9) is one line, not an allocation that takes the machine's memory.
SHAPE_LIMITS = {"block_size": 1 << 20, "n_layer": 1024, "n_head": 1024, "n_embd": 1 << 16}


@dataclass
class GPTConfig:
    """The model's keys, each declared once with its rules (config_keys.Key): legacy = what a checkpoint from
    before the key existed ran with; resume='free' = a resume may change it (the weights do not depend on it);
    shape = it sets the weights' shapes."""
    block_size: int = key(1024, shape=True, help="T: the context length in bytes, and each training window's")
    vocab_size: int = key(256, help="the vocabulary: raw bytes")
    n_layer: int = key(12, shape=True, help="transformer blocks")
    n_head: int = key(8, shape=True, help="attention heads per layer")
    n_embd: int = key(512, shape=True, help="the residual stream's width")
    dropout: float = key(0.0, resume="free", help="dropout on attention, residual and embedding outputs")
    bias: bool = key(False, help="biases in Linears and norms (False is a bit better and faster)")
    # the defaults are the best combination measured (docs/results/cpu_architecture.md); nanoGPT's 2019 model is
    # config/nanogpt_2019.py: learned, no qk_norm, gelu, tied (and optimizer='adamw')
    pos_encoding: str = key("rope", legacy="learned", choices=("learned", "rope"),
                            help="positions: 'rope' (rotary q and k, Su et al. 2021) or 'learned' (a table, GPT-2)")
    rope_base: float = key(10000.0, help="rotary frequencies are rope_base ** (-2i / head_size)")
    qk_norm: bool = key(True, legacy=False, help="RMS-normalise q and k per head before the dot product")
    mlp_act: str = key("relu2", legacy="gelu", choices=("gelu", "relu2"),
                       help="the MLP's activation: 'relu2' (squared ReLU, So et al. 2021) or 'gelu'")
    tie_embeddings: bool = key(False, legacy=True, help="the input embedding is the output head (Press & Wolf 2017)")

    @classmethod
    def declarations(cls):
        return declarations(cls)

    @classmethod
    def runtime_keys(cls):
        """Keys that may differ between a checkpoint and a resumed run (the weights do not depend on them)."""
        return tuple(k for k, d in cls.declarations().items() if d.resume != "checkpoint")

    @classmethod
    def device_defaults(cls):
        """Keys that describe the device a run used: reset to these when a checkpoint is loaded elsewhere."""
        return {k: d.default for k, d in cls.declarations().items() if d.device}

    @classmethod
    def shape_keys(cls):
        return tuple(k for k, d in cls.declarations().items() if d.shape)

    @classmethod
    def from_dict(cls, d):
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def validate(self):
        """Raise ValueError with a one-line message for an impossible model shape. The sizes come first: nothing
        after them (a subclass's checks included) may allocate or loop over an absurd one."""
        for k, top in SHAPE_LIMITS.items():
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{k} must be at least 1, got {v!r}")
            if v > top:
                raise ValueError(f"{k}={v:,} is beyond this code's limit of {top:,}; use a smaller {k}")
        for name in self.declarations():  # NaN and inf pass every comparison a range check makes
            v = getattr(self, name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{name}={v} must be a finite number")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name, d in self.declarations().items():
            if d.choices is not None and getattr(self, name) not in d.choices:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {', '.join(map(str, d.choices))}")
        if self.pos_encoding == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"pos_encoding='rope' needs an even head size, got "
                             f"n_embd/n_head={self.n_embd // self.n_head}")
        if not (math.isfinite(self.rope_base) and self.rope_base > 1):
            raise ValueError(f"rope_base must be a finite number > 1, got {self.rope_base}")

    def check_device(self, device_type, dtype, training):
        """Raise ValueError (one line) if this config cannot run on the device; the dense GPT runs anywhere."""

    def check_memory(self, batch_size, device_type, compile, free_bytes):
        """Raise ValueError (one line) if a training step's estimated memory exceeds free_bytes (None: unknown).
        Dense SDPA never builds a T x T tensor; its activations grow like the batch, which users size already."""


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021, RoFormer): rotates pairs (x_i, x_{i+hs/2}) of q and k
    by angle pos * base^(-2i/hs), so q_m . k_n depends on m - n only."""

    def __init__(self, head_size, max_len, base):
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)  # (hs/2,)
        angles = torch.arange(max_len, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (T, hs/2)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x, offset=0):  # (B, nh, T, hs) at positions offset .. offset+T-1
        T = x.shape[2]
        cos, sin = self.cos[offset:offset + T].to(x.dtype), self.sin[offset:offset + T].to(x.dtype)
        if torch.is_grad_enabled() and x.requires_grad:
            return _Rotate.apply(x, cos, sin)
        return rotate(x, cos, sin)  # no graph to build: skip Function.apply's ~11 us a call (decoding calls it often)

    def at(self, x, pos):  # (B, nh, t, hs) at positions pos (t,), a long tensor: decoding's rotation, no graph
        return rotate(x, self.cos.index_select(0, pos).to(x.dtype), self.sin.index_select(0, pos).to(x.dtype))


def rotate(x, cos, sin):  # (..., T, hs) by angles with cos, sin (T, hs/2): pairs (x_i, x_{i+hs/2})
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class _Rotate(torch.autograd.Function):
    """rotate() with its gradient written as the inverse rotation (angle -a). Autograd's own backward of the
    halves and the cat makes four zero-filled q/k-sized tensors and four half-size copies per layer; this one
    runs rotate() once (rotary cost 4-9% of the CPU step, this backward 3-4%: docs/results/dense_cpu.md). The same
    values and gradient bit for bit (tested): each gradient half is the same two products summed."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        return rotate(g, cos, -sin), None, None


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through SDPA (flash attention on CUDA).

    qkv() gives q and k after qk_norm but before rotary positions; attend() rotates them (position()),
    so a subclass can read position-free q and k (ASCA's predictor does)."""

    def __init__(self, config, layer=0):  # layer: its index in the model (a sparse attention may budget by it)
        super().__init__()
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.qk_norm = config.qk_norm
        hs = config.n_embd // config.n_head
        self.rotary = Rotary(hs, config.block_size, config.rope_base) if config.pos_encoding == "rope" else None

    def qkv(self, x):
        B, T, C = x.shape
        hs = C // self.n_head
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, hs)  # (B, T, 3, nh, hs): q, k, v side by side
        if self.qk_norm:  # no gain: the norm bounds the logits, the projections learn the scale. One call for q and
            # k together (the same rows, bit for bit): half the small ops of a decoding step
            q, k = F.rms_norm(qkv[:, :, :2], (hs,)).unbind(2)
            v = qkv[:, :, 2]
        else:
            q, k, v = qkv.unbind(2)
        return [t.transpose(1, 2) for t in (q, k, v)]  # (B, nh, T, hs) each

    def position(self, q, k, offset=0):
        """q and k with rotary positions applied (unchanged with learned positions)."""
        return (self.rotary(q, offset), self.rotary(k, offset)) if self.rotary is not None else (q, k)

    def attend(self, q, k, v):
        q, k = self.position(q, k)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                              dropout_p=self.dropout if self.training else 0.0)

    def forward(self, x):
        B, T, C = x.shape
        y = self.attend(*self.qkv(x))  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    # --- decoding with a KV cache (sample.py): the same function as forward, one new byte at a time. A step is
    # split where the cache is touched: project() is pure tensor code (decode_in; torch.compile may fuse it),
    # attend_cached() writes the cache and attends (eager: its shapes grow and ASCA keeps per-tile state).
    caches_raw_keys = False  # the cache keeps keys before rotation too (ASCA's predictor may read those)

    def project(self, x, pos):
        """x (B, t, C) at positions pos (t,) -> q, k, v and the rotated qr, kr (B, nh, t, hs): qkv() and
        position() for given positions (a tensor, so that a compiled step does not specialise on them)."""
        q, k, v = self.qkv(x)
        if self.rotary is None:
            return q, k, v, q, k
        return q, k, v, self.rotary.at(q, pos), self.rotary.at(k, pos)

    @torch.no_grad()
    def attend_cached(self, q, k, v, qr, kr, lc, pos0):
        """(B, nh, t, hs): the attention output for queries at positions pos0.. given the earlier ones in lc (a
        LayerCache), which this call extends. pos0 == 0 (prefill) runs attend() itself: the training function."""
        lc.append(kr, v, k if self.caches_raw_keys else None)
        if pos0 == 0:
            y = self.attend(q, k, v)
            self.after_prefill(q, qr, lc)
            return y
        return self.attend_step(q, qr, lc, pos0)

    def attend_step(self, q, qr, lc, pos0):
        """New queries qr (B, nh, t, hs) at pos0.. over every cached key up to themselves."""
        t, L = qr.shape[2], lc.len
        if t == 1:  # one new byte: every cached key is at or before it
            return F.scaled_dot_product_attention(qr, lc.k, lc.v)
        mask = torch.arange(L, device=qr.device)[None, :] <= (pos0 + torch.arange(t, device=qr.device))[:, None]
        return F.scaled_dot_product_attention(qr, lc.k, lc.v, attn_mask=mask)

    # --- hooks the trainer and the tools call on every attention module (GPT.set_step, diagnostics, ...).
    # Dense attention has no state behind them: these no-op defaults are the whole declaration, so a sparse
    # attention overrides what it needs and nothing asks hasattr.
    def after_prefill(self, q, qr, lc):
        """Decoding state beyond K and V (ASCA: the tile in progress), after the prompt's prefill."""

    def for_sampling(self):
        """Sampling is about to start (sample.py): take the path that needs no compile before the first byte."""

    def eager_path(self):
        """A context in which this module's forward needs no compile (an uncompiled measurement on a GPU)."""
        return contextlib.nullcontext()

    reads_tokens = False  # True where the module must see the input bytes (see_tokens) before its forward
    measures_recall = False  # True where an evaluation measures attention recall (outside a compiled graph)

    def swap_choice(self, rule):
        """Score with another choice of blocks at the same counts (eval_selector); dense attention has none."""
        raise ValueError(f"{type(self).__name__} keeps every block: there is no choice of blocks to swap for {rule!r}")

    def eval_note(self):
        """A line an evaluation's output should carry about this module's scores (None: nothing to say)."""
        return None

    def see_tokens(self, idx):
        """The forward's input bytes (B, T), for a module that reads them (an analysis rule that knows the task)."""

    def set_step(self, iter_num, progress=None):
        """The schedule position (in iterations) of the step about to run, and the run's progress in [0, 1]."""

    def update_budget(self, reduce=None):
        """After an optimizer step: controller state moves (reduce averages a tensor over DDP ranks)."""

    def diagnostics(self):
        """What the last forward measured, as a flat dict of floats and lists (logged per eval)."""
        return {}

    def start_tally(self):
        """Begin summing measurements over the following forwards (evaluation)."""

    def tally_step(self, rows=None):
        """Add the last forward to the tally (rows: only its first `rows` sequences count)."""

    def end_tally(self):
        """The tally since start_tally, as a dict ({} when nothing was measured)."""
        return {}

    def aux_loss(self):
        """An auxiliary training loss from the last training forward, added to the LM loss (None: none)."""
        return None

    @torch.no_grad()
    def attention_map(self, x):
        """For analysis (extraction.py): attention probabilities (B, nh, T, T) for layer input x."""
        q, k = self.position(*self.qkv(x)[:2])
        T = q.shape[2]
        att = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        return {"attention": F.softmax(att.masked_fill(~causal, float("-inf")), dim=-1)}

    def attn_flops_per_token(self, T):
        """Forward+backward FLOPs of the score and value matmuls per token. PaLM (appendix B) counts
        12 * C * T for the full T x T plane; causal attention computes half of it."""
        return 6 * self.n_embd * T


class LayerCache:
    """One layer's decoding state: keys as the attention uses them (rotated), values, keys before rotation where
    the attention asks for them (caches_raw_keys: ASCA's predictor with gate_input='unrotated' averages those per
    block), and state an attention may keep (`tile`, `block_means`).

    The buffers are allocated once for `capacity` positions and written in place: growing them with
    torch.cat copied the whole cache every step, which cost more than the attention itself at 8k."""

    def __init__(self, capacity):
        self.capacity, self.len = capacity, 0
        self._k = self._v = self._k_raw = None  # (B, nh, capacity, hs)
        self.tile = None  # an attention's state for the tile in progress (ASCA: its kept blocks)
        self.block_means = None  # an attention's per-block summaries of complete blocks (ASCA: mean keys)

    def append(self, k, v, k_raw=None):
        """Write t new positions: k, v (B, nh, t, hs), and k_raw where the attention reads keys before rotation."""
        if self._k is None:
            B, H, _, hs = k.shape
            self._k, self._v = (k.new_empty(B, H, self.capacity, hs) for _ in range(2))
            if k_raw is not None:
                self._k_raw = k.new_empty(B, H, self.capacity, hs)
        t = k.shape[2]
        if self.len + t > self.capacity:
            raise ValueError(f"the cache holds {self.len} positions; {t} more exceed its capacity {self.capacity}")
        if (k_raw is None) != (self._k_raw is None):
            raise ValueError("LayerCache.append: pass k_raw at every call or at none")
        for buf, new in ((self._k, k), (self._v, v), (self._k_raw, k_raw)):
            if buf is not None:
                buf[:, :, self.len:self.len + t] = new
        self.len += t

    # views of the filled part, (B, nh, len, hs)
    k = property(lambda self: self._k[:, :, :self.len])
    v = property(lambda self: self._v[:, :, :self.len])
    k_raw = property(lambda self: None if self._k_raw is None else self._k_raw[:, :, :self.len])


class KVCache:
    """Decoding state of a whole model: one LayerCache per layer and the number of positions held."""

    def __init__(self, n_layer, capacity):
        self.layers = [LayerCache(capacity) for _ in range(n_layer)]
        self.pos = 0


class ReluSquared(torch.autograd.Function):
    """relu(x)^2 (Primer, So et al. 2021) with its derivative 2 relu(x) written out: two passes over the
    (B, T, 4C) activation forward and two backward. Autograd's F.relu(x).square() takes six (relu, pow; pow's
    backward: pow, two muls, relu's threshold_backward), the MLP's largest elementwise cost on a CPU. Bit for bit
    the same values and gradient: r * r is how pow(r, 2) is computed, and (g * r) * 2 is g * (2 * r) exactly,
    doubling being exact in floating point."""

    @staticmethod
    def forward(ctx, x):
        r = torch.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, g):
        (r,) = ctx.saved_tensors
        return torch.mul(g, r).mul_(2.0)


def relu_squared(x):
    if torch.is_grad_enabled() and x.requires_grad:
        return ReluSquared.apply(x)
    r = torch.relu(x)  # no graph to build (evaluation, decoding): the same ops without Function.apply's overhead
    return r * r


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

        self.act = F.gelu if config.mlp_act == "gelu" else relu_squared

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config, attn_cls, layer=0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = attn_cls(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def decode_in(block, x, pos):
    """A decoding step's part of `block` before the cache: residual x (B, t, C) at positions pos (t,) -> its
    attention's q, k, v, qr, kr (B, nh, t, hs). Pure tensor code, so torch.compile can fuse it."""
    return block.attn.project(block.ln_1(x), pos)


def decode_out(block, x, y):
    """The part after the attention: x (B, t, C) plus the projected attention output y (B, nh, t, hs), then
    the MLP (eval mode: no dropout). Block.forward's function."""
    B, t, C = x.shape
    x = x + block.attn.c_proj(y.transpose(1, 2).contiguous().view(B, t, C))
    return x + block.mlp(block.ln_2(x))


class GPT(nn.Module):
    """Pre-norm GPT. forward(idx, targets=None) -> (logits (B, T, 256), mean loss in nats or None)."""

    def __init__(self, config, attn_cls=CausalSelfAttention):
        super().__init__()
        config.validate()
        self.config = config
        parts = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.pos_encoding == "learned":
            parts["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(dict(
            **parts,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, attn_cls, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # weight tying (Press & Wolf 2017)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        """Parameters; non_embedding leaves out the lookup tables (position table, untied input embedding),
        which cost no matmul FLOPs (a tied embedding counts once, as the output head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.transformer.wte.weight.numel()
        return n

    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        x = self.transformer.wte(idx)  # (B, T, C)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(torch.arange(T, dtype=torch.long, device=idx.device))
        x = self.transformer.drop(x)
        for a in self.attention_modules():
            if a.reads_tokens:
                a.see_tokens(idx)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, 256): every position, for tests and eval
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    @torch.no_grad()
    def forward_cached(self, idx, cache):
        """Logits (B, t, 256) for bytes idx (B, t) that follow the cache.pos bytes in `cache` (a KVCache),
        which this call extends: a prefill (cache.pos == 0) or decoding steps. Equal to forward() on the
        whole sequence (tests: float64 to 1e-9). Eval mode only: no dropout."""
        B, t = idx.shape
        pos0 = cache.pos
        if pos0 + t > self.config.block_size:
            raise ValueError(f"the cache holds {pos0} bytes; {t} more exceed block_size {self.config.block_size}")
        pos = torch.arange(pos0, pos0 + t, device=idx.device)
        x = self.transformer.wte(idx)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(pos)
        step_in, step_out = self.compiled_step if (self.compiled_step and t == 1 and pos0) else (decode_in, decode_out)
        for block, lc in zip(self.transformer.h, cache.layers):
            y = block.attn.attend_cached(*step_in(block, x, pos), lc, pos0)  # (B, nh, t, hs)
            x = step_out(block, x, y)
        cache.pos += t
        return self.lm_head(self.transformer.ln_f(x))

    compiled_step = None  # (decode_in, decode_out) compiled by compile_decoding(); None: eager

    def compile_decoding(self):
        """Compile the pure parts of a one-byte decoding step (decode_in, decode_out: norms, projections, rotary,
        the MLP) with torch.compile; the cache writes and the attention stay eager. At batch 1 a
        step is ~150 small ops whose dispatch costs more than the cached attention ASCA skips. The prefill and
        multi-byte calls stay eager. Fixed shapes: each part compiles once and serves every layer and step (tested:
        two graphs in all, logits equal to eager)."""
        self.compiled_step = tuple(torch.compile(f, dynamic=False) for f in (decode_in, decode_out))
        return self

    def new_cache(self):
        return KVCache(self.config.n_layer, self.config.block_size)

    # --- hooks the trainer calls; the attention modules own the behaviour (adaptive-span style; the hooks
    # are declared with no-op defaults on CausalSelfAttention)
    def attention_modules(self):
        return [b.attn for b in self.transformer.h]

    def for_sampling(self):
        """Before sample.py decodes: each attention module takes its path for sampling (for_sampling)."""
        self._per_layer("for_sampling")
        return self

    @contextlib.contextmanager
    def eager_paths(self):
        """Every attention module on a path that needs no compile, for the block (eager_path)."""
        with contextlib.ExitStack() as stack:
            for a in self.attention_modules():
                stack.enter_context(a.eager_path())
            yield self

    def aux_loss(self):
        """The attention modules' auxiliary losses from the last training forward, summed (None: none). The trainer
        adds it to the LM loss it backpropagates; the logged train bpc stays the LM loss alone."""
        losses = [loss for loss in (a.aux_loss() for a in self.attention_modules()) if loss is not None]
        return sum(losses) if losses else None

    def set_step(self, iter_num, progress=None):
        """Tell schedule-owning attention modules the schedule position (iterations) and the run's progress in
        [0, 1] (None where unknown)."""
        self._per_layer("set_step", iter_num, progress)

    def diagnostics(self):
        """Flat dict of the attention modules' diagnostics from the last forward (empty for dense)."""
        return self._per_layer("diagnostics")

    def swap_choice(self, rule):
        """Every attention module chooses its blocks by `rule` from now on (eval_selector's mask swap)."""
        for a in self.attention_modules():
            a.swap_choice(rule)

    def measures_recall(self):
        return any(a.measures_recall for a in self.attention_modules())

    def eval_notes(self):
        """The attention modules' notes on an evaluation's scores, each once, in layer order."""
        return list(dict.fromkeys(n for n in (a.eval_note() for a in self.attention_modules()) if n))

    def update_budgets(self, reduce=None):
        """After an optimizer step: modules with controller state (ASCA's adaptive budget) update it from
        the last training forward; `reduce` averages a tensor over DDP ranks so every rank agrees."""
        self._per_layer("update_budget", reduce)

    def start_tally(self):
        """Count diagnostics over the following forwards (tally_step after each) until end_tally."""
        self._per_layer("start_tally")

    def tally_step(self, rows=None):
        self._per_layer("tally_step", rows)

    def end_tally(self):
        return self._per_layer("end_tally")

    def _per_layer(self, name, *args):
        """Call hook `name` on every attention module; a flat dict of their returned dicts: floats
        averaged over layers as `key`, every value per layer as `key_per_layer` (empty if none returns)."""
        per_layer = [getattr(a, name)(*args) for a in self.attention_modules()]  # no-op defaults on dense
        if not per_layer or not per_layer[0]:
            return {}
        out = {}
        for name in per_layer[0]:
            vals = [d[name] for d in per_layer]
            if all(isinstance(v, float) for v in vals):
                out[name] = sum(vals) / len(vals)
            elif all(v is None or isinstance(v, float) for v in vals):
                out[name] = None  # a layer without a value (e.g. no threshold yet): no mean either
            out[f"{name}_per_layer"] = vals
        return out

    def flops_per_token(self, T=None):
        """Training FLOPs per token: 6N for the weights + each layer's attention FLOPs."""
        T = T or self.config.block_size
        return 6 * self.num_params() + sum(a.attn_flops_per_token(T) for a in self.attention_modules())

    def muon_params(self):
        """The hidden matrices Muon orthogonalises: the Linear weights inside the blocks (attention and MLP
        projections). Embeddings, the head, norms, gains and the sparsity predictor's tensors stay with AdamW."""
        return [m.weight for m in self.transformer.h.modules() if isinstance(m, nn.Linear) and m.weight.requires_grad]

    def configure_optimizer(self, weight_decay, learning_rate, betas, device_type, optimizer="adamw",
                            muon_lr=0.02, muon_momentum=0.95, muon_ns_dtype="bfloat16"):
        """AdamW (decay only on matrices, >= 2-D, not on biases, norms or gains); with optimizer='muon',
        Muon (torch's, its Newton-Schulz iteration in muon_ns_dtype: muon.py) on muon_params() and AdamW on
        everything else. Every parameter is in exactly one
        group; groups carry lr_scale so one schedule drives both (lr of a group = schedule lr * lr_scale)."""
        muon = {id(p) for p in self.muon_params()} if optimizer == "muon" else set()
        params = [p for p in self.parameters() if p.requires_grad and id(p) not in muon]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, "lr_scale": 1.0},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0}]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))
        if optimizer == "adamw":
            return adamw
        mu = Muon([{"params": self.muon_params(), "lr_scale": muon_lr / learning_rate}], lr=muon_lr,
                  weight_decay=weight_decay, momentum=muon_momentum, ns_dtype=getattr(torch, muon_ns_dtype))
        return Optimizers(mu, adamw)


class Optimizers(torch.optim.Optimizer):
    """Several optimizers stepped as one (Muon for the hidden matrices, AdamW for the rest): one
    param_groups list for the schedule and GradScaler, one state_dict for checkpoints."""

    def __init__(self, *opts):  # deliberately no super().__init__: the parts own the state
        self.opts = opts
        self.defaults = {}

    @property
    def param_groups(self):  # read afresh: load_state_dict replaces the parts' group dicts
        return [g for o in self.opts for g in o.param_groups]

    @property
    def state(self):
        return {k: v for o in self.opts for k, v in o.state.items()}

    @torch.no_grad()
    def step(self, closure=None):
        for o in self.opts:
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"parts": [o.state_dict() for o in self.opts]}

    def load_state_dict(self, state):
        if len(state.get("parts", ())) != len(self.opts):
            raise ValueError(f"the checkpoint's optimizer has {len(state.get('parts', ()))} parts, this one "
                             f"{len(self.opts)}: it was written with another `optimizer` setting")
        for o, s in zip(self.opts, state["parts"]):
            o.load_state_dict(s)


def make_model(**overrides):
    """A dense GPT from the defaults plus model-config overrides (an unknown key is a TypeError)."""
    return GPT(GPTConfig(**overrides))

