"""Equal wall-clock as a protocol: schedules follow the time budget, iteration runs are
unchanged, resume keeps the training time, and compare.py writes the table its runs' final.json give."""
import json
import math
import os

import pytest

import baseline_model
import compare
import novel_model
import trainer
from helpers import TINY, train_in_process


def nanogpt_lr(it, warmup, decay, lr, min_lr):
    """nanoGPT's get_lr, written out again as the reference for iteration runs."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay:
        return min_lr
    ratio = (it - warmup) / (decay - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def test_iteration_runs_keep_the_nanogpt_schedule_bitwise():
    cfg = dict(learning_rate=2e-3, min_lr=2e-4, warmup_iters=50, lr_decay_iters=1000, decay_lr=True)
    for it in range(0, 1100):
        assert trainer.get_lr(it, cfg) == nanogpt_lr(it, 50, 1000, 2e-3, 2e-4), it
        assert trainer.get_lr(it, cfg, it) == trainer.get_lr(it, cfg)


def read_rows(path):
    return [json.loads(l) for l in open(path)]


@pytest.mark.e2e
def test_a_time_budget_run_ends_at_min_lr_with_sparsity_at_target(tmp_path, data_dir):
    out = tmp_path / "t"
    # max_iters far beyond what 3 s allow: only the clock can end this run, and the schedules follow it
    assert train_in_process(novel_model, [f"--data_dir={data_dir}", f"--out_dir={out}", "--max_time_s=3",
                                          "--max_iters=1000000", "--eval_interval=10", "--warmup_iters=5",
                                          "--sparse_block_size=8", "--target_sparsity=0.5",
                                          "--sparsity_warmup_iters=500000", "--final_test=False"]) == 0
    final = json.load(open(out / "final.json"))
    cfg = json.load(open(out / "config.json"))
    assert final["stop_reason"] == "max_time_s" and final["iters"] < 1000000
    assert final["final_lr"] == pytest.approx(cfg["min_lr"]) and abs(final["sparsity"] - 0.5) <= 0.02
    rows = read_rows(out / "metrics.jsonl")
    assert rows[-1]["progress"] == 1.0 and rows[-1]["lr"] == pytest.approx(cfg["min_lr"])
    mid = [r for r in rows if 0.1 < r["progress"] < 0.9]
    assert mid, rows  # the run decays along the way, not in one jump at the end
    for r in mid:
        assert r["progress"] == pytest.approx(r["elapsed_s"] / 3, abs=0.02)  # progress is the clock's
        assert cfg["min_lr"] < r["lr"] < cfg["learning_rate"]
    half = [r for r in rows if r["progress"] >= 0.55]
    assert all(abs(r["sparsity"] - 0.5) <= 0.02 for r in half)  # warm-up ended at half the budget


@pytest.mark.e2e
def test_resume_continues_the_training_time(tmp_path, data_dir):
    out = tmp_path / "r"
    common = [f"--data_dir={data_dir}", f"--out_dir={out}", "--eval_interval=10", "--final_test=False"]
    assert train_in_process(novel_model, common + ["--max_iters=20", "--sparse_block_size=8"]) == 0
    saved = json.load(open(out / "final.json"))["train_time_s"]
    budget = saved * 4
    assert train_in_process(novel_model, common + ["--init_from=resume", "--max_iters=40",
                                                   f"--max_time_s={budget}"]) == 0
    rows = read_rows(out / "metrics.jsonl")
    after = [r for r in rows if r["iter"] > 20]
    assert after and all(r["progress"] >= max(r["iter"] / 40, saved / budget) - 1e-9 for r in after)
    assert after[0]["elapsed_s"] > saved


def write_spec(path, data_dir, out, second_args=()):
    path.write_text(f'''
RUNS = [("dense", "baseline_model.py", ["{TINY}", "--data_dir={data_dir}"]),
        ("sparse", "novel_model.py", ["{TINY}", "--data_dir={data_dir}", "--sparse_block_size=8",
                                      "--target_sparsity=0.5", "--sparsity_warmup_iters=4", *{list(second_args)!r}])]
BUDGET = {{"max_iters": 8}}
SEEDS = [1, 2]
OUT = "{out}"
''')
    return str(path)


@pytest.mark.e2e
def test_compare_runs_seeds_and_writes_the_table_of_their_final_json(tmp_path, data_dir):
    out = tmp_path / "cmp"
    spec = write_spec(tmp_path / "spec.py", data_dir, out)
    assert compare.main([spec]) == 0
    table = (out / "comparison.md").read_text()
    finals = {(n, s): json.load(open(out / f"{n}_s{s}" / "final.json")) for n in ("dense", "sparse") for s in (1, 2)}
    assert all(f["iters"] == 8 for f in finals.values())
    for name in ("dense", "sparse"):
        row = next(l for l in table.splitlines() if l.startswith(f"| {name} |"))
        tests = [finals[(name, s)]["test_bpc"] for s in (1, 2)]
        m, sd = sum(tests) / 2, abs(tests[0] - tests[1]) / math.sqrt(2)
        assert f"{m:.4f} ± {sd:.4f}" in row and "| 2/2 |" in row
        diffs = [finals[(name, s)]["test_bpc"] - finals[("dense", s)]["test_bpc"] for s in (1, 2)]
        assert f"{sum(diffs) / 2:+.4f}" in row
        assert row.rstrip().endswith("| - |")  # same protocol as the first run
    assert os.path.getsize(out / "compare_runs.png") > 5000
    # comparison.json: every counted seed's test bpc, which README's figure is drawn from (extraction.py --headline)
    summary = json.load(open(out / "comparison.json"))
    assert [(r["name"], r["seeds"], r["test_bpc"]) for r in summary["rows"]] == [
        (n, [1, 2], [finals[(n, s)]["test_bpc"] for s in (1, 2)]) for n in ("dense", "sparse")]
    import extraction
    assert extraction.main(["--headline", str(tmp_path / "fig.png"), str(out / "comparison.json")]) == 0
    assert os.path.getsize(tmp_path / "fig.png") > 5000
    (tmp_path / "bad.json").write_text('{"rows": [{"name": "x"}]}')
    assert extraction.main(["--headline", str(tmp_path / "fig2.png"), str(tmp_path / "bad.json")]) == 1
    # what each run cost, per seed: analytic FLOPs with each step at its own schedule (the sparse run's warm-up
    # steps are denser than its last), tokens and tokens/s; the frontier figure reads them
    rows = {r["name"]: r for r in summary["rows"]}
    tokens = 8 * 4 * 64  # iterations x batch x block_size of the tiny config
    assert rows["dense"]["tokens"] == rows["sparse"]["tokens"] == [tokens, tokens]
    dense_model = baseline_model.make_model(n_layer=2, n_head=2, n_embd=32, block_size=64)
    assert rows["dense"]["train_flops"] == [pytest.approx(tokens * dense_model.flops_per_token())] * 2
    sparse_cfg = json.load(open(out / "sparse_s1" / "config.json"))
    sparse_model = novel_model.make_model(**{k: sparse_cfg[k] for k in novel_model.ASCAConfig.declarations()
                                             if k in sparse_cfg})
    per_step = []
    for i in range(8):  # the trainer's schedule: step i runs at position i
        sparse_model.set_step(i, i / 8)
        per_step.append(tokens / 8 * sparse_model.flops_per_token())
    assert rows["sparse"]["train_flops"] == [pytest.approx(sum(per_step))] * 2
    assert per_step[0] > per_step[-1] and sum(per_step) < 8 * per_step[0]  # skipping saved compute
    assert all(x > 0 for x in rows["sparse"]["tokens_per_s"]) and rows["sparse"]["block_size"] == [64, 64]
    assert extraction.main(["--frontier", str(tmp_path / "frontier.png"), str(out / "comparison.json")]) == 0
    assert os.path.getsize(tmp_path / "frontier.png") > 5000
    mtime = os.path.getmtime(out / "sparse_s2" / "final.json")
    assert compare.main([spec]) == 0  # finished runs are kept, not run again
    assert os.path.getmtime(out / "sparse_s2" / "final.json") == mtime


@pytest.mark.e2e
def test_compare_flags_mixed_protocols(tmp_path, data_dir):
    out = tmp_path / "mix"
    spec = write_spec(tmp_path / "spec.py", data_dir, out,
                      second_args=("--block_size=32", "--eval_stride=16", "--target_sparsity=0.3"))
    assert compare.main([spec, "--seeds", "1"]) == 0
    row = next(l for l in (out / "comparison.md").read_text().splitlines() if l.startswith("| sparse |"))
    assert "not comparable" in row and "**block_size**" in row and "**eval_stride**" in row


@pytest.mark.e2e
def test_compare_spec_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("RUNS = []\nBUDGET = {'max_iters': 1}\n")
    assert compare.main([str(bad)]) == 1
    assert "RUNS must be a non-empty list" in capsys.readouterr().err


@pytest.mark.e2e
def test_compare_rows_may_name_their_own_seeds(tmp_path, capsys):
    """A row's 4th element gives its seeds (the headline pair of compare/cpu_long.py has two, the controls one);
    --seeds overrides every row; bad per-row seeds are one-line errors naming the row."""
    spec = tmp_path / "own.py"
    spec.write_text("RUNS = [('a', 'baseline_model.py', [], [1, 2]), ('b', 'novel_model.py', [])]\n"
                    "BUDGET = {'max_iters': 1}\nSEEDS = [7]\n")
    s = compare.load_spec(str(spec))
    assert [compare.run_seeds(s, r[3]) for r in s["runs"]] == [[1, 2], [7]]
    s["seeds"], s["seeds_overridden"] = [3], True
    assert [compare.run_seeds(s, r[3]) for r in s["runs"]] == [[3], [3]]
    spec.write_text("RUNS = [('a', 'baseline_model.py', [], [1, 1])]\nBUDGET = {'max_iters': 1}\n")
    assert compare.main([str(spec)]) == 1
    err = capsys.readouterr().err
    assert "run 'a'" in err and "repeat" in err and err.count("\n") == 1
    long = compare.load_spec(os.path.join(os.path.dirname(compare.__file__), "compare", "cpu_long.py"))
    assert {r[0]: compare.run_seeds(long, r[3]) for r in long["runs"]}["learned_0.875"] == [1337, 1338]


@pytest.mark.e2e
def test_compare_jobs_runs_side_by_side_and_scores_the_same(tmp_path, data_dir, monkeypatch):
    """--jobs=2 trains two runs at once and gives every run the test bpc it gets one at a time (equal iterations do
    not depend on speed; one thread each, so the float sums are the same)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    finals = {}
    for jobs in (1, 2):
        out = tmp_path / f"j{jobs}"
        spec = write_spec(tmp_path / f"spec{jobs}.py", data_dir, out)
        assert compare.main([spec, f"--jobs={jobs}"]) == 0
        finals[jobs] = {(n, s): json.load(open(out / f"{n}_s{s}" / "final.json"))["test_bpc"]
                        for n in ("dense", "sparse") for s in (1, 2)}
    assert finals[1] == finals[2]


@pytest.mark.e2e
def test_compare_jobs_keeps_at_most_that_many_running(tmp_path, monkeypatch):
    """The scheduler alone, with fake processes: never more than --jobs at once, every run started, a failure
    counted; an equal-wall-clock spec refuses --jobs > 1 in one line."""
    live, most, started = [], [0], []

    class FakeRun:
        def __init__(self, cmd, **kw):
            self.polls, self.returncode, self.name = 0, None, next(a for a in cmd if a.startswith("--out_dir="))
            live.append(self)
            started.append(self.name)
            most[0] = max(most[0], len(live))

        def poll(self):
            self.polls += 1
            if self.polls >= 3 and self.returncode is None:
                self.returncode = 1 if self.name.endswith("b_s2") else 0
                live.remove(self)
            return self.returncode

    monkeypatch.setattr(compare.subprocess, "Popen", FakeRun)
    monkeypatch.setattr(compare.time, "sleep", lambda s: None)
    spec = tmp_path / "s.py"
    spec.write_text(f"RUNS = [('a', 'baseline_model.py', []), ('b', 'novel_model.py', [])]\n"
                    f"BUDGET = {{'max_iters': 1}}\nSEEDS = [1, 2, 3]\nOUT = '{tmp_path / 'o'}'\n")
    s = compare.load_spec(str(spec))
    assert compare.execute(s, log=lambda m: None, jobs=2) == 1
    assert most[0] == 2 and len(started) == 6 and not live
    spec.write_text("RUNS = [('a', 'baseline_model.py', [])]\nBUDGET = {'max_time_s': 60}\n")
    assert compare.main([str(spec), "--jobs=2"]) == 1


@pytest.mark.e2e
def test_compare_starts_a_run_from_an_earlier_rows_checkpoint_after_it(tmp_path, monkeypatch, capsys):
    """{run:NAME} in a row's arguments is NAME's ckpt.pt of the same seed, and with --jobs that row starts only once
    NAME's run of that seed has finished; a later or unknown row, or other seeds, are one-line spec errors. A row
    that sets a budget key itself keeps its own value."""
    events, live = [], []

    class FakeRun:
        def __init__(self, cmd, **kw):
            self.cmd, self.polls, self.returncode = cmd, 0, None
            self.out = next(a for a in cmd if a.startswith("--out_dir="))[len("--out_dir="):]
            events.append(("start", os.path.basename(self.out)))
            live.append(self)

        def poll(self):
            self.polls += 1
            if self.polls >= 4 and self.returncode is None:
                self.returncode = 0
                with open(os.path.join(self.out, "final.json"), "w") as f:  # a finished run, as the trainer leaves it
                    json.dump({"iters": 1}, f)
                live.remove(self)
                events.append(("end", os.path.basename(self.out)))
            return self.returncode

    monkeypatch.setattr(compare.subprocess, "Popen", FakeRun)
    monkeypatch.setattr(compare.time, "sleep", lambda s: None)
    spec = tmp_path / "s.py"
    out = tmp_path / "o"
    spec.write_text(f"RUNS = [('short', 'baseline_model.py', ['--max_iters=3']), ('long', 'novel_model.py', "
                    f"['--init_from={{run:short}}'])]\nBUDGET = {{'max_iters': 1}}\nSEEDS = [1, 2]\nOUT = '{out}'\n")
    s = compare.load_spec(str(spec))
    started = []
    monkeypatch.setattr(compare.subprocess, "Popen", lambda cmd, **kw: started.append(cmd) or FakeRun(cmd, **kw))
    assert compare.execute(s, log=lambda m: None, jobs=2) == 0
    for seed in (1, 2):
        assert events.index(("end", f"short_s{seed}")) < events.index(("start", f"long_s{seed}"))
        cmd = next(c for c in started if f"--out_dir={out / f'long_s{seed}'}" in c)
        assert f"--init_from={out / f'short_s{seed}' / 'ckpt.pt'}" in cmd and "--max_iters=1" in cmd
        short = next(c for c in started if f"--out_dir={out / f'short_s{seed}'}" in c)
        assert [a for a in short if a.startswith("--max_iters")] == ["--max_iters=3"]  # a row's own budget wins
    assert events[:2] == [("start", "short_s1"), ("start", "short_s2")]  # independent runs still go side by side
    for text, needle in (("[('a', 'baseline_model.py', ['--init_from={run:b}']), ('b', 'baseline_model.py', [])]",
                          "names {run:b}, which is not a row before it"),
                         ("[('a', 'baseline_model.py', [], [1]), ('b', 'baseline_model.py', ['--init_from={run:a}'])]",
                          "both need the same seeds")):
        spec.write_text(f"RUNS = {text}\nBUDGET = {{'max_iters': 1}}\nSEEDS = [3]\n")
        capsys.readouterr()
        assert compare.main([str(spec)]) == 1
        assert needle in capsys.readouterr().err


def test_the_instruments_table_holds_recall_and_every_copy_bucket():
    """compare.py's second table: the mean recall of each choice over seeds, and the copy test's copied / unplanted
    bpc per distance bucket, over the union of the runs' buckets (runs with another copy length have others)."""
    from types import SimpleNamespace as NS

    def run(recall, buckets):
        final = {"test_recall": recall, "test_recall_local": recall - 0.1, "test_recall_oracle": recall + 0.1,
                 "copy_test": {"buckets": [{"lo": lo, "hi": hi, "bpc_copy": c, "bpc_plain": u}
                                           for lo, hi, c, u in buckets]}}
        return NS(final=final)

    groups = [("dense", "", [], [NS(final={"test_bpc": 2.0})], [], 1),
              ("a", "", [], [run(0.5, [(64, 127, 1.0, 2.0)]), run(0.7, [(64, 127, 2.0, 2.0)])], [], 2),
              ("b", "", [], [run(0.4, [(256, 511, 0.5, 2.5)])], [], 1)]
    lines = compare.probe_table(groups)
    head = next(l for l in lines if l.startswith("| run |"))
    assert head.endswith("| copy 64-127 | copy 256-511 |")
    a = next(l for l in lines if l.startswith("| a |"))
    assert "| 0.600 ± 0.141 | 0.500 ± 0.141 | 0.700 ± 0.141 | 1.50 / 2.00 | n/a |" in a
    assert next(l for l in lines if l.startswith("| b |")).endswith("| n/a | 0.50 / 2.50 |")
    assert not any(l.startswith("| dense |") for l in lines)  # no instruments, no row
    assert compare.probe_table(groups[:1]) == []
