"""extraction.py on tiny real runs of both models: arrays, values, PNGs, comparison table, errors."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import extraction
from helpers import TINY, make_dataset, run_script
from checkpoint import model_from_checkpoint

ASCA_ARGS = ["--sparse_block_size=8", "--target_sparsity=0.5", "--sparsity_warmup_iters=4"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    data = make_dataset(root / "data")
    for script, name, extra in (("baseline_model.py", "base", []), ("novel_model.py", "asca", ASCA_ARGS),
                                ("novel_model.py", "adaptive", ASCA_ARGS + ["--budget=adaptive"])):
        r = run_script(script, TINY, f"--data_dir={data}", f"--out_dir={root / name}", "--max_iters=12",
                       "--eval_interval=4", "--copy_test_windows=2", "--copy_len=16", *extra)
        assert r.returncode == 0, r.stderr
    return root


def check_png(path):
    assert os.path.getsize(path) > 5000, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 200 and im.size[1] > 150
        assert len(set(np.asarray(im.convert("L")).ravel().tolist())) > 10  # not a blank canvas


@pytest.mark.e2e
def test_extraction_arrays_plots_and_comparison(runs):
    base, asca = runs / "base", runs / "asca"
    assert extraction.main([str(base), str(asca), "--chars", "--length=64", "--offset=100"]) == 0

    b = np.load(base / "extract" / "attention.npz")
    T = 64
    assert b["attention"].shape == (2, 2, T, T) and b["tokens"].shape == (T,)
    val = np.fromfile(json.load(open(base / "config.json"))["data_dir"] + "/val.bin", dtype=np.uint8)
    assert np.array_equal(b["tokens"], val[100:100 + T])
    assert np.allclose(b["attention"].sum(-1), 1, atol=1e-5)
    assert np.abs(np.triu(b["attention"], 1)).max() == 0  # causal: nothing above the diagonal
    assert "keep_mask" not in b

    a = np.load(asca / "extract" / "attention.npz")
    keep, att = a["keep_mask"], a["attention"]
    assert keep.shape == att.shape == (2, 2, T, T) and a["block_selection"].shape == (2, 2, 8, 8)
    assert not np.triu(keep, 1).any()  # keep masks are causal
    assert np.allclose(att.sum(-1), 1, atol=1e-5) and att[~keep].max() == 0  # skipped pairs get nothing
    assert keep[:, :, np.arange(T), np.arange(T)].all()  # own position always kept
    # the kept blocks are the model's own: run the checkpoint on the same window and compare
    model, _ = model_from_checkpoint(str(asca / "ckpt.pt"))
    with torch.no_grad():
        model(torch.from_numpy(a["tokens"].astype(np.int64))[None])
    for l, blk in enumerate(model.transformer.h):
        assert np.array_equal(blk.attn.last_selection.selected[0].numpy(), a["block_selection"][l])
    diag = model.diagnostics()
    assert np.allclose(a["pair_sparsity"], np.array(diag["sparsity_per_head_per_layer"]), atol=1e-6)
    assert a["pair_sparsity"].mean() > 0.3

    for name in ("attention.png", "attention_chars.png", "bpc.png", "throughput.png"):
        check_png(base / "plots" / name)
        check_png(asca / "plots" / name)
    for name in ("keep_masks.png", "sparsity_per_head.png", "sparsity_training.png", "recall.png",
                 "copy_test.png"):
        check_png(asca / "plots" / name)
    check_png(base / "plots" / "copy_test.png")
    assert not (base / "plots" / "keep_masks.png").exists() and not (base / "plots" / "recall.png").exists()
    for name in ("compare_val_bpc.png", "compare_sparsity.png", "compare_copy_test.png"):
        check_png(base / "plots" / name)

    table = (base / "plots" / "comparison.md").read_text()
    rows = [l for l in table.splitlines() if l.startswith("| base ") or l.startswith("| asca ")]
    assert len(rows) == 2
    for row, run in zip(rows, (base, asca)):
        final = json.load(open(run / "final.json"))
        assert f"{final['test_bpc']:.4f}" in row and f"{final['best_val_bpc']:.4f}" in row
        assert f"{final['tokens']:,}" in row
    fa, fb = json.load(open(asca / "final.json")), json.load(open(base / "final.json"))
    assert f"{fa['test_bpc'] - fb['test_bpc']:+.4f}" in rows[1] and f"{fa['sparsity']:.3f}" in rows[1]


@pytest.mark.e2e
def test_adaptive_budget_plots_and_the_test_tally(runs):
    run = runs / "adaptive"
    assert extraction.main([str(run), "--length=64"]) == 0
    for name in ("sparsity_per_head_training.png", "kept_blocks_hist.png", "keep_masks.png"):
        check_png(run / "plots" / name)
    final = json.load(open(run / "final.json"))
    # the histogram and the measured test sparsity are two counts of the same tiles: derive one from the other
    hist = np.array(final["test_kept_blocks_hist_per_head_per_layer"], dtype=np.float64)  # (L, H, nb)
    S, T = 8, 64
    nb = T // S
    tiles = hist.sum(-1)
    kept_past = (hist * np.arange(hist.shape[-1])).sum(-1)
    kept_pairs = kept_past * S * S + tiles * S * (S + 1) / 2
    sparsity = 1 - kept_pairs / (tiles / nb * T * (T + 1) / 2)
    assert np.allclose(sparsity, final["test_sparsity_per_head_per_layer"], atol=1e-6)
    assert final["test_sparsity"] == pytest.approx(sparsity.mean(), abs=1e-6) and final["test_sparsity"] > 0.2
    rows = [json.loads(l) for l in open(run / "metrics.jsonl")]
    assert rows[0]["budget_threshold"] is None  # before the first update: keeps every block (strict JSON: no -inf)
    assert all(math.isfinite(r["budget_threshold"]) for r in rows[1:])
    fixed = json.load(open(runs / "asca" / "final.json"))
    fh = np.array(fixed["test_kept_blocks_hist_per_head_per_layer"])
    assert (fh == fh[:, :1]).all()  # fixed: every head the same histogram, by construction


@pytest.mark.e2e
def test_text_window_and_in_progress_run(runs, tmp_path):
    text = tmp_path / "t.txt"
    text.write_bytes(b"abcdefgh" * 40)
    run = tmp_path / "partial"
    run.mkdir()
    # a run in progress: metrics only, last line half-written, no final.json, no checkpoint yet
    rows = open(runs / "asca" / "metrics.jsonl").read().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(rows[:2]) + "\n" + rows[2][:20])
    (run / "config.json").write_text((runs / "asca" / "config.json").read_text())
    assert extraction.main([str(run)]) == 0
    check_png(run / "plots" / "bpc.png")
    assert not (run / "extract").exists()
    assert extraction.main([str(runs / "base"), "--text", str(text), "--offset=8", "--length=32"]) == 0
    b = np.load(runs / "base" / "extract" / "attention.npz")
    assert bytes(b["tokens"]) == (b"abcdefgh" * 4)


@pytest.mark.e2e
@pytest.mark.parametrize("case,needle", [("notrun", "not a run directory"), ("missing", "not a directory"),
                                         ("window", "outside"), ("long", "exceeds the model's block_size")])
def test_errors_are_one_line(runs, tmp_path, case, needle):
    args = {"notrun": [str(tmp_path)], "missing": [str(tmp_path / "nope")],
            "window": [str(runs / "base"), "--offset=999999999"],
            "long": [str(runs / "base"), "--length=65"]}[case]
    r = run_script("extraction.py", *args)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr


@pytest.mark.e2e
def test_comparison_flags_other_test_sets_and_stale_final_json(runs, tmp_path):
    """Test bpc on another test set is not subtracted; a final.json older than the metrics
    (the run resumed after finishing) does not mask the newer numbers."""
    import shutil
    base, other, stale = tmp_path / "base", tmp_path / "other", tmp_path / "stale"
    for src, dst in ((runs / "base", base), (runs / "asca", other), (runs / "asca", stale)):
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("plots", "extract"))
    other_data = make_dataset(tmp_path / "otherdata", seed=7)
    other_meta = json.load(open(os.path.join(other_data, "meta.json")))
    for f in ("config.json", "final.json"):  # a run trained and scored on other data: it records that data
        d = json.load(open(other / f))
        d["data_dir"] = other_data
        if f == "final.json":
            d["data_sha256"] = {k: v["sha256"] for k, v in other_meta["splits"].items()}
        json.dump(d, open(other / f, "w"))
    rows = [json.loads(l) for l in open(stale / "metrics.jsonl")]
    newer = dict(rows[-1], iter=rows[-1]["iter"] + 8, val_bpc=1.2345, tokens=rows[-1]["tokens"] * 2)
    with open(stale / "metrics.jsonl", "a") as f:
        f.write(json.dumps(newer) + "\n")
    assert extraction.main([str(base), str(other), str(stale), "--length=32"]) == 0
    table = (base / "plots" / "comparison.md").read_text()
    assert "Warning: other measured test bpc on another test set" in table
    row = next(l for l in table.splitlines() if l.startswith("| other "))
    assert "not comparable" in row
    row = next(l for l in table.splitlines() if l.startswith("| stale "))
    assert f"{newer['tokens']:,}" in row and row.split("|")[-2].strip() == "n/a"  # no test bpc until it finishes
    assert "final.json is older than metrics.jsonl" in table
    fs = json.load(open(stale / "final.json"))
    assert f"{fs['test_bpc']:.4f}" not in row
