"""asca_kernels, each kernel against the reference path, which defines the function.

attend_gather (attn_impl='gather'): outputs and every gradient (q, k, v, the predictor's parameters) in float64
and float32, fixed and adaptive budgets, lengths that are not a multiple of S, every architecture option
through the whole model, causality in train and eval mode, a negative control that a skipped block is never
read, and its memory estimate. attend_flex (CPU: compiled forward only): equal to the reference, its BlockMask
lists exactly the selected blocks and the compiled kernel visits only those; flex_backward_problem follows
inductor's tiles. The CUDA tests of the flex path (gradients, the compiled whole model) are in test_asca.py."""
import os
import re
import subprocess

import pytest
import torch
import torch.nn.functional as F

import novel_model as nm
import asca
import asca_kernels
from asca_kernels import attend_gather, tile_groups
from helpers import ROOT, attn_module, causality_violation, run_script
from novel_model import ASCAConfig, AdaptiveSparseCausalSelfAttention, make_model

TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-5, 1e-5)}  # (outputs, gradients)


def module(T=128, S=8, H=2, hs=8, target=0.75, keep_first=True, budget="fixed", dtype=torch.float64, **kw):
    torch.manual_seed(0)
    cfg = ASCAConfig(block_size=T, n_head=H, n_embd=H * hs, sparse_block_size=S, target_sparsity=target,
                     sparsity_warmup_iters=0, keep_first_block=keep_first, attn_impl="reference", budget=budget, **kw)
    return AdaptiveSparseCausalSelfAttention(cfg).to(dtype)


def run(a, impl, q, k, v, w):
    """(output, grads of q, k, v and every predictor parameter) of attend() on the given path."""
    a.impl = impl
    a.zero_grad()
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    y = a.attend(q, k, v)
    (y * w).sum().backward()
    grads = [q.grad, k.grad, v.grad] + [p.grad.clone() for p in a.selector.predictor.parameters()]
    return y.detach(), grads, a.last_selection


@pytest.fixture(params=["sdpa", "block"])
def gather_kernel(request, monkeypatch):
    """Each gather kernel in turn (the fused SDPA one and the written-out one; 'auto' picks one per tile
    group, test_auto_kernel_mixes_both_per_group_and_equals_reference)."""
    monkeypatch.setattr(asca_kernels, "GATHER_KERNEL", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", ["fixed", "fixed_no_sink", "adaptive", "adaptive_head", "odd_length", "rope_S16"])
@pytest.mark.parametrize("grouping", ["one_per_count", "default"])
def test_gather_equals_reference_outputs_and_gradients(dtype, case, grouping, gather_kernel, monkeypatch):
    if grouping == "one_per_count":  # these small shapes make one group by default: test many as well
        monkeypatch.setattr(asca_kernels, "GATHER_CALL_FLOPS", 0)
    opts = {"fixed": {}, "fixed_no_sink": dict(keep_first=False), "adaptive": dict(budget="adaptive"),
            "adaptive_head": dict(budget="adaptive", budget_scope="head"), "odd_length": dict(target=0.6),
            "rope_S16": dict(S=16, pos_encoding="rope", target=0.5)}[case]
    opts.setdefault("pos_encoding", "learned")
    a = module(dtype=dtype, **opts)
    T = 122 if case == "odd_length" else 128  # 122: the last block is padding past the real bytes
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, T, 8, dtype=dtype, generator=g) for _ in range(3))
    w = torch.randn(2, 2, T, 8, dtype=dtype, generator=g)
    if opts.get("budget") == "adaptive":  # a threshold that keeps a varying number of blocks per tile and head
        a.selector.threshold.fill_(float(a.selector.predictor(q, k, a.S).detach().median()))
    y_ref, g_ref, sel = run(a, "reference", q, k, v, w)
    y, grads, sel2 = run(a, "gather", q, k, v, w)
    tol_y, tol_g = TOL[dtype]
    assert torch.equal(sel.selected, sel2.selected)
    n_past = sel.n_past
    assert (n_past.max() > n_past.min()) and sel.selected.float().mean() < 0.9  # a real, varying selection
    assert (y - y_ref).abs().max().item() < tol_y
    for got, want in zip(grads, g_ref):
        assert got.abs().max() > 0 and (got - want).abs().max().item() < tol_g * max(1.0, want.abs().max().item())


def test_a_skipped_block_is_never_read(gather_kernel):
    """NaN in every key and value of the blocks a tile skips leaves the gather path's output unchanged; the same
    NaN in a kept block poisons it (so the check can fail), as it poisons the reference, which reads all."""
    a = module(T=64, S=8, target=0.75, pos_encoding="learned", dtype=torch.float64)
    a.impl = "gather"
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 64, 8, dtype=torch.float64, generator=g) for _ in range(3))
    with torch.no_grad():
        clean = a.attend(q, k, v)
        sel = a.last_selection.selected[0]  # (nh, nb, nb)
        last = sel.shape[1] - 1
        skipped = [j for j in range(last) if not sel[:, last, j].any()]  # blocks no head's last tile keeps
        assert skipped
        k2, v2 = k.clone(), v.clone()
        for j in skipped:
            k2[..., j * 8:(j + 1) * 8, :] = float("nan")
            v2[..., j * 8:(j + 1) * 8, :] = float("nan")
        predictor = a.selector.predictor
        predictor.forward = lambda q_, k_, S: nm.ContentBasedAdaptiveSparsity.forward(predictor, q, k, S)
        rows = slice(last * 8, None)  # the last tile's queries: they skip those blocks
        out = a.attend(q, k2, v2)
        assert torch.isfinite(out[..., rows, :]).all() and torch.equal(out[..., rows, :], clean[..., rows, :])
        a.impl = "reference"
        assert torch.isnan(a.attend(q, k2, v2)[..., rows, :]).any()  # the reference reads every block
        a.impl = "gather"
        kept = next(j for j in range(last) if sel[0, last, j])  # a block head 0's last tile keeps
        k3 = k.clone()
        k3[..., kept * 8:(kept + 1) * 8, :] = float("nan")
        assert torch.isnan(a.attend(q, k3, v)[:, 0, rows, :]).any()


MODEL = dict(n_layer=2, n_head=2, n_embd=32, block_size=128, sparse_block_size=16, target_sparsity=0.6,
             sparsity_warmup_iters=0)


@pytest.mark.parametrize("opts", [{}, dict(pos_encoding="learned", qk_norm=False, mlp_act="gelu", tie_embeddings=True,
                                           gate_input="unrotated"), dict(budget="adaptive", budget_scope="head"),
                                  # local_blocks and layer budgets (tests/test_selection_options.py)
                                  dict(local_blocks=1, keep_first_block=False, layer_sparsity="0.55,0.65",
                                       compressed_branch=True)])
def test_whole_model_on_the_gather_path_equals_the_reference(opts):
    torch.manual_seed(0)
    ref = make_model(**MODEL, attn_impl="reference", **opts).double()
    gat = make_model(**MODEL, attn_impl="gather", **opts).double()
    gat.load_state_dict(ref.state_dict())
    if opts.get("budget") == "adaptive":
        for m in (ref, gat):
            for a in m.attention_modules():
                a.selector.threshold.fill_(1.9)
    idx = torch.randint(0, 256, (2, 120), generator=torch.Generator().manual_seed(1))
    tgt = torch.randint(0, 256, (2, 120), generator=torch.Generator().manual_seed(2))
    losses = []
    for m in (ref, gat):
        m.train()
        logits, loss = m(idx, tgt)
        loss.backward()
        losses.append((logits.detach(), loss.item()))
    assert (losses[0][0] - losses[1][0]).abs().max().item() < 1e-9 and abs(losses[0][1] - losses[1][1]) < 1e-12
    gr, gg = dict(ref.named_parameters()), dict(gat.named_parameters())
    assert any("predictor" in n for n in gr)
    for name, p in gr.items():
        assert (p.grad - gg[name].grad).abs().max().item() < 1e-9, name


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("budget", ["fixed", "adaptive"])
def test_gather_path_is_causal(mode, budget):
    torch.manual_seed(0)
    # dropout in train mode with the fixed budget (the adaptive one refuses it on this path, see below)
    dropout = 0.1 if mode == "train" and budget == "fixed" else 0.0
    model = make_model(**MODEL, attn_impl="gather", budget=budget, dropout=dropout)
    if budget == "adaptive":
        for a in model.attention_modules():
            a.selector.threshold.fill_(1.9)
    before, after = causality_violation(model, mode)
    assert before < 1e-5 and after > 1e-3  # earlier logits never move; later ones do
    assert model.diagnostics()["sparsity"] > (0.3 if budget == "fixed" else 0.1)  # the selection is active


def test_tile_groups_cover_every_tile_once():
    for nb in (1, 2, 3, 5, 16, 64, 127):
        for groups in (1, 2, 4, 8):
            g = tile_groups(nb, groups)
            assert g[0][0] == 0 and g[-1][1] == nb and all(a < b for a, b in g)
            assert all(g[i][1] == g[i + 1][0] for i in range(len(g) - 1)) and len(g) == min(nb, groups)


def test_gather_groups_give_the_same_result():
    a = module(T=128, S=8, target=0.75, pos_encoding="learned")
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 128, 8, dtype=torch.float64, generator=g) for _ in range(3))
    with torch.no_grad():
        sel = a.selector.plan(q, k)
        outs = [attend_gather(q, k, v, sel.order, sel.n_past, sel.gate_bias, 8, groups=n) for n in (1, 3, 16, None)]
    assert all((o - outs[0]).abs().max().item() < 1e-12 for o in outs)


def test_count_groups_cover_every_tile_once_padded_to_their_largest_count():
    """count_groups (attend_gather's default grouping): contiguous, every tile once, K its group's largest count;
    equal counts always share a group, a call's worth of padding never splits one, and more than that does."""
    g = torch.Generator().manual_seed(0)
    for nb in (1, 2, 7, 64, 129):
        for trial in range(4):
            counts = (torch.arange(nb) * 0.3).long() + torch.randint(0, 2 * trial + 1, (nb,), generator=g)
            counts = counts.clamp(max=torch.arange(nb)).tolist()  # tile b has b blocks before it
            for call in (0.0, 1e6, 64e6, 1e12):
                plan = asca_kernels.count_groups(counts, 16, 8, 4, call_flops=call)
                assert plan[0][0] == 0 and plan[-1][1] == nb
                assert all(plan[i][1] == plan[i + 1][0] and plan[i][0] < plan[i][1] for i in range(len(plan) - 1))
                assert all(K == max(counts[t0:t1]) for t0, t1, K in plan)
                if call == 0.0:  # no padding allowed: one group per run of equal counts
                    runs = 1 + sum(a != b for a, b in zip(counts, counts[1:]))
                    assert len(plan) == runs
                if call == 1e12:
                    assert len(plan) == 1
    # one call's worth: 12 * hs * S^2 * heads flops per padded slot = 12 * 8 * 256 * 4 = 98,304
    slot = 12 * 8 * 16 * 16 * 4
    assert asca_kernels.count_groups([0, 0, 1], 16, 8, 4, call_flops=2 * slot) == [(0, 3, 1)]
    assert asca_kernels.count_groups([0, 0, 1], 16, 8, 4, call_flops=2 * slot - 1) == [(0, 2, 0), (2, 3, 1)]
    assert asca_kernels.count_groups([3, 0], 16, 8, 4, call_flops=3 * slot - 1) == [(0, 1, 3), (1, 2, 0)]


def test_gather_refuses_dropout_with_the_adaptive_budget():
    with pytest.raises(ValueError, match="has no attention dropout"):
        ASCAConfig(block_size=64, n_head=2, n_embd=16, sparse_block_size=8, attn_impl="gather", budget="adaptive",
                   dropout=0.1).validate()


BENCH_TABLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "results", "raw",
                           "bench_gather_cpu_2026-12-04.md")
NOISE = 1.15  # paths within 15% of each other are level on this machine (paired runs differ by 6-7%)


def measured_pairs():
    """{(rows, T, S, target): {path: ms}} for the step and forward rows of the benchmark table that auto's rule was
    read from, where both the gather path (today's kernel) and the reference were measured."""
    rows = {}
    for line in open(BENCH_TABLE):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 7 or cells[0] not in ("step", "forward") or cells[4] == "-":
            continue
        kind, T, S, path, measured, ms = cells[0], int(cells[1]), int(cells[2]), cells[3], float(cells[4]), cells[5]
        target = min((0.5, 0.75, 0.875), key=lambda t: abs(t - measured))  # the bench's targets; measured is near
        rows.setdefault((kind, T, S, target), {})[path] = float(ms.replace(",", ""))
    return {k: v for k, v in rows.items() if {"asca reference", "asca gather (block)"} <= v.keys()}


def test_auto_never_takes_the_slower_path_where_the_table_measured():
    """attn_impl='auto' on a CPU follows the committed benchmark table: at every training step and
    forward shape it measured both paths, auto takes the gather path where it was faster beyond the noise and the
    reference where that was; the main job's T=256 keeps the reference (level there, asca.py)."""
    pairs = measured_pairs()
    assert len(pairs) >= 15 and {T for (_, T, _, _) in pairs} >= {256, 512, 1024, 2048}
    cpu, decided = torch.device("cpu"), 0
    for (kind, T, S, target), ms in pairs.items():
        a = make_model(n_layer=1, n_head=2, n_embd=32, block_size=T, sparse_block_size=S, target_sparsity=target,
                       sparsity_warmup_iters=0).attention_modules()[0]
        a.train(kind == "step")
        with torch.set_grad_enabled(kind == "step"):
            got = a.resolved_impl(cpu, T)
        gather, ref = ms["asca gather (block)"], ms["asca reference"]
        if gather * NOISE < ref:
            assert got == "gather", (kind, T, S, target, ms)
            decided += 1
        elif ref * NOISE < gather:
            assert got == "reference", (kind, T, S, target, ms)
            decided += 1
    assert decided >= 12
    main = make_model(n_layer=1, n_head=2, n_embd=32, block_size=256, sparse_block_size=32, target_sparsity=0.5,
                      sparsity_warmup_iters=0).attention_modules()[0]
    assert main.resolved_impl(cpu, 256) == "reference"


def kernel_pairs():
    """{(rows, T, S, target): {path: ms}} for every row kind of the benchmark table where both gather kernels ran."""
    rows = {}
    for line in open(BENCH_TABLE):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 7 or cells[0] not in ("step", "forward", "attention") or cells[4] == "-":
            continue
        target = min((0.5, 0.75, 0.875), key=lambda t: abs(t - float(cells[4])))
        key = (cells[0], int(cells[1]), int(cells[2]), target)
        rows.setdefault(key, {})[cells[3]] = float(cells[5].replace(",", ""))
    return {k: v for k, v in rows.items() if {"asca gather (sdpa)", "asca gather (block)"} <= v.keys()}


def test_auto_kernel_takes_the_faster_one_where_the_table_measured(monkeypatch):
    """The gather path's kernel='auto' (the default) at every shape the committed table measured both kernels: the
    real module's tile groups, as the benchmark runs them, take only 'block' where block was faster beyond the noise,
    and take 'sdpa' where that was (T=8192, S=128, 0.5: the score tiles past 1 MB)."""
    assert asca_kernels.GATHER_KERNEL == "auto"
    chosen = []
    real = asca_kernels.choose_gather_kernel

    def spy(kernel, device_type, S, K):
        chosen.append(real(kernel, device_type, S, K))
        return chosen[-1]

    monkeypatch.setattr(asca_kernels, "choose_gather_kernel", spy)
    pairs = kernel_pairs()
    assert len(pairs) >= 30 and {T for (_, T, _, _) in pairs} >= {256, 1024, 4096, 8192}
    decided, for_sdpa = 0, 0
    for (kind, T, S, target), ms in sorted(pairs.items()):
        sdpa, block = ms["asca gather (sdpa)"], ms["asca gather (block)"]
        if not (sdpa * NOISE < block or block * NOISE < sdpa):
            continue
        a = make_model(n_layer=1, n_head=2, n_embd=32, block_size=T, sparse_block_size=S, target_sparsity=target,
                       sparsity_warmup_iters=0, attn_impl="gather").attention_modules()[0].eval()
        q, k, v = (torch.randn(1, 2, T, 16) for _ in range(3))
        chosen.clear()
        with torch.no_grad():
            a.attend(q, k, v)
        counts = a.selector.plan(q, k).n_past.amax(dim=(0, 1)).tolist()
        assert len(chosen) == len(asca_kernels.count_groups(counts, S, 16, 2))
        if sdpa * NOISE < block:
            assert "sdpa" in chosen, (kind, T, S, target, ms, chosen)
            for_sdpa += 1
        else:
            assert set(chosen) == {"block"}, (kind, T, S, target, ms, chosen)
        decided += 1
    assert decided >= 15 and for_sdpa >= 2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_auto_kernel_mixes_both_per_group_and_equals_reference(dtype, monkeypatch):
    """With the threshold lowered so that the later tile groups (more kept blocks) take sdpa and the first takes
    block, one call runs both kernels and still equals the reference, outputs and every gradient."""
    monkeypatch.setattr(asca_kernels, "GATHER_KERNEL", "auto")
    monkeypatch.setattr(asca_kernels, "GATHER_CALL_FLOPS", 0)  # a group per count: these tiny shapes would be one
    calls = []  # (K, kernel) per tile group
    real = asca_kernels.choose_gather_kernel
    monkeypatch.setattr(asca_kernels, "choose_gather_kernel",
                        lambda kernel, dev, S, K: calls.append((K, real(kernel, dev, S, K))) or calls[-1][1])
    a = module(dtype=dtype, target=0.5, pos_encoding="learned")
    g = torch.Generator().manual_seed(3)
    q, k, v, w = (torch.randn(2, 2, 128, 8, dtype=dtype, generator=g) for _ in range(4))
    y_ref, g_ref, _ = run(a, "reference", q, k, v, w)
    run(a, "gather", q, k, v, w)
    K0 = min(K for K, _ in calls)
    assert max(K for K, _ in calls) > K0  # the groups differ
    monkeypatch.setattr(asca_kernels, "GATHER_SDPA_MIN_SCORES", a.S * a.S * (K0 + 1))  # the first group: block
    calls.clear()
    y, grads, _ = run(a, "gather", q, k, v, w)
    assert {kernel for _, kernel in calls} == {"sdpa", "block"}, calls
    tol_y, tol_g = TOL[dtype]
    assert (y - y_ref).abs().max().item() < tol_y
    for got, want in zip(grads, g_ref):
        assert got.abs().max() > 0 and (got - want).abs().max().item() < tol_g * max(1.0, want.abs().max().item())


def test_auto_below_t_1024_waits_for_the_measured_sparsity():
    """Between GATHER_SPARSE_MIN_T and GATHER_MIN_T the gather path is taken once the schedule reaches the least
    sparsity the table measured (0.5); from GATHER_MIN_T at any sparsity; with dropout and the adaptive budget never."""
    cfg = dict(n_layer=1, n_head=2, n_embd=32, block_size=1024, sparse_block_size=64, sparsity_warmup_iters=100)
    a = make_model(**cfg, target_sparsity=0.8).attention_modules()[0]
    cpu = torch.device("cpu")
    a.set_step(0)  # sparsity 0
    assert a.resolved_impl(cpu, 1024) == "gather" and a.resolved_impl(cpu, 512) == "reference"
    a.set_step(50)  # 0.4
    assert a.resolved_impl(cpu, 512) == "reference"
    a.set_step(70)  # 0.56
    assert a.resolved_impl(cpu, 512) == "gather" and a.resolved_impl(cpu, 256) == "reference"
    ad = make_model(**cfg, target_sparsity=0.8, budget="adaptive", dropout=0.1).attention_modules()[0]
    assert ad.resolved_impl(cpu, 1024) == "reference"  # the gather path has no dropout with that budget
    ad.eval()
    assert ad.resolved_impl(cpu, 1024) == "gather"


def test_bad_attn_impl_is_one_line():
    with pytest.raises(ValueError, match="attn_impl='gathr' must be one of auto, reference, flex, gather"):
        ASCAConfig(block_size=64, n_head=2, n_embd=16, sparse_block_size=8, attn_impl="gathr").validate()


@pytest.mark.e2e
def test_a_training_run_on_the_gather_path(tmp_path):
    import json
    import novel_model
    from helpers import make_dataset, train_in_process
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "g"
    assert train_in_process(novel_model, [f"--data_dir={data}", f"--out_dir={out}", "--attn_impl=gather",
                                          "--sparse_block_size=8", "--target_sparsity=0.6", "--sparsity_warmup_iters=4",
                                          "--max_iters=10", "--eval_interval=5"]) == 0
    final = json.load(open(out / "final.json"))
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert final["test_bpc"] < rows[0]["val_bpc"] and abs(final["test_sparsity"] - 0.6) < 0.05


@pytest.mark.parametrize("impl", ["reference", "gather"])
def test_bf16_inputs_to_an_fp32_module_run_and_match(impl):
    """bench_attention.py and the CUDA start-up test feed bf16 q, k, v to a module kept in fp32 without autocast
    (once: the predictor's einsum raised 'expected scalar type Float but found BFloat16'. It now
    scores in its weights' dtype, so the choice equals the fp32 module's on the same (bf16-rounded) inputs, and
    the attention matches within bf16 rounding."""
    a = module(T=64, S=8, H=2, hs=16, target=0.6, dtype=torch.float32)
    a.impl = impl
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 64, 16, generator=g).bfloat16().requires_grad_(True) for _ in range(3))
    y = a.attend(q, k, v)
    y.float().sum().backward()
    sel16 = a.last_selection.selected.clone()
    assert y.dtype == torch.bfloat16 and q.grad is not None and torch.isfinite(q.grad.float()).all()
    ref = a.attend(*(t.detach().float() for t in (q, k, v)))
    assert torch.equal(a.last_selection.selected, sel16)
    assert (y.float() - ref).abs().max().item() < 0.05 and ref.abs().max().item() > 0.5


@pytest.mark.parametrize("T,S,target,B", [(1024, 64, 0.875, 2), (2048, 64, 0.75, 1), (1024, 32, 0.5, 1)])
def test_the_gather_memory_estimate_matches_what_autograd_keeps(T, S, target, B):
    """gather_attention_bytes (from shapes alone) against the bytes autograd really saves in one forward of
    attend() on the gather path, counted storage by storage (q, k, v themselves excluded)."""
    cfg = ASCAConfig(block_size=T, n_head=4, n_embd=256, sparse_block_size=S, target_sparsity=target,
                     sparsity_warmup_iters=0, attn_impl="gather")
    a = AdaptiveSparseCausalSelfAttention(cfg)
    q, k, v = (torch.randn(B, 4, T, 64, requires_grad=True) for _ in range(3))
    inputs = {t.untyped_storage().data_ptr() for t in (q, k, v)}
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        a.attend(q, k, v)
    measured = sum(n for ptr, n in seen.items() if ptr not in inputs)
    assert 0.6 < nm.gather_attention_bytes(cfg, B)[0] / measured < 1.5


@pytest.mark.e2e
def test_a_gather_run_that_would_not_fit_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    """Bad input: a gather run whose estimate exceeds the free memory stops before anything is
    allocated, naming a batch that fits (or, when not even one sequence fits, a shorter block_size)."""
    import train_config
    from helpers import make_dataset, one_line, train_in_process
    data = make_dataset(tmp_path / "d")
    args = [f"--data_dir={data}", "--attn_impl=gather", "--sparse_block_size=16", "--target_sparsity=0.3",
            "--max_iters=1", "--batch_size=8"]
    cfg = ASCAConfig(block_size=64, n_layer=2, n_head=2, n_embd=32, sparse_block_size=16, target_sparsity=0.3)
    need = nm.gather_step_bytes(cfg, 8)
    for free, fix in ((need / 2, r"use batch_size=3\b"), (1000, r"use block_size=32 \(or less\)")):
        monkeypatch.setattr(train_config, "free_memory_bytes", lambda *a, free=free: free)
        assert train_in_process(nm, args + [f"--out_dir={tmp_path / str(free)}"]) == 1
        err = one_line(capsys.readouterr().err)
        assert "the gather path needs about" in err and re.search(fix, err), err
        assert f"but {asca.size_text(free)} are free" in err and "0.0 GiB" not in err, err  # sizes a reader can use
        assert not (tmp_path / str(free)).exists()
    monkeypatch.setattr(train_config, "free_memory_bytes", lambda *a: need * 2)
    assert train_in_process(nm, args + [f"--out_dir={tmp_path / 'fits'}", "--final_test=False"]) == 0


# ----------------------------------------------------------------------------- flex

def _flex_inputs(a, B=2, H=2, T=128, hs=8, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, T, hs, generator=g, dtype=dtype).to(device) for _ in range(3))
    return q, k, v, a.selector.plan(q, k)


@pytest.mark.parametrize("layout", asca_kernels.GATE_BIAS_LAYOUTS)
def test_flex_path_forward_matches_reference_on_cpu(layout):
    """Compiled FlexAttention (CPU forward) reads the BlockMask's block lists: equal to the reference, with the
    gate bias read per key position (the default) or per block."""
    a = attn_module(T=128, S=16, hs=16, target=0.6, dtype=torch.float32)
    q, k, v, sel = _flex_inputs(a, hs=16)
    with torch.no_grad():  # FlexAttention has no backward on CPU; CUDA tests cover gradients
        ref = asca_kernels.attend_reference(q, k, v, sel, a.S)
        got = asca_kernels.attend_flex(q, k, v, sel, a.S, compiled=True, layout=layout)
    assert (got - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("layout", asca_kernels.GATE_BIAS_LAYOUTS)
def test_the_flex_score_mod_is_the_reference_function_with_its_gradients(layout):
    """The flex path's score_mod (the bias indexed per key position cuts the atomics of its
    backward S-fold), applied over the whole T x T plane with broadcast indices as FlexAttention's math path does,
    under the selection's mask: outputs and gradients (q, k, v and the predictor through the gate bias) equal the
    reference in float64. FlexAttention has no backward on a CPU, so this is the function its CUDA backward
    differentiates."""
    a = attn_module(T=64, S=16, hs=16, target=0.5)
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 2, 64, 16, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
    w = torch.randn(2, 2, 64, 16, dtype=torch.float64, generator=g)
    results = []
    for path in ("reference", "score_mod"):
        a.zero_grad()
        sel = a.selector.plan(q, k)
        if path == "reference":
            y = asca_kernels.attend_reference(q, k, v, sel, 16)
        else:
            mod = asca_kernels.gate_score_mod(sel.gate_bias, 16, layout)
            i = torch.arange(64)
            b, h = torch.arange(2)[:, None, None, None], torch.arange(2)[None, :, None, None]
            qi, ki = i[:, None], i[None, :]
            logits = mod(q @ k.transpose(-1, -2) / 4.0, b, h, qi, ki)  # (B, nh, T, T)
            keep = sel.selected[b, h, qi // 16, ki // 16] & (qi >= ki)
            y = torch.softmax(logits.masked_fill(~keep, float("-inf")), -1) @ v
        grads = torch.autograd.grad((y * w).sum(), [q, k, v, *a.selector.predictor.parameters()], allow_unused=True)
        results.append((y.detach(), grads))
    (y0, g0), (y1, g1) = results
    assert (y1 - y0).abs().max().item() < 1e-12
    for got, want in zip(g1, g0):
        if want is None:
            assert got is None
            continue
        assert (got - want).abs().max().item() < 1e-10
    assert g0[-2] is not None and g0[-2].abs().max() > 0  # the distance bias: the gate's gradient is real


def test_bad_flex_gate_bias_is_one_line():
    with pytest.raises(ValueError, match="flex_gate_bias='row' must be one of auto, key, block"):
        ASCAConfig(block_size=64, n_head=2, n_embd=16, sparse_block_size=8, flex_gate_bias="row").validate()


@pytest.mark.parametrize("target", [0.0, 0.6, 0.8])
def test_block_mask_covers_exactly_the_selected_blocks(target):
    """The claim that work is skipped: the BlockMask the flex path builds lists exactly `selected`
    (own block as the one partial block, the kept past blocks as full blocks), nothing else."""
    a = attn_module(T=128, S=16, hs=16, target=target, dtype=torch.float32)
    _, _, _, sel = _flex_inputs(a, hs=16)
    for state_selection in (True, False):
        bm = nm.build_block_mask(sel, 16, state_selection=state_selection)
        assert torch.equal(bm.to_dense().bool(), sel.selected)
        assert (bm.kv_num_blocks == 1).all() and torch.equal(bm.full_kv_num_blocks, sel.n_past.int())
    nb = 8
    assert sel.selected.sum().item() == 2 * 2 * nb + sel.n_past.sum().item()  # own + kept past, every (b, h)


def test_flex_kernel_visits_only_listed_blocks_on_cpu():
    """With the causal-only mask_mod, the compiled kernel still computes only the listed blocks (so it
    skips work), while uncompiled flex applies only the mask_mod and is dense: the two differ."""
    from torch.nn.attention.flex_attention import flex_attention
    a = attn_module(T=128, S=16, hs=16, target=0.6, dtype=torch.float32)
    q, k, v, sel = _flex_inputs(a, hs=16)
    bm = nm.build_block_mask(sel, 16, state_selection=False)
    compiled = asca_kernels.flex_attention_fn(True)(q, k, v, block_mask=bm)
    eager = flex_attention(q, k, v, block_mask=bm)
    no_gate = nm.Selection(sel.scores, sel.order, sel.n_past, sel.selected, torch.zeros_like(sel.gate_bias), 128)
    sparse_ref = asca_kernels.attend_reference(q, k, v, no_gate, a.S)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (compiled - sparse_ref).abs().max().item() < 1e-5
    assert (eager - dense).abs().max().item() < 1e-5
    assert (compiled - dense).abs().max().item() > 1e-2
    # stating the selection in the mask_mod makes the uncompiled path the same function
    eager_sel = flex_attention(q, k, v, block_mask=nm.build_block_mask(sel, 16, state_selection=True))
    assert (eager_sel - sparse_ref).abs().max().item() < 1e-5


def test_flex_backward_problem_follows_inductor_default_tiles(monkeypatch):
    """torch < 2.14.1 checks S against inductor's default backward tiles (pytorch issue 176025). Asked
    with the H100/H200 capability (sm90), S=64 has no valid tile in bf16 at head dim 64 and S=128 has."""
    from torch.torch_version import TorchVersion
    if TorchVersion(torch.__version__.split("+")[0]) >= "2.14.1":
        pytest.skip("fixed upstream in this torch")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    why = nm.flex_backward_problem(64, 64, torch.bfloat16)
    assert why and "sparse_block_size=128" in why and "176025" in why
    assert nm.flex_backward_problem(128, 64, torch.bfloat16) is None
    assert nm.flex_backward_problem(256, 128, torch.bfloat16) is None
    assert nm.flex_backward_problem(64, 64, torch.float32) is None  # fp32 tiles are 16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))  # A100: 64-tiles at head dim 64
    assert nm.flex_backward_problem(64, 64, torch.bfloat16) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_sdpa_gather_kernel_runs_on_the_fused_flash_kernel(dtype):
    """sdpa_kernel(FLASH_ATTENTION) makes a fall-back to the unfused math path an error, so this pins the
    path; forward and backward (the gate bias's gradient included) equal the written-out kernel's."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    g = torch.Generator().manual_seed(0)
    N, S, K, hs = 6, 8, 3, 16
    q, k, v = (torch.randn(N, n, hs, generator=g).to(dtype).requires_grad_(True) for n in (S, (K + 1) * S, (K + 1) * S))
    bias = torch.nn.functional.logsigmoid(torch.randn(N, K + 1, generator=g)).to(dtype)
    bias[:, 0] = 0
    bias[0, -1] = asca_kernels.NEG_BIAS  # a padding slot
    bias.requires_grad_(True)
    w = torch.randn(N, S, hs, generator=g).to(dtype)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        y = asca_kernels.sdpa_block_attention(q, k, v, bias, S, hs ** -0.5)
        (y * w).sum().backward()
    got = [y.detach(), q.grad, k.grad, v.grad, bias.grad]
    for t in (q, k, v, bias):
        t.grad = None
    own = torch.zeros(S, S, dtype=dtype).masked_fill_(~torch.ones(S, S, dtype=torch.bool).tril(), float("-inf"))
    ref_bias = bias.detach().masked_fill(bias.detach() <= asca_kernels.NEG_BIAS, float("-inf")).requires_grad_(True)
    y2 = asca_kernels._BlockAttention.apply(q, k, v, ref_bias, own, hs ** -0.5, S)
    (y2 * w).sum().backward()
    want = [y2.detach(), q.grad, k.grad, v.grad, ref_bias.grad]
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for a, b in zip(got, want):
        assert (a.float() - b.float()).abs().max().item() <= tol * max(1.0, b.float().abs().max().item())
    assert got[4][:, 1:3].abs().max() > 0 and got[4][0, -1] == 0  # the bias learns; padding gets no gradient


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_block_kernel_equals_the_written_out_mask_formula(dtype):
    """_BlockAttention adds the gate bias as baddbmm's broadcast input and the causal part to the own block's
    columns only (one (N, S, L) tensor fewer). Its forward is the full-mask formula's bit for bit (an
    allowed logit is bias + scale * qk either way), its gradients that formula's autograd gradients."""
    g = torch.Generator().manual_seed(1)
    N, S, K, hs = 5, 8, 3, 16
    L = (K + 1) * S
    q, k, v = (torch.randn(N, n, hs, generator=g).to(dtype).requires_grad_(True) for n in (S, L, L))
    bias = torch.nn.functional.logsigmoid(torch.randn(N, K + 1, generator=g)).to(dtype)
    bias[:, 0] = 0
    bias[1, -1] = float("-inf")  # a padding slot
    bias.requires_grad_(True)
    own = torch.zeros(S, S, dtype=dtype).masked_fill_(~torch.ones(S, S, dtype=torch.bool).tril(), float("-inf"))
    w = torch.randn(N, S, hs, generator=g).to(dtype)
    y = asca_kernels._BlockAttention.apply(q, k, v, bias, own, hs ** -0.5, S)
    got = [y.detach(), *torch.autograd.grad((y * w).sum(), (q, k, v, bias))]
    full = torch.zeros(S, L, dtype=dtype)
    full[:, :S] = own
    mask = bias.repeat_interleave(S, dim=-1)[:, None, :] + full  # (N, S, L): the full-mask formula
    logits = torch.baddbmm(mask, q, k.transpose(1, 2), alpha=hs ** -0.5)
    p = torch.softmax(logits, dim=-1, dtype=torch.promote_types(dtype, torch.float32)).to(dtype)
    y2 = torch.bmm(p, v)
    want = [y2.detach(), *torch.autograd.grad((y2 * w).sum(), (q, k, v, bias))]
    assert torch.equal(got[0], want[0])
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    for a, b in zip(got[1:], want[1:]):
        assert (a.float() - b.float()).abs().max().item() <= tol * max(1.0, b.float().abs().max().item())
    assert got[4][:, 1:].abs().max() > 0 and got[4][1, -1] == 0  # the bias learns; padding gets no gradient


def in_git_checkout():
    return subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True).returncode == 0


@pytest.mark.e2e
@pytest.mark.skipif(not in_git_checkout(), reason="reads asca_kernels.py at a git revision")
def test_the_paired_revision_benchmark_runs_and_prints_its_table():
    """scripts/bench_gather_vs_rev.py (how a kernel change is timed: old and new taking turns): its rows are medians
    whose ratios to dense are what the table says; a bad shape or revision is a one-line error."""
    r = run_script("scripts/bench_gather_vs_rev.py", "--rev", "HEAD", "--shapes", "256/32/0.5", "--rounds", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [l for l in r.stdout.splitlines() if l.startswith("| attention | 256 |")]
    cells = [c.strip() for c in rows[-1].strip("|").split("|")]
    old, new, dense = (float(c.replace(",", "")) for c in cells[4:7])
    assert old > 0 and new > 0 and dense > 0 and float(cells[9]) > 0
    # ms are printed to 0.01 (a few ms at this size), the ratios from the unrounded times
    assert float(cells[7]) == pytest.approx(old / dense, rel=0.1) and float(cells[8]) == pytest.approx(new / dense,
                                                                                                        rel=0.1)
    for args, needle in [(["--rev", "HEAD", "--shapes", "256x32"], "must be T/S/sparsity"),
                         (["--rev", "no-such-rev"], "cannot read asca_kernels.py at 'no-such-rev'")]:
        r = run_script("scripts/bench_gather_vs_rev.py", *args)
        assert r.returncode != 0 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
