"""The selection controls: selector='local' keeps the nearest past blocks plus the sink, 'random' a
new uniform draw each forward, 'pooled' the blocks whose mean key the tile's first query scores highest, 'oracle'
the blocks that query's dense attention puts the most mass on; all at the learned selector's budget, without a
gate bias, causal in train and eval mode, on the reference and gather paths; cached decoding refuses them in one
line. Attention recall (the dense mass a choice keeps) against a per-query loop; the mask swap at evaluation."""
import contextlib
import json
import math

import pytest
import torch

from helpers import causality_violation
from novel_model import ASCAConfig, AdaptiveSparseCausalSelfAttention, make_model

MODEL = dict(n_layer=2, n_head=2, n_embd=32, block_size=128, sparse_block_size=8, target_sparsity=0.7,
             sparsity_warmup_iters=0)


def module(selector, **kw):
    torch.manual_seed(0)
    cfg = ASCAConfig(block_size=128, n_head=2, n_embd=16, sparse_block_size=8, sparsity_warmup_iters=0,
                     attn_impl="reference", pos_encoding="learned", selector=selector,
                     **{"keep_first_block": True, "local_blocks": 0, "target_sparsity": 0.7, **kw})
    # (the sink and no forced local block: the rules as the tests below spell them)
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


def test_explore_noise_samples_the_learned_choice_in_training_only():
    """explore_noise: in training the learned choice is a Gumbel-top-k sample (the first chosen block of a tile
    follows softmax(score / explore_noise) over its candidates), reproducible from the seed, at the same counts; in
    evaluation it is the plain top scores, the same choice as explore_noise=0's."""
    a, plain = module("learned", explore_noise=1.0), module("learned")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), plain.state_dict().values()))
    q, k, v = qkv()
    a.eval(), plain.eval()
    a.attend(q, k, v), plain.attend(q, k, v)
    assert torch.equal(a.last_selection.selected, plain.last_selection.selected)
    a.train()
    torch.manual_seed(5)
    a.attend(q, k, v)
    first = a.last_selection.selected.clone()
    assert not torch.equal(first, plain.last_selection.selected)
    assert torch.equal(first.sum(-1), plain.last_selection.selected.sum(-1))  # the same compute
    torch.manual_seed(5)
    a.attend(q, k, v)
    assert torch.equal(a.last_selection.selected, first)
    # the distribution: tile 15's candidates are blocks 1..14 (0 is the sink, kept whatever the scores)
    scores = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    scores[0, 0, 15, 1:15] = torch.linspace(-2.0, 2.0, 14, dtype=torch.float64)
    want = torch.softmax(scores[0, 0, 15, 1:15], -1)
    torch.manual_seed(0)
    firsts = torch.stack([a.selector.rank(scores)[0][0, 0, 15, 2] for _ in range(4000)])
    assert a.selector.rank(scores)[0][0, 0, 15, :2].tolist() == [15, 0]  # own block, then the sink
    freq = torch.bincount(firsts, minlength=16)[1:15].double() / 4000
    assert (freq - want).abs().max().item() < 0.03, (freq, want)
    a.eval()
    assert a.selector.rank(scores)[0][0, 0, 15, 2].item() == 14  # evaluation: the top score


@pytest.mark.parametrize("bad,message", [
    (dict(explore_noise=-0.5), "explore_noise=-0.5 samples the learned choice in training"),
    (dict(explore_noise=float("nan")), "explore_noise=nan must be a finite number"),
    (dict(explore_noise=1.0, selector="local"), "explore_noise=1.0 .*selector='learned' .*selector='local'")])
def test_explore_noise_refuses_what_it_cannot_do(bad, message):
    with pytest.raises(ValueError, match=message):
        ASCAConfig(**{"selector": "learned", **bad}).validate()


# the rules, and the learned choice sampled in training (explore_noise): a draw of its own each forward, too
RULES = {"local": {}, "random": {}, "pooled": {}, "oracle": {}, "local_gated": {},
         "learned_explore": dict(selector="learned", explore_noise=1.0)}


@pytest.mark.parametrize("selector", list(RULES))
@pytest.mark.parametrize("impl", ["reference", "gather"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_rules_are_causal(selector, impl, mode):
    torch.manual_seed(0)
    model = make_model(**{**MODEL, "selector": selector, **RULES[selector]}, attn_impl=impl,
                       dropout=0.1 if mode == "train" else 0.0)
    before, after = causality_violation(model, mode)
    assert before < 1e-5 and after > 1e-3  # earlier logits never move; later ones do
    assert model.diagnostics()["sparsity"] > 0.6


@pytest.mark.parametrize("selector", list(RULES))
def test_rules_on_the_gather_path_equal_the_reference(selector):
    a = module(**{"selector": selector, **RULES[selector]}).train()
    q, k, v = qkv(2)
    outs = []
    for impl in ("reference", "gather"):
        a.impl = impl
        torch.manual_seed(3)
        outs.append(a.attend(q, k, v))
    assert (outs[0] - outs[1]).abs().max().item() < 1e-9


@pytest.mark.parametrize("selector", ["local", "oracle", "pooled", "random"])
def test_cached_decoding_refuses_the_rules(selector):
    import sample
    model = make_model(**MODEL, selector=selector).eval()
    with pytest.raises(ValueError, match="cached decoding supports selector='learned', 'local_gated' and 'nsa' only"):
        sample.generate(model, b"hello", 4)
    assert len(sample.generate(model, b"hello", 4, kv_cache=False)) == 4


def test_bad_selector_is_one_line():
    with pytest.raises(ValueError,
                       match="selector='nearest' must be one of learned, local, random, pooled, oracle, local_gated"):
        ASCAConfig(block_size=64, n_head=2, n_embd=16, sparse_block_size=8, selector="nearest").validate()


def test_local_gated_keeps_the_local_blocks_with_the_learned_gate_bias():
    """'local_gated' separates the learned choice from the learned scaling: its kept blocks are the local rule's, its
    gate bias on them is logsigmoid of the predictor's score (as the learned selector's on its own blocks), and the
    predictor learns through it (the local rule's predictor gets no gradient)."""
    q, k, v = (t.requires_grad_(True) for t in qkv(4))
    mods = {name: module(name) for name in ("local_gated", "local", "learned")}  # one seed: the same predictor
    for a in mods.values():
        a.attend(q, k, v).square().sum().backward()
    gated, local, learned = (mods[n].last_selection for n in ("local_gated", "local", "learned"))
    assert torch.equal(gated.selected, local.selected) and not torch.equal(gated.selected, learned.selected)
    assert torch.allclose(gated.scores, learned.scores)  # the predictor's scores
    past = torch.ones(16, 16, dtype=torch.bool).tril(-1)
    kept = gated.selected & past
    want = torch.where(kept, torch.nn.functional.logsigmoid(learned.scores), torch.zeros(()))
    assert torch.allclose(gated.gate_bias, want) and (gated.gate_bias[kept] < 0).all()
    grads = {n: [p.grad for p in m.selector.predictor.parameters()] for n, m in mods.items()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads["local_gated"])
    assert all(g is None or g.abs().sum() == 0 for g in grads["local"])
    with pytest.raises(ValueError, match="selector='local_gated' keeps the local rule's blocks at the fixed budget"):
        ASCAConfig(block_size=64, n_head=2, n_embd=16, sparse_block_size=8, selector="local_gated",
                   budget="adaptive").validate()


def naive_first_query(q, k, S, b, kind):
    """Tile b's score of each earlier block j < b, by a loop: the first query (b*S) against block j's mean key
    ('pooled'), or the share of that query's softmax over positions < b*S that falls in block j ('oracle')."""
    hs = q.shape[-1]
    first = q[b * S]
    if kind == "pooled":
        return [float(first @ k[j * S:(j + 1) * S].mean(0)) / math.sqrt(hs) for j in range(b)]
    p = torch.softmax(torch.stack([first @ k[t] for t in range(b * S)]) / math.sqrt(hs), 0)
    return [float(p[j * S:(j + 1) * S].sum()) for j in range(b)]


@pytest.mark.parametrize("kind", ["pooled", "oracle"])
def test_pooled_and_oracle_keep_the_blocks_their_first_query_scores_highest(kind):
    a = module(kind)
    q, k, v = qkv(4)
    a.attend(q, k, v)
    sel = a.last_selection
    for bb, h in ((0, 0), (1, 1)):
        for b in range(1, 16):
            want = naive_first_query(q[bb, h], k[bb, h], 8, b, kind)
            got = sel.scores[bb, h, b, :b]
            assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-5), (kind, b)
            n = int(sel.n_past[bb, h, b])
            rest = sorted(range(1, b), key=lambda j: -want[j])  # block 0 is the sink here (keep_first_block)
            keep = ({0} if n else set()) | set(rest[:max(0, n - 1)]) | {b}
            assert {j for j in range(16) if sel.selected[bb, h, b, j]} == keep, (kind, b)
    assert (sel.gate_bias == 0).all()


def test_the_causality_check_catches_an_oracle_that_reads_its_tiles_last_query(monkeypatch):
    """The negative control: the oracle reads the tile's FIRST query, the one every member of the tile has seen.
    Reading its last query instead leaks later bytes into earlier positions' choice, and the check sees it."""
    import asca_selector
    real = asca_selector.first_query_block_mass
    monkeypatch.setattr(asca_selector, "first_query_block_mass",
                        lambda q, k, S: real(torch.roll(q, -(S - 1), dims=2), k, S))
    model = make_model(**MODEL, selector="oracle", attn_impl="reference")
    before, _ = causality_violation(model, "eval")
    assert before > 1e-3


def naive_recall(q, k, selected, S):
    """Per head: the mean over queries of the softmax mass (over every earlier position) in the query's tile's
    selected blocks, by a loop over queries."""
    H, T, hs = q.shape
    out = []
    for h in range(H):
        total = 0.0
        for i in range(T):
            p = torch.softmax(torch.stack([q[h, i] @ k[h, t] for t in range(i + 1)]) / math.sqrt(hs), 0)
            total += float(sum(p[t] for t in range(i + 1) if selected[h, i // S, t // S]))
        out.append(total / T)
    return out


@pytest.mark.parametrize("selector", ["learned", "local", "oracle"])
def test_recall_is_the_dense_mass_each_choice_keeps(selector):
    """Recall (the run's choice), recall_local and recall_oracle (their choices at the same counts),
    against a loop over queries; each choice's recall is that of the run that uses it."""
    a = module(selector, target_sparsity=0.5)
    a.eval()
    q, k, v = (t[:, :, :64] for t in qkv(6))
    a.start_tally()
    a.attend(q, k, v)
    a.tally_step()
    got = a.end_tally()
    sel = a.last_selection
    assert got["recall_per_head"] == pytest.approx(naive_recall(q[0], k[0], sel.selected[0], 8), abs=1e-9)
    assert got[{"learned": "recall", "local": "recall_local", "oracle": "recall_oracle"}[selector]] == \
        pytest.approx(got["recall"], abs=1e-12)
    assert 0 < got["recall_local"] < 1 and 0 < got["recall_oracle"] < 1
    a.attend(q, k, v)  # outside a tally nothing is summed
    assert a.selector.recall_sum is None


@pytest.mark.e2e
def test_eval_selector_swaps_the_choice_of_blocks(tmp_path, data_dir, capsys):
    """--eval_only --eval_selector=X scores a trained ASCA checkpoint with another choice of blocks
    at the same counts; a dense checkpoint, or eval_selector without eval_only, is one line."""
    import baseline_model
    import novel_model
    from helpers import one_line, train_in_process
    out = tmp_path / "o"
    common = [f"--data_dir={data_dir}", f"--out_dir={out}"]
    assert train_in_process(novel_model, common + ["--max_iters=4", "--sparse_block_size=8",
                                                   "--target_sparsity=0.6", "--sparsity_warmup_iters=0"]) == 0
    final = json.load(open(out / "final.json"))
    evals = {}
    for swap in ("", "local", "oracle"):
        args = ["--init_from=resume", "--eval_only=True"] + ([f"--eval_selector={swap}"] if swap else [])
        assert train_in_process(novel_model, common + args) == 0
        evals[swap] = ev = json.load(open(out / "eval.json"))
        assert ev["eval_selector"] == (swap or None) and abs(ev["test_sparsity"] - final["test_sparsity"]) < 1e-9
    assert evals[""]["test_bpc"] == pytest.approx(final["test_bpc"], abs=1e-9)
    assert evals["local"]["test_bpc"] != evals[""]["test_bpc"] != evals["oracle"]["test_bpc"]
    # in the first layer (its input does not depend on the choice) the swapped choice keeps what the unswapped eval
    # measured for it at the same counts
    for swap in ("local", "oracle"):
        assert evals[swap]["test_recall_per_layer"][0] == pytest.approx(
            evals[""][f"test_recall_{swap}_per_layer"][0], abs=1e-9)
    capsys.readouterr()
    assert train_in_process(novel_model, common + ["--init_from=resume", "--eval_selector=local"]) == 1
    assert "add --eval_only=True" in one_line(capsys.readouterr().err)
    dense = tmp_path / "dense"
    assert train_in_process(baseline_model, [f"--data_dir={data_dir}", f"--out_dir={dense}", "--max_iters=2",
                                             "--final_test=False"]) == 0
    capsys.readouterr()
    assert train_in_process(baseline_model, [f"--data_dir={data_dir}", f"--out_dir={dense}", "--init_from=resume",
                                             "--eval_only=True", "--eval_selector=local"]) == 1
    assert "a 'baseline' run has no such choice (its attention keeps every block)" in one_line(capsys.readouterr().err)


@pytest.mark.e2e
@pytest.mark.slow
def test_a_compiled_run_measures_recall_on_a_fixed_uncompiled_sample(tmp_path, data_dir):
    """A compiled evaluation computes no recall inside its graph, so the trainer measures it with
    the uncompiled model on the split's first batch of evenly spaced windows: the metrics row and final.json hold
    what the checkpoint's model measures on those windows, computed here again."""
    import evaluate
    import novel_model
    from checkpoint import model_from_checkpoint
    from helpers import train_in_process
    from prepare_dataset import ByteDataset
    out = tmp_path / "c"
    assert train_in_process(novel_model, [f"--data_dir={data_dir}", f"--out_dir={out}", "--compile=True",
                                          "--max_iters=2", "--eval_interval=2", "--sparse_block_size=8",
                                          "--target_sparsity=0.5", "--sparsity_warmup_iters=0"]) == 0
    row = [json.loads(l) for l in open(out / "metrics.jsonl")][-1]
    final = json.load(open(out / "final.json"))
    model, _ = model_from_checkpoint(str(out / "ckpt.pt"))
    ds = ByteDataset(data_dir)
    for split, got in (("val", row), ("test", {k[5:]: v for k, v in final.items() if k.startswith("test_")})):
        starts = ds.val_windows(64, 4, split=split)
        _, want = evaluate.tallied(model, lambda after: evaluate.eval_windows(
            model, ds.splits[split], starts, 64, 4, "cpu", contextlib.nullcontext(), after_forward=after))
        for key in ("recall", "recall_local", "recall_oracle"):
            assert got[key] == pytest.approx(want[key], abs=1e-6), (split, key)


def test_gate_pooled_adds_the_pooled_affinity_with_a_learned_weight():
    """gate_pooled=True adds a_h * (the tile's first query . each block's mean key) / sqrt(hs) to the
    predictor's scores, a_h learned per head (1 at the start). Against the per-block loop, with the weight at 1 and at
    another value; the weight gets a gradient through the gate bias; the gather path computes the same function."""
    q, k, v = (t.requires_grad_(True) for t in qkv(7))
    plain, pooled = module("learned"), module("learned", gate_pooled=True)  # one seed: the same MLP weights
    assert plain.selector.predictor.pooled_weight is None
    with torch.no_grad():
        pooled.selector.predictor.pooled_weight.copy_(torch.tensor([1.0, -0.5], dtype=torch.float64))
    plain.attend(q, k, v)
    pooled.attend(q, k, v).square().sum().backward()
    got = pooled.last_selection.scores - plain.last_selection.scores  # (B, nh, nb, nb)
    for bb, h, w in ((0, 0, 1.0), (1, 1, -0.5)):
        for b in range(1, 16):
            want = torch.tensor(naive_first_query(q[bb, h].detach(), k[bb, h].detach(), 8, b, "pooled"))
            assert torch.allclose(got[bb, h, b, :b], w * want.double(), atol=1e-9), (bb, h, b)
    assert not torch.equal(pooled.last_selection.selected, plain.last_selection.selected)  # it changes the choice
    assert pooled.selector.predictor.pooled_weight.grad.abs().min() > 0
    outs = []
    for impl in ("reference", "gather"):
        pooled.impl = impl
        outs.append(pooled.attend(q, k, v))
    assert (outs[0] - outs[1]).abs().max().item() < 1e-9


@pytest.mark.parametrize("selector", ["learned", "local_gated"])
@pytest.mark.parametrize("impl", ["reference", "gather"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gate_pooled_is_causal(selector, impl, mode):
    torch.manual_seed(0)
    model = make_model(**MODEL, selector=selector, gate_pooled=True, attn_impl=impl,
                       dropout=0.1 if mode == "train" else 0.0)
    before, after = causality_violation(model, mode)
    assert before < 1e-5 and after > 1e-3


def test_gate_pooled_needs_a_gated_selector():
    with pytest.raises(ValueError, match="gate_pooled adds to the learned predictor's scores; selector='local' does "
                                         "not use them"):
        ASCAConfig(block_size=64, n_head=2, n_embd=16, sparse_block_size=8, selector="local",
                   gate_pooled=True).validate()


def naive_distance_ranked(scores, forced, n, b, cost):
    """Tile b's kept past blocks by a loop: the forced ones, then the n - len(forced) others with the highest
    score - cost * (b - j - 1)."""
    rest = sorted((j for j in range(b) if j not in forced), key=lambda j: -(float(scores[j]) - cost * (b - j - 1)))
    return set(forced) | set(rest[:n - len(forced)])


@pytest.mark.parametrize("cost", [0.0, 0.7, 1e4])
def test_rank_distance_cost_ranks_by_score_minus_cost_per_block_between(cost):
    """rank_distance_cost biases the learned choice toward near blocks, against a per-tile loop; the
    gate bias stays logsigmoid(score) on whatever is kept; a large cost keeps local_gated's blocks exactly."""
    a = module("learned", keep_first_block=False, local_blocks=1, rank_distance_cost=cost)
    with torch.no_grad():
        a.selector.predictor.wk.mul_(4.0)  # spread scores: the cost must really trade against them
    q, k, v = qkv(8)
    a.attend(q, k, v)
    sel = a.last_selection
    for bb, h in ((0, 0), (1, 1)):
        for b in range(2, 16):
            n = int(sel.n_past[bb, h, b])
            want = naive_distance_ranked(sel.scores[bb, h, b], {b - 1}, n, b, cost) | {b}
            assert {j for j in range(16) if sel.selected[bb, h, b, j]} == want, (cost, b)
    kept = sel.selected & torch.ones(16, 16, dtype=torch.bool).tril(-1)
    assert torch.allclose(sel.gate_bias, torch.where(kept, torch.nn.functional.logsigmoid(sel.scores), 0.0))
    gated = module("local_gated", keep_first_block=False, local_blocks=1)
    with torch.no_grad():
        gated.selector.predictor.wk.mul_(4.0)
    gated.attend(q, k, v)
    same = torch.equal(sel.selected, gated.last_selection.selected)
    assert same == (cost == 1e4), cost  # cost 0 and 0.7 choose other blocks than the nearest here


@pytest.mark.parametrize("impl", ["reference", "gather"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_rank_distance_cost_is_causal(impl, mode):
    torch.manual_seed(0)
    model = make_model(**MODEL, rank_distance_cost=0.5, attn_impl=impl, dropout=0.1 if mode == "train" else 0.0)
    before, after = causality_violation(model, mode)
    assert before < 1e-5 and after > 1e-3


@pytest.mark.parametrize("over", [dict(rank_distance_cost=-1.0), dict(rank_distance_cost=0.5, selector="local"),
                                  dict(rank_distance_cost=0.5, budget="adaptive")])
def test_bad_rank_distance_cost_is_one_line(over):
    with pytest.raises(ValueError, match="rank_distance_cost=.* biases the learned choice at the fixed budget"):
        ASCAConfig(block_size=64, n_head=2, n_embd=16, sparse_block_size=8, **over).validate()


@pytest.mark.e2e
def test_eval_selector_on_an_adaptive_budget_keeps_the_models_own_counts(tmp_path, data_dir):
    """An adaptive budget's counts come from the trained predictor's scores against its thresholds: another rule
    swapped in chooses WHICH blocks, at those counts per sequence, head and tile. In the first layer (its input does
    not depend on the choice) the measured sparsity is the model's own for every rule, per head; later layers' counts
    follow the predictor on what the swap changed, so the whole model's is close, not equal. The rules score
    differently."""
    import novel_model
    from helpers import train_in_process
    out = tmp_path / "o"
    common = [f"--data_dir={data_dir}", f"--out_dir={out}"]
    assert train_in_process(novel_model, common + ["--max_iters=6", "--sparse_block_size=8", "--budget=adaptive",
                                                   "--budget_scope=head", "--target_sparsity=0.6",
                                                   "--sparsity_warmup_iters=0"]) == 0
    evals = {}
    for swap in ("", "local", "oracle", "pooled"):
        args = ["--init_from=resume", "--eval_only=True"] + ([f"--eval_selector={swap}"] if swap else [])
        assert train_in_process(novel_model, common + args) == 0
        evals[swap] = json.load(open(out / "eval.json"))
    own = evals[""]["test_sparsity"]
    assert 0.3 < own < 0.9
    for swap in ("local", "oracle", "pooled"):
        first, want = (evals[x]["test_sparsity_per_head_per_layer"][0] for x in (swap, ""))
        assert first == pytest.approx(want, abs=1e-9), swap
        assert evals[swap]["test_sparsity"] == pytest.approx(own, abs=0.01), swap
    bpcs = {evals[s]["test_bpc"] for s in ("local", "oracle", "pooled")}
    assert len(bpcs) == 3 and evals[""]["test_bpc"] not in bpcs


def test_max_pooled_block_keys_follow_their_rule():
    """gate_key_pool='max': the predictor reads each block's per-dimension max key instead of the mean; its scores
    equal the mean predictor's formula fed the max, and differ from the mean's."""
    import novel_model
    torch.manual_seed(0)
    cfg = dict(n_layer=1, n_head=2, n_embd=32, block_size=64, sparse_block_size=8, target_sparsity=0.5,
               sparsity_warmup_iters=0)
    mean, mx = (novel_model.make_model(**cfg, gate_key_pool=p).attention_modules()[0].selector.predictor
                for p in ("mean", "max"))
    mx.load_state_dict(mean.state_dict())
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, 2, 64, 16, generator=g) for _ in range(2))
    kb = k.view(2, 2, 8, 8, 16).amax(dim=3)
    want = mean.score(q[:, :, ::8], kb, torch.arange(8))
    assert torch.allclose(mx(q, k, 8), want) and not torch.allclose(mean(q, k, 8), want)
