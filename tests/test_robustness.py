"""Nothing lost, nothing silently wrong: each test here failed on the code before its fix.
Data-loss tests check that the earlier bytes are still there afterwards."""
import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import baseline_model
import checkpoint
import novel_model
import trainer
from baseline_model import GPTConfig
from helpers import TINY, NaNAfter, one_line, run_script, train_in_process


def train(args, build_model=None, module=baseline_model):
    return train_in_process(module, args, build_model)


# ----------------------------------------------------------------------------- data loss

class NaNThenSignal(NaNAfter):
    """NaNAfter (loss NaN from iteration 6), and at iteration 7 a signal: a user's Ctrl-C after divergence."""

    def __init__(self, cfg, sig):
        super().__init__(GPTConfig.from_dict(cfg))
        self.sig = sig

    def forward(self, idx, targets=None):
        if self.training and getattr(self, "step", 0) == 7:
            os.kill(os.getpid(), self.sig)
        return super().forward(idx, targets)


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_after_nan_keeps_the_last_good_checkpoint(tmp_path, data_dir, capsys, sig):
    out = tmp_path / "nan"
    handler = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a job a shell put in the background
    rc = train([f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=50", "--eval_interval=4",
                "--log_interval=1000"], build_model=lambda cfg: NaNThenSignal(cfg, sig))
    assert rc == 1
    assert "NaN or inf" in one_line(capsys.readouterr().err)
    ck = checkpoint.load(str(out / "ckpt.pt"))
    assert ck["iter_num"] == 4 and all(torch.isfinite(v).all() for v in ck["model"].values())
    assert signal.getsignal(signal.SIGINT) is handler  # handlers restored


@pytest.mark.e2e
def test_rerun_into_a_run_directory_stops_instead_of_overwriting(tmp_path, data_dir, capsys):
    out = tmp_path / "r"
    assert train([f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=4", "--final_test=False"]) == 0
    before = {f: (out / f).read_bytes() for f in ("ckpt.pt", "best.pt", "metrics.jsonl")}
    capsys.readouterr()
    assert train([f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=4"]) == 1
    line = one_line(capsys.readouterr().err)
    assert "already holds a run" in line and "--init_from=resume" in line and "another --out_dir" in line
    assert {f: (out / f).read_bytes() for f in before} == before


@pytest.mark.e2e
def test_checkpoint_write_on_a_full_disk_is_one_line_and_keeps_the_old(tmp_path, data_dir, capsys, monkeypatch):
    out = tmp_path / "full"
    real, calls = checkpoint.save, []

    def full_disk(obj, path):
        calls.append(path)
        if len(calls) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path)

    monkeypatch.setattr(checkpoint, "save", full_disk)
    assert train([f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=8", "--eval_interval=4"]) == 1
    assert "No space left on device" in one_line(capsys.readouterr().err)
    assert checkpoint.load(str(out / "ckpt.pt"))["iter_num"] == 0


@pytest.mark.e2e
def test_stale_temp_files_are_removed_and_a_metrics_symlink_is_refused(tmp_path, data_dir, capsys):
    out = tmp_path / "t"
    assert train([f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2", "--final_test=False"]) == 0
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a PID that no longer runs
    (out / f"ckpt.pt.tmp.{dead.pid}").write_bytes(b"x" * 1000)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    (out / f"best.pt.tmp.{live.pid}").write_bytes(b"live")  # a live process's temp stays
    try:
        assert train([f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=3", "--init_from=resume",
                      "--final_test=False"]) == 0
    finally:
        live.kill()
    assert not (out / f"ckpt.pt.tmp.{dead.pid}").exists() and (out / f"best.pt.tmp.{live.pid}").exists()
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("not yours\n")
    os.remove(out / "metrics.jsonl")
    os.symlink(elsewhere, out / "metrics.jsonl")
    capsys.readouterr()
    assert train([f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=4", "--init_from=resume"]) == 1
    assert "symlink" in one_line(capsys.readouterr().err)
    assert elsewhere.read_text() == "not yours\n"


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_final_test_stops_at_once(tmp_path, data_dir, capsys, monkeypatch, sig):
    real = trainer.Trainer.test_bpc

    def interrupted(self, *args, **kwargs):
        os.kill(os.getpid(), sig)
        time.sleep(0.2)  # the handler runs here
        return real(self, *args, **kwargs)

    monkeypatch.setattr(trainer.Trainer, "test_bpc", interrupted)
    out = tmp_path / "ft"
    assert train([f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=4"]) == 130
    line = one_line(capsys.readouterr().err)
    assert "interrupted" in line and "--eval_only=True --init_from=resume" in line
    assert checkpoint.load(str(out / "ckpt.pt"))["iter_num"] == 4 and not (out / "final.json").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# ----------------------------------------------------------------------------- resume continues the checkpoint's run

@pytest.mark.e2e
def test_resume_keeps_the_checkpoints_schedule_unless_overridden(tmp_path, data_dir, capsys):
    out = tmp_path / "s"
    common = [f"--data_dir={data_dir}", f"--out_dir={out}", "--sparse_block_size=8", "--final_test=False",
              "--eval_interval=2"]
    assert train(common + ["--target_sparsity=0.3", "--sparsity_warmup_iters=4", "--max_iters=4"],
                 module=novel_model) == 0
    capsys.readouterr()
    # the README's "continue" line: config + --init_from=resume + a longer run; the config says 0.5 and warm-up 0
    assert train(common + ["--init_from=resume", "--max_iters=6", "--sparsity_warmup_iters=4"], module=novel_model) == 0
    text = capsys.readouterr().out
    assert "kept the checkpoint's target_sparsity=0.3" in text
    assert json.load(open(out / "config.json"))["target_sparsity"] == 0.3
    last = [json.loads(l) for l in open(out / "metrics.jsonl")][-1]
    assert last["iter"] == 6 and abs(last["sparsity"] - 0.3) <= 0.02
    assert train(common + ["--init_from=resume", "--max_iters=8", "--target_sparsity=0.5"], module=novel_model) == 0
    assert "overriding the checkpoint's settings from the command line: max_iters 6 -> 8, target_sparsity 0.3 -> 0.5" \
        in capsys.readouterr().out
    last = [json.loads(l) for l in open(out / "metrics.jsonl")][-1]
    assert last["iter"] == 8 and abs(last["sparsity"] - 0.5) <= 0.02


@pytest.mark.e2e
def test_resuming_another_kind_names_the_kind_first(tmp_path, data_dir, capsys):
    out = tmp_path / "k"
    assert train([f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2", "--final_test=False"]) == 0
    capsys.readouterr()
    assert train([f"--data_dir={data_dir}", f"--out_dir={out}", "--init_from=resume"], module=novel_model) == 1
    line = one_line(capsys.readouterr().err)
    assert "'baseline' model" in line and "baseline_model.py" in line


# ----------------------------------------------------------------------------- checkpoints cannot run code

class RunsAShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("trained") / "run"
    assert train([f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=4", "--final_test=False"]) == 0
    return out


@pytest.mark.e2e
def test_a_crafted_checkpoint_does_not_run_code(tmp_path, trained, data_dir):
    marker = tmp_path / "pwned"
    ck = torch.load(trained / "ckpt.pt", weights_only=True)
    ck["env"] = RunsAShellCommand(marker)
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save(ck, evil / "ckpt.pt")
    r = run_script("sample.py", f"--out_dir={evil}", "--num_bytes=5")
    assert r.returncode == 1 and "refusing to load" in one_line(r.stderr) and "posix.system" in r.stderr
    r = run_script("baseline_model.py", TINY, f"--data_dir={data_dir}", f"--out_dir={evil}", "--init_from=resume")
    assert r.returncode == 1 and "refusing to load" in one_line(r.stderr)
    r = run_script("extraction.py", str(evil))
    assert r.returncode == 1 and "refusing to load" in one_line(r.stderr)
    assert not marker.exists()
    with open(tmp_path / "plain.pkl", "wb") as f:  # the same object does run code when unpickled plainly:
        pickle.dump(RunsAShellCommand(marker), f)  # the test would catch a loader that did so
    with open(tmp_path / "plain.pkl", "rb") as f:
        pickle.load(f)
    assert marker.exists()


@pytest.mark.e2e
@pytest.mark.parametrize("key", ["model_args", "model", "optimizer", "data_generator", "best_val_bpc"])
def test_a_checkpoint_missing_a_key_is_one_line_naming_it(tmp_path, trained, data_dir, key):
    ck = torch.load(trained / "ckpt.pt", weights_only=True)
    del ck[key]
    out = tmp_path / "m"
    out.mkdir()
    torch.save(ck, out / "ckpt.pt")
    r = run_script("baseline_model.py", TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--init_from=resume")
    assert r.returncode == 1 and f"lacks '{key}'" in one_line(r.stderr)
    if key in ("model_args", "model"):
        r = run_script("sample.py", f"--out_dir={out}", "--num_bytes=5")
        assert r.returncode == 1 and f"lacks '{key}'" in one_line(r.stderr)


@pytest.mark.e2e
def test_a_checkpoint_written_by_the_previous_format_loads_samples_and_resumes(tmp_path, trained, data_dir):
    """Before this change the numpy RNG state was numpy's own tuple (an ndarray) and env held a TorchVersion."""
    ck = torch.load(trained / "ckpt.pt", weights_only=True)
    for r in ck["rng"]:
        n = r["numpy"]
        r["numpy"] = (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
        r["python"] = tuple(r["python"])
    ck["env"]["torch"] = torch.__version__  # a TorchVersion, as before
    old = tmp_path / "old"
    old.mkdir()
    torch.save(ck, old / "ckpt.pt")
    assert set(torch.serialization.get_unsafe_globals_in_checkpoint(str(old / "ckpt.pt"))) <= checkpoint.LEGACY_GLOBALS
    r = run_script("sample.py", f"--out_dir={old}", "--num_bytes=20", "--start=the ")
    assert r.returncode == 0 and r.stdout.startswith("the "), r.stderr
    assert train([f"--data_dir={data_dir}", f"--out_dir={old}", "--init_from=resume", "--max_iters=6",
                  "--final_test=False"]) == 0
    assert checkpoint.load(str(old / "ckpt.pt"))["iter_num"] == 6


@pytest.mark.e2e
def test_new_checkpoints_hold_only_tensors_and_plain_values(trained):
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(trained / "ckpt.pt")) == []
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(trained / "best.pt")) == []


# ----------------------------------------------------------------------------- bad input: one line, naming the fix

@pytest.mark.e2e
@pytest.mark.parametrize("arg,needle", [
    ("--learning_rate=nan", "learning_rate=nan must be a positive finite number"),
    ("--learning_rate=-1", "learning_rate=-1.0 must be a positive finite number"),
    ("--seed=-1", "seed must be >= 0"),
    ("--device=CPU", "device='CPU' is not one of auto, cpu, cuda"),
    ("--max_iters=-5", "max_iters must be >= 0"),
    ("--block_size=0", "block_size must be at least 1"),
    ("--out_dir=", "out_dir is empty"),
    ("--min_lr=1.0", "min_lr=1.0 must be in [0, learning_rate"),
])
def test_bad_settings_are_one_line_errors(tmp_path, data_dir, capsys, arg, needle):
    rc = train([f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'o'}", arg])
    assert rc == 1
    assert needle in one_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


@pytest.mark.e2e
@pytest.mark.parametrize("args,needle", [
    (["--top_k=-3"], "--top_k must be at least 1"),
    (["--temperature=nan"], "--temperature must be a finite number >="),
    (["--num_bytes=-1"], "--num_bytes must be >= 0"),
    pytest.param(["--device=cuda"], "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")),
])
def test_sample_bad_arguments(trained, args, needle):
    r = run_script("sample.py", f"--out_dir={trained}", *args)
    assert r.returncode == 1 and needle in one_line(r.stderr)


@pytest.mark.e2e
@pytest.mark.parametrize("args,needle", [(["--chars_len", "0"], "--chars_len must be at least 1"),
                                         (["--length", "-3"], "--length must be at least 1")])
def test_extraction_bad_arguments(trained, args, needle):
    r = run_script("extraction.py", str(trained), *args)
    assert r.returncode == 1 and needle in one_line(r.stderr)
