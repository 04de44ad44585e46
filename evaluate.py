"""
The evaluation protocol, in bits per byte (docs/design.md, "evaluation"): validation on fixed windows during
training, and the test split scored once, every byte, with sliding windows (each byte scored with at least
block_size - stride bytes of context). What the model measures over an evaluation (ASCA: its sparsity, which
varies with content) is tallied across all its forwards.
"""
import contextlib
import math

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
            # the training batch's shape, and a compiled model does not compile once more for the last one (issue 23)
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
    """(bpc, bytes scored, what the model measured) over the whole test split."""
    (bpc, n), measured = tallied(model, lambda after: evaluate_stream(
        fwd, ds.splits["test"], cfg["block_size"], cfg["eval_stride"], cfg["batch_size"], device, ctx,
        after_forward=after))
    return bpc, n, measured
