"""
Pictures and tables from runs: attention and keep-mask maps from a checkpoint, sparsity and
training curves from metrics.jsonl, and a comparison of several runs (baseline vs ASCA).

    python extraction.py out/excerpt_cpu_baseline out/excerpt_cpu_novel --chars
    python extraction.py out/RUN --text some.txt --offset 1000 --length 256
    python extraction.py --headline docs/headline.png docs/results/raw/headline.json   # README's figure
    python extraction.py --headline fig.png out/compare_x/comparison.json out/compare_y/comparison.json
    python extraction.py --frontier fig.png out/compare_x/comparison.json ...   # test bpc against training compute

--headline draws test bpc per run with every seed as a point and the mean as a bar, one panel per comparison:
from the comparison.json that compare.py writes, or a JSON list of such panels ({"title", "rows": [{"name",
"test_bpc": [per seed]}], ...}).

Per run it writes out/RUN/extract/attention.npz and PNGs into out/RUN/plots/; with several runs,
overlay plots and comparison.md go into the first run's plots/. It reads whatever exists, so it
works on runs still in progress and on checkpoints written on a GPU.

attention.npz holds (L layers, H heads, T window bytes, nb = ceil(T / sparse_block_size)):
  tokens (T,) uint8            the window's bytes
  attention (L, H, T, T) f32   attention probabilities (row i: query i over keys; rows sum to 1)
  offset, iter () int64        where the window starts in its source; the checkpoint's iteration
  source () str                the file or split the window came from
  ASCA runs only:
  keep_mask (L, H, T, T) bool  query-key pairs the sparse attention computes (causal, block-structured)
  block_selection (L, H, nb, nb) bool   kept key blocks per query tile
  gate_scores (L, H, nb, nb) f32        the predictor's scores (meaningful below the diagonal)
  pair_sparsity (L, H) f32     fraction of causal pairs skipped in this window
  sparse_block_size () int64
"""
import argparse
import json
import os
import sys

import numpy as np


class ExtractError(Exception):
    pass


# ----------------------------------------------------------------------------- reading runs

class Run:
    def __init__(self, path):
        self.path = path.rstrip("/")
        self.name = os.path.basename(self.path)
        if not os.path.isdir(path):
            raise ExtractError(f"{path} is not a directory; give run directories such as out/baseline")
        files = set(os.listdir(path))
        if not files & {"config.json", "metrics.jsonl", "ckpt.pt", "final.json"}:
            raise ExtractError(f"{path} is not a run directory (no config.json, metrics.jsonl or ckpt.pt)")
        self.config = self._json("config.json") or {}
        self.final = self._json("final.json")
        self.metrics = []
        mpath = os.path.join(path, "metrics.jsonl")
        if os.path.exists(mpath):
            with open(mpath) as f:
                lines = f.read().split("\n")
            for i, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    row = None
                if not isinstance(row, dict):
                    if i == len(lines):  # a run in progress may have a half-written last line
                        continue
                    raise ExtractError(f"{mpath}, line {i} is not a JSON object ({line[:60]!r}); the file was edited "
                                       f"or damaged: delete or mend that line")
                self.metrics.append(row)
        self.stale_final = None
        if self.final and self.metrics and self.final.get("iters", -1) < self.metrics[-1].get("iter", -1):
            # final.json of an earlier finish, and the run went on (resumed): its numbers are not the latest
            self.stale_final, self.final = self.final, None
        self.kind = (self.final or self.stale_final or {}).get("model_kind") or (
            "asca" if "target_sparsity" in self.config else "baseline")
        self.plots = os.path.join(path, "plots")

    def _json(self, name):
        p = os.path.join(self.path, name)
        if not os.path.exists(p):
            return None
        try:
            with open(p) as f:
                return json.load(f)
        except ValueError as e:
            raise ExtractError(f"{p} is not valid JSON ({e})") from None

    def test_set(self):
        """What the test bpc was measured on: the test split's sha256 as the run recorded it (final.json,
        since 2026-12-01), else the data_dir's current one marked as unrecorded (the data may have been split
        again since); plus the protocol (block_size, eval_stride). Runs compare only if these are equal."""
        data_dir = (self.final or {}).get("data_dir") or self.config.get("data_dir")
        recorded = (self.final or self.stale_final or {}).get("data_sha256")
        if isinstance(recorded, dict) and recorded.get("test"):
            test = recorded["test"][:12]
        else:
            sha = None
            try:
                with open(os.path.join(data_dir, "meta.json")) as f:
                    sha = json.load(f)["splits"]["test"]["sha256"]
            except (OSError, ValueError, KeyError, TypeError):
                pass
            test = f"{sha[:12] if sha else data_dir} (now; not recorded by the run)"
        return (test, self.last("block_size") or self.config.get("block_size"),
                self.last("eval_stride") or self.config.get("eval_stride"))

    def training_data(self):
        """The train and val splits' sha256 as the run recorded them (final.json), or 'not recorded': runs trained
        on other bytes do not compare, even on one test set."""
        recorded = (self.final or self.stale_final or {}).get("data_sha256")
        if isinstance(recorded, dict) and recorded.get("train"):
            return f"train {str(recorded['train'])[:12]}, val {str(recorded.get('val'))[:12]}"
        return "not recorded"

    def label(self):
        c = self.config
        s = f"{self.name} ({self.kind}"
        if c:
            s += f", {c.get('n_layer')}L {c.get('n_embd')}d {c.get('n_head')}h T={c.get('block_size')}"
        if self.kind == "asca" and c:
            s += f", S={c.get('sparse_block_size')}, target {c.get('target_sparsity')}"
        if self.origin():
            s += f", {self.warm_text()}"
        return s + ")"

    def origin(self):
        """Where the run's weights came from (init_from=PATH; config.json, else final.json), or None."""
        o = self.config.get("init_origin") or (self.final or self.stale_final or {}).get("init_origin")
        return o if isinstance(o, dict) else None

    def warm_text(self):
        """'warm from SOURCE at iter N (+T tokens before)': the source run's directory, its iteration and tokens."""
        o = self.origin()
        src = os.path.basename(os.path.dirname(str(o.get("path", "?"))))
        before = f", +{o['tokens']:,} tokens before" if isinstance(o.get("tokens"), int) else ""
        return f"warm from {src} at iter {o.get('iter', '?')}{before}"

    def last(self, key):
        """The latest value of `key`: final.json first, then the newest metrics row that has it."""
        if self.final and self.final.get(key) is not None:
            return self.final[key]
        for row in reversed(self.metrics):
            if row.get(key) is not None:
                return row[key]
        return None

    def series(self, key, x="iter"):
        rows = [r for r in self.metrics if r.get(key) is not None and r.get(x) is not None]
        return [r[x] for r in rows], [r[key] for r in rows]


# ----------------------------------------------------------------------------- extraction

def window_bytes(run, args, block_size):
    if args.text:
        if not os.path.isfile(args.text):
            raise ExtractError(f"--text {args.text} does not exist")
        data = np.fromfile(args.text, dtype=np.uint8)
        source = args.text
    else:
        from prepare_dataset import ByteDataset, DataError
        data_dir = run.config.get("data_dir")
        try:
            data = ByteDataset(data_dir).splits[args.split]
        except (DataError, TypeError) as e:
            raise ExtractError(f"cannot read the {args.split} split of {run.name} ({e}); "
                               f"pass --text FILE instead") from None
        source = f"{data_dir}/{args.split}.bin"
    length = args.length or min(block_size, 256)
    if length > block_size:
        raise ExtractError(f"--length {length} exceeds the model's block_size {block_size}")
    if args.offset < 0 or args.offset + length > len(data):
        raise ExtractError(f"window [{args.offset}, {args.offset + length}) is outside {source} "
                           f"({len(data)} bytes); choose --offset <= {len(data) - length}")
    return np.array(data[args.offset:args.offset + length], dtype=np.uint8), source


def extract(run, args):
    """Run the checkpoint on the window and save attention.npz; returns the arrays (or None)."""
    import torch
    from checkpoint import CheckpointError, model_from_checkpoint
    name = "best.pt" if args.best else "ckpt.pt"
    path = os.path.join(run.path, name)
    if not os.path.exists(path):
        print(f"{run.name}: no {name} yet; attention maps skipped, curves only")
        return None
    try:
        model, ckpt = model_from_checkpoint(path, "cpu")  # map_location=cpu: GPU checkpoints load anywhere
    except CheckpointError as e:
        raise ExtractError(str(e)) from None
    tokens, source = window_bytes(run, args, model.config.block_size)
    inputs = {}
    hooks = [blk.attn.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0]))
             for i, blk in enumerate(model.transformer.h)]
    with torch.no_grad():
        model(torch.from_numpy(tokens.astype(np.int64))[None])
    for h in hooks:
        h.remove()
    maps = [blk.attn.attention_map(inputs[i]) for i, blk in enumerate(model.transformer.h)]
    out = {"tokens": tokens, "offset": np.int64(args.offset), "iter": np.int64(ckpt.get("iter_num", 0)),
           "source": np.array(source),
           "attention": np.stack([m["attention"][0].numpy() for m in maps]).astype(np.float32)}
    if "keep_mask" in maps[0]:
        keep = np.stack([m["keep_mask"][0].numpy() for m in maps])
        T = len(tokens)
        causal = np.tril(np.ones((T, T), dtype=bool))
        out.update(keep_mask=keep, block_selection=np.stack([m["block_selection"][0].numpy() for m in maps]),
                   gate_scores=np.stack([m["gate_scores"][0].numpy() for m in maps]).astype(np.float32),
                   pair_sparsity=(1 - keep.sum(axis=(-1, -2)) / causal.sum()).astype(np.float32),
                   sparse_block_size=np.int64(model.config.sparse_block_size))
    os.makedirs(os.path.join(run.path, "extract"), exist_ok=True)
    tmp = os.path.join(run.path, "extract", "attention.tmp.npz")
    np.savez_compressed(tmp, **out)
    os.replace(tmp, os.path.join(run.path, "extract", "attention.npz"))
    return out


# ----------------------------------------------------------------------------- plots

def plt_module():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path):
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt_module().close(fig)
    return path


def grid_plot(run, arr, title, path, cmap, block=None, norm=None):
    plt = plt_module()
    L, H = arr.shape[:2]
    fig, axes = plt.subplots(L, H, figsize=(2.4 * H + 1, 2.4 * L + 0.8), squeeze=False)
    T = arr.shape[-1]
    for l in range(L):
        for h in range(H):
            ax = axes[l][h]
            im = ax.imshow(arr[l, h], cmap=cmap, norm=norm, interpolation="nearest",
                           extent=(-0.5, T - 0.5, T - 0.5, -0.5))
            if block:
                for b in range(block, T, block):
                    ax.axhline(b - 0.5, color="tab:red", lw=0.3)
                    ax.axvline(b - 0.5, color="tab:red", lw=0.3)
            ax.set_title(f"layer {l} head {h}", fontsize=8)
            ax.tick_params(labelsize=6)
            if h == 0:
                ax.set_ylabel("query position (byte)", fontsize=7)
            if l == L - 1:
                ax.set_xlabel("key position (byte)", fontsize=7)
    fig.colorbar(im, ax=axes, shrink=0.6)
    fig.suptitle(f"{title}\n{run.label()}", fontsize=9)
    return save(fig, path)


def chars_plot(run, ex, path, n, layer, head):
    plt = plt_module()
    tokens = ex["tokens"]
    n = min(n, len(tokens))
    att = ex["attention"][layer, head][-n:, -n:]
    labels = [chr(t) if 32 <= t < 127 else f"\\x{t:02x}" for t in tokens[-n:]]
    fig, ax = plt.subplots(figsize=(0.22 * n + 2, 0.22 * n + 1.5))
    im = ax.imshow(att, cmap="viridis", interpolation="nearest")
    if "keep_mask" in ex:
        skipped = ~ex["keep_mask"][layer, head][-n:, -n:] & np.tril(np.ones((n, n), dtype=bool))
        ax.imshow(np.ma.masked_where(~skipped, skipped), cmap="Reds", alpha=0.35, vmin=0, vmax=1)
    ax.set_xticks(range(n), labels, fontsize=7, family="monospace")
    ax.set_yticks(range(n), labels, fontsize=7, family="monospace")
    ax.set_xlabel("key byte")
    ax.set_ylabel("query byte")
    fig.colorbar(im, ax=ax, shrink=0.6, label="attention probability")
    extra = " (red: skipped by ASCA)" if "keep_mask" in ex else ""
    ax.set_title(f"layer {layer} head {head}, last {n} bytes of the window{extra}\n{run.label()}", fontsize=8)
    return save(fig, path)


def per_head_sparsity_plot(run, ex, path):
    plt = plt_module()
    per = run.last("sparsity_per_head_per_layer")
    blocks = run.last("block_sparsity_per_head_per_layer")
    where = "measured in training (last eval)"
    if per is None and ex is not None and "pair_sparsity" in ex:
        per, blocks, where = ex["pair_sparsity"].tolist(), None, "measured on the extracted window"
    if per is None:
        return None
    per = np.array(per)
    L, H = per.shape
    dist = run.last("kept_block_distance_per_head_per_layer")
    panels = 2 if dist is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(max(5, 0.5 * L * H) * panels, 3.5), squeeze=False)
    ax = axes[0][0]
    x = np.arange(L)
    w = 0.8 / H
    for h in range(H):
        ax.bar(x + h * w, per[:, h], w, label=f"head {h}")
        if blocks is not None:
            ax.scatter(x + h * w, np.array(blocks)[:, h], color="k", marker="_", s=60, zorder=3)
    ax.set_xticks(x + 0.4 - w / 2, [f"layer {l}" for l in range(L)])
    ax.set_ylabel("pair sparsity (fraction of causal pairs skipped)")
    ax.set_ylim(0, 1)
    target = run.config.get("target_sparsity")
    if target is not None:
        ax.axhline(target, ls="--", color="gray", lw=1, label=f"target {target}")
    ax.legend(fontsize=6, ncol=2)
    ax.set_title(f"sparsity per layer and head, {where}; black ticks: skipped-block fraction\n{run.label()}",
                 fontsize=8)
    if dist is not None:  # the budget is the same for every head; how far back each head looks is not
        ax2 = axes[0][1]
        dist = np.array(dist)
        for h in range(H):
            ax2.bar(x + h * w, dist[:, h], w, label=f"head {h}")
        ax2.set_xticks(x + 0.4 - w / 2, [f"layer {l}" for l in range(L)])
        ax2.set_ylabel("mean distance of kept past blocks (blocks)")
        ax2.legend(fontsize=6, ncol=2)
        ax2.set_title("which blocks each head keeps: mean distance back", fontsize=8)
    return save(fig, path)


def series_figure(run, key):
    """(fig, ax, iterations, values) for a one-panel plot of a metrics key, or None if it was never logged."""
    its, vals = run.series(key)
    if not its:
        return None
    fig, ax = plt_module().subplots(figsize=(6, 3.5))
    return fig, ax, its, vals


def sparsity_training_plot(run, path):
    made = series_figure(run, "sparsity")
    if made is None:
        return None
    fig, ax, its, vals = made
    ax.plot(its, vals, "k-", lw=2, label="mean pair sparsity")
    rows = [r for r in run.metrics if r.get("sparsity_per_layer")]
    for l in range(len(rows[0]["sparsity_per_layer"]) if rows else 0):
        ax.plot([r["iter"] for r in rows], [r["sparsity_per_layer"][l] for r in rows], lw=1, alpha=0.7,
                label=f"layer {l}")
    _, blk = run.series("block_sparsity")
    ax.plot(its, blk, "k:", lw=1.5, label="skipped-block fraction")
    return finish_over_iterations(fig, ax, path, "sparsity", f"sparsity over training\n{run.label()}", (0, 1))


def head_budget_plot(run, path):
    """Each head's measured pair sparsity over training, one panel per layer (adaptive span's span plot):
    with budget='fixed' the heads coincide by construction; with 'adaptive' they part."""
    rows = [r for r in run.metrics if r.get("sparsity_per_head_per_layer")]
    if not rows:
        return None
    plt = plt_module()
    per = np.array([r["sparsity_per_head_per_layer"] for r in rows])  # (evals, L, H)
    its = [r["iter"] for r in rows]
    L, H = per.shape[1:]
    fig, axes = plt.subplots(1, L, figsize=(3.2 * L + 0.5, 3.2), squeeze=False, sharey=True)
    target = run.config.get("target_sparsity")
    for l in range(L):
        ax = axes[0][l]
        for h in range(H):
            ax.plot(its, per[:, l, h], lw=1.2, label=f"head {h}")
        if target is not None:
            ax.axhline(target, ls="--", color="gray", lw=1)
        ax.set_title(f"layer {l}", fontsize=8)
        ax.set_xlabel("iteration", fontsize=7)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("pair sparsity (val eval)")
    axes[0][0].legend(fontsize=6)
    budget = run.config.get("budget", "fixed")
    fig.suptitle(f"sparsity per head over training (budget={budget}; dashed: target)\n{run.label()}", fontsize=9)
    fig.subplots_adjust(top=0.8)
    return save(fig, path)


def kept_blocks_hist_plot(run, path):
    """How many past blocks the query tiles kept (the sink counts, the own block does not), per layer and
    head, over the whole test split (final.json). A fixed budget gives every head the same histogram."""
    hist = (run.final or {}).get("test_kept_blocks_hist_per_head_per_layer")
    if not hist:
        return None
    plt = plt_module()
    hist = np.array(hist, dtype=np.float64)  # (L, H, nb)
    L, H, nb = hist.shape
    fig, axes = plt.subplots(1, L, figsize=(3.2 * L + 0.5, 3.2), squeeze=False, sharey=True)
    x = np.arange(nb)
    for l in range(L):
        ax = axes[0][l]
        for h in range(H):
            frac = hist[l, h] / max(1.0, hist[l, h].sum())
            ax.step(x, frac, where="mid", lw=1.2, label=f"head {h} (mean {np.dot(x, frac):.1f})")
        ax.set_title(f"layer {l}", fontsize=8)
        ax.set_xlabel("past blocks kept by a tile", fontsize=7)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("fraction of tiles (test split)")
    sp = run.final.get("test_sparsity")
    fig.suptitle(f"kept past blocks per tile, test split{f' (measured sparsity {sp:.3f})' if sp is not None else ''}"
                 f"\n{run.label()}", fontsize=9)
    fig.subplots_adjust(top=0.8)
    return save(fig, path)


def recall_plot(run, path):
    """Attention recall: the share of each query's dense attention mass in its tile's kept blocks, for
    the run's own choice and for the local rule's and the oracle's at the same counts. Left: over training (val
    evals); right: per layer and head on the test pass (final.json)."""
    rows = [r for r in run.metrics if r.get("recall") is not None]
    final = run.final or {}
    per = {k: final.get(f"test_{k}_per_head_per_layer") for k in ("recall", "recall_local", "recall_oracle")}
    if not rows and per["recall"] is None:
        return None
    plt = plt_module()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.6))
    names = {"recall": "own choice", "recall_local": "local rule", "recall_oracle": "oracle"}
    for key, style in zip(names, ("o-", "s--", "^:")):
        xs, ys = run.series(key)
        if xs:
            ax1.plot(xs, ys, style, ms=3, label=names[key])
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("attention recall (val)")
    ax1.set_ylim(0, 1)
    ax1.legend(fontsize=7)
    if per["recall"] is not None:
        own = np.array(per["recall"])  # (L, H)
        L, H = own.shape
        x = np.arange(L * H)
        ax2.bar(x, own.flatten(), 0.8, color="C0", alpha=0.6, label=names["recall"])
        for key, marker in (("recall_local", "s"), ("recall_oracle", "^")):
            if per[key] is not None:
                ax2.plot(x, np.array(per[key]).flatten(), marker, color="k" if marker == "s" else "C3", ms=4,
                         ls="none", label=names[key])
        ax2.set_xticks(x, [f"L{l}H{h}" for l in range(L) for h in range(H)], fontsize=6, rotation=90)
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("attention recall (test)")
        ax2.legend(fontsize=7)
    fig.suptitle(f"attention recall: dense attention mass kept, own choice against the local rule and the oracle at "
                 f"the same counts\n{run.label()}", fontsize=9)
    fig.subplots_adjust(top=0.82, bottom=0.22)
    return save(fig, path)


def copy_test_axes(ax, run, color, label):
    """One run's copy test (final.json) on ax: bpc on copied bytes (solid) and the same bytes unplanted (dashed)
    per distance bucket; False if the run has none."""
    ct = (run.final or {}).get("copy_test")
    if not ct:
        return False
    mid = [(b["lo"] + b["hi"]) / 2 for b in ct["buckets"]]
    ax.plot(mid, [b["bpc_copy"] for b in ct["buckets"]], "o-", color=color, label=f"{label}: copied bytes")
    ax.plot(mid, [b["bpc_plain"] for b in ct["buckets"]], "x--", color=color, alpha=0.6, label=f"{label}: unplanted")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"distance from the source (bytes; {ct['copy_len']}-byte copies, first {ct['skip']} not scored)")
    ax.set_ylabel("bits per byte")
    return True


def copy_test_plot(run, path):
    fig, ax = plt_module().subplots(figsize=(6, 3.6))
    if not copy_test_axes(ax, run, "C0", "this run"):
        plt_module().close(fig)
        return None
    ax.legend(fontsize=7)
    ax.set_title(f"long-range copy test (test split)\n{run.label()}", fontsize=8)
    return save(fig, path)


def bpc_plot(run, path):
    plt = plt_module()
    if not run.metrics:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (x, xl) in zip(axes, (("iter", "iteration"), ("tokens", "tokens (bytes) trained"),
                                  ("elapsed_s", "training wall-clock (s, excl. eval and compile)"))):
        for key, style in (("train_bpc", "-"), ("val_bpc", "o-")):
            xs, ys = run.series(key, x)
            if xs:
                ax.plot(xs, ys, style, ms=3, label=key.replace("_bpc", ""))
        ax.set_xlabel(xl)
        ax.set_ylabel("bits per byte")
        ax.legend(fontsize=7)
    test = run.last("test_bpc")
    fig.suptitle(f"bits per byte{f' (test {test:.4f})' if test else ''}\n{run.label()}", fontsize=9)
    return save(fig, path)


def throughput_plot(run, path):
    made = series_figure(run, "tokens_per_s")
    if made is None:
        return None
    fig, ax, its, tps = made
    ax.plot(its, tps, "o-", ms=3)
    return finish_over_iterations(fig, ax, path, "training tokens (bytes) / s",
                                  f"throughput (excl. eval and compile)\n{run.label()}", (0, None), legend=False)


def finish_over_iterations(fig, ax, path, ylabel, title, ylim, legend=True):
    """Labels, limits, legend and title of a one-panel plot against training iterations; saves it."""
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.set_ylim(*ylim)
    if legend:
        ax.legend(fontsize=6)
    ax.set_title(title, fontsize=8)
    return save(fig, path)


def comparison(runs, out_dir):
    plt = plt_module()
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for run in runs:
        for ax, x in zip(axes, ("tokens", "elapsed_s")):
            xs, ys = run.series("val_bpc", x)
            ax.plot(xs, ys, "o-", ms=3, label=run.label())
    axes[0].set_xlabel("tokens (bytes) trained")
    axes[1].set_xlabel("training wall-clock (s, excl. eval and compile)")
    for ax in axes:
        ax.set_ylabel("validation bits per byte")
        ax.legend(fontsize=6)
    fig.suptitle("validation bpc at equal tokens and at equal wall-clock", fontsize=9)
    written.append(save(fig, os.path.join(out_dir, "compare_val_bpc.png")))
    sparse = [r for r in runs if r.series("sparsity")[0]]
    if sparse:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for run in sparse:
            ax.plot(*run.series("sparsity"), "o-", ms=3, label=run.label())
        written.append(finish_over_iterations(fig, ax, os.path.join(out_dir, "compare_sparsity.png"),
                                              "pair sparsity", "sparsity over training", (0, 1)))
    copies = [r for r in runs if (r.final or {}).get("copy_test")]
    if copies:
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, run in enumerate(copies):
            copy_test_axes(ax, run, f"C{i % 10}", run.label())
        ax.legend(fontsize=6)
        ax.set_title("long-range copy test per run (test split)", fontsize=8)
        written.append(save(fig, os.path.join(out_dir, "compare_copy_test.png")))
    written.append(comparison_table(runs, os.path.join(out_dir, "comparison.md")))
    return written


def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def comparison_table(runs, path):
    base = next((r for r in runs if r.kind == "baseline" and r.last("test_bpc") is not None), None)
    lines = ["# Run comparison", "",
             f"Differences are to the dense baseline `{base.name}`." if base
             else "No finished dense baseline among these runs.",
             "", "| run | model | layers x d x heads | T | params | tokens | train time s | tokens/s | best val bpc | "
                 "test bpc | sparsity | test set (sha256, T, stride) | test bpc - baseline |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    mixed = []
    for r in runs:
        c = r.config
        test = r.last("test_bpc")
        same = base is None or r.test_set() == base.test_set()
        if not same:
            mixed.append(r.name)
        diff = ("not comparable: other test set or protocol" if not same else
                fmt(test - base.last("test_bpc"), "+.4f") if (base and test is not None) else "n/a")
        if r.origin() and diff != "n/a":  # its tokens are not its whole training
            diff += f" ({r.warm_text()})"
        kind = (r.kind if r.kind != "asca" else
                f"asca (S={c.get('sparse_block_size')}, target {c.get('target_sparsity')})")
        best = r.last("best_val_bpc") or min((m["val_bpc"] for m in r.metrics if m.get("val_bpc")), default=None)
        lines.append(f"| {r.name} | {kind} | {c.get('n_layer')} x {c.get('n_embd')} x {c.get('n_head')} | "
                     f"{c.get('block_size')} | {fmt(r.last('n_params'), ',')} | {fmt(r.last('tokens'), ',')} | "
                     f"{fmt(r.last('train_time_s') or r.last('elapsed_s'), '.1f')} | "
                     f"{fmt(r.last('tokens_per_s'), ',.0f')} | {fmt(best, '.4f')} | {fmt(test, '.4f')} | "
                     f"{fmt(r.last('test_sparsity') or r.last('sparsity'), '.3f')} | "
                     f"{', '.join(map(str, r.test_set()))} | {diff} |")
    if mixed:
        lines[2:2] = [f"**Warning: {', '.join(mixed)} measured test bpc on another test set or protocol than "
                      f"`{base.name}`; their differences are not computed.**", ""]
    stale = [r.name for r in runs if r.stale_final]
    lines += ["", "tokens/s and train time exclude evaluation and compile/warm-up; sparsity is the measured fraction "
                  "of causal query-key pairs skipped, over the whole test split where final.json has it. Runs without "
                  "final.json show their latest metrics."]
    if stale:
        lines.append(f"{', '.join(stale)}: final.json is older than metrics.jsonl (the run was resumed after it "
                     f"finished); its latest metrics are shown, and test bpc only once it finishes again.")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def process(run, args):
    os.makedirs(run.plots, exist_ok=True)
    ex = extract(run, args)
    written = []
    if ex is not None:
        block = int(ex["sparse_block_size"]) if "sparse_block_size" in ex else None
        from matplotlib.colors import PowerNorm
        written.append(grid_plot(run, ex["attention"], f"attention probabilities, window of {len(ex['tokens'])} bytes "
                                 f"at offset {int(ex['offset'])} (iter {int(ex['iter'])})",
                                 os.path.join(run.plots, "attention.png"), "viridis", block, PowerNorm(0.4, 0, 1)))
        if "keep_mask" in ex:
            written.append(grid_plot(run, ex["keep_mask"].astype(np.float32), "keep masks (yellow: computed; "
                                     "red lines: block boundaries)", os.path.join(run.plots, "keep_masks.png"),
                                     "cividis", block))
        if args.chars:
            L, H = ex["attention"].shape[:2]
            layer = args.layer if args.layer is not None else L - 1
            if not (0 <= layer < L and 0 <= args.head < H):
                raise ExtractError(f"--layer {layer} --head {args.head} out of range ({L} layers, {H} heads)")
            written.append(chars_plot(run, ex, os.path.join(run.plots, "attention_chars.png"), args.chars_len,
                                      layer, args.head))
    for fn, name in ((bpc_plot, "bpc.png"), (throughput_plot, "throughput.png"), (copy_test_plot, "copy_test.png")):
        written.append(fn(run, os.path.join(run.plots, name)))
    if run.kind == "asca":
        written.append(per_head_sparsity_plot(run, ex, os.path.join(run.plots, "sparsity_per_head.png")))
        written.append(sparsity_training_plot(run, os.path.join(run.plots, "sparsity_training.png")))
        written.append(head_budget_plot(run, os.path.join(run.plots, "sparsity_per_head_training.png")))
        written.append(kept_blocks_hist_plot(run, os.path.join(run.plots, "kept_blocks_hist.png")))
        written.append(recall_plot(run, os.path.join(run.plots, "recall.png")))
    return [w for w in written if w]


def load_panels(paths):
    """The panels of --headline: each file a comparison.json (one panel) or a list of panels."""
    panels = []
    for path in paths:
        try:
            with open(path) as f:
                obj = json.load(f)
        except (OSError, ValueError) as e:
            raise ExtractError(f"cannot read {path} ({e}); give comparison.json files that compare.py wrote") from None
        for panel in obj if isinstance(obj, list) else [obj]:
            rows = panel.get("rows") if isinstance(panel, dict) else None
            if not rows or not all(isinstance(r, dict) and "name" in r and isinstance(r.get("test_bpc"), list)
                                   for r in rows):
                raise ExtractError(f"{path}: a panel needs rows of {{name, test_bpc: [per seed]}}")
            panels.append(panel)
    return panels


def headline_plot(panels, path):
    """Test bpc per run, each seed a point, the mean a short bar; one panel per comparison (README's figure)."""
    plt = plt_module()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels) + 0.6, 3.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes[0], panels):
        for i, row in enumerate(panel["rows"]):
            vals = [v for v in row["test_bpc"] if v is not None]
            if not vals:
                continue
            jitter = np.linspace(-0.08, 0.08, len(vals)) if len(vals) > 1 else [0.0]
            ax.plot([i + j for j in jitter], vals, "o", color=colors[i % len(colors)], ms=5, alpha=0.85)
            ax.hlines(float(np.mean(vals)), i - 0.25, i + 0.25, color=colors[i % len(colors)], lw=2)
        ax.set_xticks(range(len(panel["rows"])), [r["name"] for r in panel["rows"]], rotation=20, fontsize=7,
                      ha="right")
        ax.set_xlim(-0.6, len(panel["rows"]) - 0.4)
        ax.set_title(panel.get("title", ""), fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("test bits per byte (lower is better)", fontsize=8)
    fig.suptitle("each point one seed, bar the mean; equal iterations", fontsize=8)
    return save(fig, path)


def frontier_plot(panels, path):
    """Test bpc against training compute, one point per row and comparison (the mean over its seeds), T as the
    label, dense rows drawn as a line per T: left, the analytic FLOPs (final.json's train_flops: 6N per token plus
    the attention each step computed at its schedule); right, the measured training time (tokens / tokens_per_s;
    hollow where the run shared the machine, so its time is not comparable). A sparse point below and left of
    dense's line at the same T is the gain the mission asks for."""
    plt = plt_module()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names, labelled = [], set()
    dense = []  # (flops, seconds, bpc) of the rows named dense, at every T: the line to beat
    for panel in panels:
        for row in panel["rows"]:
            if row["name"] not in names:
                names.append(row["name"])
            color = colors[names.index(row["name"]) % len(colors)]
            seeds = [i for i, v in enumerate(row["test_bpc"]) if v is not None]
            flops = [(row.get("train_flops") or [None] * len(row["test_bpc"]))[i] for i in seeds]
            if not seeds or any(f is None for f in flops):
                continue  # runs from before train_flops was recorded
            bpc = float(np.mean([row["test_bpc"][i] for i in seeds]))
            tps = [(row.get("tokens_per_s") or [None] * len(row["test_bpc"]))[i] for i in seeds]
            toks = [(row.get("tokens") or [None] * len(row["test_bpc"]))[i] for i in seeds]
            secs = float(np.mean([t / r for t, r in zip(toks, tps)])) if all(tps) and all(toks) else None
            T = (row.get("block_size") or [None])[0]
            busy = any((row.get("contended") or [False])[i] for i in seeds)
            for ax, x in zip(axes, (float(np.mean(flops)), secs)):
                if x is None:
                    continue
                label = row["name"] if ax is axes[0] and row["name"] not in labelled else None
                labelled.add(row["name"])
                ax.plot([x], [bpc], "o", ms=7, color=color, mfc="none" if (busy and ax is axes[1]) else color,
                        label=label)
                ax.annotate(f"T={T}", (x, bpc), textcoords="offset points", xytext=(5, 4), fontsize=6)
            if row["name"] == "dense":
                dense.append((float(np.mean(flops)), secs, bpc))
    for ax, i in ((axes[0], 0), (axes[1], 1)):
        pts = sorted((p[i], p[2]) for p in dense if p[i] is not None)
        if len(pts) > 1:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "k--", lw=0.8, alpha=0.6)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("training FLOPs (analytic: weights + attention as computed)")
    axes[1].set_xlabel("training time (s): tokens / measured tokens/s (hollow: contended)")
    for ax in axes:
        ax.set_ylabel("test bits per byte")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("test bpc against training compute: each point one row's mean over seeds", fontsize=9)
    return save(fig, path)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (out/NAME); with several, the first gets the comparison "
                                           "(with --headline: comparison.json files)")
    p.add_argument("--headline", metavar="PNG", default=None,
                   help="draw test bpc per run and seed from comparison.json files into PNG (README's figure)")
    p.add_argument("--frontier", metavar="PNG", default=None,
                   help="draw test bpc against training FLOPs and time from comparison.json files into PNG")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", help="take the window from this file instead of the run's data")
    src.add_argument("--split", default="val", choices=("train", "val", "test"),
                     help="which split of the run's data_dir to take the window from (default val)")
    p.add_argument("--offset", type=int, default=0, help="window start, in bytes (default 0)")
    p.add_argument("--length", type=int, default=None, help="window length in bytes (default min(block_size, 256))")
    p.add_argument("--best", action="store_true", help="use best.pt instead of ckpt.pt")
    p.add_argument("--chars", action="store_true", help="also draw a small heatmap with the bytes as axis labels")
    p.add_argument("--chars_len", type=int, default=48, help="bytes in the --chars heatmap (default 48)")
    p.add_argument("--layer", type=int, default=None, help="layer for --chars (default the last)")
    p.add_argument("--head", type=int, default=0, help="head for --chars (default 0)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        for name, low in (("length", 1), ("chars_len", 1), ("offset", 0), ("head", 0), ("layer", 0)):
            v = getattr(args, name)
            if v is not None and v < low:
                raise ExtractError(f"--{name} must be at least {low}, got {v}")
        if args.headline:
            print(headline_plot(load_panels(args.runs), args.headline))
            return 0
        if args.frontier:
            print(frontier_plot(load_panels(args.runs), args.frontier))
            return 0
        runs = [Run(p) for p in args.runs]
        for run in runs:
            for path in process(run, args):
                print(path)
        if len(runs) > 1:
            for path in comparison(runs, runs[0].plots):
                print(path)
    except ExtractError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a read-only run directory, a file where plots/ should be, a full disk
        print(f"error: cannot write {e.filename or 'the plots'}: {e.strerror or e}; make the run directory "
              f"writable (or free some space)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
