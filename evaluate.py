"""
The evaluation protocol, in bits per byte (docs/design.md, "evaluation"): validation on fixed windows during
training, and the test split scored once, every byte, with sliding windows (each byte scored with at least
block_size - stride bytes of context). What the model measures over an evaluation (ASCA: its sparsity, which
varies with content) is tallied across all its forwards.
"""
import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from prepare_dataset import sliding_windows, stack_windows

LN2 = math.log(2)


@torch.no_grad()
def eval_windows(model, data, starts, block_size, batch_size, device, ctx, after_forward=None):
    """Mean bits per byte over fixed windows data[s : s+block_size] -> next bytes (after_forward: as
    evaluate_stream's)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        x, y = (t.to(device) for t in stack_windows(data, starts[i:i + batch_size], block_size))
        with ctx:
            logits, _ = model(x)
        if after_forward is not None:
            after_forward()
        total += F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), reduction="sum").item()
        count += y.numel()
    return total / count / LN2


@torch.no_grad()
def evaluate_stream(model, data, block_size, stride, batch_size, device, ctx=contextlib.nullcontext(),
                    after_forward=None):
    """Bits per byte over every target byte 1..n-1 of `data`, each scored exactly once, with sliding
    windows of block_size and the given stride (docs/design.md, "evaluation"). Returns (bpc, n_scored).
    after_forward(rows) is called after each forward (to tally what the model measured on its first `rows`
    sequences: the real ones)."""
    model.eval()
    windows = sliding_windows(len(data), block_size, stride)
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        by_len = {}
        for w in windows[i:i + batch_size]:  # all windows have length block_size unless the data is shorter
            by_len.setdefault(w[1], []).append(w)
        for length, ws in by_len.items():
            # a short last batch is filled up with copies of its last window, scored nowhere: every forward then has
            # the training batch's shape, and a compiled model does not compile once more for the last one
            rows = ws + [ws[-1]] * (batch_size - len(ws)) if length == block_size else ws
            x, y = (t.to(device) for t in stack_windows(data, [s for s, _, _ in rows], length))
            with ctx:
                logits, _ = model(x)
            if after_forward is not None:
                after_forward(len(ws))  # the real rows: the filler's selection is not tallied
            nll = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")  # (b, length)
            keep = torch.zeros_like(nll, dtype=torch.bool)
            for r, (_, _, n_score) in enumerate(ws):  # the filler rows keep nothing
                keep[r, length - n_score:] = True
            total += nll[keep].double().sum().item()
            count += int(keep.sum().item())
    return total / count / LN2, count


def tallied(model, run):
    """(run(after_forward), what the model measured over the forwards run made): run calls after_forward()
    after each forward, which adds that forward to the model's tally."""
    model.start_tally()
    out = run(model.tally_step)
    return out, model.end_tally()


def val_bpc(model, fwd, ds, cfg, device, ctx):
    """(bpc on the fixed val windows, what the model measured over them); fwd: the (compiled) model to call."""
    starts = ds.val_windows(cfg["block_size"], cfg["eval_iters"] * cfg["batch_size"])
    return tallied(model, lambda after: eval_windows(fwd, ds.splits["val"], starts, cfg["block_size"],
                                                     cfg["batch_size"], device, ctx, after_forward=after))


def test_bpc(model, fwd, ds, cfg, device, ctx):
    """(bpc, bytes scored, what the model measured) over the whole test split. On a synthetic task's episodes (meta
    'align'), each episode is one window, as in training: every byte after its first is scored once, with its own
    episode as context (a window across two episodes sees an arrangement training never shows)."""
    align = ds.meta.get("align")
    if align:
        data = ds.splits["test"]
        starts = [k * align for k in range(len(data) // align)]
        bpc, measured = tallied(model, lambda after: eval_windows(
            fwd, data, starts, align - 1, cfg["batch_size"], device, ctx, after_forward=after))
        return bpc, len(starts) * (align - 1), measured
    (bpc, n), measured = tallied(model, lambda after: evaluate_stream(
        fwd, ds.splits["test"], cfg["block_size"], cfg["eval_stride"], cfg["batch_size"], device, ctx,
        after_forward=after))
    return bpc, n, measured


# ----------------------------------------------------------------------------- the synthetic recall task

@torch.no_grad()
def recall_answers(model, data, align, block_size, batch_size, device, ctx=contextlib.nullcontext(), n_episodes=None):
    """recall_task.summarize over the episodes of `data` (the first n_episodes, or all): at each query byte, whether
    the model's most likely next byte is the answer, and its bits on the answer; per query-to-record distance."""
    import recall_task
    model.eval()
    n = len(data) // align if n_episodes is None else min(n_episodes, len(data) // align)
    correct, bits, dist = [], [], []
    for i in range(0, n, batch_size):
        starts = [k * align for k in range(i, min(n, i + batch_size))]
        x, y = stack_windows(data, starts, block_size)
        bi, ti, ans, d = recall_task.answers(x.numpy())
        with ctx:
            logits, _ = model(x.to(device))
        if len(bi) == 0:
            continue
        at = logits.float()[torch.as_tensor(bi, device=logits.device), torch.as_tensor(ti, device=logits.device)]
        target = torch.as_tensor(ans, device=logits.device)
        if not torch.equal(y[torch.as_tensor(bi), torch.as_tensor(ti)].to(target.device), target):
            raise ValueError("the data's answer bytes do not follow its queries: it was not made by recall_task.py")
        correct += (at.argmax(-1) == target).tolist()
        bits += (F.cross_entropy(at, target, reduction="none") / LN2).tolist()
        dist += d.tolist()
    return recall_task.summarize(correct, bits, dist, block_size)


# ----------------------------------------------------------------------------- the long-range copy test
# enwik8's needle test: a copy of an L-byte span planted at distance d from its source, in held-out windows. A model
# that reaches the source predicts the copy's bytes at a few tenths of a bit; one confined to its nearest blocks
# cannot. The copy's first COPY_SKIP bytes are not scored: only after them has the model seen that a copy began.
COPY_SKIP = 8
COPY_SEED = 32  # the plan (windows, distances, positions) is the same for every model, so their rows compare


def check_copy_len(copy_len, block_size):
    """One line naming the fix when a copy and its source cannot both fit a window (None: they fit)."""
    if copy_len <= COPY_SKIP:
        return f"copy_len={copy_len} must exceed the {COPY_SKIP} bytes the copy test leaves unscored: use at least " \
               f"{COPY_SKIP + 1} (the default is 64)"
    if 2 * copy_len > block_size:
        return f"copy_len={copy_len} does not fit block_size={block_size}: a copy and its source need " \
               f"2*copy_len <= block_size; use copy_len <= {block_size // 2}"
    return None


def copy_buckets(block_size, copy_len):
    """[(lo, hi)]: distance buckets (inclusive) from copy_len (the copy just after its source) doubling up to
    block_size - copy_len (the source at the window's start, the copy at its end)."""
    top, out, lo = block_size - copy_len, [], copy_len
    while lo <= top:
        hi = min(2 * lo - 1, top)
        if top - hi < lo // 2:  # a last bucket narrower than half of its predecessor's width joins it
            hi = top
        out.append((lo, hi))
        lo = hi + 1
    return out


def plant(seq, d, p, copy_len):
    """seq (.., T+1) with bytes p..p+L-1 replaced by the source bytes p-d..p-d+L-1 (a copy of the same array)."""
    out = seq.copy()
    out[..., p:p + copy_len] = seq[..., p - d:p - d + copy_len]
    return out


def copy_plan(n_windows, buckets, block_size, copy_len, seed=COPY_SEED):
    """[(window, bucket, d, p)]: in each window, one plant per bucket at a distance d drawn in the bucket and a
    copy start p drawn where the copy and its source fit the window's T+1 bytes (p - d >= 0, p + L <= T + 1)."""
    rng = np.random.default_rng(seed)
    out = []
    for w in range(n_windows):
        for b, (lo, hi) in enumerate(buckets):
            d = int(rng.integers(lo, hi + 1))
            p = int(rng.integers(d, block_size + 2 - copy_len))
            out.append((w, b, d, p))
    return out


@torch.no_grad()
def copy_test(model, data, block_size, copy_len, n_windows, batch_size, device, ctx=contextlib.nullcontext()):
    """Bits per byte on planted copies, per distance bucket, next to the same bytes of the same windows without
    the plant. Windows: n_windows fixed, evenly spaced offsets of `data` (the test split). Returns
    {"copy_len", "skip", "windows", "buckets": [{"lo", "hi", "bpc_copy", "bpc_plain", "bytes"}]}."""
    why = check_copy_len(copy_len, block_size)
    if why:
        raise ValueError(why)
    model.eval()
    T, L = block_size, copy_len
    last = len(data) - T - 1
    starts = sorted({int(round(i * last / max(1, n_windows - 1))) for i in range(n_windows)}) if last > 0 else [0]
    windows = [np.asarray(data[s:s + T + 1], dtype=np.int64) for s in starts]
    buckets = copy_buckets(T, L)
    plan = copy_plan(len(windows), buckets, T, L)

    def nll_rows(seqs):  # (n, T) nats of each target byte 1..T, in batches
        out = []
        for i in range(0, len(seqs), batch_size):
            s = torch.from_numpy(np.stack(seqs[i:i + batch_size]))
            x, y = s[:, :-1].to(device), s[:, 1:].to(device)
            with ctx:
                logits, _ = model(x)
            out.append(F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none").double().cpu())
        return torch.cat(out)

    plain = nll_rows(windows)  # (W, T)
    planted = nll_rows([plant(windows[w], d, p, L) for w, _, d, p in plan])  # (W * n_buckets, T)
    sums = [[0.0, 0.0, 0] for _ in buckets]
    for row, (w, b, d, p) in enumerate(plan):
        scored = slice(p + COPY_SKIP - 1, p + L - 1)  # target index j-1 predicts byte j: bytes p+8 .. p+L-1
        sums[b][0] += planted[row, scored].sum().item()
        sums[b][1] += plain[w, scored].sum().item()
        sums[b][2] += L - COPY_SKIP
    return {"copy_len": L, "skip": COPY_SKIP, "windows": len(windows),
            "buckets": [{"lo": lo, "hi": hi, "bpc_copy": c / n / LN2, "bpc_plain": u / n / LN2, "bytes": n}
                        for (lo, hi), (c, u, n) in zip(buckets, sums)]}


def plant_copies(x, y, fraction, copy_len, generator):
    """copy_augment: in a fraction of the training windows (x, y: (B, T) int64, y = x shifted by one), a copy of
    copy_len bytes planted at a distance drawn uniformly where it fits (copy_len .. T - copy_len), as the copy test
    plants them. Draws from `generator` only when fraction > 0, so that runs without it keep their data stream."""
    if fraction <= 0:
        return x, y
    B, T = x.shape
    L = copy_len
    seq = torch.cat([x, y[:, -1:]], dim=1)  # (B, T+1): the window's bytes
    hit = torch.rand(B, generator=generator) < fraction
    d = torch.randint(L, T - L + 1, (B,), generator=generator)
    u = torch.rand(B, generator=generator)
    for r in torch.nonzero(hit).flatten().tolist():
        dr = int(d[r])
        p = dr + int(u[r] * (T + 2 - L - dr))  # uniform in [d, T+1-L]
        seq[r, p:p + L] = seq[r, p - dr:p - dr + L].clone()
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
