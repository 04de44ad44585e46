"""The modern-GPT options: rotary positions, QK-norm, squared ReLU, untied embeddings, Muon.
Causality for each option in both models and modes; RoPE against an independent (complex-number)
implementation; Muon's parameter groups; exact resume with Muon; checkpoints from before the options."""
import json

import pytest
import torch

import baseline_model
import gpt
import checkpoint
from config_keys import legacy_values
import novel_model
from baseline_model import Rotary
from helpers import run_script, train_in_process

OPTIONS = {
    "rope": dict(pos_encoding="rope"),
    "qk_norm": dict(qk_norm=True),
    "relu2": dict(mlp_act="relu2"),
    "untied": dict(tie_embeddings=False),
    "all": dict(pos_encoding="rope", qk_norm=True, mlp_act="relu2", tie_embeddings=False),
    "all_rotated_gate_no_dist": dict(pos_encoding="rope", qk_norm=True, mlp_act="relu2", tie_embeddings=False,
                                     gate_input="rotated", gate_dist_bias=False),
    "max_pooled_keys": dict(pos_encoding="rope", gate_key_pool="max"),
    "explore_noise": dict(pos_encoding="rope", explore_noise=1.0),  # the learned choice sampled in training
}


def build(kind, opts, **extra):
    torch.manual_seed(0)
    shape = dict(n_layer=2, n_head=2, n_embd=32, block_size=128, **opts, **extra)
    if kind == "asca":
        return novel_model.make_model(**shape, sparse_block_size=8, target_sparsity=0.6, sparsity_warmup_iters=0)
    shape.pop("gate_input", None), shape.pop("gate_dist_bias", None), shape.pop("gate_key_pool", None)
    shape.pop("explore_noise", None)
    return baseline_model.make_model(**shape)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kind", ["baseline", "asca"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_every_option_is_causal(name, kind, mode):
    model = build(kind, OPTIONS[name], dropout=0.1 if mode == "train" else 0.0)
    model.train(mode == "train")
    idx = torch.randint(0, 256, (2, 128), generator=torch.Generator().manual_seed(1))
    for t in (1, 37, 64, 127):
        other = idx.clone()
        other[:, t:] = torch.randint(0, 256, other[:, t:].shape, generator=torch.Generator().manual_seed(t))
        torch.manual_seed(5)  # same dropout masks for both forwards
        a, _ = model(idx)
        torch.manual_seed(5)
        b, _ = model(other)
        assert (a[:, :t] - b[:, :t]).abs().max().item() < 1e-5, (name, t)
        assert (a[:, t:] - b[:, t:]).abs().max().item() > 1e-4, (name, t)  # the test can fail


def complex_rope(x, positions, base):
    """Independent RoPE: pairs (x_i, x_{i+hs/2}) as complex numbers times exp(i * pos * base^(-2i/hs))."""
    hs = x.shape[-1]
    half = hs // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    freq = base ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    rot = torch.polar(torch.ones(len(positions), half, dtype=torch.float64),
                      torch.tensor(positions, dtype=torch.float64)[:, None] * freq[None, :])
    z = z * rot
    return torch.cat((z.real, z.imag), dim=-1)


def test_rope_matches_a_complex_implementation_and_depends_only_on_offsets():
    g = torch.Generator().manual_seed(0)
    rot = Rotary(16, 64, 10000.0)
    q, k = torch.randn(1, 2, 64, 16, generator=g), torch.randn(1, 2, 64, 16, generator=g)
    assert (rot(q).double() - complex_rope(q, list(range(64)), 10000.0)).abs().max().item() < 1e-5
    # the same q and k vectors placed at positions shifted by s: the scores are unchanged
    qv, kv = q[:, :, :1], k[:, :, :1]
    scores = {}
    for s in (0, 5, 23):
        qs = complex_rope(qv, [30 + s], 10000.0)
        ks = complex_rope(kv, [12 + s], 10000.0)
        scores[s] = (qs * ks).sum(-1)
    assert torch.allclose(scores[0], scores[5], atol=1e-10) and torch.allclose(scores[0], scores[23], atol=1e-10)
    # and through our Rotary: q at m, k at n vs q at m+s, k at n+s, for every pair in the window
    x_q, x_k = q[0, 0, 0], k[0, 0, 0]
    placed_q = rot(x_q.expand(1, 1, 64, 16).contiguous())[0, 0]
    placed_k = rot(x_k.expand(1, 1, 64, 16).contiguous())[0, 0]
    att = placed_q @ placed_k.T  # att[m, n] = score of q at m with k at n
    for s in (1, 7, 20):
        assert torch.allclose(att[s:, s:], att[:-s, :-s], atol=1e-4)
    assert not torch.allclose(att[1:, :-1], att[:-1, :-1], atol=1e-3)  # but it does depend on m - n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_hand_written_backwards_equal_autograds_bit_for_bit(dtype):
    """gpt.ReluSquared and Rotary's _Rotate write their gradients out (fewer passes on a CPU).
    Against autograd's own differentiation of the plain formulas: the same values and gradients, bit for bit,
    zeros of the ReLU included; and gradcheck in float64 (an independent, numerical derivative)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 40, 16, generator=g).to(dtype)
    x[0, 0, :4] = 0.0  # relu's kink
    up = torch.randn(x.shape, generator=g).to(dtype)
    rot = Rotary(16, 64, 10000.0)
    cos, sin = rot.cos[9:49].to(dtype), rot.sin[9:49].to(dtype)
    pairs = [(gpt.ReluSquared.apply, lambda t: torch.nn.functional.relu(t).square()),
             (lambda t: rot(t, 9), lambda t: gpt.rotate(t, cos, sin))]
    for fast, plain in pairs:
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        fa, pb = fast(a), plain(b)
        fa.backward(up), pb.backward(up)
        assert torch.equal(fa, pb) and torch.equal(a.grad, b.grad)
        assert a.grad.abs().max() > 0  # the test can fail
    with torch.no_grad():  # without a graph (evaluation, decoding) the same ops run without Function.apply
        assert torch.equal(gpt.relu_squared(x), pairs[0][1](x)) and torch.equal(rot(x, 9), pairs[1][1](x))
    if dtype == torch.float64:
        xs = torch.randn(1, 2, 6, 16, dtype=torch.float64, generator=g).requires_grad_()
        assert torch.autograd.gradcheck(gpt.ReluSquared.apply, (xs,))
        assert torch.autograd.gradcheck(lambda t: rot(t, 3), (xs,))
        # and the rotation's gradient against the complex-number RoPE (autograd through complex ops)
        xr, xc = xs.detach().clone().requires_grad_(), xs.detach().clone().requires_grad_()
        w = torch.randn(xs.shape, dtype=torch.float64, generator=g)
        (rot(xr, 3) * w).sum().backward()
        (complex_rope(xc, list(range(3, 9)), 10000.0) * w).sum().backward()
        assert (xr.grad - xc.grad).abs().max().item() < 1e-6


def test_compiled_dense_model_matches_eager_forward_and_backward():
    """The dense model as a user runs it with --compile=True (the hand-written backwards traced by dynamo):
    logits, loss and every gradient equal the eager model's, and causal on the compiled path."""
    torch.manual_seed(0)
    model = baseline_model.make_model(n_layer=2, n_head=2, n_embd=32, block_size=64)
    idx = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    tgt = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(2))
    logits, loss = model(idx, tgt)
    loss.backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model)
    c_logits, c_loss = compiled(idx, tgt)
    c_loss.backward()
    assert (c_logits - logits).abs().max().item() < 1e-4 and abs(c_loss.item() - loss.item()) < 1e-5
    for n, p in model.named_parameters():
        scale = eager[n].abs().max().item()
        assert scale > 0 and (p.grad - eager[n]).abs().max().item() <= 1e-3 * scale, n
    other = idx.clone()
    other[:, 40:] = (other[:, 40:] + 1) % 256
    with torch.no_grad():
        moved = compiled(other)[0]
    assert (moved[:, :40] - c_logits.detach()[:, :40]).abs().max().item() < 1e-5
    assert (moved[:, 40:] - c_logits[:, 40:]).abs().max().item() > 1e-4


def test_attention_layer_logits_depend_on_relative_offsets_only():
    """A whole attention layer with rope and no position table: the same content, shifted right by s
    positions (with other bytes before it), gives the same attention scores among the shifted positions."""
    torch.manual_seed(0)
    cfg = baseline_model.GPTConfig(block_size=64, n_head=2, n_embd=32, pos_encoding="rope", qk_norm=True)
    attn = baseline_model.CausalSelfAttention(cfg)
    x = torch.randn(1, 40, 32)
    s = 9
    shifted = torch.cat([torch.randn(1, s, 32), x], dim=1)
    a = attn.attention_map(x)["attention"]
    q, k = attn.position(*attn.qkv(x)[:2])
    q2, k2 = attn.position(*attn.qkv(shifted)[:2])
    assert torch.allclose(q @ k.transpose(-1, -2), (q2 @ k2.transpose(-1, -2))[:, :, s:, s:], atol=1e-4)
    assert torch.allclose(a.sum(-1), torch.ones_like(a.sum(-1)), atol=1e-5)


def test_muon_groups_cover_every_parameter_exactly_once():
    for kind in ("baseline", "asca"):
        model = build(kind, OPTIONS["all"])
        opt = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu", "muon", 0.02, 0.95)
        seen = [id(p) for g in opt.param_groups for p in g["params"]]
        assert sorted(seen) == sorted(id(p) for p in model.parameters()) and len(seen) == len(set(seen))
        muon = {id(p) for p in opt.opts[0].param_groups[0]["params"]}
        names = {n for n, p in model.named_parameters() if id(p) in muon}
        assert names and all(n.startswith("transformer.h.") and n.endswith("weight") for n in names)
        assert not any("predictor" in n or "wte" in n or "lm_head" in n for n in names)
        assert all(p.dim() == 2 for g in opt.opts[0].param_groups for p in g["params"])
        assert opt.opts[0].param_groups[0]["lr_scale"] == pytest.approx(20.0)


@pytest.mark.e2e
def test_exact_resume_with_muon_and_modern_options_is_bitwise(tmp_path, data_dir):
    common = [f"--data_dir={data_dir}", "--optimizer=muon", "--pos_encoding=rope", "--qk_norm=true",
              "--mlp_act=relu2", "--tie_embeddings=false", "--lr_decay_iters=16", "--eval_interval=4",
              "--final_test=False", "--sparse_block_size=8", "--target_sparsity=0.5", "--sparsity_warmup_iters=6"]
    assert train_in_process(novel_model, common + [f"--out_dir={tmp_path / 'a'}", "--max_iters=16"]) == 0
    assert train_in_process(novel_model, common + [f"--out_dir={tmp_path / 'b'}", "--max_iters=8"]) == 0
    assert train_in_process(novel_model, [f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'b'}", "--max_iters=16",
                                          "--init_from=resume"]) == 0
    a, b = checkpoint.load(str(tmp_path / "a" / "ckpt.pt")), checkpoint.load(str(tmp_path / "b" / "ckpt.pt"))
    assert a["config"]["optimizer"] == b["config"]["optimizer"] == "muon"
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert len(a["optimizer"]["parts"]) == 2


@pytest.mark.e2e
def test_a_checkpoint_from_before_the_options_loads_samples_and_resumes(tmp_path, data_dir):
    """A checkpoint as the code before this change wrote it: no new model or optimizer keys. Their absence
    means the old behaviour (learned positions, GELU, tied embeddings, no QK-norm, AdamW), whatever the
    defaults are now."""
    out = tmp_path / "old"
    assert train_in_process(baseline_model, [f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=4",
                                             "--final_test=False", "--pos_encoding=learned", "--qk_norm=false",
                                             "--mlp_act=gelu", "--tie_embeddings=true", "--optimizer=adamw"]) == 0
    ck = checkpoint.load(str(out / "ckpt.pt"))
    new_keys = (set(legacy_values(baseline_model.GPTConfig.declarations()))
                | {"rope_base", "optimizer", "muon_lr", "muon_momentum"})
    for d in (ck["model_args"], ck["config"]):
        for key in new_keys:
            d.pop(key, None)
    torch.save(ck, out / "ckpt.pt")
    model, _ = checkpoint.model_from_checkpoint(str(out / "ckpt.pt"))
    assert "wpe" in model.transformer and model.config.mlp_act == "gelu" and model.config.tie_embeddings
    r = run_script("sample.py", f"--out_dir={out}", "--num_bytes=10", "--start=the ")
    assert r.returncode == 0 and r.stdout.startswith("the "), r.stderr
    assert train_in_process(baseline_model, [f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=6",
                                             "--init_from=resume", "--final_test=False"]) == 0
    cfg = json.load(open(out / "config.json"))
    assert cfg["optimizer"] == "adamw" and cfg["pos_encoding"] == "learned"


@pytest.mark.e2e
@pytest.mark.parametrize("arg,needle", [("--pos_encoding=alibi", "pos_encoding='alibi' must be one of learned, rope"),
                                        ("--mlp_act=swish", "mlp_act='swish' must be one of gelu, relu2"),
                                        ("--optimizer=sgd", "optimizer='sgd' must be one of adamw, muon"),
                                        ("--muon_lr=0", "muon_lr must be a positive finite number"),
                                        ("--rope_base=1", "rope_base must be a finite number > 1")])
def test_bad_option_values_are_one_line_errors(tmp_path, data_dir, capsys, arg, needle):
    assert train_in_process(baseline_model, [f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'o'}",
                                             "--optimizer=muon" if "muon_lr" in arg else "--seed=1", arg]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
