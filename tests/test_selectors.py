"""The selection controls (issue 21): selector='local' keeps the nearest past blocks plus the sink, 'random' a
new uniform draw each forward, both at the learned selector's budget, without a gate bias, causal in train and
eval mode, on the reference and gather paths; cached decoding refuses them in one line."""
import pytest
import torch

from helpers import causality_violation
from novel_model import ASCAConfig, AdaptiveSparseCausalSelfAttention, make_model

MODEL = dict(n_layer=2, n_head=2, n_embd=32, block_size=128, sparse_block_size=8, target_sparsity=0.7,
             sparsity_warmup_iters=0)


def module(selector, **kw):
    torch.manual_seed(0)
    cfg = ASCAConfig(block_size=128, n_head=2, n_embd=16, sparse_block_size=8, target_sparsity=0.7,
                     sparsity_warmup_iters=0, attn_impl="reference", pos_encoding="learned", selector=selector,
                     **{"keep_first_block": True, "local_blocks": 0, **kw})  # the rules as the tests below spell them
    return AdaptiveSparseCausalSelfAttention(cfg).double()


def qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 2, 128, 8, dtype=torch.float64, generator=g) for _ in range(3)]


def test_local_keeps_the_sink_and_the_nearest_past_blocks():
    a = module("local")
    q, k, v = qkv()
    a.attend(q, k, v)
    sel = a.last_selection
    nb = 16
    for b in range(nb):
        n = int(sel.n_past[0, 0, b])
        want = ({0} if b > 0 and n > 0 else set()) | set(range(b - (n - 1), b)) if n > 0 else set()
        want = {j for j in want if 0 <= j < b} | {b}
        got = {j for j in range(nb) if sel.selected[0, 0, b, j]}
        assert got == want, (b, n, got, want)
    assert (sel.gate_bias == 0).all() and torch.equal(sel.selected[0], sel.selected[1])  # same for every input


def test_random_draws_anew_each_forward_at_the_same_budget():
    a = module("random")
    learned = module("learned")
    q, k, v = qkv()
    torch.manual_seed(5)
    a.attend(q, k, v)
    first = a.last_selection.selected.clone()
    a.attend(q, k, v)
    second = a.last_selection.selected
    assert not torch.equal(first, second)  # a new draw
    learned.attend(q, k, v)
    # the same number of blocks per tile as the learned selector: the same compute
    assert torch.equal(first.sum(-1), learned.last_selection.selected.sum(-1))
    torch.manual_seed(5)
    a.attend(q, k, v)
    assert torch.equal(a.last_selection.selected, first)  # reproducible from the seed
    assert (a.last_selection.gate_bias == 0).all()
    hits = torch.zeros(16, 16)
    for _ in range(200):  # every past block of the last tile gets drawn about equally often
        a.attend(q[:1, :1], k[:1, :1], v[:1, :1])
        hits += a.last_selection.selected[0, 0].double()
    row = hits[15, 1:15] / 200  # the sink (0) and the own block (15) are always kept
    assert row.min() > 0.05 and row.max() < 0.6 and abs(row.mean() - (int(a.selector.n_keep[15]) - 1) / 14) < 0.05


@pytest.mark.parametrize("selector", ["local", "random"])
@pytest.mark.parametrize("impl", ["reference", "gather"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_rules_are_causal(selector, impl, mode):
    torch.manual_seed(0)
    model = make_model(**MODEL, selector=selector, attn_impl=impl, dropout=0.1 if mode == "train" else 0.0)
    before, after = causality_violation(model, mode)
    assert before < 1e-5 and after > 1e-3  # earlier logits never move; later ones do
    assert model.diagnostics()["sparsity"] > 0.6


@pytest.mark.parametrize("selector", ["local", "random"])
def test_rules_on_the_gather_path_equal_the_reference(selector):
    a = module(selector)
    q, k, v = qkv(2)
    outs = []
    for impl in ("reference", "gather"):
        a.impl = impl
        torch.manual_seed(3)
        outs.append(a.attend(q, k, v))
    assert (outs[0] - outs[1]).abs().max().item() < 1e-9


def test_cached_decoding_refuses_the_rules():
    import sample
    model = make_model(**MODEL, selector="local").eval()
    with pytest.raises(ValueError, match="cached decoding supports selector='learned' only"):
        sample.generate(model, b"hello", 4)
    assert len(sample.generate(model, b"hello", 4, kv_cache=False)) == 4


def test_bad_selector_is_one_line():
    with pytest.raises(ValueError, match="selector='nearest' must be one of learned, local, random"):
        ASCAConfig(block_size=64, n_head=2, n_embd=16, sparse_block_size=8, selector="nearest").validate()
