"""The elements for quality at high sparsity, each against an independent reference:

- local_blocks=w: the w nearest past blocks always kept and counted in the budget (counts, the selection, the
  reference path against a naive loop, the gather and flex paths against the reference, the adaptive budget,
  causality, errors);
- layer_sparsity: per-layer targets with the mean of target_sparsity (measured per layer, errors);
- gate_loss: the distillation target against a per-query loop, the KL against a direct formula, its gradient
  reaching the predictor only, training on it lowering it, and the trainer adding it without logging it as LM loss;
- compressed_branch: the branch against a per-query loop (float64, gradients), on every path, causal.
Cached decoding with each of them is in test_decoding.py (VARIANTS)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import asca_kernels
from asca_kernels import attend_compressed
from asca_selector import first_query_block_mass, forced_past, keep_counts, max_sparsity
from helpers import (attend_with_grads, attn_module, causality_violation, make_dataset, naive_block_attention,
                     train_in_process)
from novel_model import ASCAConfig, make_model

MODEL = dict(n_layer=2, n_head=2, n_embd=32, block_size=128, sparse_block_size=8, target_sparsity=0.6,
             sparsity_warmup_iters=0)


# ----------------------------------------------------------------------------- local_blocks

def forced_by_rule(b, w, keep_first):
    """Past blocks tile b keeps whatever the budget, written from the rule: the sink and the w nearest."""
    return sorted(set(range(max(0, b - w), b)) | ({0} if keep_first and b > 0 else set()))


@pytest.mark.parametrize("keep_first", [True, False])
@pytest.mark.parametrize("w", [0, 1, 2, 3])
def test_forced_blocks_and_max_sparsity_follow_the_rule(w, keep_first):
    nb, S, T = 16, 8, 128
    f = forced_past(nb, keep_first, w)
    for b in range(nb):
        assert f[b].nonzero().flatten().tolist() == forced_by_rule(b, w, keep_first)
    skippable = sum(b - len(forced_by_rule(b, w, keep_first)) for b in range(nb))
    assert max_sparsity(T, S, keep_first, w) == pytest.approx(skippable * S * S / (T * (T + 1) / 2))


@pytest.mark.parametrize("target", [0.3, 0.6, 0.7])
@pytest.mark.parametrize("w", [1, 2])
def test_keep_counts_hit_the_target_and_never_drop_a_forced_block(w, target):
    nb, S, T = 16, 8, 128
    n = keep_counts(nb, S, T, target, True, w)
    for b in range(nb):
        assert len(forced_by_rule(b, w, True)) <= int(n[b]) <= b
    skipped = sum(b - int(n[b]) for b in range(nb))
    skippable = sum(b - len(forced_by_rule(b, w, True)) for b in range(nb))  # beyond it the target is capped
    assert skipped == min(skippable, round(target * T * (T + 1) / 2 / (S * S)))


def naive_local(q, k, v, scores, n_past, S, w):
    """Tile b keeps its own block, the forced blocks (rule above), then the best-scored others up to n_past[b]."""
    def kept(bb, h, b):
        forced = forced_by_rule(b, w, True)
        rest = sorted((j for j in range(b) if j not in forced), key=lambda j: -scores[bb, h, b, j].item())
        return forced + rest[: int(n_past[b]) - len(forced)]
    return naive_block_attention(q, k, v, scores, S, kept)


def test_local_blocks_reference_matches_a_naive_loop_fp64_with_gradients():
    a = attn_module(T=64, S=8, target=0.2, local_blocks=2)  # 0.2 of at most 0.31 here
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 64, 8, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
    y = a.attend(q, k, v)
    scores = a.selector.predictor(q.detach(), k.detach(), 8)
    ref = naive_local(q, k, v, scores, a.selector.n_keep, 8, 2)
    assert (y - ref).abs().max().item() < 1e-12
    w = torch.randn_like(y)
    grads = torch.autograd.grad((y * w).sum(), (q, k, v))
    for got, want in zip(grads, torch.autograd.grad((ref * w).sum(), (q, k, v))):
        assert got.abs().max() > 0 and (got - want).abs().max().item() < 1e-10
    sel = a.last_selection
    f = forced_past(8, True, 2)
    assert sel.selected[..., f].all()  # every forced block kept, in every sequence and head
    # and the budget still decides on others: some candidate is kept somewhere, some skipped
    cand = torch.tril(torch.ones(8, 8, dtype=torch.bool), -1) & ~f
    assert sel.selected[..., cand].any() and not sel.selected[..., cand].all()


@pytest.mark.parametrize("budget", ["fixed", "adaptive"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_local_blocks_gather_equals_reference(budget, dtype):
    a = attn_module(T=128, S=8, target=0.6, local_blocks=2, budget=budget, dtype=dtype)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 122, 8, dtype=dtype, generator=g) for _ in range(3))  # 122: a padded last block
    wts = torch.randn(2, 2, 122, 8, dtype=dtype, generator=g)
    if budget == "adaptive":
        a.selector.threshold.fill_(float(a.selector.predictor(F.pad(q, (0, 0, 0, 6)), F.pad(k, (0, 0, 0, 6)),
                                                              8).median()))
    outs = []
    for impl in ("reference", "gather"):
        a.impl = impl
        outs.append((*attend_with_grads(a, q, k, v, wts, lambda: [a.selector.predictor.wk]), a.last_selection))
    (y0, g0, s0), (y1, g1, s1) = outs
    assert torch.equal(s0.selected, s1.selected) and s0.n_past.max() > s0.n_past.min()
    assert s0.selected[..., forced_past(16, True, 2)].all()
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    assert (y1 - y0).abs().max().item() < tol
    for got, want in zip(g1, g0):
        assert (got - want).abs().max().item() < tol * max(1.0, want.abs().max().item())


def test_local_blocks_flex_forward_equals_reference_on_cpu():
    a = attn_module(T=128, S=16, hs=16, target=0.5, local_blocks=2, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 128, 16, generator=g) for _ in range(3))
    with torch.no_grad():
        sel = a.selector.plan(q, k)
        ref = asca_kernels.attend_reference(q, k, v, sel, a.S)
        got = asca_kernels.attend_flex(q, k, v, sel, a.S, compiled=True)
    assert sel.selected[..., forced_past(8, True, 2)].all()
    assert (got - ref).abs().max().item() < 1e-5


def test_adaptive_budget_with_local_blocks_decides_on_the_others_only():
    """The adaptive budget keeps every forced block plus the candidates above the threshold; its controller's
    estimate counts skips among the candidates only, so it still meets the scheduled sparsity."""
    a = attn_module(T=128, S=8, target=0.6, local_blocks=2, budget="adaptive")
    sl = a.selector
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 128, 8, dtype=torch.float64, generator=g) for _ in range(3))
    with torch.no_grad():
        a.attend(q, k, v)
        sl.threshold.copy_(sl.budget_estimate())
        a.attend(q, k, v)
    sel = sl.last
    f = forced_past(16, True, 2)
    scores = sel.scores
    above = (scores > sl.threshold[0]) & sl.candidates(16, "cpu")
    assert torch.equal(sel.n_past, above.sum(-1) + f.sum(-1))
    assert sel.selected[..., f].all()
    assert sl.diagnostics()["sparsity"] == pytest.approx(0.6, abs=0.02)  # the estimate meets the target on its batch


@pytest.mark.parametrize("impl", ["reference", "gather"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_local_blocks_and_layer_budgets_are_causal(impl, mode):
    torch.manual_seed(0)
    model = make_model(**MODEL, attn_impl=impl, local_blocks=1, layer_sparsity="0.5,0.7", gate_loss=0.1,
                       compressed_branch=True, dropout=0.1 if mode == "train" else 0.0)
    before, after = causality_violation(model, mode)
    assert before < 1e-5 and after > 1e-3
    assert model.diagnostics()["sparsity"] > 0.4


def test_bad_local_blocks_is_one_line():
    with pytest.raises(ValueError, match="local_blocks=-1 must be >= 0"):
        ASCAConfig(block_size=64, n_head=2, n_embd=16, sparse_block_size=8, local_blocks=-1).validate()
    with pytest.raises(ValueError, match="out of reach .* local_blocks=4: the maximum is 0.0923"):
        ASCAConfig(block_size=64, n_head=2, n_embd=16, sparse_block_size=8, local_blocks=4, keep_first_block=True,
                   target_sparsity=0.6).validate()


# ----------------------------------------------------------------------------- layer_sparsity

def test_layer_budgets_are_measured_per_layer():
    torch.manual_seed(0)
    model = make_model(**{**MODEL, "n_layer": 3}, layer_sparsity="0.3,0.7,0.8", attn_impl="reference")
    model.eval()
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 128)))
    d = model.diagnostics()
    for got, want in zip(d["sparsity_per_layer"], (0.3, 0.7, 0.8)):
        assert got == pytest.approx(want, abs=0.02)
    assert d["sparsity"] == pytest.approx(0.6, abs=0.02)
    # the FLOP count follows each layer's own budget (less attention in the sparser layers)
    flops = [a.attn_flops_per_token(128) for a in model.attention_modules()]
    assert flops[0] > flops[1] > flops[2]


@pytest.mark.parametrize("value,message", [
    ("0.5,0.7,0.6", "layer_sparsity has 3 values for n_layer=2"),
    ("0.5,0.8", "layer_sparsity's mean is 0.6500 but target_sparsity=0.6: set --target_sparsity=0.6500"),
    ("0.5;0.7", "must be comma-separated numbers"),
    ("1.1,0.1", "every value must be in \\[0, 1\\)"),
    ("0.21,0.99", "layer 1's target 0.99 is out of reach"),
])
def test_bad_layer_sparsity_is_one_line(value, message):
    with pytest.raises(ValueError, match=message):
        ASCAConfig(**{**MODEL, "layer_sparsity": value}).validate()


@pytest.mark.e2e
def test_layer_sparsity_on_the_command_line(tmp_path):
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "r"
    assert train_in_process(__import__("novel_model"), [
        f"--data_dir={data}", f"--out_dir={out}", "--sparse_block_size=8", "--target_sparsity=0.6",
        "--layer_sparsity=0.58,0.62", "--sparsity_warmup_iters=0", "--max_iters=4", "--eval_interval=4",
        "--final_test=False"]) == 0
    row = [json.loads(l) for l in open(out / "metrics.jsonl")][-1]
    assert row["sparsity_target_now_per_layer"] == [0.58, 0.62]


# ----------------------------------------------------------------------------- gate_loss

def test_first_query_block_mass_matches_a_per_query_loop():
    g = torch.Generator().manual_seed(0)
    B, H, T, hs, S = 2, 2, 48, 8, 8
    q, k = (torch.randn(B, H, T, hs, dtype=torch.float64, generator=g) * 2 for _ in range(2))
    got = first_query_block_mass(q, k, S)
    nb = T // S
    for bb in range(B):
        for h in range(H):
            for b in range(nb):
                if b == 0:
                    assert got[bb, h, 0].abs().sum() == 0
                    continue
                logits = torch.stack([q[bb, h, b * S] @ k[bb, h, t] for t in range(b * S)]) / math.sqrt(hs)
                p = torch.softmax(logits, 0)
                want = torch.stack([p[j * S:(j + 1) * S].sum() for j in range(b)])
                assert (got[bb, h, b, :b].double() - want).abs().max().item() < 1e-6
                assert got[bb, h, b, b:].abs().sum() == 0


def gate_module(weight=0.5, **kw):
    return attn_module(T=64, S=8, target=0.5, gate_loss=weight, **kw)


def test_gate_loss_is_the_kl_to_the_first_querys_block_mass():
    a = gate_module()
    a.train()
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 64, 8, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
    a.attend(q, k, v)
    loss = a.aux_loss()
    # directly: per tile b >= 2, sum_j P log(P / Q) with Q = softmax of the scores over j < b; mean over tiles, B, H
    scores = a.selector.predictor(q.detach(), k.detach(), 8).detach()
    P = first_query_block_mass(q.detach(), k.detach(), 8).double()
    kls = []
    for bb in range(2):
        for h in range(2):
            for b in range(2, 8):
                Q = torch.softmax(scores[bb, h, b, :b], 0)
                p = P[bb, h, b, :b]
                kls.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), Q.tolist()) if pi > 0))
    assert loss.item() == pytest.approx(0.5 * sum(kls) / len(kls), rel=1e-5)
    assert a.aux_loss() is None  # read once per forward
    # its gradient reaches the predictor and nothing else
    a.attend(q, k, v)
    loss = a.aux_loss()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for n, p in a.selector.predictor.named_parameters()
               if n != "offset")  # the offset is one constant per head: softmax ignores it
    assert q.grad is None and k.grad is None and a.c_attn.weight.grad is None


def test_gate_loss_is_off_by_default_and_in_eval_mode():
    a = attn_module(T=64, S=8, target=0.5)
    a.train()
    q, k, v = (torch.randn(1, 2, 64, 8, dtype=torch.float64) for _ in range(3))
    a.attend(q, k, v)
    assert a.aux_loss() is None and "gate_kl" not in a.diagnostics()
    b = gate_module()
    b.eval()
    b.attend(q, k, v)
    assert b.aux_loss() is None


def test_training_the_predictor_on_the_gate_loss_lowers_it():
    """The loss can be learned: 60 Adam steps on it alone (fixed q, k) at least halve the KL."""
    a = gate_module(weight=1.0)
    a.train()
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 64, 8, dtype=torch.float64, generator=g) * 1.5 for _ in range(3))
    opt = torch.optim.Adam(a.selector.predictor.parameters(), lr=3e-2)
    first = None
    for _ in range(60):
        a.attend(q, k, v)
        loss = a.aux_loss()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    a.attend(q, k, v)
    assert a.aux_loss().item() < 0.5 * first


def test_gate_loss_needs_the_learned_selector():
    for selector in ("local", "local_gated"):  # local_gated has a predictor, but does not choose by it
        with pytest.raises(ValueError, match=f"gate_loss trains the learned predictor's choice; selector='{selector}'"):
            ASCAConfig(**MODEL, gate_loss=0.1, selector=selector).validate()
    with pytest.raises(ValueError, match="gate_loss=-1.0 must be >= 0"):
        ASCAConfig(**MODEL, gate_loss=-1.0).validate()


@pytest.mark.e2e
def test_the_trainer_adds_the_gate_loss_but_logs_the_lm_loss(tmp_path):
    """The same seed with gate_loss 0 and 1: the first logged train bpc (the LM loss of the first steps, before
    the predictor's change reaches the attention much) is close, gate_kl is logged only with the loss on, and
    the predictors end apart (the loss was backpropagated)."""
    import novel_model
    data = make_dataset(tmp_path / "data")
    runs = {}
    for w in (0.0, 1.0):
        out = tmp_path / f"w{w}"
        assert train_in_process(novel_model, [
            f"--data_dir={data}", f"--out_dir={out}", "--sparse_block_size=8", "--target_sparsity=0.6",
            "--sparsity_warmup_iters=0", "--max_iters=6", "--eval_interval=6", "--log_interval=1",
            f"--gate_loss={w}", "--final_test=False"]) == 0
        rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
        sd = torch.load(out / "ckpt.pt", weights_only=True)["model"]
        runs[w] = (rows, sd)
    (rows0, sd0), (rows1, sd1) = runs[0.0], runs[1.0]
    assert "gate_kl" not in rows0[-1] and rows1[-1]["gate_kl"] > 0
    assert abs(rows0[1]["train_bpc"] - rows1[1]["train_bpc"]) < 0.05  # LM loss only: no +KL in it
    key = next(k for k in sd0 if k.endswith("predictor.wk"))
    assert (sd0[key] - sd1[key]).abs().max() > 1e-4


# ----------------------------------------------------------------------------- compressed_branch

def test_the_compressed_branch_matches_a_per_query_loop_fp64_with_gradients():
    g = torch.Generator().manual_seed(2)
    B, H, T, hs, S = 2, 2, 40, 4, 8
    q, k, v = (torch.randn(B, H, T, hs, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
    got = attend_compressed(q, k, v, S)
    want = torch.zeros_like(q)
    rows = []
    for bb in range(B):
        for h in range(H):
            for i in range(T):
                b = i // S
                if b == 0:
                    rows.append(torch.zeros(hs, dtype=torch.float64))
                    continue
                kb = torch.stack([k[bb, h, j * S:(j + 1) * S].mean(0) for j in range(b)])
                vb = torch.stack([v[bb, h, j * S:(j + 1) * S].mean(0) for j in range(b)])
                rows.append(torch.softmax(kb @ q[bb, h, i] / math.sqrt(hs), 0) @ vb)
    want = torch.stack(rows).view(B, H, T, hs)
    assert (got - want).abs().max().item() < 1e-12 and got[:, :, S:].abs().max() > 0
    w = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad((got * w).sum(), (q, k, v)), torch.autograd.grad((want * w).sum(), (q, k, v))):
        assert (a - b).abs().max().item() < 1e-10


@pytest.mark.parametrize("impl", ["gather", "flex"])
def test_the_compressed_branch_is_the_same_on_every_path(impl):
    a = attn_module(T=128, S=16, hs=16, target=0.5, compressed_branch=True, dtype=torch.float32)
    with torch.no_grad():
        a.cmp_gate_b.fill_(0.3)
        a.cmp_gate_w.normal_()
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 128, 16, generator=g) for _ in range(3))
    outs = {}
    with torch.no_grad():  # (flex on a CPU: compiled forward only)
        for path in ("reference", impl):
            a.impl = path
            outs[path] = a.attend(q, k, v)
        a.compressed = False
        a.impl = "reference"
        without = a.attend(q, k, v)
    assert (outs[impl] - outs["reference"]).abs().max().item() < 1e-5
    assert (outs["reference"] - without).abs().max().item() > 1e-2  # the branch is really added


def test_the_compressed_branch_trains_its_gate():
    torch.manual_seed(0)
    model = make_model(**MODEL, compressed_branch=True)
    idx = torch.randint(0, 256, (2, 128))
    _, loss = model(idx, idx)
    loss.backward()
    for a in model.attention_modules():
        assert a.cmp_gate_w.grad.abs().max() > 0 and a.cmp_gate_b.grad.abs().max() > 0
