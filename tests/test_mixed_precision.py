"""Mixed precision as a GPU runs it, rehearsed on a CPU.

CUDA's autocast runs softmax, sums and norms in float32 where the CPU's keeps bf16, so a kernel that passed
every CPU test crashed on the first CUDA step. runtime.cuda_autocast_on_cpu applies CUDA's float32 ops on a CPU;
it is checked here against the lists in the installed torch's own ATen/autocast_mode.h. Then every ASCA path runs
under it, whole model, gradients included, for torch 2.11's policy (rms_norm in bf16) and 2.13's (rms_norm in
float32), against float32 and float64 references; and the start-up check is shown to pass correct models over
many seeds and to stop real faults."""
import importlib.util
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

import asca_kernels
import novel_model as nm
from asca_kernels import attend_gather, attend_reference
from helpers import ROOT, attn_module
from runtime import CUDA_FP32_OPS, CUDA_FP32_SET_OPT_DTYPE_OPS, cuda_autocast_on_cpu

POLICIES = {"torch 2.11": False, "torch 2.13": True}  # rms_norm_fp32 of each version's CUDA policy


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


noise = load_script("startup_noise")


# ----------------------------------------------------------------------------- the emulation itself

def _header_ops(text, macro):
    body = text[text.index(f"#define {macro}(_)"):]
    body = body[:body.index("\n\n")]
    return {m.group(1) for m in re.finditer(r"_\((\w+)", body)}


def test_the_emulated_policy_is_the_installed_torchs_cuda_policy():
    """Every op of CUDA's float32 lists in this torch's ATen/autocast_mode.h is emulated, or named here as one no
    Python function reaches (internal names, upsampling, which the models never call)."""
    path = os.path.join(os.path.dirname(torch.__file__), "include", "ATen", "autocast_mode.h")
    if not os.path.exists(path):
        pytest.skip("this torch ships no ATen headers")
    text = open(path).read()
    fp32, set_dtype = _header_ops(text, "AT_FORALL_FP32"), _header_ops(text, "AT_FORALL_FP32_SET_OPT_DTYPE")
    not_reached = {op for op in fp32 if "upsample" in op} | {"native_layer_norm", "frobenius_norm"}
    assert fp32 - not_reached - {"rms_norm"} == CUDA_FP32_OPS
    assert set_dtype == CUDA_FP32_SET_OPT_DTYPE_OPS - {"norm"}  # norm: fp32_append_dtype, its own list in the header


@pytest.mark.parametrize("rms_fp32", [False, True])
def test_the_emulation_gives_cudas_dtypes(rms_fp32):
    x, w = torch.randn(4, 8).bfloat16(), torch.ones(8)
    with cuda_autocast_on_cpu(rms_norm_fp32=rms_fp32):
        fp32 = [torch.softmax(x, -1), F.softmax(x, -1), x.softmax(-1), F.log_softmax(x, -1), x.sum(), x.sum(-1),
                torch.sum(x, 0), x.exp(), x ** 2, x.rsqrt(), F.layer_norm(x, (8,)), torch.logsumexp(x, -1)]
        low = [x @ x.T, F.linear(x.float(), w[None].expand(3, 8)), x.mean(-1), F.gelu(x),
               torch.softmax(x, -1, dtype=torch.bfloat16)]
        rms = F.rms_norm(x, (8,), w)
        ints = torch.arange(5).sum()
    assert all(t.dtype == torch.float32 for t in fp32)
    assert all(t.dtype == torch.bfloat16 for t in low)
    assert rms.dtype == (torch.float32 if rms_fp32 else torch.bfloat16) and ints.dtype == torch.int64
    assert torch.softmax(x, -1).dtype == torch.bfloat16  # nothing outside the context


# ----------------------------------------------------------------------------- item 1: kernels under CUDA's policy

@pytest.mark.parametrize("groups", ["default", "one_per_count"])  # one group at this size, or one per kept count
@pytest.mark.parametrize("kernel", ["block", "sdpa"])  # both kernels auto chooses between per tile group
@pytest.mark.parametrize("qk_dtype", [torch.bfloat16, torch.float32])
def test_the_gather_kernel_trains_under_cudas_policy_and_matches_float64(qk_dtype, kernel, groups, monkeypatch):
    """Under CUDA's autocast the softmax inside the gather kernel is float32 and the incoming gradient bf16: its
    backward raised 'expected m1 and m2 to have the same dtype' (the first CUDA step of every ASCA run). q and k
    arrive in float32 where rms_norm is on CUDA's float32 list (torch 2.13), v in bf16. Outputs and every gradient
    (q, k, v, the predictor's) against the float64 reference on the same selection, within bf16 rounding; each
    gradient in its input's dtype."""
    if groups == "one_per_count":
        monkeypatch.setattr(asca_kernels, "GATHER_CALL_FLOPS", 0)
    a = attn_module(T=128, S=16, H=2, hs=16, target=0.6, keep_first=False, local_blocks=1, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(2, 2, 128, 16, generator=g) for _ in range(3)]
    q, k, v = (t.to(d).requires_grad_(True) for t, d in zip(base, (qk_dtype, qk_dtype, torch.bfloat16)))
    w = torch.randn(2, 2, 128, 16, generator=g)
    sel = a.selector.plan(q.detach().float(), k.detach().float()).detach()
    bias = sel.gate_bias.clone().requires_grad_(True)  # a leaf: the gate bias's gradient (the predictor's) is checked
    with cuda_autocast_on_cpu():
        y = attend_gather(q, k, v, sel.order, sel.n_past, bias, 16, kernel=kernel)
    (y.float() * w).sum().backward()
    assert y.dtype == torch.bfloat16
    assert (q.grad.dtype, k.grad.dtype, v.grad.dtype) == (qk_dtype, qk_dtype, torch.bfloat16)
    ref_in = [t.detach().double().requires_grad_(True) for t in (q, k, v, bias)]
    ref_sel = nm.Selection(sel.scores, sel.order, sel.n_past, sel.selected, ref_in[3], sel.seq_len)
    y_ref = attend_reference(*ref_in[:3], ref_sel, 16)
    (y_ref * w.double()).sum().backward()
    assert (y.double() - y_ref).abs().max().item() <= 2e-2 * y_ref.abs().max().item()
    for got, want in zip((q.grad, k.grad, v.grad, bias.grad), ref_in):
        assert (got.double() - want.grad).abs().max().item() <= 3e-2 * want.grad.abs().max().item()
    assert bias.grad.abs().max() > 0


def _grads(m):
    return {n: p.grad.float().clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("impl,extra", [("gather", {}), ("reference", {}),
                                        ("gather", dict(compressed_branch=True, gate_loss=1.0)),
                                        ("gather", dict(budget="adaptive")),
                                        ("gather", dict(gate_pooled=True, rank_distance_cost=0.1)),
                                        ("gather", dict(selector="local_gated")),
                                        ("gather", dict(selector="nsa", keep_tokens=64)),
                                        ("reference", dict(dense_from=0.5))])
def test_the_whole_model_trains_under_cudas_policy(policy, impl, extra):
    """The model as the trainer runs it (loss and auxiliary loss under autocast, backward outside) under each torch
    version's CUDA policy: the predictor, the compressed branch and the gate loss included. Logits and every
    gradient against the same weights in float32 replaying the same block choice (within bf16 rounding)."""
    import copy
    torch.manual_seed(0)
    model = nm.make_model(n_layer=2, n_head=2, n_embd=64, block_size=256, sparse_block_size=16, target_sparsity=0.7,
                          sparsity_warmup_iters=0, attn_impl=impl, **extra)
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, 256, (2, 256), generator=g) for _ in range(2))
    if extra.get("budget") == "adaptive":
        with torch.no_grad():
            model(x)
        model.update_budgets()
    ref = copy.deepcopy(model)
    with cuda_autocast_on_cpu(rms_norm_fp32=POLICIES[policy]):
        logits, loss = model(x, y)
        aux = model.aux_loss()
    (loss + (aux if aux is not None else 0)).backward()
    assert logits.dtype == torch.bfloat16 and math.isfinite(loss.item())
    assert (aux is not None) == ("gate_loss" in extra)
    for a, chosen in zip(ref.attention_modules(), model.attention_modules()):
        a.selector.replay = (chosen.last_selection.order, chosen.last_selection.n_past)
    logits_ref, loss_ref = ref(x, y)
    aux_ref = ref.aux_loss()
    (loss_ref + (aux_ref if aux_ref is not None else 0)).backward()
    assert (logits.float() - logits_ref).abs().max().item() <= 3e-2 * logits_ref.abs().max().item()
    got, want = _grads(model), _grads(ref)
    trained = ".nsa_" if extra.get("selector") == "nsa" else ".predictor."  # NSA scores with its compressed branch
    assert got.keys() == want.keys() and any(trained in n for n in want)
    for n in want:
        assert (got[n] - want[n]).norm().item() <= 5e-2 * want[n].norm().item() + 1e-6, n


@pytest.mark.parametrize("branches", [dict(compressed_branch=True), dict(selector="nsa")])
@pytest.mark.parametrize("policy", POLICIES)
def test_the_flex_path_and_cached_decoding_run_under_cudas_policy(policy, branches):
    """Flex (a CPU has its forward only) and KV-cached decoding under each CUDA policy: q and k in float32 next to
    a bf16 v where rms_norm is on the float32 list. Both equal the reference path under the same policy (with the
    compressed branch, and with NSA's three branches)."""
    torch.manual_seed(0)
    model = nm.make_model(n_layer=2, n_head=2, n_embd=64, block_size=128, sparse_block_size=16, target_sparsity=0.6,
                          sparsity_warmup_iters=0, attn_impl="reference", **branches).eval()
    x = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(2))
    ctx = cuda_autocast_on_cpu(rms_norm_fp32=POLICIES[policy])
    with torch.no_grad():
        with ctx:
            want = model(x)[0].float()
        for a in model.attention_modules():
            a.impl = "flex"
        with ctx:
            flex = model(x)[0].float()
            cache = model.new_cache()
            steps = [model.forward_cached(x[:, :37], cache)] + [model.forward_cached(x[:, t:t + 1], cache)
                                                                for t in range(37, 100)]
        cached = torch.cat(steps, dim=1).float()
    scale = want.abs().max().item()
    assert (flex - want).abs().max().item() <= 3e-2 * scale
    assert (cached - want).abs().max().item() <= 3e-2 * scale


# ----------------------------------------------------------------------------- item 2: the start-up check

TINY = dict(n_layer=2, n_embd=64, n_head=2, block_size=256, sparse_block_size=16, target_sparsity=0.75)


@pytest.mark.parametrize("policy", POLICIES)
def test_the_start_up_check_never_false_alarms_on_a_correct_model(policy):
    """24 seeds of a correct model in bf16 under CUDA's policy: no alarm, and each measure under half its
    tolerance (the margin of scripts/startup_noise.py's floor)."""
    for seed in range(24):
        r = noise.check_once(noise.FAULTS["correct"], seed, TINY, rms_norm_fp32=POLICIES[policy])
        assert r["ok"], (seed, r)
        assert all(r[m] <= r["tol"][m] / 2 for m in noise.MEASURES), (seed, r)


@pytest.mark.parametrize("fault", ["wrong block", "dropped gate bias"])
def test_the_start_up_check_stops_real_faults(fault):
    """A kernel that reads one wrong block in the last tile, or drops the gate bias: stopped in every seed."""
    for seed in range(6):
        r = noise.check_once(noise.FAULTS[fault], seed, TINY)
        assert not r["ok"], (seed, r)


@pytest.mark.parametrize("budget", ["fixed", "adaptive"])
def test_the_start_up_check_runs_at_the_target_sparsity_and_restores_the_schedule(budget):
    """With a warm-up the first steps are dense (and an adaptive budget's threshold keeps every block until its first
    update): a check at the run's schedule position checked no skipping, so a wrong block passed it. The check now
    runs at the target and puts the schedule (and the thresholds) back."""
    torch.manual_seed(0)
    model = nm.GPT(nm.ASCAConfig(**TINY, attn_impl="gather", sparsity_warmup_iters=100, budget=budget),
                   attn_cls=noise.WrongBlock)
    model.set_step(0)
    x, y = (torch.randint(0, 256, (1, 256)) for _ in range(2))
    r = nm.startup_check(model, model, x, y, cuda_autocast_on_cpu(), low_precision=True)
    assert not r["ok"] and r["logits"] > r["tol"]["logits"]
    assert model.diagnostics()["sparsity"] == pytest.approx(0.75, abs=0.05)  # the check's forward skipped blocks
    a = model.attention_modules()[0]
    assert a.selector.sparsity == 0.0 and a.selector.step_pos == 0  # and the schedule is where it was
    assert torch.equal(a.selector.n_keep, torch.arange(16))
    if budget == "adaptive":
        assert torch.isinf(a.selector.threshold).all()
