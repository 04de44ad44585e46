"""The synthetic associative-recall task (recall_task.py, prepare_dataset.py --synthetic recall): the generator's
layout written from its rules, the loader's whole-episode windows, the answer metric against a per-query count, the
task oracle's choice and causality, the trainer's metrics, and the bad specs as one line."""
import contextlib
import json
import math

import numpy as np
import pytest
import torch

import evaluate
import novel_model
import prepare_dataset
import recall_task as rt
from helpers import causality_violation, one_line, run_script, train_in_process

T = 128
SPEC = dict(n_records=6, n_queries=12, min_distance=40, tile=4)


@pytest.mark.parametrize("variant", ["A", "B"])
def test_episodes_follow_the_rules(variant):
    ep = rt.make_episodes(50, T, seed=3, variant=variant, **SPEC)
    assert ep.shape == (50, T + 1) and ep.dtype == np.uint8
    assert np.array_equal(ep, rt.make_episodes(50, T, seed=3, variant=variant, **SPEC))  # deterministic by seed
    assert not np.array_equal(ep, rt.make_episodes(50, T, seed=4, variant=variant, **SPEC))
    for e in ep:
        recs = {int(v - rt.RECORD0) // rt.N_VALUES: (t, int(v - rt.RECORD0) % rt.N_VALUES)
                for t, v in enumerate(e) if v >= rt.RECORD0}
        assert len(recs) == SPEC["n_records"] and all(t < T // 4 for t, _ in recs.values())  # distinct keys, early
        queries = [t for t, v in enumerate(e) if rt.QUERY0 <= v < rt.QUERY0 + rt.N_KEYS]
        assert len(queries) == SPEC["n_queries"]
        for t in queries:
            r, value = recs[int(e[t]) - rt.QUERY0]
            assert t - r >= SPEC["min_distance"] and t >= T // 2 and t + 1 <= T - 1
            assert e[t + 1] == rt.ANSWER0 + value  # the answer follows its query
            if variant == "A":
                assert t % SPEC["tile"] == 0
        others = [v for t, v in enumerate(e) if t not in queries and t - 1 not in queries and v < rt.RECORD0]
        assert all(rt.FILLER[0] <= v < rt.FILLER[1] for v in others)


def test_answers_are_found_from_the_bytes_alone():
    x = np.full((2, 16), 40, dtype=np.uint8)
    x[0, 1] = rt.RECORD0 + 3 * rt.N_VALUES + 5  # key 3, value 5
    x[0, 9] = rt.QUERY0 + 3
    x[0, 10] = rt.ANSWER0 + 5
    x[0, 12] = rt.QUERY0 + 7  # a key with no record in the window: not an answer
    x[1, 4] = rt.RECORD0 + 0 * rt.N_VALUES + 1
    x[1, 11] = rt.QUERY0
    x[1, 14] = rt.QUERY0  # the same key again: its answer could be copied from position 12, so not scored
    bi, ti, ans, dist = rt.answers(x)
    assert bi.tolist() == [0, 1] and ti.tolist() == [9, 11]
    assert ans.tolist() == [rt.ANSWER0 + 5, rt.ANSWER0 + 1] and dist.tolist() == [8, 7]


@pytest.fixture(scope="module")
def recall_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("recall")
    r = run_script("prepare_dataset.py", "--synthetic", "recall", "--out_dir", str(out), "--recall_T", str(T),
                   "--recall_records", "6", "--recall_queries", "12", "--recall_distance", "40", "--recall_tile", "4",
                   "--recall_episodes", "400", "--seed", "1")
    assert r.returncode == 0, r.stderr
    return str(out)


@pytest.mark.e2e
def test_the_data_dir_records_its_generator_and_windows_are_whole_episodes(recall_dir):
    ds = prepare_dataset.ByteDataset(recall_dir)
    assert ds.meta["align"] == T + 1 and ds.meta["synthetic"] == {
        "task": "recall", "T": T, "n_records": 6, "n_queries": 12, "min_distance": 40, "variant": "A", "tile": 4,
        "seed": 1, "episodes": 400}
    assert [len(ds.splits[s]) for s in ("train", "val", "test")] == [360 * (T + 1), 20 * (T + 1), 20 * (T + 1)]
    g = torch.Generator().manual_seed(0)
    x, y = ds.get_batch("train", 64, T, g)
    data = ds.splits["train"]
    for row in x.numpy():  # each window is one episode: its records come first, its queries find them
        start = next(s for s in range(0, len(data), T + 1) if np.array_equal(data[s:s + T], row))
        assert start % (T + 1) == 0
    distinct = sum(len({int(v) for v in row if rt.QUERY0 <= v < rt.QUERY0 + rt.N_KEYS}) for row in x.numpy())
    assert len(rt.answers(x.numpy())[0]) == distinct and 64 * 6 >= distinct >= 64 * 4  # each key's first query
    assert all(s % (T + 1) == 0 for s in ds.val_windows(T, 8))
    with pytest.raises(prepare_dataset.DataError, match=f"episodes of {T + 1} bytes.*block_size={T}"):
        ds.check_block_size(64)


class Cheat(torch.nn.Module):
    """Logits that put `margin` on the true next byte at every position: a model that knows every answer."""

    def __init__(self, data, align, margin):
        super().__init__()
        self.data, self.align, self.margin = data, align, margin

    def forward(self, x):
        y = np.stack([self.data[self.find(row) + 1:self.find(row) + 1 + x.shape[1]] for row in x.numpy()])
        return torch.nn.functional.one_hot(torch.as_tensor(y.astype(np.int64)), 256).float() * self.margin, None

    def find(self, row):
        for s in range(0, len(self.data), self.align):
            if np.array_equal(self.data[s:s + len(row)], row):
                return s
        raise AssertionError("not an episode")


@pytest.mark.e2e
def test_the_answer_metric_counts_each_query_once(recall_dir):
    ds = prepare_dataset.ByteDataset(recall_dir)
    data = ds.splits["test"]
    perfect = evaluate.recall_answers(Cheat(data, T + 1, 30.0), data, T + 1, T, 8, "cpu")
    episodes = np.asarray(data).reshape(20, T + 1)[:, :T]
    distinct = sum(len({int(v) for v in e if rt.QUERY0 <= v < rt.QUERY0 + rt.N_KEYS}) for e in episodes)
    assert perfect["answers"] == distinct and perfect["answer_acc"] == 1.0 and perfect["answer_bpc"] < 1e-6
    assert sum(b["answers"] for b in perfect["buckets"]) == distinct
    assert [b["lo"] for b in perfect["buckets"]] == [0, 43, 85] and [b["hi"] for b in perfect["buckets"]][-1] == T
    blind = evaluate.recall_answers(Cheat(data, T + 1, 0.0), data, T + 1, T, 8, "cpu")  # uniform over 256
    assert blind["answer_bpc"] == pytest.approx(8.0) and blind["answers"] == distinct


@pytest.mark.e2e
def test_the_test_split_of_episodes_is_scored_episode_by_episode(recall_dir):
    """The final test pass scores each episode in its own window (every byte after its first, once), as training
    sees it; a naive loop over episodes with the cross-entropy written out is the reference."""
    ds = prepare_dataset.ByteDataset(recall_dir)
    data = np.asarray(ds.splits["test"])
    torch.manual_seed(0)
    model = novel_model.GPT(novel_model.ASCAConfig(block_size=T, n_layer=1, n_head=2, n_embd=16,
                                                   sparse_block_size=4, target_sparsity=0.5)).eval()
    model.set_step(10 ** 6)
    bpc, n, _ = evaluate.test_bpc(model, model, ds, {"batch_size": 7, "block_size": T, "eval_stride": T // 2},
                                  "cpu", contextlib.nullcontext())
    bits = 0.0
    with torch.no_grad():
        for e in data.reshape(-1, T + 1).astype(np.int64):
            logits, _ = model(torch.as_tensor(e[None, :T]))
            logp = logits[0].double().log_softmax(-1)
            bits -= sum(logp[t, e[t + 1]].item() for t in range(T)) / math.log(2)
    assert n == 20 * T and bpc == pytest.approx(bits / n, rel=1e-6)


def test_the_task_oracle_keeps_the_asked_records_block_and_is_causal():
    ep = torch.as_tensor(rt.make_episodes(4, T, seed=5, variant="A", **SPEC)[:, :T].astype(np.int64))
    S, nb = 4, T // 4
    scores = rt.task_oracle_scores(ep, S, nb)
    for b in range(4):
        row = ep[b].numpy()
        for tile in range(nb):
            v = int(row[tile * S])
            if rt.QUERY0 <= v < rt.QUERY0 + rt.N_KEYS:
                r = next(t for t in range(tile * S) if row[t] >= rt.RECORD0 and (row[t] - rt.RECORD0) // 8 == v - 96)
                assert scores[b, tile].nonzero().flatten().tolist() == [r // S]
            else:
                assert scores[b, tile].sum() == 0
    torch.manual_seed(0)
    model = novel_model.make_model(n_layer=2, n_head=2, n_embd=32, block_size=T, sparse_block_size=S,
                                   target_sparsity=0.75, sparsity_warmup_iters=0, selector="task_oracle")
    model.eval()
    with torch.no_grad():
        model(ep)
    sel = model.attention_modules()[0].last_selection
    asked = scores[:, None].expand_as(sel.selected) > 0
    assert asked.any() and sel.selected[asked].all()  # every asked block is kept
    before, after = causality_violation(model, "eval")  # random bytes: queries and records appear by chance too
    assert before < 1e-5 and after > 1e-3


@pytest.mark.e2e
def test_a_run_on_the_task_logs_and_scores_its_answers(tmp_path, recall_dir):
    out = tmp_path / "o"
    assert train_in_process(novel_model, [f"--data_dir={recall_dir}", f"--out_dir={out}", f"--block_size={T}",
                                          "--sparse_block_size=4", "--target_sparsity=0.5", "--max_iters=4",
                                          "--eval_interval=2", "--eval_iters=2"]) == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert all(0.0 <= r["answer_acc"] <= 1.0 and r["answer_bpc"] > 0 for r in rows)
    final = json.load(open(out / "final.json"))["recall_task"]
    assert 20 * 4 <= final["answers"] <= 20 * 6 and len(final["buckets"]) == 3 and 0 <= final["answer_acc"] <= 1


@pytest.mark.e2e
@pytest.mark.parametrize("args,message", [
    (["--recall_distance", "200"], "min_distance=200 is beyond T=128"),
    (["--recall_records", "17"], "n_records=17 must be between 1 and 16"),
    (["--recall_queries", "40", "--recall_tile", "8"], "only 7 query positions"),
    (["--recall_episodes", "30"], "must be a positive multiple of 20"),
])
def test_a_spec_that_cannot_be_met_is_one_line(tmp_path, args, message):
    r = run_script("prepare_dataset.py", "--synthetic", "recall", "--out_dir", str(tmp_path / "d"), "--recall_T",
                   str(T), "--recall_distance", "40", "--recall_tile", "4", "--recall_queries", "12", *args)
    assert r.returncode == 1 and message in one_line(r.stderr)
    assert not (tmp_path / "d").exists()


@pytest.mark.e2e
def test_another_seed_is_another_dataset_to_compare(tmp_path):
    """Runs record their splits' sha256 (compare.py refuses to mix test sets): two seeds give two test sets."""
    shas = []
    for seed in ("1", "2"):
        r = run_script("prepare_dataset.py", "--synthetic", "recall", "--out_dir", str(tmp_path / seed), "--recall_T",
                       str(T), "--recall_distance", "40", "--recall_queries", "12", "--recall_episodes", "100",
                       "--seed", seed)
        assert r.returncode == 0, r.stderr
        shas.append(json.load(open(tmp_path / seed / "meta.json"))["splits"]["test"]["sha256"])
    assert shas[0] != shas[1]
