"""KV-cached decoding: the cached logits are the full forward's, for both models, prompts that end
inside a tile and generations that cross several tile boundaries; greedy samples match; past block_size
the cache crops and prefills again, as documented."""
import dataclasses

import pytest
import torch

import baseline_model
import novel_model
import sample
from helpers import run_script

VARIANTS = {
    "dense_learned": ("baseline", dict(pos_encoding="learned")),
    "dense_rope": ("baseline", dict(pos_encoding="rope", qk_norm=True)),
    "asca_learned": ("asca", dict(pos_encoding="learned", target_sparsity=0.6)),
    "asca_rope": ("asca", dict(pos_encoding="rope", qk_norm=True, gate_input="unrotated", target_sparsity=0.75)),
    "asca_rope_rotated_gate": ("asca", dict(pos_encoding="rope", gate_input="rotated", target_sparsity=0.5)),
    "asca_no_sink": ("asca", dict(pos_encoding="rope", keep_first_block=False, target_sparsity=0.6)),
    # the nearest blocks forced, and a budget per layer
    "asca_local": ("asca", dict(pos_encoding="rope", local_blocks=2, target_sparsity=0.5)),
    "asca_layer_budgets": ("asca", dict(pos_encoding="rope", layer_sparsity="0.4,0.6", target_sparsity=0.5,
                                        gate_loss=0.1)),
    "asca_compressed": ("asca", dict(pos_encoding="rope", compressed_branch=True, target_sparsity=0.6)),
    # the pooled affinity in the predictor's scores (a decoded tile's choice adds it too)
    "asca_gate_pooled": ("asca", dict(pos_encoding="rope", gate_pooled=True, target_sparsity=0.6)),
    "asca_local_gated": ("asca", dict(pos_encoding="rope", selector="local_gated", target_sparsity=0.6)),
    "asca_distance_cost": ("asca", dict(pos_encoding="rope", rank_distance_cost=0.5, target_sparsity=0.6)),
    # the match-dense arms: dense + gate (also the dense phase of dense_from), a dense layer, an absolute budget
    "asca_dense_gate": ("asca", dict(pos_encoding="rope", target_sparsity=0.0)),
    "asca_dense_layer": ("asca", dict(pos_encoding="rope", layer_sparsity="0.6,0", target_sparsity=0.3)),
    "asca_keep_tokens": ("asca", dict(pos_encoding="rope", keep_tokens=40)),
    "asca_max_pooled_keys": ("asca", dict(pos_encoding="rope", gate_key_pool="max", target_sparsity=0.6)),
    # NSA's branches: the choice from the compressed branch's attention, the window, the compressed tokens, gated
    "asca_nsa": ("asca", dict(pos_encoding="rope", selector="nsa", target_sparsity=0.6)),
    # the adaptive budget: how many blocks a head keeps depends on the scores (thresholds set in build())
    "asca_adaptive": ("asca", dict(pos_encoding="rope", budget="adaptive", budget_scope="head", target_sparsity=0.5)),
}


def build(name, dtype=torch.float64, block_size=128, **over):
    kind, opts = VARIANTS[name]
    torch.manual_seed(0)
    shape = dict(n_layer=2, n_head=2, n_embd=32, block_size=block_size, **{**opts, **over})
    if kind == "asca":
        model = novel_model.make_model(**shape, sparse_block_size=8, sparsity_warmup_iters=0)
        with torch.no_grad():  # a trained-looking predictor: spread scores, so choices really differ by content
            for a in model.attention_modules():
                a.selector.predictor.wk.mul_(4.0)
                if a.nsa:  # projections and gates away from their identity and 0.5 starts: each branch weighs in
                    g = torch.Generator().manual_seed(1)
                    for p in (a.selector.nsa_ck, a.nsa_cv, a.nsa_gate_w, a.nsa_gate_b):
                        p.copy_(p + torch.randn(p.shape, generator=g))
                if a.selector.adaptive:  # thresholds inside the scores' spread: counts differ by head and tile
                    a.selector.threshold.copy_(torch.linspace(1.0, 3.0, a.selector.threshold.numel()))
    else:
        model = baseline_model.make_model(**shape)
    return model.to(dtype).eval()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("prompt_len", [1, 13, 16])
def test_cached_logits_equal_the_full_forward(name, dtype, tol, prompt_len):
    model = build(name, dtype)
    seq = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(prompt_len))
    with torch.no_grad():
        full = model(seq)[0]  # (1, 100, 256): the uncached function at every position
        cache = model.new_cache()
        got = model.forward_cached(seq[:, :prompt_len], cache)
        assert (got - full[:, :prompt_len]).abs().max().item() < tol
        for p in range(prompt_len, 100):  # 100 - 13 steps cross 10 tile boundaries of S=8
            step = model.forward_cached(seq[:, p:p + 1], cache)
            assert (step[:, 0] - full[:, p]).abs().max().item() < tol, (name, p)
    assert cache.pos == 100


def test_cached_path_uses_only_the_tiles_selection():
    """A negative control: the cached ASCA step really reads only its tile's kept blocks. Zeroing a value
    vector in a block the tile skipped leaves the step's output alone; one in a kept block changes it."""
    model = build("asca_rope", torch.float64)
    attn = model.transformer.h[0].attn
    seq = torch.randint(0, 256, (1, 81), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = model.new_cache()
        model.forward_cached(seq[:, :80], cache)  # position 80 starts tile 10
        model.forward_cached(seq[:, 80:81], cache)
        lc = cache.layers[0]
        t = lc.tile  # TileState: keys = the gathered kept blocks (start rows), then the own block's slots
        b, ks, start = t.b, t.keys, t.start
        kept = {int(t) // 8 for t in torch.nonzero((lc.k[0, 0, :80, None, :] == ks[0, 0, :start][None]).all(-1))[:, 0]}
        skipped = set(range(10)) - kept
        assert b == 10 and kept and skipped
        q, k, v = attn.qkv(model.transformer.h[0].ln_1(model.transformer.wte(seq[:, 80:81])))
        qr, _ = attn.position(q, k, 80)
        base = attn.attend_step(q, qr, lc, 80)
        for blocks, moves in ((skipped, False), (kept, True)):
            saved = lc.tile
            vals = lc.tile.vals.clone()
            if moves:
                vals[:, :, :8] = 0  # the first kept block's values
            lc.tile = dataclasses.replace(saved, vals=vals)
            if not moves:  # change a skipped block in the full cache: not read
                j = min(skipped)
                lc.v[:, :, j * 8:(j + 1) * 8] = 0
            out = attn.attend_step(q, qr, lc, 80)
            assert ((out - base).abs().max().item() > 1e-6) == moves
            lc.tile = saved


@pytest.mark.parametrize("name", ["dense_rope", "asca_rope"])
def test_greedy_and_seeded_samples(name):
    model = build(name, torch.float32)
    prompt = b"the history of "
    greedy = [sample.generate(model, prompt, 60, top_k=1, kv_cache=kv) for kv in (True, False)]
    assert greedy[0] == greedy[1] and len(greedy[0]) == 60
    runs = [sample.generate(model, prompt, 60, temperature=0.9, generator=torch.Generator().manual_seed(7))
            for _ in range(2)]
    assert runs[0] == runs[1]
    other = sample.generate(model, prompt, 60, temperature=0.9, generator=torch.Generator().manual_seed(8))
    assert other != runs[0]


@pytest.mark.parametrize("name", ["dense_learned", "asca_rope"])
def test_past_block_size_the_cache_crops_to_half_and_prefills(name):
    """Documented behaviour past block_size: keep the newest block_size // 2 bytes, prefill them again.
    Reference: the full forward over exactly that window, step by step, greedy."""
    model = build(name, torch.float64, block_size=32, **({"target_sparsity": 0.3} if "asca" in name else {}))
    prompt = bytes(range(97, 107))  # 10 bytes
    got = sample.generate(model, prompt, 70, top_k=1)
    window, want = list(prompt), []
    with torch.no_grad():
        for i in range(70):
            nxt = int(model(torch.tensor([window]))[0][0, -1].argmax())
            want.append(nxt)
            window.append(nxt)
            if len(window) > 32:
                window = window[-16:]
    assert got == bytes(want)


@pytest.mark.parametrize("kwargs,needle", [(dict(temperature=0), "temperature"), (dict(top_k=0), "top_k"),
                                           (dict(prompt=b""), "prompt is empty"), (dict(num_bytes=-1), "num_bytes")])
def test_bad_arguments(kwargs, needle):
    model = build("dense_rope", torch.float32)
    args = dict(prompt=b"x", num_bytes=5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=needle):
        sample.generate(model, args.pop("prompt"), args.pop("num_bytes"), **args)


@pytest.mark.e2e
@pytest.mark.parametrize("compiled", [[], pytest.param(["--compile"], marks=pytest.mark.slow)])
def test_decode_benchmark_runs_and_prints_its_table(compiled):
    r = run_script("scripts/bench_decode.py", "--ctx", "128", "--quick", "--sparse_block_size", "16",
                   "--layers", "1", "--n_embd", "32", "--heads", "2", "--sparsity", "0.5", "0.6", "0.9", *compiled)
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("cached steps compiled" in r.stdout) == bool(compiled)
    row = [l for l in r.stdout.splitlines() if l.startswith("| 128 |")]
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert len(row) == 1 and all(float(c) > 0 for c in cells[1:5]) and cells[5] == "n/a"  # 0.9: out of reach
    assert float(cells[6].rstrip("x")) == pytest.approx(float(cells[4]) / float(cells[2]), rel=0.1)  # shown rounded


def test_the_cache_is_written_in_place():
    """The decoding cache is allocated once per layer for block_size positions and filled in place (growing it
    with torch.cat copied the whole cache every step); one more byte than it holds is a one-line error."""
    model = build("asca_rope", torch.float32, block_size=64, target_sparsity=0.5)
    seq = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache = model.new_cache()
        model.forward_cached(seq[:, :10], cache)
        lc = cache.layers[1]
        ptrs = (lc.k.data_ptr(), lc.v.data_ptr(), lc.k_raw.data_ptr())
        for p in range(10, 64):
            model.forward_cached(seq[:, p:p + 1], cache)
        assert (lc.k.data_ptr(), lc.v.data_ptr(), lc.k_raw.data_ptr()) == ptrs and lc.k.shape[2] == 64
        with pytest.raises(ValueError, match="exceed block_size 64"):
            model.forward_cached(seq[:, :1], cache)
        with pytest.raises(ValueError, match="exceed its capacity 64"):
            lc.append(*(torch.zeros(1, 2, 1, 16),) * 3)


@pytest.mark.parametrize("budget,choice", [("fixed", {}), ("adaptive", {}), ("fixed", dict(selector="local_gated")),
                                           ("fixed", dict(rank_distance_cost=0.3))])
@pytest.mark.parametrize("keep_first,local", [(False, 1), (True, 0), (True, 2)])
def test_choose_row_is_the_full_rankings_row(budget, choice, keep_first, local):
    """Decoding ranks one tile's row (selector.choose_row); the forward ranks every tile (rank, selection). For
    every tile b of random scores (with ties), the row's kept blocks, counts and gate biases are the full ones'
    (the learned choice, the nearest blocks with the gate, and the learned choice with a distance cost)."""
    torch.manual_seed(0)
    model = novel_model.make_model(n_layer=1, n_head=3, n_embd=24, block_size=96, sparse_block_size=8,
                                   sparsity_warmup_iters=0, target_sparsity=0.4, budget=budget,
                                   keep_first_block=keep_first, local_blocks=local, **choice)
    sl = model.transformer.h[0].attn.selector
    if sl.adaptive:
        sl.threshold.copy_(torch.tensor([-0.5, 0.0, 0.5]))
    nb = 12
    scores = torch.randn(2, 3, nb, nb, dtype=torch.float64).round(decimals=1)  # rounded: ties among blocks
    full = sl.selection(scores, *sl.rank(scores), nb * 8)
    counts = set()
    for b in range(nb):
        blocks, n, bias = sl.choose_row(scores[:, :, b, :b], b)
        assert torch.equal(n, full.n_past[:, :, b])
        m = int(n.max()) if b else 0
        assert blocks.shape[-1] == m
        want = full.order[:, :, b, 1:1 + m]  # the full order starts with the own block
        used = torch.arange(m) < n[..., None]
        assert torch.equal(blocks[used], want[used])
        assert torch.equal(bias[used], full.gate_bias[:, :, b].gather(-1, want)[used])
        assert bool((bias[~used] == float("-inf")).all())
        counts |= set(n.flatten().tolist())
    assert len(counts) > 2  # counts really vary over tiles (and heads, adaptive)


@pytest.mark.parametrize("name,raw", [("dense_rope", False), ("asca_rope_rotated_gate", False), ("asca_rope", True)])
def test_the_cache_keeps_keys_before_rotation_only_where_read(name, raw):
    """Unrotated keys are cached only for a predictor that reads them (gate_input='unrotated'): a third buffer
    of block_size positions per layer, written every step, that nothing else reads."""
    model = build(name, torch.float32)
    with torch.no_grad():
        cache = model.new_cache()
        model.forward_cached(torch.randint(0, 256, (1, 20)), cache)
    assert all((lc.k_raw is not None) == raw for lc in cache.layers)


@pytest.mark.slow  # torch.compile: seconds per graph
@pytest.mark.parametrize("name", ["dense_learned", "asca_rope"])
def test_compiled_decoding_steps_equal_the_full_forward_and_the_eager_steps(name):
    """GPT.compile_decoding() (sample.py --compile): the step's pure parts through
    torch.compile (inductor's CPU code here), the cache and attention eager. Its logits are the full forward's
    and the eager steps', and the compiled graphs really ran: two (decode_in, decode_out) for every layer and
    step, no recompiles per step or layer."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = build(name, torch.float32), build(name, torch.float32).compile_decoding()
    seq = torch.randint(0, 256, (1, 60), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = eager(seq)[0]
        caches = eager.new_cache(), compiled.new_cache()
        eager.forward_cached(seq[:, :13], caches[0])
        compiled.forward_cached(seq[:, :13], caches[1])
        for p in range(13, 60):  # crosses 6 tile boundaries of S=8: the ASCA tile choice between compiled parts
            a = eager.forward_cached(seq[:, p:p + 1], caches[0])[:, 0]
            b = compiled.forward_cached(seq[:, p:p + 1], caches[1])[:, 0]
            assert (b - full[:, p]).abs().max().item() < 1e-5, (name, p)
            assert (b - a).abs().max().item() < 1e-5, (name, p)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


@pytest.mark.e2e
def test_sample_compile_needs_the_cache():
    r = run_script("sample.py", "--out_dir=nowhere", "--compile=true", "--kv_cache=false")
    assert r.returncode == 1 and "--compile=true compiles the cached decoding step" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["dense_rope", "asca_rope"])
def test_cuda_compiled_decoding_equals_the_full_forward(name):
    """compile_decoding() on CUDA (inductor's Triton code): fp32 logits of every decoded byte against the full
    forward on the same device, across tile boundaries."""
    torch._dynamo.reset()
    model = build(name, torch.float32).cuda().for_sampling().compile_decoding()  # as sample.py: gather, not flex
    seq = torch.randint(0, 256, (1, 60), generator=torch.Generator().manual_seed(3)).cuda()
    with torch.no_grad():
        full = model(seq)[0]
        cache = model.new_cache()
        model.forward_cached(seq[:, :13], cache)
        for p in range(13, 60):
            step = model.forward_cached(seq[:, p:p + 1], cache)[:, 0]
            assert (step - full[:, p]).abs().max().item() < 1e-4, (name, p)
