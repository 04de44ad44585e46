"""
How much better than the nearest blocks could any block choice be, once a model is trained? A post-hoc probe: a
trained DENSE checkpoint is scored on the test split with its attention restricted at evaluation to K kept keys per
query (no selector is trained), for several choices of what to keep:

    nearest      the tile's own block and the nearest past blocks (the local rule)
    oracle_first the blocks where the tile's first query puts the most dense attention mass (what ASCA's selector
                 could read: causal)
    oracle_all   the blocks where all of the tile's queries put the most mass (NOT causal: an upper bound for any
                 tile-shared block choice)
    token        each query's own K keys of highest dense attention (not tile-shared: an upper bound at the budget)
    random       random past blocks (seeded)

Each is reported as the change in test bpc against the unrestricted model, on all bytes and on two classes: bytes whose
preceding 8 bytes also occur earlier in the window beyond the nearest block's reach (long-range repeats, where an
earlier occurrence could tell the next byte) and all others.

    python3 scripts/headroom_probe.py out/compare_cpu_match_dense/dense_s1337/ckpt.pt --S 32 --budgets 64 128 256 512
    python3 scripts/headroom_probe.py CKPT --max_windows 40          # a quick look on part of the test split

Prints a table; --out FILE also writes it (and the numbers as FILE.json).
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint  # noqa: E402
from prepare_dataset import ByteDataset, DataError, sliding_windows, stack_windows  # noqa: E402

CHOICES = ("nearest", "oracle_first", "oracle_all", "token", "random")
NGRAM = 8


class ProbeError(Exception):
    """A one-line user error."""


def keep_mask(probs, choice, K, S, generator=None):
    """(B, nh, T, T) bool: the keys each query keeps under `choice` at K keys per query, from the dense model's
    causal attention probabilities (B, nh, T, T). Block choices keep the query's own block (up to itself) and
    K // S - 1 past blocks of its tile, so at most K keys; 'token' keeps the K most attended keys at or before it."""
    B, H, T, _ = probs.shape
    causal = torch.ones(T, T, dtype=torch.bool, device=probs.device).tril()
    if choice == "token":
        k = min(K, T)
        top = probs.topk(k, dim=-1).indices
        return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, top, True) & causal
    nb, n_past = T // S, max(0, K // S - 1)
    tiles = torch.arange(nb, device=probs.device)
    past = tiles[None, :] < tiles[:, None]  # (nb, nb): block j before tile b
    if choice == "nearest":
        prio = (tiles[None, :] - tiles[:, None]).float().expand(B, H, nb, nb)
    elif choice == "random":
        prio = torch.rand(B, H, nb, nb, generator=generator).to(probs.device)
    else:
        mass = probs.view(B, H, nb, S, nb, S).sum(-1)  # (B, nh, tile, query in tile, block): mass per key block
        prio = mass[:, :, :, 0] if choice == "oracle_first" else mass.sum(3)
    prio = prio.masked_fill(~past, float("-inf"))
    order = prio.argsort(dim=-1, descending=True)
    rank_ok = torch.arange(nb, device=probs.device) < torch.minimum(tiles, torch.tensor(n_past))[:, None]  # (nb, nb)
    kept = torch.zeros(B, H, nb, nb, dtype=torch.bool, device=probs.device)
    kept.scatter_(-1, order, rank_ok.expand(B, H, nb, nb))
    kept |= torch.eye(nb, dtype=torch.bool, device=probs.device)  # the own block
    return kept.repeat_interleave(S, dim=2).repeat_interleave(S, dim=3) & causal


def repeat_class(x, S):
    """(B, T) bool: position t (predicting byte t + 1) is a long-range repeat: its preceding 8 bytes x[t-7..t] also
    end at an earlier position e whose next byte lies beyond the nearest block's reach (e + 1 < (t // S - 1) * S),
    where the local rule cannot see it."""
    x = np.asarray(x)
    B, T = x.shape
    out = np.zeros((B, T), dtype=bool)
    for b in range(B):
        row = x[b].tobytes()
        first = {}  # 8-gram -> its earliest end position
        for t in range(NGRAM - 1, T):
            gram = row[t - NGRAM + 1:t + 1]
            e = first.get(gram)
            if e is not None and e + 1 < (t // S - 1) * S:
                out[b, t] = True
            first.setdefault(gram, t)
    return out


class Probe:
    """The dense model with every layer's attention replaced by the masked one of a (choice, K), or None: dense."""

    def __init__(self, model, S, seed=0):
        self.model, self.S, self.setting = model, S, None
        self.gen = torch.Generator().manual_seed(seed)
        for a in model.attention_modules():
            a.attend = self.masked_attend(a)

    def masked_attend(self, a):
        def attend(q, k, v):
            q, k = a.position(q, k)
            T = q.shape[2]
            logits = (q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])
            causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
            logits = logits.masked_fill(~causal, float("-inf"))
            if self.setting is None:
                return torch.softmax(logits, -1).to(v.dtype) @ v
            choice, K = self.setting
            keep = keep_mask(torch.softmax(logits, -1), choice, K, self.S, self.gen)
            return torch.softmax(logits.masked_fill(~keep, float("-inf")), -1).to(v.dtype) @ v
        return attend


@torch.no_grad()
def per_byte_nll(probe, data, T, stride, batch_size, max_windows=None):
    """(nll in bits, repeat class) over the scored targets of the test protocol's sliding windows (every target once;
    the first max_windows windows only, if given)."""
    windows = [w for w in sliding_windows(len(data), T, stride) if w[1] == T]
    windows = windows[:max_windows] if max_windows else windows
    nll, cls = [], []
    for i in range(0, len(windows), batch_size):
        ws = windows[i:i + batch_size]
        x, y = stack_windows(data, [s for s, _, _ in ws], T)
        logits, _ = probe.model(x)
        bits = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none") / math.log(2)
        rep = repeat_class(x.numpy(), probe.S)
        for r, (_, _, n_score) in enumerate(ws):
            nll.append(bits[r, T - n_score:].numpy())
            cls.append(rep[r, T - n_score:])
    return np.concatenate(nll), np.concatenate(cls)


def run(path, S, budgets, choices, batch_size, max_windows, split="test", seed=0):
    model, ckpt = checkpoint.model_from_checkpoint(path)
    if ckpt.get("model_kind") != "baseline":
        raise ProbeError(f"{path} is a {ckpt.get('model_kind')} checkpoint: the probe restricts a DENSE model's "
                         f"attention (baseline_model.py's checkpoints)")
    cfg = ckpt["config"]
    T = ckpt["model_args"]["block_size"]
    if T % S:
        raise ProbeError(f"--S {S} must divide the checkpoint's block_size={T}")
    bad = [k for k in budgets if k < S or k > T]
    if bad:
        raise ProbeError(f"--budgets {bad} must lie between S={S} and block_size={T} keys")
    try:
        ds = ByteDataset(cfg["data_dir"])
    except DataError as e:
        raise ProbeError(f"the checkpoint's data ({cfg['data_dir']}): {e}") from None
    data = ds.splits[split]
    stride = cfg.get("eval_stride") or T // 2
    probe = Probe(model.float().eval(), S, seed)
    base, cls = per_byte_nll(probe, data, T, stride, batch_size, max_windows)
    rows = [{"choice": "dense", "K": T, "bpc": float(base.mean()), "d_all": 0.0, "d_repeat": 0.0, "d_other": 0.0}]
    for K in budgets:
        for choice in choices:
            probe.setting = (choice, K)
            nll, _ = per_byte_nll(probe, data, T, stride, batch_size, max_windows)
            d = nll - base
            rows.append({"choice": choice, "K": K, "bpc": float(nll.mean()), "d_all": float(d.mean()),
                         "d_repeat": float(d[cls].mean()) if cls.any() else None,
                         "d_other": float(d[~cls].mean()) if (~cls).any() else None})
            print(f"K={K} {choice}: {rows[-1]['bpc']:.4f} ({rows[-1]['d_all']:+.4f})", flush=True)
        probe.setting = None
    return {"checkpoint": os.path.realpath(path), "iter": ckpt.get("iter_num"), "T": T, "S": S, "split": split,
            "stride": stride, "bytes": int(len(base)), "repeat_fraction": float(cls.mean()), "rows": rows,
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}


def table(r):
    lines = [f"Headroom probe: {r['checkpoint']} (iter {r['iter']}, T={r['T']}), S={r['S']}, {r['split']} split, "
             f"{r['bytes']:,} bytes (stride {r['stride']}); long-range repeats: {r['repeat_fraction']:.3f} of them; "
             f"{r['date']}, torch {r['torch']}", "",
             "| K keys | choice | test bpc | Δ all | Δ long-range repeats | Δ other bytes |",
             "|---|---|---|---|---|---|"]
    f = lambda v: "-" if v is None else f"{v:+.4f}"  # noqa: E731
    for row in r["rows"]:
        lines.append(f"| {row['K']} | {row['choice']} | {row['bpc']:.4f} | {f(row['d_all'])} | {f(row['d_repeat'])} | "
                     f"{f(row['d_other'])} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a dense run's ckpt.pt")
    p.add_argument("--S", type=int, default=32, help="block and tile size (default 32)")
    p.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256, 512], help="keys kept per query")
    p.add_argument("--choices", nargs="+", default=list(CHOICES), choices=CHOICES)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_windows", type=int, default=None, help="score only the first N windows")
    p.add_argument("--out", default=None, help="also write the table here, and the numbers to OUT.json")
    a = p.parse_args(argv)
    try:
        r = run(a.checkpoint, a.S, a.budgets, a.choices, a.batch_size, a.max_windows)
    except (ProbeError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    text = table(r)
    print("\n" + text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
        with open(a.out + ".json", "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
