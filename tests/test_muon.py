"""Muon's Newton-Schulz iteration in the dtype the machine runs fast (muon.py, runtime.resolve_muon_ns_dtype):
our step against torch.optim.Muon, the float32 iteration against float64 and an exact U V^T, the 'auto' rule on
each kind of machine, and a whole CPU training step with no bf16 matmul where the CPU has no native bf16."""
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import baseline_model
import gpt
import novel_model
import runtime
from helpers import one_line, train_in_process
from muon import Muon, zeropower_via_newtonschulz

COEFFS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's defaults


def params_and_grads(seed, steps):
    g = torch.Generator().manual_seed(seed)
    shapes = [(48, 16), (16, 40), (24, 24)]  # tall (transposed inside), wide, square
    ps = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]
    return ps, grads


def run(opt_cls, ps, grads, step="step", **kw):
    params = [torch.nn.Parameter(p.clone()) for p in ps]
    opt = opt_cls([{"params": params[:2]}, {"params": params[2:], "lr": 0.05}], lr=0.02, **kw)
    for gs in grads:
        for p, gr in zip(params, gs):
            p.grad = gr.clone()
        getattr(opt, step)()
    return params, opt


@pytest.mark.parametrize("kw", [dict(), dict(nesterov=False, weight_decay=0.0), dict(momentum=0.8, weight_decay=0.3),
                                dict(adjust_lr_fn="match_rms_adamw")])
def test_own_step_in_bfloat16_is_torch_muon_bit_for_bit(kw):
    """The update we run for every other dtype, run in bfloat16, is torch.optim.Muon's to the bit (so the float32
    path differs from torch's only in the iteration's dtype); the state dicts are interchangeable."""
    ps, grads = params_and_grads(0, 4)
    want, ref = run(torch.optim.Muon, ps, grads, **kw)
    got, ours = run(Muon, ps, grads, step="own_step", ns_dtype=torch.bfloat16, **kw)
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    for p_ref, p_ours in zip(want, got):
        assert torch.equal(ref.state[p_ref]["momentum_buffer"], ours.state[p_ours]["momentum_buffer"])
    assert ours.state_dict()["param_groups"] == ref.state_dict()["param_groups"]


def test_bfloat16_setting_runs_torchs_own_step():
    ps, grads = params_and_grads(1, 3)
    want, _ = run(torch.optim.Muon, ps, grads)
    got, _ = run(Muon, ps, grads, ns_dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_float32_step_agrees_with_torch_muon_within_bfloat16_tolerance():
    ps, grads = params_and_grads(2, 3)
    want, _ = run(torch.optim.Muon, ps, grads)
    got, _ = run(Muon, ps, grads, ns_dtype=torch.float32)
    start = [p.clone() for p in ps]
    for a, b, p0 in zip(want, got, start):
        moved = (a.detach() - p0).norm()
        assert moved > 0.05  # the steps really moved the weights
        assert (a.detach() - b.detach()).norm() / moved < 0.03  # bf16's 8-bit mantissa over 5 iterations
        assert not torch.equal(a, b)  # and the float32 iteration really ran


@pytest.mark.parametrize("shape", [(96, 32), (32, 80)])
def test_float32_iteration_against_float64_and_an_exact_orthogonalisation(shape):
    """G = U diag(s) V^T with known factors: the float32 iteration (direct and in Gram form) equals the float64 one
    to float32's precision (bf16's is 100x further off), its singular values lie in the quintic's band around 1, and
    it points along the exact U V^T."""
    g = torch.Generator().manual_seed(3)
    n = min(shape)
    u = torch.linalg.qr(torch.randn(shape[0], n, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(shape[1], n, generator=g, dtype=torch.float64))[0]
    s = torch.logspace(0, -1, n, dtype=torch.float64)
    G = u @ torch.diag(s) @ v.T
    exact = u @ v.T
    o64 = zeropower_via_newtonschulz(G, COEFFS, 5, 1e-7, torch.float64)
    o32 = zeropower_via_newtonschulz(G.float(), COEFFS, 5, 1e-7, torch.float32).double()  # Gram form at these shapes
    o16 = zeropower_via_newtonschulz(G.float(), COEFFS, 5, 1e-7, torch.bfloat16).double()
    direct = zeropower_via_newtonschulz(G.float(), COEFFS, 5, 1e-7, torch.float32, gram=False).double()
    err = lambda a: ((a - o64).norm() / o64.norm()).item()  # noqa: E731
    assert err(direct) < 3e-6 and err(o32) < 5e-5 and err(o16) > 100 * err(o32)
    sv = torch.linalg.svdvals(o32)
    assert 0.6 < sv.min() and sv.max() < 1.25
    cosine = (o32 * exact).sum() / (o32.norm() * exact.norm())
    assert cosine > 0.97
    # the iteration keeps U and V: o32's own polar factor is the exact U V^T
    uu, _, vvh = torch.linalg.svd(o32, full_matrices=False)
    assert torch.allclose(uu @ vvh, exact, atol=1e-4)


@pytest.mark.parametrize("shape", [(96, 32), (32, 80), (40, 40), (50, 60)])
def test_the_gram_form_is_the_same_iteration(shape):
    """newtonschulz_gram against the direct iteration in float64 (equal to rounding), and the automatic choice:
    the Gram form where one side is 1.5x the other or longer and the dtype is not bfloat16."""
    G = torch.randn(shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    direct = zeropower_via_newtonschulz(G, COEFFS, 5, 1e-7, torch.float64, gram=False)
    gram = zeropower_via_newtonschulz(G, COEFFS, 5, 1e-7, torch.float64, gram=True)
    assert ((direct - gram).norm() / direct.norm()) < 1e-12
    assert not torch.equal(direct, gram)  # really two computations
    for dtype in (torch.float32, torch.bfloat16):
        auto = zeropower_via_newtonschulz(G.to(dtype), COEFFS, 5, 1e-7, dtype)
        wide = max(shape) * 2 >= 3 * min(shape) and dtype != torch.bfloat16
        assert torch.equal(auto, zeropower_via_newtonschulz(G.to(dtype), COEFFS, 5, 1e-7, dtype, gram=wide))


@pytest.fixture
def machine(monkeypatch):
    """Pretend to be a CPU with or without native bf16 (the cached detection replaced)."""
    def pretend(native):
        monkeypatch.setattr(runtime, "cpu_native_bf16", lambda: (native, "pretended"))
    return pretend


def test_auto_picks_the_dtype_the_device_runs_fast(machine):
    machine(False)
    assert runtime.resolve_muon_ns_dtype("auto", cuda=False)[0] == "float32"
    assert runtime.resolve_muon_ns_dtype("auto", cuda=True)[0] == "bfloat16"
    assert runtime.resolve_muon_ns_dtype("bfloat16", cuda=False)[0] == "bfloat16"
    machine(True)
    assert runtime.resolve_muon_ns_dtype("auto", cuda=False)[0] == "bfloat16"
    assert runtime.resolve_muon_ns_dtype("float32", cuda=True)[0] == "float32"
    cfg = {"device": "cpu", "dtype": "auto", "compile": "auto", "backend": "auto", "muon_ns_dtype": "auto"}
    assert runtime.resolve_auto(cfg)["muon_ns_dtype"] == "bfloat16"


@pytest.mark.parametrize("flags,native", [((False, False), False), ((True, False), True), ((False, True), True)])
def test_x86_detection_reads_the_flags_torch_dispatches_on(monkeypatch, flags, native):
    monkeypatch.setattr(runtime.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: flags[0])
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: flags[1])
    runtime.cpu_native_bf16.cache_clear()
    try:
        got, why = runtime.cpu_native_bf16()
    finally:
        runtime.cpu_native_bf16.cache_clear()
    assert got is native and why == ("no AVX512-BF16 or AMX" if not native else why)


def test_other_machines_are_probed(monkeypatch):
    """Off x86 a probe times a bf16 matmul against float32: here the probe's verdict must match the flags."""
    native_here = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    monkeypatch.setattr(runtime.platform, "machine", lambda: "aarch64")
    runtime.cpu_native_bf16.cache_clear()
    try:
        got, why = runtime.cpu_native_bf16()
    finally:
        runtime.cpu_native_bf16.cache_clear()
    assert "probed" in why
    if runtime.platform.machine() in ("x86_64", "AMD64") and not native_here:
        assert got is False  # emulated bf16 is ~100x float32's time here, far past the probe's 2x line


class MatmulDtypes(TorchDispatchMode):
    """Records the input dtypes of every matrix product dispatched (forward, backward and optimizer)."""

    MM = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_scaled_dot_product_flash_attention_for_cpu",
          "_scaled_dot_product_attention_math", "_flash_attention_forward", "_efficient_attention_forward"}

    def __init__(self):
        super().__init__()
        self.seen = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.MM or name.startswith("_scaled_dot_product") or "flash_attention" in name:
            for a in args:
                if torch.is_tensor(a) and a.is_floating_point():
                    self.seen.setdefault(name, set()).add(a.dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.e2e
@pytest.mark.parametrize("module", [baseline_model, novel_model])
def test_a_cpu_training_run_without_native_bf16_multiplies_no_bf16(tmp_path, data_dir, machine, monkeypatch,
                                                                   capsys, module):
    """The whole run as a user starts it (the script's entry point, default optimizer Muon, muon_ns_dtype=auto,
    dtype=auto) on a CPU without native bf16: every matrix product of training, evaluation and the optimizer is
    float32, the choice is logged, and config.json records it."""
    machine(False)
    mode = MatmulDtypes()
    real = gpt.GPT.configure_optimizer

    def spy(self, *a, **k):
        opt = real(self, *a, **k)
        spy.ns = opt.opts[0].ns_dtype
        return opt
    monkeypatch.setattr(gpt.GPT, "configure_optimizer", spy)
    sparse = ["--sparse_block_size=8", "--target_sparsity=0.5", "--sparsity_warmup_iters=0"]
    extra = sparse if module is novel_model else []
    with mode:
        assert train_in_process(module, [f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--max_iters=3",
                                         "--eval_interval=3", "--eval_iters=1", *extra]) == 0
    assert spy.ns == torch.float32
    assert "mm" in mode.seen and all(d == {torch.float32} for d in mode.seen.values()), mode.seen
    assert f"muon_ns_dtype=auto -> float32 ({runtime.cpu_model()}: pretended)" in capsys.readouterr().out
    with open(tmp_path / "config.json") as f:
        cfg = json.load(f)
    assert cfg["muon_ns_dtype"] == "float32" and cfg["optimizer"] == "muon"


@pytest.mark.e2e
def test_a_cpu_with_native_bf16_keeps_torchs_muon(tmp_path, data_dir, machine, monkeypatch):
    machine(True)
    real = gpt.GPT.configure_optimizer
    got = {}

    def spy(self, *a, **k):
        opt = real(self, *a, **k)
        got["ns"] = opt.opts[0].ns_dtype
        return opt
    monkeypatch.setattr(gpt.GPT, "configure_optimizer", spy)
    assert train_in_process(baseline_model, [f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--max_iters=2",
                                             "--final_test=False"]) == 0
    assert got["ns"] == torch.bfloat16
    assert json.load(open(tmp_path / "config.json"))["muon_ns_dtype"] == "bfloat16"


@pytest.mark.e2e
def test_bad_muon_ns_dtype_is_one_line(tmp_path, data_dir, capsys):
    assert train_in_process(baseline_model, [f"--data_dir={data_dir}", f"--out_dir={tmp_path}",
                                             "--muon_ns_dtype=float16"]) != 0
    line = one_line(capsys.readouterr().err)
    assert "muon_ns_dtype='float16'" in line and "auto, bfloat16, float32" in line


def test_bf16_autocast_on_a_cpu_without_native_bf16_is_named(machine):
    """--dtype=bfloat16 on such a CPU would emulate every matmul: the run says so and names the fix."""
    cfg = {"device": "cpu", "dtype": "bfloat16", "compile": False, "backend": "auto", "optimizer": "adamw"}
    machine(False)
    warned = [n for n in runtime.Runtime(cfg).notes if n.startswith("warning: dtype=bfloat16")]
    assert len(warned) == 1 and "--dtype=float32" in warned[0]
    machine(True)
    assert not any("dtype=bfloat16" in n for n in runtime.Runtime(cfg).notes)
    assert not any("dtype=bfloat16" in n for n in runtime.Runtime({**cfg, "dtype": "float32"}).notes)
