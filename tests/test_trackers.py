"""Optional trackers: what wandb and TensorBoard receive is exactly what metrics.jsonl holds, at the
same steps, across a resume; off by default; a missing package is a one-line error. No network: wandb is a
fake module injected in sys.modules (its API as wandb.init / run.log / run.summary / run.finish), and the
TensorBoard event files are read back with tensorboard's own reader."""
import json
import sys
import types

import pytest

import novel_model
import trackers
from helpers import one_line, train_in_process


class FakeRun:
    def __init__(self, calls, kwargs):
        self.calls, self.kwargs, self.summary = calls, kwargs, {}
        calls.append(("init", kwargs))

    def log(self, row, step):
        self.calls.append(("log", step, dict(row)))

    def finish(self):
        self.calls.append(("finish", dict(self.summary)))


@pytest.fixture
def fake_wandb(monkeypatch):
    calls = []
    mod = types.ModuleType("wandb")
    mod.init = lambda **kw: FakeRun(calls, kw)
    monkeypatch.setitem(sys.modules, "wandb", mod)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", "/nonexistent")  # no ~/.netrc: no API key, so offline
    return calls


def metrics_rows(out):
    return [json.loads(l) for l in open(out / "metrics.jsonl")]


COMMON = ["--sparse_block_size=8", "--target_sparsity=0.5", "--sparsity_warmup_iters=4", "--eval_interval=4"]


@pytest.mark.e2e
def test_wandb_gets_every_metrics_row_and_resumes_the_same_run(tmp_path, data_dir, fake_wandb):
    out = tmp_path / "w"
    assert train_in_process(novel_model, [f"--data_dir={data_dir}", f"--out_dir={out}", *COMMON, "--max_iters=8",
                                          "--wandb_log=True", "--wandb_project=p"]) == 0
    assert train_in_process(novel_model, [f"--out_dir={out}", "--init_from=resume", "--max_iters=12"]) == 0
    inits = [c[1] for c in fake_wandb if c[0] == "init"]
    assert len(inits) == 2 and inits[0]["id"] == inits[1]["id"] == (out / "wandb_id.txt").read_text().strip()
    assert all(k["resume"] == "allow" and k["mode"] == "offline" and k["project"] == "p" and k["name"] == "w"
               and k["dir"] == str(out) for k in inits)
    assert inits[0]["config"]["target_sparsity"] == 0.5 and inits[0]["config"]["wandb_log"] is True
    logged = [(c[1], c[2]) for c in fake_wandb if c[0] == "log"]
    rows = metrics_rows(out)
    assert [s for s, _ in logged] == [r["iter"] for r in rows] == [0, 4, 8, 12]  # no step twice, none missing
    for (step, got), row in zip(logged, rows):
        assert got == trackers.flatten(row)
        assert got["val_bpc"] == row["val_bpc"] and got["sparsity_per_layer/1"] == row["sparsity_per_layer"][1]
        assert got["sparsity_per_head_per_layer/1/0"] == row["sparsity_per_head_per_layer"][1][0]
    finishes = [c[1] for c in fake_wandb if c[0] == "finish"]
    assert len(finishes) == 2 and finishes[-1]["test_bpc"] == json.load(open(out / "final.json"))["test_bpc"]


@pytest.mark.e2e
def test_tensorboard_event_files_hold_the_metrics_rows(tmp_path, data_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "tb"
    assert train_in_process(novel_model, [f"--data_dir={data_dir}", f"--out_dir={out}", *COMMON, "--max_iters=8",
                                          "--tensorboard_log=True"]) == 0
    assert train_in_process(novel_model, [f"--out_dir={out}", "--init_from=resume", "--max_iters=12"]) == 0
    ea = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    rows = metrics_rows(out)
    flat = [trackers.flatten(r) for r in rows]
    for name in ("val_bpc", "train_bpc", "sparsity", "lr", "sparsity_per_head_per_layer/1/1"):
        events = ea.Scalars(name)
        want = [(r["iter"], f[name]) for r, f in zip(rows, flat) if name in f]
        assert [e.step for e in events] == [s for s, _ in want]  # the same steps, across the resume
        assert all(e.value == pytest.approx(v, rel=1e-6, abs=1e-7) for e, (_, v) in zip(events, want))
    assert ea.Scalars("final/test_bpc")[-1].value == pytest.approx(json.load(open(out / "final.json"))["test_bpc"],
                                                                  rel=1e-6)


@pytest.mark.e2e
def test_trackers_are_off_by_default_and_a_missing_package_is_one_line(tmp_path, data_dir, capsys, monkeypatch):
    out = tmp_path / "off"
    assert train_in_process(novel_model, [f"--data_dir={data_dir}", f"--out_dir={out}", *COMMON, "--max_iters=4",
                                          "--final_test=False"]) == 0
    assert not (out / "tb").exists() and not (out / "wandb_id.txt").exists() and not (out / "wandb").exists()
    for key, package in (("wandb_log", "wandb"), ("tensorboard_log", "tensorboard")):
        monkeypatch.setitem(sys.modules, package, None)  # import fails, as when it is not installed
        rc = train_in_process(novel_model, [f"--data_dir={data_dir}", f"--out_dir={tmp_path / key}", *COMMON,
                                            f"--{key}=True"])
        assert rc == 1
        line = one_line(capsys.readouterr().err)
        assert f"needs the {package} package" in line and f"pip install {package}" in line
        assert not (tmp_path / key).exists()  # refused before anything was written


def test_flatten_keeps_numbers_and_names_list_positions():
    row = {"iter": 3, "a": 1.5, "b": None, "c": [0.1, None, [2, 3]], "d": "text", "e": True, "f": {"x": 1}}
    assert trackers.flatten(row) == {"iter": 3, "a": 1.5, "c/0": 0.1, "c/2/0": 2, "c/2/1": 3, "e": 1, "f/x": 1}
