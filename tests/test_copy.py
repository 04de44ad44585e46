"""The long-range copy test (evaluate.copy_test) and copy_augment. The plan fits every window, the
scores match a per-plant loop, a hand-made copier scores the copied bytes near zero bits and the unplanted ones at
the alphabet's entropy (an off-by-one in what is scored would not), the local rule cannot see a source beyond its
kept blocks by construction while dense attention can, and bad copy settings are one line."""
import json
import math

import numpy as np
import pytest
import torch

import evaluate
from helpers import one_line, train_in_process


@pytest.mark.parametrize("T,L", [(512, 64), (2048, 64), (128, 16), (100, 9), (64, 32)])
def test_buckets_run_from_the_copy_length_to_the_window(T, L):
    b = evaluate.copy_buckets(T, L)
    assert b[0][0] == L and b[-1][1] == T - L
    assert all(lo <= hi for lo, hi in b) and all(b[i][1] + 1 == b[i + 1][0] for i in range(len(b) - 1))
    plan = evaluate.copy_plan(5, b, T, L)
    assert len(plan) == 5 * len(b)
    for w, k, d, p in plan:
        lo, hi = b[k]
        assert lo <= d <= hi and p - d >= 0 and p + L <= T + 1  # the source and the copy lie in the T+1 bytes


def random_bytes(n, alphabet=256, seed=0):
    return np.random.default_rng(seed).integers(0, alphabet, n).astype(np.uint8)


def test_copy_test_matches_a_loop_over_the_plants():
    """Each plant scored alone, with a copy made byte by byte and log-softmax over one row (not the batched
    cross-entropy), gives the same per-bucket bits per byte."""
    from baseline_model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=128)).eval()
    data = random_bytes(5000)
    T, L, n = 128, 16, 6
    got = evaluate.copy_test(model, data, T, L, n, batch_size=4, device="cpu")
    buckets = evaluate.copy_buckets(T, L)
    last = len(data) - T - 1
    starts = [round(i * last / (n - 1)) for i in range(n)]
    want = [[0.0, 0.0, 0] for _ in buckets]
    for w, b, d, p in evaluate.copy_plan(n, buckets, T, L):
        plain = [int(c) for c in data[starts[w]:starts[w] + T + 1]]
        planted = list(plain)
        for i in range(L):
            planted[p + i] = plain[p - d + i]
        for k, seq in ((0, planted), (1, plain)):
            with torch.no_grad():
                logits, _ = model(torch.tensor([seq[:T]]))
            logp = torch.log_softmax(logits[0].double(), -1)
            want[b][k] -= sum(logp[j - 1, seq[j]].item() for j in range(p + evaluate.COPY_SKIP, p + L))
        want[b][2] += L - evaluate.COPY_SKIP
    assert got["windows"] == n and got["copy_len"] == L
    for g, (lo, hi), (c, u, m) in zip(got["buckets"], buckets, want):
        assert (g["lo"], g["hi"], g["bytes"]) == (lo, hi, m)
        assert g["bpc_copy"] == pytest.approx(c / m / math.log(2), rel=1e-5)
        assert g["bpc_plain"] == pytest.approx(u / m / math.log(2), rel=1e-5)
    assert any(abs(g["bpc_copy"] - g["bpc_plain"]) > 1e-3 for g in got["buckets"])  # the plant changed the input


class NGramCopier(torch.nn.Module):
    """A model by hand: after the most recent earlier occurrence of the last 4 bytes, predict the byte that followed
    it (logit 30), else uniform. On random bytes a 4-byte match occurs only inside a planted copy."""

    def forward(self, idx):
        B, T = idx.shape
        logits = torch.zeros(B, T, 256)
        for r in range(B):
            s = idx[r].tolist()
            for t in range(3, T):
                for u in range(t - 1, 2, -1):
                    if s[u - 3:u + 1] == s[t - 3:t + 1]:
                        logits[r, t, s[u + 1]] = 30.0
                        break
        return logits, None


def test_a_copier_scores_the_copied_bytes_and_only_them():
    r = evaluate.copy_test(NGramCopier(), random_bytes(3000), 96, 16, 4, batch_size=8, device="cpu")
    for b in r["buckets"]:
        assert b["bpc_copy"] < 1e-6  # every scored byte lies after 4 copied bytes, all of them found at the source
        assert b["bpc_plain"] == pytest.approx(8.0, abs=0.05)  # nothing to find: uniform over 256 bytes


def kept_reach(model):
    """The farthest back, in bytes, that one attention layer's kept blocks reach from any query (the largest past
    block count over tiles, heads and layers, plus the own block, times S)."""
    S = model.config.sparse_block_size
    return max((int(a.last_selection.n_past.max()) + 1) * S for a in model.attention_modules())


@pytest.mark.parametrize("selector", ["local", "dense"])
def test_the_local_rule_cannot_see_a_source_beyond_its_blocks(selector):
    """By construction: with the local rule, logits at a copy whose source lies beyond n_layer times one layer's
    reach do not depend on the source's bytes (the copy test's local row can only stay at the unplanted level).
    Dense attention's do: the control that this check can fail."""
    from baseline_model import GPT, GPTConfig
    from novel_model import make_model
    torch.manual_seed(0)
    T, L = 256, 16
    if selector == "dense":
        model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=T)).eval()
    else:
        model = make_model(n_layer=2, n_head=2, n_embd=32, block_size=T, sparse_block_size=8, target_sparsity=0.9,
                           sparsity_warmup_iters=0, selector="local", attn_impl="reference").eval()
    seq = random_bytes(T + 1).astype(np.int64)
    d, p = 200, 230
    planted = evaluate.plant(seq, d, p, L)
    other = planted.copy()
    other[p - d:p - d + L] = random_bytes(L, seed=1)  # another source; the copy itself is unchanged
    with torch.no_grad():
        a, _ = model(torch.from_numpy(planted[None, :T]))
        b, _ = model(torch.from_numpy(other[None, :T]))
    moved = (a[0, p:] - b[0, p:]).abs().max().item()
    if selector == "dense":
        assert moved > 1e-3
    else:
        assert 2 * kept_reach(model) < d - L  # the premise: the source lies beyond both layers' reach
        assert moved == 0.0


def test_plant_copies_plants_a_fraction_and_keeps_y_shifted():
    g = torch.Generator().manual_seed(0)
    x = torch.from_numpy(random_bytes(64 * 200).astype(np.int64)).view(64, 200)
    y = torch.roll(x, -1, 1)
    y[:, -1] = 7
    x2, y2 = evaluate.plant_copies(x, y, 0.5, 20, g)
    assert torch.equal(y2[:, :-1], x2[:, 1:])
    changed = (x2 != x).any(1) | (y2 != y).any(1)
    assert 16 < int(changed.sum()) < 48  # about half of 64
    for r in torch.nonzero(changed).flatten().tolist():  # each changed row holds one 20-byte copy of earlier bytes
        s = torch.cat([x2[r], y2[r, -1:]]).tolist()
        diff = [i for i in range(201) if s[i] != torch.cat([x[r], y[r, -1:]]).tolist()[i]]
        p = diff[0]
        assert diff[-1] < p + 20 and any(s[p - d:p - d + 20] == s[p:p + 20] for d in range(20, 181))
    before = g.get_state()
    x3, y3 = evaluate.plant_copies(x, y, 0.0, 20, g)  # off: nothing drawn, so a run keeps its data stream
    assert x3 is x and y3 is y and torch.equal(g.get_state(), before)


@pytest.mark.e2e
@pytest.mark.parametrize("args,needle", [
    (["--copy_test_windows=2", "--copy_len=40"], "does not fit block_size=64: a copy and its source need"),
    (["--copy_augment=0.5", "--copy_len=8"], "copy_len=8 must exceed the 8 bytes"),
    (["--copy_augment=1.5"], "copy_augment=1.5 is the fraction of training windows"),
    (["--copy_augment=nan"], "copy_augment"),
    (["--copy_test_windows=-1"], "copy_test_windows=-1 must be >= 0"),
])
def test_bad_copy_settings_are_one_line(tmp_path, data_dir, capsys, args, needle):
    import baseline_model
    assert train_in_process(baseline_model, [f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'o'}", *args]) == 1
    assert needle in one_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


@pytest.mark.e2e
def test_the_copy_test_runs_with_the_final_test_and_eval_only(tmp_path, data_dir):
    """final.json and eval.json hold the copy test's buckets; an eval_only of the same checkpoint agrees."""
    import novel_model
    out = tmp_path / "o"
    common = [f"--data_dir={data_dir}", f"--out_dir={out}", "--copy_test_windows=3", "--copy_len=16"]
    assert train_in_process(novel_model, common + ["--max_iters=4", "--sparse_block_size=8",
                                                   "--target_sparsity=0.5", "--sparsity_warmup_iters=0",
                                                   "--copy_augment=0.5"]) == 0
    final = json.load(open(out / "final.json"))["copy_test"]
    assert [(b["lo"], b["hi"]) for b in final["buckets"]] == evaluate.copy_buckets(64, 16)
    assert all(math.isfinite(b["bpc_copy"]) and b["bytes"] == 3 * 8 for b in final["buckets"])
    assert train_in_process(novel_model, common + ["--init_from=resume", "--eval_only=True"]) == 0
    again = json.load(open(out / "eval.json"))["copy_test"]
    for a, b in zip(final["buckets"], again["buckets"]):
        assert a["bpc_copy"] == pytest.approx(b["bpc_copy"], abs=1e-9)
