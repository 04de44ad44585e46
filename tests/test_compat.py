"""Checkpoints written before the selector had its own module (the selector in its own module: attn.predictor.* and
attn.threshold became attn.selector.*) still load, give the same logits bit for bit, sample and resume.

The fixture (tests/fixtures/asca_tiny_ckpt.pt: 2 layers, n_embd 32, T=128, S=16, the adaptive budget, 4
iterations) and its logits on 2 x 128 bytes of the excerpt were written by the code of commit b911c2d."""
import json
import os
import shutil

import pytest
import torch

import checkpoint
import novel_model
import sample
from helpers import ROOT, make_dataset, train_in_process

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "asca_tiny_ckpt.pt")
LOGITS = os.path.join(ROOT, "tests", "fixtures", "asca_tiny_logits.pt")


def test_the_old_checkpoint_holds_the_old_names():
    """The control: the fixture really is in the old layout, so the next tests exercise the remap."""
    sd = torch.load(FIXTURE, map_location="cpu", weights_only=True)["model"]
    assert "transformer.h.0.attn.predictor.wk" in sd and "transformer.h.0.attn.threshold" in sd
    assert not any(".selector." in k for k in sd)


def test_an_old_checkpoint_gives_the_logits_it_gave_when_written():
    model, _ = checkpoint.model_from_checkpoint(FIXTURE)
    ref = torch.load(LOGITS, weights_only=True)
    with torch.no_grad():
        logits, _ = model(ref["x"], ref["x"])
    # every 8th position was stored. Bit for bit on the CPU that wrote them; another CPU's vector kernels (AVX2
    # against AVX-512) round float32 sums differently, by about 1e-7 here (2026-12-04), so the check allows float32
    # rounding: a wrong remap of any tensor moves the logits by orders of magnitude more
    assert torch.allclose(logits[:, ::8], ref["logits"], rtol=0, atol=1e-6)
    a = model.transformer.h[0].attn
    assert torch.isfinite(a.selector.threshold).all()  # the adaptive threshold came across, not left at -inf
    old = torch.load(FIXTURE, map_location="cpu", weights_only=True)["model"]
    assert torch.equal(a.selector.threshold, old["transformer.h.0.attn.threshold"])
    assert torch.equal(a.selector.predictor.wk, old["transformer.h.0.attn.predictor.wk"])


def test_an_old_checkpoint_samples_the_same_with_and_without_the_cache():
    model, _ = checkpoint.model_from_checkpoint(FIXTURE)
    model.double()  # float64: no near-tie can pick another block or byte on the two paths
    outs = [sample.generate(model, b"The ", 40, temperature=1.0, generator=torch.Generator().manual_seed(3),
                            kv_cache=kv) for kv in (True, False)]
    assert outs[0] == outs[1] and len(outs[0]) >= 40


@pytest.mark.e2e
def test_an_old_checkpoint_resumes_and_saves_the_new_names(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    shutil.copy(FIXTURE, out / "ckpt.pt")
    data = make_dataset(tmp_path / "data")
    assert train_in_process(novel_model, [f"--out_dir={out}", "--init_from=resume", f"--data_dir={data}",
                                          "--max_iters=8", "--final_test=False"]) == 0
    ck = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ck["iter_num"] == 8 and "transformer.h.0.attn.selector.threshold" in ck["model"]
    assert not any(k.endswith("attn.threshold") or ".attn.predictor." in k for k in ck["model"])
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert rows[-1]["iter"] == 8 and rows[-1]["budget_threshold"] is not None


@pytest.mark.e2e
def test_an_old_checkpoint_starts_a_new_run(tmp_path, capsys):
    """--init_from=PATH with the fixture: keys it predates without a legacy value (compressed_branch, gate_pooled)
    count as their defaults, as for a resume, so a run with the checkpoint's own settings starts from its weights."""
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "warm"
    args = [f"--out_dir={out}", f"--init_from={FIXTURE}", f"--data_dir={data}", "--block_size=128",
            "--sparse_block_size=16", "--max_iters=2", "--final_test=False"]
    assert train_in_process(novel_model, args) == 0, capsys.readouterr().err
    assert f"init_from: weights from {FIXTURE} (asca, iter 4" in capsys.readouterr().out
    ck = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ck["iter_num"] == 2 and "transformer.h.0.attn.selector.predictor.wk" in ck["model"]
