"""The CUDA path's pieces a CPU can check: host syncs the warm-up must not make, the start-up
self-check, DDP wrapping, the last test batch's shape, sampling's path; what the first GPU run would have tripped
over."""
import pytest
import torch

import novel_model
from asca_selector import BlockSelector, block_masks, keep_counts
from baseline_model import GPT
from helpers import one_line, train_in_process
from novel_model import ASCAConfig, AdaptiveSparseCausalSelfAttention


def selector(**kw):
    cfg = dict(block_size=256, n_head=2, n_embd=32, sparse_block_size=16, target_sparsity=0.6,
               sparsity_warmup_iters=10, keep_first_block=True, local_blocks=0)  # as the references here spell it
    cfg.update(kw)
    return BlockSelector(ASCAConfig(**cfg))


def test_set_step_copies_the_counts_only_when_they_change():
    """Item 6: n_keep.copy_ from host memory waits for the GPU; it ran once per layer and step. Now it runs
    during the warm-up (the counts change) and not after it (the buffer's version counter stays)."""
    s = selector()
    versions = []
    for it in range(20):
        s.set_step(it)
        versions.append(s.n_keep._version)
    during, after = versions[:11], versions[11:]
    assert len(set(during)) > 5  # the ramp changes the counts, and each change is copied
    assert len(set(after)) == 1  # past the warm-up: no copy at all
    ref = selector(sparsity_warmup_iters=0)
    assert torch.equal(s.n_keep, ref.n_keep)  # and the counts are the target's


class HostToDevice(torch.overrides.TorchFunctionMode):
    """Counts the calls that mix a host tensor with one on another device: on a GPU, a copy from pageable host
    memory that waits for the GPU."""

    def __init__(self):
        super().__init__()
        self.crossings = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        tensors = [a for a in list(args) + list((kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        if len({t.device.type for t in tensors}) > 1:
            self.crossings.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("keep_first,local", [(True, 0), (False, 1), (False, 3)])
def test_the_warm_up_copies_no_counts_from_host_memory(keep_first, local):
    """Each warm-up step once copied its new counts from host memory, a host sync per layer and step
    on a GPU (about 1,500 of 2,000 steps at T=8192). The counts of every step are now rows of a table on the
    module's device, copied there once. On the meta device (a stand-in for a GPU, whose tensors the mode tells
    from host tensors) no warm-up step mixes the two; the counts equal keep_counts' at every step."""
    s = selector(keep_first_block=keep_first, local_blocks=local, sparsity_warmup_iters=40).to("meta")
    host = selector(keep_first_block=keep_first, local_blocks=local, sparsity_warmup_iters=40)
    watch = HostToDevice()
    with watch:
        for it in range(45):
            s.set_step(it)
    assert watch.crossings == [] and s.n_keep.device.type == "meta"
    for it in [*range(45), 12.5, 3.25, 0]:  # a time budget's positions between steps copy from the host, still exact
        host.set_step(it)
        assert torch.equal(host.n_keep, keep_counts(16, 16, 256, host.sparsity, keep_first, local)), it


def test_the_count_table_stays_small_for_many_blocks():
    """Small blocks at long T have many skippable blocks (nb^2 / 2): the table holds only the rows the warm-up's
    integer steps reach (and, past COUNT_TABLE_MAX entries, only dense and the target), never every count."""
    from asca_selector import COUNT_TABLE_MAX
    s = selector(block_size=16384, sparse_block_size=16, sparsity_warmup_iters=2000, target_sparsity=0.9)
    assert s.count_table.shape == (2001, 1024)  # one row per step of the warm-up, not one per count (about 470k)
    s.set_step(1000)
    assert torch.equal(s.n_keep, keep_counts(1024, 16, 16384, 0.45, True, 0))
    big = selector(block_size=32768, sparse_block_size=16, sparsity_warmup_iters=3000, target_sparsity=0.9)
    assert big.count_table.shape[0] == 2 and big.count_table.numel() <= COUNT_TABLE_MAX
    big.set_step(1500)  # from the host: still the counts of the schedule
    assert torch.equal(big.n_keep, keep_counts(2048, 16, 32768, 0.45, True, 0))


@pytest.mark.parametrize("keep_first", [True, False])
def test_the_budget_estimate_reads_the_candidates_without_a_boolean_mask(keep_first):
    """Item 6: boolean-mask indexing on a GPU syncs for the count. The cached flat index picks the same
    elements in the same order."""
    s = selector(keep_first_block=keep_first, budget="adaptive")
    nb = 16
    scores = torch.randn(3, 2, nb, nb)
    cand = block_masks(nb, "cpu", keep_first)[2]
    assert torch.equal(scores.flatten(-2).index_select(-1, s.candidate_index(nb, "cpu")), scores[..., cand])


# ----------------------------------------------------------------------------- the start-up self-check (build 4)

ASCA_ARGS = ["--sparse_block_size=16", "--target_sparsity=0.3", "--sparsity_warmup_iters=0", "--max_iters=2",
             "--eval_interval=2", "--final_test=False"]


class WrongGather(AdaptiveSparseCausalSelfAttention):
    """The injected fault: the gather path is off by 0.5 (as a miscompiled kernel would be); the reference is right."""

    def attend(self, q, k, v):
        y = super().attend(q, k, v)
        return y + 0.5 if self.resolved_impl(q.device, q.shape[2]) == "gather" else y


@pytest.mark.e2e
def test_the_start_up_check_stops_a_run_whose_fast_path_is_wrong(tmp_path, data_dir, capsys):
    out = tmp_path / "wrong"
    rc = train_in_process(novel_model, [f"--data_dir={data_dir}", f"--out_dir={out}", "--attn_impl=gather",
                                        "--startup_check=on", *ASCA_ARGS],
                          build_model=lambda cfg: GPT(ASCAConfig.from_dict(cfg), attn_cls=WrongGather))
    err = one_line(capsys.readouterr().err)
    assert rc == 1 and "start-up check failed" in err and "gather path differs from the reference path" in err
    assert "--attn_impl=reference" in err and "--startup_check=off" in err
    assert not (out / "ckpt.pt").exists()  # before the first step and the first checkpoint


@pytest.mark.e2e
@pytest.mark.parametrize("selector", ["learned", "random"])
def test_the_start_up_check_passes_correct_paths_and_changes_nothing(tmp_path, data_dir, capsys, selector):
    """It compares like with like (the random selector draws the same blocks on both sides), and it leaves the
    run's RNG and data stream alone: the run with the check trains bit for bit as the one without."""
    finals = {}
    for check in ("on", "off"):
        out = tmp_path / check
        assert train_in_process(novel_model, [f"--data_dir={data_dir}", f"--out_dir={out}", "--attn_impl=gather",
                                              f"--startup_check={check}", f"--selector={selector}", *ASCA_ARGS]) == 0
        finals[check] = torch.load(out / "ckpt.pt", weights_only=True)["model"]
        said = capsys.readouterr().out
        assert ("start-up check: the gather path equals the reference path" in said) == (check == "on")
    assert all(torch.equal(finals["on"][k], finals["off"][k]) for k in finals["off"])


@pytest.mark.e2e
def test_the_start_up_check_is_off_on_a_cpu_by_default(tmp_path, data_dir, capsys):
    assert train_in_process(novel_model, [f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'auto'}",
                                          "--attn_impl=gather", *ASCA_ARGS]) == 0
    assert "start-up check" not in capsys.readouterr().out


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_start_up_check_on_the_compiled_flex_path():
    """On a GPU the check compares what the trainer runs (the whole model compiled, bf16 autocast, flex traced
    into the graph) with the gather path; it must pass on a correct install, within bf16's tolerance."""
    torch.manual_seed(0)
    model = novel_model.make_model(n_layer=2, n_head=4, n_embd=256, block_size=1024, sparse_block_size=128,
                                   target_sparsity=0.5, sparsity_warmup_iters=0).cuda()
    # the shapes of test_asca's first CUDA test (batch 4 of 1024), so inductor's cache from it serves this one
    x, y = (torch.randint(0, 256, (4, 1024), device="cuda") for _ in range(2))
    ctx = torch.autocast("cuda", dtype=torch.bfloat16)
    r = novel_model.startup_check(model, torch.compile(model), x, y, ctx, low_precision=True)
    assert r["fast"] == "compiled flex" and r["reference"] == "gather"
    assert r["ok"], r


# ----------------------------------------------------------------------------- item 7, the smaller points

def test_ddp_wraps_the_model_and_compile_wraps_ddp(tmp_path):
    """DDP around an already-compiled model hides its gradient buckets from torch.compile's DDP optimizer: the
    trainer now compiles the DDP wrapper, and evaluates the plain (separately compiled) model."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    import trainer
    model = novel_model.make_model(n_layer=1, n_head=2, n_embd=32, block_size=64, sparse_block_size=8)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        fwd, ddp, train_fwd = trainer.wrap_for_training(model, True, True)
        assert isinstance(ddp, DDP) and ddp.module is model
        assert isinstance(train_fwd, torch._dynamo.eval_frame.OptimizedModule) and train_fwd._orig_mod is ddp
        assert isinstance(fwd, torch._dynamo.eval_frame.OptimizedModule) and fwd._orig_mod is model
        fwd, ddp, train_fwd = trainer.wrap_for_training(model, False, True)
        assert fwd is model and train_fwd is ddp
    finally:
        dist.destroy_process_group()
    fwd, ddp, train_fwd = trainer.wrap_for_training(model, False, False)
    assert fwd is model and ddp is None and train_fwd is model


def test_the_last_test_batch_has_the_training_shape():
    """A short last batch made a compiled model compile once more: evaluate_stream now fills it up with copies of
    its last window, which score nothing and are not tallied. Every forward has one shape, the bpc equals the
    batch-of-one evaluation's (no filler there), and so does the adaptive budget's tallied sparsity."""
    import evaluate
    torch.manual_seed(0)
    model = novel_model.make_model(n_layer=1, n_head=2, n_embd=32, block_size=64, sparse_block_size=8,
                                   target_sparsity=0.5, sparsity_warmup_iters=0, budget="adaptive").double()
    model.attention_modules()[0].selector.threshold.fill_(1.9)
    data = torch.randint(0, 256, (1000,), generator=torch.Generator().manual_seed(1)).numpy().astype("uint8")
    shapes = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            shapes.append(tuple(x.shape))
            return self.m(x)

    results = []
    for batch in (5, 1):
        shapes.clear()
        (bpc, n), tally = evaluate.tallied(model, lambda after: evaluate.evaluate_stream(
            Spy(), data, 64, 32, batch, "cpu", after_forward=after))
        results.append((bpc, n, tally["sparsity"], set(shapes)))
    (bpc5, n5, sp5, shapes5), (bpc1, n1, sp1, _) = results
    assert shapes5 == {(5, 64)}  # 31 windows of 64 at stride 32 in 1000 bytes: the last batch (1 window) is filled up
    assert n5 == n1 == 999 and abs(bpc5 - bpc1) < 1e-9
    assert abs(sp5 - sp1) < 1e-12 and 0.2 < sp1 < 0.8


def test_sampling_takes_the_gather_path(tmp_path):
    """sample.py compiled the flex kernel before the first byte (and again per bucketed prefill length): an ASCA
    model now samples on the gather path, which computes the same function uncompiled; dense attention is as it was."""
    import baseline_model
    cuda = torch.device("cuda")  # resolved_impl reads the device type only: no GPU needed to check the choice
    model = novel_model.make_model(n_layer=2, n_head=2, n_embd=32, block_size=64, sparse_block_size=8)
    assert {a.resolved_impl(cuda, 64) for a in model.attention_modules()} == {"flex"}
    assert model.for_sampling() is model
    assert {a.resolved_impl(cuda, 64) for a in model.attention_modules()} == {"gather"}
    ref = novel_model.make_model(n_layer=2, n_head=2, n_embd=32, block_size=64, sparse_block_size=8,
                                 attn_impl="reference")
    pinned = ref.for_sampling()  # a path the user chose stays
    assert {a.resolved_impl(cuda, 64) for a in pinned.attention_modules()} == {"reference"}
    dense = baseline_model.make_model(n_layer=1, n_head=2, n_embd=32, block_size=64)
    assert dense.for_sampling() is dense


# ----------------------------------------------------------------------------- the first GPU session

@pytest.mark.parametrize("S,block_size,ok", [(128, 1024, True), (64, 1024, True), (32, 1024, False), (16, 256, False),
                                             (96, 960, False), (32, 32, True)])
def test_auto_on_cuda_refuses_an_S_flex_cannot_compile_for_short_sequences(S, block_size, ok):
    """Under 128 bytes inductor's flex-decoding kernel needs its query tile (the padded length's next power of two)
    to divide S: 'auto' on CUDA refuses such an S in one line, even where no backward runs; a CPU run is untouched."""
    cfg = novel_model.ASCAConfig(block_size=block_size, n_head=2, n_embd=32, sparse_block_size=S)
    if ok:
        cfg.check_device("cuda", torch.bfloat16, training=False)
    else:
        with pytest.raises(ValueError, match=f"sparse_block_size={S} cannot compile FlexAttention on CUDA for a "
                                             f"sequence padded to .* or attn_impl='gather'"):
            cfg.check_device("cuda", torch.bfloat16, training=False)
    cfg.check_device("cpu", torch.float32, training=True)
    gathered = novel_model.ASCAConfig(block_size=block_size, n_head=2, n_embd=32, sparse_block_size=S,
                                      attn_impl="gather")
    gathered.check_device("cuda", torch.bfloat16, training=False)  # the named fix works


def test_eager_paths_take_the_gather_path_for_the_block_only():
    """The recall sample of a compiled run: the attention's flex/auto path becomes the gather path inside the block
    (no second compile on a GPU) and comes back after it, an exception included; explicit paths stay."""
    model = novel_model.make_model(n_layer=2, n_head=2, n_embd=32, block_size=64, sparse_block_size=8)
    model.attention_modules()[1].impl = "reference"
    with model.eager_paths():
        assert [a.impl for a in model.attention_modules()] == ["gather", "reference"]
    assert [a.impl for a in model.attention_modules()] == ["auto", "reference"]
    with pytest.raises(RuntimeError):
        with model.eager_paths():
            raise RuntimeError("inside")
    assert model.attention_modules()[0].impl == "auto"
