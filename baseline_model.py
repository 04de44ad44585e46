"""
Dense causal GPT over raw bytes (vocab 256), in the nanoGPT mould, and its training script.

    python baseline_model.py config/train_enwik8.py --max_time_s=600

The attention class is a constructor argument, so novel_model.py swaps in the sparse attention
without copying this model; both scripts share the loop in trainer.py.
References: nanoGPT model.py (Karpathy), GPT-2 (Radford et al. 2019) for the init.
"""
import inspect
import math
import sys
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 256  # raw bytes
    n_layer: int = 12
    n_head: int = 8
    n_embd: int = 512
    dropout: float = 0.0
    bias: bool = False  # bias in Linears and LayerNorms; False is a bit better and faster

    # keys that may differ between a checkpoint and a resumed run (they do not change the weights)
    RUNTIME_KEYS = ("dropout",)
    # keys that describe the device a run used, not the model: reset when a checkpoint is loaded elsewhere
    DEVICE_DEFAULTS = {}

    @classmethod
    def from_dict(cls, d):
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def validate(self):
        """Raise ValueError with a one-line message for an impossible model shape."""
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        for k in ("block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be at least 1, got {getattr(self, k)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def check_device(self, device_type, dtype, training):
        """Raise ValueError (one line) if this config cannot run on the device; the dense GPT runs anywhere."""


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through SDPA (flash attention on CUDA)."""

    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def qkv(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        return [t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v)]

    def attend(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                              dropout_p=self.dropout if self.training else 0.0)

    def forward(self, x):
        B, T, C = x.shape
        y = self.attend(*self.qkv(x))  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    @torch.no_grad()
    def attention_map(self, x):
        """For analysis (extraction.py): attention probabilities (B, nh, T, T) for layer input x."""
        q, k, _ = self.qkv(x)
        T = q.shape[2]
        att = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        return {"attention": F.softmax(att.masked_fill(~causal, float("-inf")), dim=-1)}

    def attn_flops_per_token(self, T):
        """Forward+backward FLOPs of the score and value matmuls per token. PaLM (appendix B) counts
        12 * C * T for the full T x T plane; causal attention computes half of it."""
        return 6 * self.n_embd * T


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config, attn_cls):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = attn_cls(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Pre-norm GPT. forward(idx, targets=None) -> (logits (B, T, 256), mean loss in nats or None)."""

    def __init__(self, config, attn_cls=CausalSelfAttention):
        super().__init__()
        config.validate()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, attn_cls) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
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
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, 256): every position, for tests and eval
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    # --- hooks the trainer calls; the attention modules own the behaviour (adaptive-span style).
    # A module that needs an auxiliary loss would expose it the same way; none does yet.
    def attention_modules(self):
        return [b.attn for b in self.transformer.h]

    def set_step(self, iter_num):
        """Tell schedule-owning attention modules the current training iteration."""
        for a in self.attention_modules():
            if hasattr(a, "set_step"):
                a.set_step(iter_num)

    def diagnostics(self):
        """Flat dict of the attention modules' diagnostics from the last forward (empty for dense)."""
        per_layer = [a.diagnostics() for a in self.attention_modules() if hasattr(a, "diagnostics")]
        if not per_layer or not per_layer[0]:
            return {}
        out = {}
        for key in per_layer[0]:
            vals = [d[key] for d in per_layer]
            if isinstance(vals[0], float):
                out[key] = sum(vals) / len(vals)
            out[f"{key}_per_layer"] = vals
        return out

    def flops_per_token(self, T=None):
        """Training FLOPs per token: 6N for the weights + each layer's attention FLOPs."""
        T = T or self.config.block_size
        return 6 * self.num_params() + sum(a.attn_flops_per_token(T) for a in self.attention_modules())

    def configure_optimizer(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; decay only on matrices (>= 2-D), not on biases, norms or gains."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))


# ----------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class ModelKind:
    """What the trainer, sample.py and extraction.py need to know about a model: its config class and
    attention class (so they build it from a config or a checkpoint's model_args), and its script."""
    name: str
    config_cls: type
    attn_cls: type
    script: str
    out_dir: str  # default out_dir of its script

    def defaults(self):
        return {f.name: f.default for f in fields(self.config_cls) if f.name != "vocab_size"}

    def build(self, cfg):
        """The model for a dict holding (at least) this kind's config keys; others are ignored."""
        return GPT(self.config_cls.from_dict(cfg), attn_cls=self.attn_cls)

    def make_model(self, **overrides):
        """This kind's defaults plus model-config overrides; an unknown key is a TypeError."""
        cfg = self.defaults()
        unknown = sorted(set(overrides) - set(cfg))
        if unknown:
            raise TypeError(f"make_model: unknown keys {unknown}; known: {', '.join(sorted(cfg))}")
        cfg.update(overrides)
        return self.build(cfg)


MODELS = {}  # model_kind -> ModelKind; novel_model.py adds "asca" when imported


def register(kind):
    MODELS[kind.name] = kind
    return kind


BASELINE = register(ModelKind("baseline", GPTConfig, CausalSelfAttention, "baseline_model.py", "out/baseline"))
make_model = BASELINE.make_model

if __name__ == "__main__":  # python baseline_model.py [config/X.py ...] [--key=value ...]
    import trainer
    sys.exit(trainer.main(sys.argv[1:], "baseline"))
