"""Shared test helpers: a small learnable text dataset, running the training scripts, the one-line error
check, a naive per-query attention loop, causality checks, and models with injected faults. Test files
import from here, never from each other."""
import itertools
import math
import os
import subprocess
import sys

import numpy as np
import torch
import torch.nn.functional as F

import prepare_dataset
from baseline_model import GPT
from novel_model import ASCAConfig, AdaptiveSparseCausalSelfAttention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "config", "train_tiny.py")
WORDS = ("the of and to in is was for on as with by he at from his an were are which this be or first "
         "[[ ]] == {{ }} | = < > history city people new world state war").split()


def make_text(n=60_000, seed=0):
    """Pseudo-text with word-level structure, so a tiny model's loss really falls."""
    rng = np.random.default_rng(seed)
    out, size = [], 0
    while size < n:
        w = WORDS[rng.integers(len(WORDS))]
        out.append(w)
        size += len(w) + 1
    return " ".join(out).encode()[:n]


def make_dataset(path, n=60_000, seed=0):
    prepare_dataset.write_splits(make_text(n, seed), str(path), "test-made text")
    return str(path)


def run_script(script, *args, env_extra=None, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def train_in_process(module, args, build_model=None):
    """Run a training script's entry point in this process, exactly as its __main__ does (module:
    baseline_model or novel_model), on the tiny config plus args; build_model replaces the model builder."""
    import trainer
    kind = {"baseline_model": "baseline", "novel_model": "asca"}[module.__name__]
    return trainer.main([TINY, *args], kind, build_model=build_model)


def causality_violation(model, mode, ts=(1, 9, 40, 64, 100, 127)):
    """Largest change of logits before t when bytes >= t change; and the smallest change after (sequences of
    128 bytes; the same dropout draws for both forwards)."""
    model.train(mode == "train")
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 256, (2, 128), generator=g)
    worst_before, least_after = 0.0, float("inf")
    for t in ts:
        other = idx.clone()
        other[:, t:] = torch.randint(0, 256, other[:, t:].shape, generator=g)
        torch.manual_seed(1)
        a, _ = model(idx)
        torch.manual_seed(1)
        b, _ = model(other)
        worst_before = max(worst_before, (a[:, :t] - b[:, :t]).abs().max().item())
        least_after = min(least_after, (a[:, t:] - b[:, t:]).abs().max().item())
    return worst_before, least_after


def one_line(err):
    """The single 'error: ...' line a user error must be (no traceback); returns it."""
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    return lines[0]


def naive_block_attention(q, k, v, scores, S, kept_blocks):
    """Per-query loop over the past blocks kept_blocks(bb, h, b) names for tile b, plus the query's own
    block up to itself; kept past blocks add logsigmoid(score) to their logits."""
    B, H, T, hs = q.shape
    out = torch.zeros_like(q)
    for bb, h in itertools.product(range(B), range(H)):
        for i in range(T):
            b = i // S
            keys = [t for j in kept_blocks(bb, h, b) for t in range(j * S, j * S + S)] + list(range(b * S, i + 1))
            bias = torch.stack([F.logsigmoid(scores[bb, h, b, t // S]) if t // S != b else scores.new_zeros(())
                                for t in keys])
            logits = torch.stack([q[bb, h, i] @ k[bb, h, t] for t in keys]) / math.sqrt(hs) + bias
            out[bb, h, i] = torch.softmax(logits, 0) @ v[bb, h, keys]
    return out


class NaNAfter(GPT):
    """A GPT whose loss turns NaN from iteration 6 on (as a diverging run would)."""

    def set_step(self, it, progress=None):
        self.step = it

    def forward(self, idx, targets=None):
        logits, loss = super().forward(idx, targets)
        if loss is not None and self.training and self.step >= 6:
            loss = loss * float("nan")
        return logits, loss


def attn_module(T=128, S=8, H=2, hs=8, target=0.75, keep_first=True, local_blocks=0, dtype=torch.float64, **kw):
    """One ASCA attention layer on the reference path with learned (position-free) q, k, seeded; kw: more
    ASCAConfig keys. By default the selection the naive loops here spell out: the sink and no forced local block
    (ASCA's defaults before local_blocks); tests/test_selection_options.py's loops cover local_blocks."""
    torch.manual_seed(0)
    cfg = ASCAConfig(block_size=T, n_head=H, n_embd=H * hs, sparse_block_size=S, target_sparsity=target,
                     sparsity_warmup_iters=0, keep_first_block=keep_first, local_blocks=local_blocks,
                     attn_impl="reference", pos_encoding="learned", **kw)
    # position-free q, k (learned positions): the naive loops below define the function on them
    return AdaptiveSparseCausalSelfAttention(cfg).to(dtype)


def attend_with_grads(a, q, k, v, wts, params):
    """An attention module's attend() on fresh leaf copies of q, k, v, backward of sum(y * wts): (y, [the grads of
    q, k, v, then of each of params() after backward]) (a kernel compared against another with gradients)."""
    a.zero_grad()
    qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
    y = a.attend(qq, kk, vv)
    (y * wts).sum().backward()
    return y.detach(), [qq.grad, kk.grad, vv.grad, *(p.grad.clone() for p in params())]
