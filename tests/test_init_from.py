"""--init_from=PATH starts a new run from another run's weights (nanoGPT's init_from): its own out_dir, a
fresh optimizer and schedule, the same or a longer block_size, a dense checkpoint into ASCA (the predictor fresh).
Rotary positions carry to a longer T; learned ones and an ASCA predictor sized for other blocks are one line."""
import json

import pytest
import torch

import baseline_model
import novel_model
from checkpoint import model_from_checkpoint
from helpers import one_line, train_in_process

SPARSE = ["--sparse_block_size=8", "--target_sparsity=0.5", "--sparsity_warmup_iters=4"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory, data_dir):
    """A dense rotary run, a dense run with learned positions and an ASCA run, each 8 iterations at T=64."""
    root = tmp_path_factory.mktemp("src")
    for module, name, extra in ((baseline_model, "rope", []), (baseline_model, "learned", ["--pos_encoding=learned"]),
                                (novel_model, "asca", SPARSE)):
        assert train_in_process(module, [f"--data_dir={data_dir}", f"--out_dir={root / name}", "--max_iters=8",
                                         *extra]) == 0
    return root


def weights(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.e2e
def test_the_same_model_scores_what_its_source_scored(sources, data_dir, tmp_path):
    """max_iters=0 from a checkpoint is that checkpoint, scored again: the same test bpc to the last digit."""
    out = tmp_path / "again"
    assert train_in_process(baseline_model, [f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=0",
                                             f"--init_from={sources / 'rope' / 'ckpt.pt'}"]) == 0
    again, before = (json.load(open(d / "final.json"))["test_bpc"] for d in (out, sources / "rope"))
    assert again == before


@pytest.mark.e2e
def test_rotary_positions_carry_to_a_longer_block_size(sources, data_dir, tmp_path):
    """A T=64 rotary model started at T=256: the same weights, a fresh schedule (iter 0, the warm-up's first lr),
    and on the first 64 bytes the T=256 model's logits are the T=64 model's (causal, rotary: nothing depends on T)."""
    out = tmp_path / "long"
    assert train_in_process(baseline_model, [f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=3",
                                             "--block_size=256", f"--init_from={sources / 'rope' / 'ckpt.pt'}"]) == 0
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert rows[0]["iter"] == 0 and json.load(open(out / "final.json"))["iters"] == 3
    short, _ = model_from_checkpoint(str(sources / "rope" / "ckpt.pt"))
    start = tmp_path / "start"  # the new run before its first step
    assert train_in_process(baseline_model, [f"--data_dir={data_dir}", f"--out_dir={start}", "--max_iters=0",
                                             "--block_size=256", f"--init_from={sources / 'rope' / 'ckpt.pt'}"]) == 0
    long, _ = model_from_checkpoint(str(start / "ckpt.pt"))
    assert long.config.block_size == 256
    x = torch.randint(0, 256, (2, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, _ = short(x[:, :64])
        b, _ = long(x)
    assert torch.allclose(a, b[:, :64], atol=1e-5)
    assert not torch.equal(weights(out / "ckpt.pt")["lm_head.weight"], weights(start / "ckpt.pt")["lm_head.weight"])


@pytest.mark.e2e
def test_a_dense_checkpoint_starts_asca_with_its_attention_and_a_fresh_predictor(sources, data_dir, tmp_path):
    out = tmp_path / "asca"
    src = sources / "rope" / "ckpt.pt"
    assert train_in_process(novel_model, [f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=0",
                                          "--block_size=128", *SPARSE, f"--init_from={src}"]) == 0
    dense, got = weights(src), weights(out / "ckpt.pt")
    assert all(torch.equal(dense[k], got[k]) for k in dense)
    fresh = [k for k in got if k not in dense]
    assert fresh and all(".selector.predictor." in k for k in fresh)
    torch.manual_seed(1337)  # the run's seed: the predictor is what a new ASCA model of this config starts with
    new = novel_model.make_model(n_layer=2, n_head=2, n_embd=32, block_size=128, sparse_block_size=8,
                                 target_sparsity=0.5).state_dict()
    assert all(torch.equal(new[k], got[k]) for k in fresh)
    # and it trains from there
    more = tmp_path / "asca_trained"
    assert train_in_process(novel_model, [f"--data_dir={data_dir}", f"--out_dir={more}", "--max_iters=6",
                                          "--block_size=128", *SPARSE, f"--init_from={src}"]) == 0
    assert json.load(open(more / "final.json"))["test_sparsity"] > 0.3


@pytest.mark.e2e
def test_an_asca_checkpoint_continues_at_its_block_size_and_into_dense(sources, data_dir, tmp_path):
    src = sources / "asca" / "ckpt.pt"
    out = tmp_path / "same"
    assert train_in_process(novel_model, [f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=0", *SPARSE,
                                          "--target_sparsity=0.3", f"--init_from={src}"]) == 0
    a, b = weights(src), weights(out / "ckpt.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the predictor included
    dense = tmp_path / "dense"
    assert train_in_process(baseline_model, [f"--data_dir={data_dir}", f"--out_dir={dense}", "--max_iters=0",
                                             f"--init_from={src}"]) == 0
    d = weights(dense / "ckpt.pt")
    assert all(torch.equal(a[k], d[k]) for k in d) and len(d) < len(a)


@pytest.mark.e2e
def test_learned_positions_serve_a_shorter_block_size_only(sources, data_dir, tmp_path, capsys):
    src = sources / "learned" / "ckpt.pt"
    out = tmp_path / "short"
    assert train_in_process(baseline_model, [f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=0",
                                             "--pos_encoding=learned", "--block_size=32", f"--init_from={src}"]) == 0
    assert torch.equal(weights(out / "ckpt.pt")["transformer.wpe.weight"], weights(src)["transformer.wpe.weight"][:32])
    capsys.readouterr()
    assert train_in_process(baseline_model, [f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'long'}",
                                             "--pos_encoding=learned", "--block_size=128", f"--init_from={src}"]) == 1
    assert "has learned positions for block_size=64, not this run's 128" in one_line(capsys.readouterr().err)


@pytest.mark.e2e
@pytest.mark.parametrize("case,needle", [
    ("asca_longer", "predictor is sized for 8 key blocks (block_size=64), this run has 16"),
    ("wider", "holds another architecture: n_embd=32 (this run: 48)"),
    ("other_pos", "holds another architecture: pos_encoding='rope' (this run: 'learned')"),
    ("missing", "there is no file"),
    ("eval_only", "start a run from it with --max_iters=0"),
])
def test_a_checkpoint_that_cannot_start_the_run_is_one_line(sources, data_dir, tmp_path, capsys, case, needle):
    common = [f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'o'}"]
    module, args = {
        "asca_longer": (novel_model, [*SPARSE, "--block_size=128", f"--init_from={sources / 'asca' / 'ckpt.pt'}"]),
        "wider": (baseline_model, ["--n_embd=48", f"--init_from={sources / 'rope' / 'ckpt.pt'}"]),
        "other_pos": (baseline_model, ["--pos_encoding=learned", f"--init_from={sources / 'rope' / 'ckpt.pt'}"]),
        "missing": (baseline_model, [f"--init_from={tmp_path / 'nope.pt'}"]),
        "eval_only": (baseline_model, ["--eval_only=True", f"--init_from={sources / 'rope' / 'ckpt.pt'}"]),
    }[case]
    assert train_in_process(module, common + args) == 1
    assert needle in one_line(capsys.readouterr().err)
    assert not (tmp_path / "o" / "ckpt.pt").exists()


@pytest.mark.e2e
def test_test_iters_scores_the_test_split_during_training(tmp_path, data_dir, capsys):
    """test_iters=2,4: the test split's bpc in iteration 2's metrics row and in final.json, equal to the final test of
    a run stopped at 2 on the same schedule; the test does not move the training (the last iteration scores what a
    run without it scores, through a run started from its checkpoint); a bad list is one line."""
    out = tmp_path / "run"
    common = [f"--data_dir={data_dir}", "--eval_interval=4"]
    assert train_in_process(baseline_model, common + [f"--out_dir={out}", "--max_iters=4", "--final_test=False"]) == 0
    at4 = tmp_path / "at4"
    assert train_in_process(baseline_model, common + [f"--out_dir={at4}", f"--init_from={out / 'ckpt.pt'}",
                                                      "--max_iters=0"]) == 0
    longer = tmp_path / "longer"
    assert train_in_process(baseline_model, common + [f"--out_dir={longer}", "--max_iters=4", "--test_iters=2,4",
                                                      "--eval_interval=10"]) == 0
    rows = {r["iter"]: r for r in map(json.loads, open(longer / "metrics.jsonl"))}
    at2 = tmp_path / "at2"
    assert train_in_process(baseline_model, common + [f"--out_dir={at2}", "--max_iters=2", "--lr_decay_iters=4"]) == 0
    assert rows[2]["test_bpc"] == json.load(open(at2 / "final.json"))["test_bpc"]
    final = json.load(open(longer / "final.json"))
    assert set(rows) == {0, 2, 4} and "test_bpc" in rows[2] and "test_bpc" not in rows[4]  # 4: the final test
    assert final["test_bpc_at_iter"] == {"2": rows[2]["test_bpc"]}
    assert final["test_bpc"] == json.load(open(at4 / "final.json"))["test_bpc"]
    capsys.readouterr()
    assert train_in_process(baseline_model, common + [f"--out_dir={tmp_path / 'bad'}", "--test_iters=5,x"]) == 1
    assert "test_iters='5,x' must be a comma list" in one_line(capsys.readouterr().err)


@pytest.mark.e2e
def test_max_iters_0_scores_an_asca_checkpoint_at_its_own_sparsity(tmp_path, data_dir):
    """--init_from=CKPT --max_iters=0 takes no step: an ASCA checkpoint is scored at its own schedule position (its
    trained sparsity), not at the fresh schedule's start, which is dense while the sparsity warms up."""
    import json
    import novel_model
    from helpers import train_in_process
    src = tmp_path / "src"
    common = [f"--data_dir={data_dir}", "--sparse_block_size=8", "--target_sparsity=0.5"]
    assert train_in_process(novel_model, common + [f"--out_dir={src}", "--max_iters=6", "--sparsity_warmup_iters=4",
                                                   "--final_test=True"]) == 0
    trained = json.load(open(src / "final.json"))
    out = tmp_path / "scored"
    assert train_in_process(novel_model, common + [f"--out_dir={out}", f"--init_from={src / 'ckpt.pt'}",
                                                   "--max_iters=0", "--sparsity_warmup_iters=4"]) == 0
    scored = json.load(open(out / "final.json"))
    assert trained["test_sparsity"] > 0.3
    assert scored["test_sparsity"] == trained["test_sparsity"] and scored["test_bpc"] == trained["test_bpc"]
