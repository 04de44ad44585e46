"""scripts/headroom_probe.py: the masks of each choice written from their rules, the long-range repeat class against
a naive search, and the probe on a trained dense checkpoint (no restriction at K = T gives the dense bpc exactly)."""
import os
import sys

import numpy as np
import pytest
import torch

from helpers import ROOT, one_line, run_script, train_in_process

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import headroom_probe as hp  # noqa: E402

B, H, T, S = 2, 2, 32, 4


def probs(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, H, T, T, generator=g, dtype=torch.float64) * 3
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)


def kept_blocks(mask, b, h, tile):
    """The key blocks the first query of `tile` keeps (the own block included), from a (B, nh, T, T) mask's rows."""
    row = mask[b, h, tile * S + S - 1]  # the tile's last query sees its whole own block
    return sorted({j // S for j in row.nonzero().flatten().tolist()})


@pytest.mark.parametrize("K", [8, 12, 20])
def test_block_choices_follow_their_rules(K):
    p = probs()
    n_past = K // S - 1
    nearest = hp.keep_mask(p, "nearest", K, S)
    first = hp.keep_mask(p, "oracle_first", K, S)
    every = hp.keep_mask(p, "oracle_all", K, S)
    for b in range(B):
        for h in range(H):
            for tile in range(T // S):
                n = min(tile, n_past)
                assert kept_blocks(nearest, b, h, tile) == sorted(list(range(tile - n, tile)) + [tile])
                mass_first = [p[b, h, tile * S, j * S:(j + 1) * S].sum().item() for j in range(tile)]
                mass_all = [p[b, h, tile * S:(tile + 1) * S, j * S:(j + 1) * S].sum().item() for j in range(tile)]
                for mask, mass in ((first, mass_first), (every, mass_all)):
                    want = sorted(sorted(range(tile), key=lambda j: -mass[j])[:n] + [tile])
                    assert kept_blocks(mask, b, h, tile) == want
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for m in (nearest, first, every):
        assert not (m & ~causal).any() and m.sum(-1).max() <= K  # causal, at most K keys per query


def test_the_token_oracle_keeps_each_querys_most_attended_keys():
    p = probs(1)
    m = hp.keep_mask(p, "token", 6, S)
    for i in range(T):
        want = set(torch.topk(p[0, 0, i, :i + 1], min(6, i + 1)).indices.tolist())
        assert set(m[0, 0, i].nonzero().flatten().tolist()) == want


def test_every_choice_at_T_keys_is_dense():
    p = probs(2)
    causal = torch.ones(T, T, dtype=torch.bool).tril().expand(B, H, T, T)
    for choice in hp.CHOICES:
        assert torch.equal(hp.keep_mask(p, choice, T, S, torch.Generator().manual_seed(0)), causal), choice


def test_the_repeat_class_against_a_naive_search():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2, size=(3, 128)).astype(np.uint8)  # a two-letter alphabet: 8-grams repeat
    got = hp.repeat_class(x, 8)
    for b in range(3):
        for t in range(128):
            want = t >= 7 and any(np.array_equal(x[b, e - 7:e + 1], x[b, t - 7:t + 1]) and e + 1 < (t // 8 - 1) * 8
                                  for e in range(7, t))
            assert got[b, t] == want
    assert got.any() and not got.all()


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("probe") / "dense"
    import baseline_model
    assert train_in_process(baseline_model, [f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=6",
                                             "--final_test=False"]) == 0
    return out / "ckpt.pt"


@pytest.mark.e2e
def test_the_probe_on_a_dense_checkpoint(dense_ckpt, tmp_path):
    r = hp.run(str(dense_ckpt), 16, [32, 64], ["nearest", "oracle_first", "token"], 8, max_windows=6)
    rows = {(row["choice"], row["K"]): row for row in r["rows"]}
    assert r["T"] == 64 and r["bytes"] > 0 and 0 <= r["repeat_fraction"] <= 1
    for choice in ("nearest", "oracle_first", "token"):
        assert rows[(choice, 64)]["d_all"] == pytest.approx(0.0, abs=1e-6)  # K = T: no restriction
        assert rows[(choice, 32)]["bpc"] == pytest.approx(rows[("dense", 64)]["bpc"] + rows[(choice, 32)]["d_all"])
    assert rows[("nearest", 32)]["d_all"] != 0.0
    out = tmp_path / "probe.md"
    rc = hp.main([str(dense_ckpt), "--S", "16", "--budgets", "32", "--choices", "nearest", "--max_windows", "2",
                  "--out", str(out)])
    assert rc == 0 and "| 32 | nearest |" in out.read_text() and (tmp_path / "probe.md.json").exists()


@pytest.mark.e2e
def test_bad_probe_input_is_one_line(dense_ckpt, tmp_path):
    r = run_script("scripts/headroom_probe.py", str(dense_ckpt), "--S", "16", "--budgets", "8")
    assert r.returncode == 1 and "must lie between S=16 and block_size=64" in one_line(r.stderr)
    r = run_script("scripts/headroom_probe.py", str(dense_ckpt), "--S", "24")
    assert r.returncode == 1 and "must divide the checkpoint's block_size=64" in one_line(r.stderr)
    r = run_script("scripts/headroom_probe.py", str(tmp_path / "none.pt"))
    assert r.returncode == 1 and "no checkpoint" in one_line(r.stderr)
