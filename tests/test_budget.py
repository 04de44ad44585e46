"""ASCA's adaptive budget: tiles keep every past block scoring above a per-layer threshold that a
controller moves between optimizer steps. The reference path against a naive loop (values and gradients,
the predictor's included); causality at several targets in train and eval mode, with a negative control (a
per-sequence quantile threshold) that the same check catches; the controller's estimate against a brute-force
count; the mean sparsity held at the target on real text; heads that differ; the flex path, the BlockMask and
cached decoding with per-head counts; exact resume with the controller state; the test-split tally."""
import json
import lzma
import os

import pytest
import torch

import asca_kernels
import checkpoint
import novel_model as nm
import prepare_dataset
from helpers import ROOT, make_dataset, train_in_process
from novel_model import AdaptiveSparseCausalSelfAttention, ASCAConfig, keep_counts, make_model
from helpers import causality_violation, naive_block_attention

SMALL = dict(n_layer=2, n_head=2, n_embd=32, block_size=128, sparse_block_size=8, sparsity_warmup_iters=0,
             budget="adaptive")


def adaptive_module(T=64, S=8, H=2, hs=8, target=0.6, keep_first=True, dtype=torch.float64):
    torch.manual_seed(0)
    cfg = ASCAConfig(block_size=T, n_head=H, n_embd=H * hs, sparse_block_size=S, target_sparsity=target,
                     sparsity_warmup_iters=0, keep_first_block=keep_first, attn_impl="reference",
                     pos_encoding="learned", budget="adaptive", local_blocks=0)  # the rule the loop below spells out
    return AdaptiveSparseCausalSelfAttention(cfg).to(dtype)


def naive_threshold_attention(q, k, v, scores, theta, S, keep_first):
    """Written from the adaptive rule: tile b keeps its own block, block 0 (if keep_first), and every
    other past block j whose score is above theta."""
    return naive_block_attention(q, k, v, scores, S, lambda bb, h, b: [
        j for j in range(b) if (keep_first and j == 0) or scores[bb, h, b, j].item() > theta])


def _qkv(B=2, H=2, T=64, hs=8, seed=1, dtype=torch.float64, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, hs, dtype=dtype, generator=g, requires_grad=grad) for _ in range(3)]


@pytest.mark.parametrize("keep_first", [True, False])
def test_reference_matches_naive_loop_fp64_with_gradients(keep_first):
    a = adaptive_module(keep_first=keep_first)
    with torch.no_grad():
        a.selector.predictor.wk.mul_(3.0)  # spread the scores so the per-tile counts really vary
    q, k, v = _qkv(grad=True)
    scores = a.selector.predictor(q.detach(), k.detach(), 8)
    theta = scores[..., 1:, :].median().item()  # about half the candidates above it
    a.selector.threshold.fill_(theta)
    y = a.attend(q, k, v)
    n_past = a.last_selection.n_past
    assert n_past.shape == (2, 2, 8) and len(set(n_past[..., -1].flatten().tolist())) > 1  # counts differ by head
    ref = naive_threshold_attention(q, k, v, scores, theta, 8, keep_first)
    assert (y - ref).abs().max().item() < 1e-12
    w = torch.randn_like(y)
    got = torch.autograd.grad((y * w).sum(), (q, k, v))
    want = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for g1, g2 in zip(got, want):
        assert (g1 - g2).abs().max().item() < 1e-10
    # the predictor's parameters (its per-head offset moves a head's count against the threshold) too
    params = list(a.selector.predictor.parameters())
    a.zero_grad()
    (a.attend(q.detach(), k.detach(), v.detach()) * w).sum().backward()
    got = [p.grad.clone() for p in params]
    a.zero_grad()
    scores = a.selector.predictor(q.detach(), k.detach(), 8)
    (naive_threshold_attention(q.detach(), k.detach(), v.detach(), scores, theta, 8, keep_first) * w).sum().backward()
    for p, g1 in zip(params, got):
        assert g1.abs().max() > 0 and (g1 - p.grad).abs().max().item() < 1e-10


def test_threshold_starts_dense_and_the_estimate_meets_the_scheduled_count():
    """-inf keeps every block; after one update with budget_ema=1 on a forward, the same forward again skips
    exactly the number of blocks the fixed budget would (counted by brute force), pooled over heads and
    sequences: each (sequence, head) its own count."""
    a = adaptive_module(T=128, target=0.7)
    a.budget_ema = 1.0
    q, k, v = _qkv(T=128)
    a.attend(q, k, v)
    dense = torch.ones(16, 16, dtype=torch.bool).tril()
    assert torch.isinf(a.selector.threshold).all()
    assert torch.equal(a.last_selection.selected, dense.expand(2, 2, 16, 16))
    a.update_budget()
    a.attend(q, k, v)
    sel = a.last_selection.selected
    nb = 16
    skipped = int((~sel & torch.ones(nb, nb, dtype=torch.bool).tril()).sum())
    per_seq = int((torch.arange(nb) - keep_counts(nb, 8, 128, 0.7, True)).sum())
    assert skipped == per_seq * 2 * 2
    per = (~sel).float().tril().sum(dim=(-1, -2)).flatten()
    assert per.max() > per.min()  # not the same count in every (sequence, head)
    d = a.diagnostics()
    assert d["sparsity"] == pytest.approx(per_seq * 64 / (128 * 129 / 2), abs=1e-6)  # diagnostics count in fp32
    assert d["budget_threshold_per_head"] == a.selector.threshold.tolist() and d["kept_blocks_sd"] > 0
    # budget_scope='layer': one threshold for the layer's heads
    assert a.selector.threshold[0] == a.selector.threshold[1]
    # at target 0 nothing is skipped: the estimate is -inf again
    a.selector.sparsity = 0.0
    a.update_budget()
    assert torch.isinf(a.selector.threshold).all() and (a.selector.threshold < 0).all()


def test_per_head_scope_holds_every_head_at_the_target():
    """budget_scope='head': each head its own threshold, each skipping the scheduled count over the batch
    (its sequences and tiles still differ), where the layer scope lets one head take more than another."""
    a = adaptive_module(T=128, target=0.7)
    a.budget_ema = 1.0
    with torch.no_grad():
        a.selector.predictor.offset.copy_(torch.tensor([3.0, -3.0]))  # head 0 scores higher across the board
    q, k, v = _qkv(T=128)
    per_seq = int((torch.arange(16) - keep_counts(16, 8, 128, 0.7, True)).sum())
    skipped = {}
    for scope in ("layer", "head"):
        a.selector.per_head = scope == "head"
        a.selector.threshold.fill_(float("-inf"))
        a.attend(q, k, v)
        a.update_budget()
        a.attend(q, k, v)
        sel = a.last_selection.selected
        skipped[scope] = (~sel & torch.ones(16, 16, dtype=torch.bool).tril()).sum(dim=(0, 2, 3))  # per head
        assert int(skipped[scope].sum()) == per_seq * 2 * 2
    assert skipped["head"].tolist() == [per_seq * 2, per_seq * 2] and a.selector.threshold[0] > a.selector.threshold[1]
    assert skipped["layer"][0] < skipped["layer"][1]  # the high-scoring head keeps more


ORIGINAL_SELECT = nm.BlockSelector.select


def quantile_select(self, q, k):
    """A per-sequence quantile threshold: the obvious way to hold a budget, and not causal (each
    sequence's threshold reads all its tiles, so later bytes move earlier tiles' counts)."""
    scores, order, _ = ORIGINAL_SELECT(self, q, k)
    nb = scores.shape[-1]
    cand = self.candidates(nb, q.device)
    vals = scores.detach().float()[..., cand]  # (B, nh, n)
    theta = vals.quantile(self.sparsity, dim=-1)[..., None, None]
    n_past = ((scores.detach().float() > theta) & cand).sum(-1) + ((torch.arange(nb) >= 1) & self.keep_first).long()
    return scores, order, n_past


def _trained_threshold(model, steps=3):
    """Give every layer a finite threshold as training would: forward in train mode, then the update."""
    g = torch.Generator().manual_seed(5)
    model.train()
    for _ in range(steps):
        model(torch.randint(0, 256, (2, 128), generator=g))
        model.update_budgets()
    for a in model.attention_modules():
        assert torch.isfinite(a.selector.threshold).all()
    return model


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("target,scope", [(0.3, "layer"), (0.6, "layer"), (0.8, "layer"), (0.6, "head")])
def test_adaptive_budget_is_causal(mode, target, scope):
    torch.manual_seed(0)
    model = _trained_threshold(make_model(**SMALL, target_sparsity=target, pos_encoding="rope", qk_norm=True,
                                          budget_scope=scope, dropout=0.1 if mode == "train" else 0.0))
    before, after = causality_violation(model, mode)
    assert before < 1e-5 and after > 1e-3
    assert model.diagnostics()["sparsity"] > 0.1  # the threshold really skips blocks


def test_causality_check_catches_a_per_sequence_quantile(monkeypatch):
    torch.manual_seed(0)
    model = _trained_threshold(make_model(**SMALL, target_sparsity=0.6))
    monkeypatch.setattr(nm.BlockSelector, "select", quantile_select)
    before, _ = causality_violation(model, "eval")
    assert before > 1e-5  # the bound test_adaptive_budget_is_causal uses: it would fail


def test_counts_follow_the_threshold_per_head():
    """Mechanism: a head whose scores sit above the threshold keeps everything, one below keeps the sink
    only; the layer's mean is whatever the two give (the controller then moves the threshold)."""
    a = adaptive_module(T=128)
    a.selector.threshold.fill_(0.0)
    with torch.no_grad():
        a.selector.predictor.offset.copy_(torch.tensor([50.0, -50.0]))
    q, k, v = _qkv(T=128)
    a.attend(q, k, v)
    per_head = a.diagnostics()["sparsity_per_head"]
    assert per_head[0] == pytest.approx(0.0, abs=1e-6)
    assert per_head[1] == pytest.approx(nm.max_sparsity(128, 8, True), abs=1e-6)


def test_flex_forward_and_block_mask_with_per_head_counts_on_cpu():
    a = adaptive_module(T=128, S=16, hs=16, dtype=torch.float32)
    q, k, v = _qkv(T=128, hs=16, dtype=torch.float32)
    a.selector.threshold.fill_(a.selector.predictor(q, k, 16)[..., 1:, :].median().item())
    sel = a.selector.plan(q, k)
    assert len(set(sel.n_past[..., -1].flatten().tolist())) > 1
    for state in (True, False):
        bm = nm.build_block_mask(sel, 16, state_selection=state)
        assert torch.equal(bm.to_dense().bool(), sel.selected)
        assert torch.equal(bm.full_kv_num_blocks, sel.n_past.int())
    with torch.no_grad():
        ref = asca_kernels.attend_reference(q, k, v, sel, a.S)
        got = asca_kernels.attend_flex(q, k, v, sel, a.S, compiled=True)
    assert (got - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_cached_decoding_with_per_head_counts_equals_the_full_forward(dtype, tol):
    torch.manual_seed(0)
    model = make_model(**SMALL, target_sparsity=0.6, pos_encoding="rope", qk_norm=True)
    with torch.no_grad():
        for a in model.attention_modules():
            a.selector.predictor.wk.mul_(4.0)
    model = _trained_threshold(model).to(dtype).eval()
    seq = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(seq)[0]
        assert model.transformer.h[0].attn.last_selection.n_past.unique().numel() > 2
        cache = model.new_cache()
        got = model.forward_cached(seq[:, :13], cache)
        assert (got - full[:, :13]).abs().max().item() < tol
        for p in range(13, 100):
            step = model.forward_cached(seq[:, p:p + 1], cache)
            assert (step[:, 0] - full[:, p]).abs().max().item() < tol, p


def test_the_tally_counts_every_forward():
    torch.manual_seed(0)
    model = _trained_threshold(make_model(**SMALL, target_sparsity=0.6)).eval()
    g = torch.Generator().manual_seed(7)
    xs = [torch.randint(0, 256, (2, 128), generator=g) for _ in range(3)]
    model.start_tally()
    per_forward = []
    for x in xs:
        model(x)
        model.tally_step()
        per_forward.append(model.diagnostics()["sparsity_per_head_per_layer"])
    t = model.end_tally()
    want = torch.tensor(per_forward).mean(0)  # equal lengths: the mean of the per-forward sparsities
    assert torch.allclose(torch.tensor(t["sparsity_per_head_per_layer"], dtype=torch.float64), want.double(), atol=1e-6)
    hist = torch.tensor(t["kept_blocks_hist_per_head_per_layer"])  # (L, H, nb)
    assert (hist.sum(-1) == 3 * 2 * 16).all()  # every tile of every sequence counted once per head
    assert model.end_tally() == {}  # the tally ends


def test_bad_budget_is_a_one_line_error():
    with pytest.raises(ValueError, match="budget='sometimes' must be one of fixed, adaptive"):
        ASCAConfig(budget="sometimes").validate()
    with pytest.raises(ValueError, match="budget_scope='model' must be one of layer, head"):
        ASCAConfig(budget_scope="model").validate()
    with pytest.raises(ValueError, match="budget_ema=0.0 must be in"):
        ASCAConfig(budget_ema=0.0).validate()


# ----------------------------------------------------------------------------- training runs

@pytest.fixture(scope="module")
def excerpt_dir(tmp_path_factory):
    """Real text: the first 400 kB of the bundled enwik8 excerpt."""
    with lzma.open(os.path.join(ROOT, "assets", "enwik8_excerpt.txt.xz")) as f:
        text = f.read(400_000)
    out = tmp_path_factory.mktemp("excerpt")
    prepare_dataset.write_splits(text, str(out), "bundled excerpt, first 400 kB")
    return str(out)


@pytest.mark.e2e
@pytest.mark.slow
def test_sparsity_tracks_the_target_on_real_text_and_heads_differ(tmp_path, excerpt_dir):
    out = tmp_path / "run"
    args = [f"--data_dir={excerpt_dir}", f"--out_dir={out}", "--budget=adaptive", "--target_sparsity=0.6",
            "--block_size=128", "--sparse_block_size=8", "--n_head=4", "--n_embd=64", "--batch_size=8",
            "--max_iters=60", "--sparsity_warmup_iters=20", "--eval_interval=10", "--eval_iters=4",
            "--eval_stride=128"]
    assert train_in_process(nm, args) == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    after = [r for r in rows if r["iter"] >= 30]
    assert after and all(abs(r["sparsity"] - 0.6) <= 0.03 for r in after), [r["sparsity"] for r in after]
    final = json.load(open(out / "final.json"))
    assert abs(final["test_sparsity"] - 0.6) <= 0.03  # measured over the whole test split
    heads = torch.tensor(final["test_sparsity_per_head_per_layer"])
    assert (heads.max(1).values - heads.min(1).values).max() > 0.05  # heads keep different amounts
    assert len(final["test_kept_blocks_hist_per_head_per_layer"]) == 2


@pytest.mark.e2e
def test_exact_resume_with_the_controller_state_is_bitwise(tmp_path):
    data = make_dataset(tmp_path / "data")
    common = [f"--data_dir={data}", "--budget=adaptive", "--lr_decay_iters=16", "--eval_interval=4",
              "--final_test=False", "--sparse_block_size=8", "--target_sparsity=0.5", "--sparsity_warmup_iters=6"]
    assert train_in_process(nm, common + [f"--out_dir={tmp_path / 'a'}", "--max_iters=16"]) == 0
    assert train_in_process(nm, common + [f"--out_dir={tmp_path / 'b'}", "--max_iters=8"]) == 0
    mid = checkpoint.load(str(tmp_path / "b" / "ckpt.pt"))
    assert all(torch.isfinite(mid["model"][f"transformer.h.{i}.attn.selector.threshold"]).all() for i in range(2))
    assert train_in_process(nm, [f"--data_dir={data}", f"--out_dir={tmp_path / 'b'}", "--max_iters=16",
                                 "--init_from=resume"]) == 0
    a, b = checkpoint.load(str(tmp_path / "a" / "ckpt.pt")), checkpoint.load(str(tmp_path / "b" / "ckpt.pt"))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert not torch.equal(a["model"]["transformer.h.0.attn.selector.threshold"],
                           mid["model"]["transformer.h.0.attn.selector.threshold"])


def test_a_checkpoint_with_one_threshold_per_layer_loads():
    """Checkpoints written before budget_scope held one threshold per layer (a 0-dim tensor), under its name
    of that time (attn.threshold, before the selector had its own module): it loads as that value for every
    head."""
    torch.manual_seed(0)
    model = make_model(**SMALL, target_sparsity=0.6)
    sd = model.state_dict()
    del sd["transformer.h.1.attn.selector.threshold"]
    sd["transformer.h.1.attn.threshold"] = torch.tensor(1.25)
    model.load_state_dict(sd)
    assert model.transformer.h[1].attn.selector.threshold.tolist() == [1.25, 1.25]
