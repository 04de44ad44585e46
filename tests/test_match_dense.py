"""The arms that ask sparse attention to hold dense's quality: dense + gate (target_sparsity=0), a dense layer
(layer_sparsity with a 0), an absolute budget (keep_tokens) and sparse-then-dense (dense_from). Each against an
independent reference (a per-query loop in float64 with gradients, the reference path, the full forward for
cached decoding), causal in train and eval mode, on the reference, gather and flex paths, and with its bad inputs
as one line."""
import json

import pytest
import torch

import asca_kernels
import checkpoint
import novel_model
from asca_selector import forced_past
from helpers import (attend_with_grads, attn_module, causality_violation, naive_block_attention, one_line,
                     train_in_process)
from novel_model import ASCAConfig, make_model

MODEL = dict(n_layer=2, n_head=2, n_embd=32, block_size=128, sparse_block_size=8, sparsity_warmup_iters=0,
             pos_encoding="rope")


def naive_keep(q, k, v, scores, S, kept):
    return naive_block_attention(q, k, v, scores, S, lambda bb, h, b: kept(b, scores[bb, h, b]))


def check_against_loop(a, T, kept):
    """a.attend against the per-query loop whose tile b keeps kept(b, scores_row) past blocks, outputs and every
    input gradient in float64."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, T, 8, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
    y = a.attend(q, k, v)
    scores = a.selector.predictor(q.detach(), k.detach(), a.S)
    ref = naive_keep(q, k, v, scores, a.S, kept)
    assert (y - ref).abs().max().item() < 1e-12
    w = torch.randn_like(y)
    grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for got, want in zip(torch.autograd.grad((y * w).sum(), (q, k, v)), grads):
        assert got.abs().max() > 0 and (got - want).abs().max().item() < 1e-10
    return a.last_selection


# ----------------------------------------------------------------------------- dense + gate

def test_target_sparsity_zero_is_dense_with_the_gate_on_every_block():
    """target_sparsity=0 skips nothing: every tile keeps every past block, and each carries logsigmoid(score) (a
    per-query loop with every block and the gate agrees); the gate really changes the output against plain dense
    attention (the same loop with the bias left out)."""
    a = attn_module(T=64, S=8, target=0.0, keep_first=False, local_blocks=1)
    sel = check_against_loop(a, 64, lambda b, row: list(range(b)))
    past = torch.tril(torch.ones(8, 8, dtype=torch.bool), -1)
    assert sel.selected[..., past].all()
    nonzero_bias = sel.gate_bias[..., past] != 0
    assert nonzero_bias.all()
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 64, 8, dtype=torch.float64, generator=g) for _ in range(3))
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (a.attend(q, k, v) - plain).abs().max() > 1e-3
    assert a.selector.diagnostics()["sparsity"] == 0.0


# ----------------------------------------------------------------------------- a dense layer

def test_a_zero_in_layer_sparsity_keeps_that_layer_dense_and_the_mean_rule_holds():
    model = make_model(**{**MODEL, "n_layer": 4}, target_sparsity=0.45, layer_sparsity="0.6,0.6,0.6,0",
                       attn_impl="reference").eval()
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 128)))
    d = model.diagnostics()
    assert d["sparsity_per_layer"][3] == 0.0 and all(s == pytest.approx(0.6, abs=0.02)
                                                     for s in d["sparsity_per_layer"][:3])
    last = model.attention_modules()[3].last_selection
    past = torch.tril(torch.ones(16, 16, dtype=torch.bool), -1)
    assert last.selected[..., past].all() and (last.gate_bias[..., past] != 0).all()
    flops = [a.attn_flops_per_token(128) for a in model.attention_modules()]
    assert flops[3] > flops[0] == flops[1] == flops[2]  # and its FLOPs are dense's
    with pytest.raises(ValueError, match="layer_sparsity's mean is 0.4500 but target_sparsity=0.6"):
        ASCAConfig(**{**MODEL, "n_layer": 4}, target_sparsity=0.6, layer_sparsity="0.6,0.6,0.6,0").validate()


# ----------------------------------------------------------------------------- keep_tokens

def test_keep_tokens_caps_each_tile_and_sets_the_sparsity_from_T():
    """Tile b keeps min(b, keep_tokens // S - 1) past blocks at the end of the warm-up, and ramps to it; at
    T <= keep_tokens nothing is skipped; the target is the cap's sparsity at block_size."""
    cfg = ASCAConfig(**MODEL, keep_tokens=40)  # S=8: 5 blocks, 4 past
    m = make_model(**MODEL, keep_tokens=40)
    sl = m.attention_modules()[0].selector
    assert sl.n_keep.tolist() == [min(b, 4) for b in range(16)]
    T, S = 128, 8
    skipped_pairs = sum(max(0, b - 4) for b in range(16)) * S * S
    assert cfg.layer_targets() == [pytest.approx(skipped_pairs / (T * (T + 1) / 2))] * 2
    ramp = make_model(**{**MODEL, "sparsity_warmup_iters": 10}, keep_tokens=40).attention_modules()[0].selector
    ramp.set_step(5)
    mid = ramp.n_keep.tolist()
    assert all(min(b, 4) <= n <= b for b, n in zip(range(16), mid)) and mid != list(range(16))
    assert mid != [min(b, 4) for b in range(16)]
    dense = ASCAConfig(**{**MODEL, "block_size": 64}, keep_tokens=64)
    assert dense.layer_targets() == [0.0, 0.0]


@pytest.mark.parametrize("keep_first,local", [(False, 1), (True, 2)])
def test_keep_tokens_reference_matches_a_naive_loop_fp64_with_gradients(keep_first, local):
    a = attn_module(T=64, S=8, target=0.5, keep_first=keep_first, local_blocks=local, keep_tokens=32)
    cap = 3

    def kept(b, row):
        forced = forced_past(8, keep_first, local)[b].nonzero().flatten().tolist()
        rest = sorted((j for j in range(b) if j not in forced), key=lambda j: -row[j].item())
        return forced + rest[:min(b, cap) - len(forced)]
    sel = check_against_loop(a, 64, kept)
    assert sel.n_past[0, 0].tolist() == [min(b, cap) for b in range(8)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_keep_tokens_gather_and_flex_equal_the_reference(dtype):
    a = attn_module(T=128, S=16, hs=16, target=0.5, keep_first=False, local_blocks=1, keep_tokens=48, dtype=dtype)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 122, 16, dtype=dtype, generator=g) for _ in range(3))  # a padded last block
    wts = torch.randn(2, 2, 122, 16, dtype=dtype, generator=g)
    outs = []
    for impl in ("reference", "gather"):
        a.impl = impl
        outs.append(attend_with_grads(a, q, k, v, wts, lambda: [a.selector.predictor.wk]))
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    assert (outs[1][0] - outs[0][0]).abs().max().item() < tol
    for got, want in zip(outs[1][1], outs[0][1]):
        assert want.abs().max() > 0 and (got - want).abs().max().item() < tol * max(1.0, want.abs().max().item())
    if dtype == torch.float32:
        qp, kp, vp = (torch.nn.functional.pad(t, (0, 0, 0, 6)) for t in (q, k, v))
        with torch.no_grad():
            sel = a.selector.plan(qp, kp)
            ref = asca_kernels.attend_reference(qp, kp, vp, sel, a.S)
            got = asca_kernels.attend_flex(qp, kp, vp, sel, a.S, compiled=True)
        assert sel.n_past[0, 0].tolist() == [min(b, 2) for b in range(8)]
        assert (got - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("impl", ["reference", "gather"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("arm", ["keep_tokens", "dense_gate", "dense_layer", "dense_from", "nsa"])
def test_the_arms_are_causal(arm, impl, mode):
    keys = {"keep_tokens": dict(keep_tokens=40), "dense_gate": dict(target_sparsity=0.0),
            "dense_layer": dict(target_sparsity=0.3, layer_sparsity="0.6,0"),
            "dense_from": dict(target_sparsity=0.6, dense_from=0.5),
            "nsa": dict(target_sparsity=0.6, selector="nsa")}[arm]
    torch.manual_seed(0)
    model = make_model(**MODEL, attn_impl=impl, dropout=0.1 if mode == "train" else 0.0, **keys)
    if arm == "dense_from":
        model.set_step(10, 0.4)  # still sparse: the sparse phase is the one that could leak
    before, after = causality_violation(model, mode)
    assert before < 1e-5 and after > 1e-3
    if arm in ("keep_tokens", "dense_from", "nsa"):
        assert model.diagnostics()["sparsity"] > 0.3


@pytest.mark.e2e
def test_keep_tokens_bad_input_is_one_line(tmp_path, data_dir, capsys):
    with pytest.raises(ValueError, match="keep_tokens=16 is below the blocks every tile keeps .* use keep_tokens=24"):
        ASCAConfig(**MODEL, keep_tokens=16, local_blocks=1, keep_first_block=True).validate()
    with pytest.raises(ValueError, match="cannot be combined with layer_sparsity or budget='adaptive'"):
        ASCAConfig(**MODEL, keep_tokens=40, budget="adaptive").validate()
    args = [f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'r'}", "--sparse_block_size=8", "--keep_tokens=32"]
    assert train_in_process(novel_model, args + ["--target_sparsity=0.5"]) == 1
    assert "--keep_tokens and --target_sparsity set the same thing two ways" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "r").exists()  # nothing started
    assert train_in_process(novel_model, args + ["--keep_tokens=4"]) == 1
    assert "keep_tokens=4 is below" in one_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------- dense_from

def test_dense_from_keeps_every_block_from_that_fraction_of_the_run_on():
    m = make_model(**MODEL, target_sparsity=0.6, dense_from=0.9)
    sl = m.attention_modules()[0].selector
    sparse = sl.n_keep.tolist()
    for progress, dense in ((0.0, False), (0.89, False), (0.9, True), (1.0, True), (None, False)):
        m.set_step(1000, progress)
        assert (sl.n_keep.tolist() == list(range(16))) == dense and sl.sparsity == (0.0 if dense else 0.6)
    m.set_step(1000, 0.5)
    assert sl.n_keep.tolist() == sparse  # back to the sparse counts
    never = make_model(**MODEL, target_sparsity=0.6)  # the default dense_from=1: sparse to the end, its last step too
    never.set_step(1000, 1.0)
    assert never.attention_modules()[0].selector.n_keep.tolist() == sparse


@pytest.mark.e2e
def test_dense_from_in_a_run_and_in_every_reload(tmp_path, data_dir):
    """A 10-iteration run with dense_from=0.5: the scheduled sparsity is 0 from iteration 5 on (its rows say so), the
    final test scores the dense model, and a reload (sample.py, extraction.py) is dense too; a resume keeps the
    schedule. The run before the switch trained sparse."""
    out = tmp_path / "r"
    common = [f"--data_dir={data_dir}", f"--out_dir={out}", "--sparse_block_size=8", "--target_sparsity=0.5",
              "--sparsity_warmup_iters=0", "--dense_from=0.5", "--eval_interval=2", "--log_interval=1"]
    assert train_in_process(novel_model, common + ["--max_iters=10", "--final_test=False"]) == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    target = {r["iter"]: r["sparsity_target_now"] for r in rows if "sparsity_target_now" in r}
    assert target[2] == target[4] == 0.5 and target[6] == target[8] == target[10] == 0.0
    model, _ = checkpoint.model_from_checkpoint(str(out / "ckpt.pt"))
    assert all(a.selector.n_keep.tolist() == list(range(8)) for a in model.attention_modules())
    # resumed to 20 iterations: progress 10/20 is again at the switch's edge, 0.5 -> dense from there
    assert train_in_process(novel_model, [f"--data_dir={data_dir}", f"--out_dir={out}", "--init_from=resume",
                                          "--max_iters=20", "--final_test=True"]) == 0
    final = json.load(open(out / "final.json"))
    assert final["test_sparsity"] == 0.0


def test_dense_from_with_a_time_budget_follows_the_time():
    """With max_time_s the run's progress is the larger of iterations / max_iters and time / max_time_s: the
    selector reads that progress, whatever the iteration."""
    m = make_model(**MODEL, target_sparsity=0.6, dense_from=0.75)
    sl = m.attention_modules()[0].selector
    m.set_step(3.0, 0.8)  # few iterations, most of the time spent
    assert sl.sparsity == 0.0


@pytest.mark.e2e
def test_dense_from_bad_input_is_one_line(tmp_path, data_dir, capsys):
    for value in ("1.5", "-0.1"):
        assert train_in_process(novel_model, [f"--data_dir={data_dir}", f"--out_dir={tmp_path / value}",
                                              "--sparse_block_size=8", f"--dense_from={value}"]) == 1
        assert f"dense_from={float(value)} must be in [0, 1]" in one_line(capsys.readouterr().err)
        assert not (tmp_path / value).exists()
    with pytest.raises(ValueError, match="dense_from keeps every block through the fixed budget"):
        ASCAConfig(**MODEL, dense_from=0.5, budget="adaptive").validate()


@pytest.mark.e2e
@pytest.mark.parametrize("key,first,then", [("dense_from", "0.5", "0.8"), ("keep_tokens", "40", "48")])
def test_a_resume_that_changes_the_arm_is_one_line(tmp_path, data_dir, capsys, key, first, then):
    out = tmp_path / "r"
    common = [f"--data_dir={data_dir}", f"--out_dir={out}", "--sparse_block_size=8", "--final_test=False"]
    assert train_in_process(novel_model, common + [f"--{key}={first}", "--max_iters=2"]) == 0
    before = (out / "ckpt.pt").read_bytes()
    capsys.readouterr()
    assert train_in_process(novel_model, common + ["--init_from=resume", f"--{key}={then}", "--max_iters=4"]) == 1
    line = one_line(capsys.readouterr().err)
    assert key in line and first in line
    assert (out / "ckpt.pt").read_bytes() == before  # nothing lost, nothing trained


# ----------------------------------------------------------------------------- NSA's three gated branches

def nsa_loop(a, q, k, v):
    """NSA's output per query, written out: the selected blocks (own, the local_blocks nearest, then the blocks the
    tile's first query's compressed attention ranks highest, up to the tile's count), the window (own and the
    local_blocks nearest) and the compressed branch (the blocks before the tile, their mean keys and values through
    the branch's projections), each a softmax of its own, mixed by per-head sigmoid gates from the query."""
    import math
    B, H, T, hs = q.shape
    S, w = a.S, a.selector.local
    ck, cv = a.selector.nsa_ck, a.nsa_cv
    nb = T // S
    kb = k.reshape(B, H, nb, S, hs).mean(3)
    vb = v.reshape(B, H, nb, S, hs).mean(3)
    out = torch.zeros_like(q)
    for bb in range(B):
        for h in range(H):
            kc, vc = kb[bb, h] @ ck[h], vb[bb, h] @ cv[h]
            for i in range(T):
                b = i // S
                first = q[bb, h, b * S]
                probs = torch.softmax(torch.stack([first @ kc[j] for j in range(b)]) / math.sqrt(hs), 0) if b else []
                nearest = list(range(max(0, b - w), b))
                rest = sorted((j for j in range(b) if j not in nearest), key=lambda j: -probs[j].item())
                chosen = nearest + rest[:int(a.selector.n_keep[b]) - len(nearest)]

                def attn(blocks):
                    keys = [t for j in blocks for t in range(j * S, j * S + S)] + list(range(b * S, i + 1))
                    p = torch.softmax(torch.stack([q[bb, h, i] @ k[bb, h, t] for t in keys]) / math.sqrt(hs), 0)
                    return p @ v[bb, h, keys]
                if b:
                    pc = torch.softmax(torch.stack([q[bb, h, i] @ kc[j] for j in range(b)]) / math.sqrt(hs), 0)
                    y_cmp = pc @ vc[:b]
                else:
                    y_cmp = torch.zeros(hs, dtype=q.dtype)
                g = torch.sigmoid(a.nsa_gate_w[h] @ q[bb, h, i] + a.nsa_gate_b[h])
                out[bb, h, i] = g[0] * attn(chosen) + g[1] * attn(nearest) + g[2] * y_cmp
    return out


def nsa_module(dtype=torch.float64, T=64):
    a = attn_module(T=T, S=8, target=0.5, keep_first=False, local_blocks=1, selector="nsa", dtype=dtype)
    with torch.no_grad():  # trained-looking parameters: the projections and gates away from their start
        g = torch.Generator().manual_seed(7)
        for p in (a.selector.nsa_ck, a.nsa_cv, a.nsa_gate_w, a.nsa_gate_b):
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return a


def test_nsa_matches_a_per_query_loop_fp64_with_gradients():
    a = nsa_module()
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 64, 8, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
    y = a.attend(q, k, v)
    ref = nsa_loop(a, q, k, v)
    assert (y - ref).abs().max().item() < 1e-12
    w = torch.randn_like(y)
    params = [q, k, v, a.selector.nsa_ck, a.nsa_cv, a.nsa_gate_w, a.nsa_gate_b]
    got = torch.autograd.grad((y * w).sum(), params)
    want = torch.autograd.grad((ref * w).sum(), params)
    for gg, ww in zip(got, want):
        assert ww.abs().max() > 0 and (gg - ww).abs().max().item() < 1e-10
    # the selection's own scores are the compressed branch's first-query probabilities, and the projection the
    # scores read gets the LM loss's gradient through the compressed branch
    sel = a.last_selection
    from asca_selector import compressed_block_probs
    assert torch.allclose(sel.scores, compressed_block_probs(q.detach(), k.detach(), 8, a.selector.nsa_ck))
    assert got[3].abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nsa_gather_and_flex_equal_the_reference(dtype):
    a = nsa_module(dtype, T=128)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 122, 8, dtype=dtype, generator=g) for _ in range(3))
    wts = torch.randn(2, 2, 122, 8, dtype=dtype, generator=g)
    outs = []
    for impl in ("reference", "gather"):
        a.impl = impl
        outs.append(attend_with_grads(a, q, k, v, wts, lambda: [a.nsa_cv, a.selector.nsa_ck]))
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    assert (outs[1][0] - outs[0][0]).abs().max().item() < tol
    for got, want in zip(outs[1][1], outs[0][1]):
        assert want.abs().max() > 0 and (got - want).abs().max().item() < tol * max(1.0, want.abs().max().item())
    if dtype == torch.float32:
        a16 = attn_module(T=128, S=16, hs=16, target=0.5, keep_first=False, local_blocks=1, selector="nsa",
                          dtype=torch.float32)
        q, k, v = (torch.randn(2, 2, 128, 16, generator=g) for _ in range(3))
        with torch.no_grad():
            a16.impl = "reference"
            ref = a16.attend(q, k, v)
            a16.impl = "flex"
            got = a16.attend(q, k, v)
        assert (got - ref).abs().max().item() < 1e-5


def test_nsa_bad_settings_are_one_line():
    with pytest.raises(ValueError, match="selector='nsa' keeps the fixed budget's counts"):
        ASCAConfig(**MODEL, selector="nsa", budget="adaptive").validate()
    with pytest.raises(ValueError, match="local_blocks >= 1"):
        ASCAConfig(**MODEL, selector="nsa", local_blocks=0).validate()
