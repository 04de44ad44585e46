"""The shared training loop, through the baseline: causality, eval protocol, exact resume,
atomic checkpoints, signals, NaN stops, eval_only, sampling, and DDP on CPU."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import baseline_model
import checkpoint
import evaluate
import runtime
from baseline_model import GPTConfig, make_model
from helpers import ROOT, TINY, NaNAfter, run_script, train_in_process


def train(args, build_model=None):
    return train_in_process(baseline_model, args, build_model)


def read_jsonl(path):
    return [json.loads(l) for l in open(path)]


# ----------------------------------------------------------------------------- model

@pytest.mark.parametrize("mode", ["train", "eval"])
def test_baseline_is_causal(mode):
    torch.manual_seed(0)
    model = make_model(n_layer=2, n_head=2, n_embd=32, block_size=64, dropout=0.1 if mode == "train" else 0.0)
    model.train(mode == "train")
    idx = torch.randint(0, 256, (2, 64))
    for t in (1, 17, 40, 63):
        other = idx.clone()
        other[:, t:] = torch.randint(0, 256, other[:, t:].shape)
        torch.manual_seed(1)
        a, _ = model(idx)
        torch.manual_seed(1)  # same dropout masks for both passes
        b, _ = model(other)
        assert (a[:, :t] - b[:, :t]).abs().max().item() < 1e-5, f"logits before {t} moved"
        assert (a[:, t:] - b[:, t:]).abs().max().item() > 1e-3, "changing bytes changed nothing after them"


def test_forward_shapes_and_loss_value():
    torch.manual_seed(0)
    model = make_model(n_layer=1, n_head=2, n_embd=16, block_size=32)
    idx, tgt = torch.randint(0, 256, (3, 32)), torch.randint(0, 256, (3, 32))
    logits, loss = model(idx, tgt)
    assert logits.shape == (3, 32, 256)
    ref = -torch.log_softmax(logits, -1).gather(-1, tgt[..., None]).mean()
    assert torch.allclose(loss, ref, atol=1e-6)
    assert abs(loss.item() - math.log(256)) < 0.1  # GPT-2 init: near-uniform predictions


def test_make_model_rejects_unknown_and_bad_shapes():
    with pytest.raises(TypeError, match="n_layr"):
        make_model(n_layr=2)
    with pytest.raises(ValueError, match="divisible"):
        make_model(n_embd=30, n_head=4)


# ----------------------------------------------------------------------------- evaluation

def test_stream_eval_matches_naive_per_position_loop():
    torch.manual_seed(0)
    model = make_model(n_layer=1, n_head=2, n_embd=16, block_size=16).eval()
    data = np.random.default_rng(0).integers(0, 256, 97).astype(np.uint8)
    for stride in (5, 8, 16):
        got, n = evaluate.evaluate_stream(model, data, 16, stride, batch_size=7, device="cpu")
        # naive: each target p alone, with the context the protocol gives it
        total = 0.0
        for p in range(1, len(data)):
            if p <= 16:
                start = 0
            else:  # window k >= 1 ends at target 16 + k*stride, scores (end - stride, end]
                k = math.ceil((p - 16) / stride)
                start = min(16 + k * stride, len(data) - 1) - 16
            x = torch.tensor(data[start:start + 16].astype(np.int64))[None]
            with torch.no_grad():
                logits, _ = model(x)
            total += -torch.log_softmax(logits[0, p - 1 - start].double(), -1)[int(data[p])].item()
        assert n == len(data) - 1
        assert abs(got - total / (len(data) - 1) / math.log(2)) < 1e-6, stride


# ----------------------------------------------------------------------------- the loop

@pytest.mark.e2e
def test_training_run_writes_outputs_and_learns(tmp_path, data_dir):
    out = tmp_path / "run"
    assert train([f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=60", "--eval_interval=20"]) == 0
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["iter"] for r in rows] == [0, 20, 40, 60]
    for key in ("iter", "tokens", "elapsed_s", "lr", "train_bpc", "val_bpc", "tokens_per_s", "mfu"):
        assert key in rows[-1]
    assert rows[-1]["val_bpc"] < rows[0]["val_bpc"] - 1.0  # it learns: 8 bits -> well below
    assert rows[-1]["tokens"] == 60 * 4 * 64
    final = json.load(open(out / "final.json"))
    for key in ("test_bpc", "val_bpc", "iters", "tokens", "train_time_s", "tokens_per_s", "n_params", "eval_stride"):
        assert final[key] is not None, key
    assert final["iters"] == 60 and final["eval_stride"] == 32
    assert final["test_bpc"] < 6.0
    cfg = json.load(open(out / "config.json"))
    assert cfg["max_iters"] == 60 and cfg["min_lr"] == pytest.approx(3e-4)
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    assert ck["model_kind"] == "baseline" and ck["iter_num"] == 60
    assert not any(k.startswith("_orig_mod") for k in ck["model"])
    assert {"python", "numpy", "torch"} <= set(ck["rng"][0]) and len(ck["data_generator"]) == len(ck["rng"]) == 1
    best = torch.load(out / "best.pt", weights_only=False)
    assert best["iter_num"] == final["best_iter"]
    assert min(r["val_bpc"] for r in rows) == pytest.approx(final["best_val_bpc"])


@pytest.mark.e2e
def test_exact_resume_is_bitwise(tmp_path, data_dir):
    common = [f"--data_dir={data_dir}", "--dropout=0.1", "--lr_decay_iters=20", "--eval_interval=5",
              "--final_test=False"]
    assert train(common + [f"--out_dir={tmp_path / 'a'}", "--max_iters=20"]) == 0
    assert train(common + [f"--out_dir={tmp_path / 'b'}", "--max_iters=10"]) == 0
    assert train(common + [f"--out_dir={tmp_path / 'b'}", "--max_iters=20", "--init_from=resume"]) == 0
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    assert a["iter_num"] == b["iter_num"] == 20
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # and without the saved data-generator state the runs would differ (the test can fail)
    c = tmp_path / "c"
    assert train(common + [f"--out_dir={c}", "--max_iters=10"]) == 0
    ck = torch.load(c / "ckpt.pt", weights_only=False)
    ck["data_generator"] = [torch.Generator().manual_seed(99).get_state()]
    torch.save(ck, c / "ckpt.pt")
    assert train(common + [f"--out_dir={c}", "--max_iters=20", "--init_from=resume"]) == 0
    cc = torch.load(c / "ckpt.pt", weights_only=False)
    assert not all(torch.equal(a["model"][k], cc["model"][k]) for k in a["model"])


@pytest.mark.e2e
def test_resume_refuses_other_architecture_and_kind(tmp_path, data_dir, capsys):
    out = tmp_path / "r"
    assert train([f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2", "--final_test=False"]) == 0
    assert train([f"--data_dir={data_dir}", f"--out_dir={out}", "--init_from=resume", "--n_layer=3"]) == 1
    assert "n_layer=2 (run: 3)" in capsys.readouterr().err
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    ck["model_kind"] = "asca"
    torch.save(ck, out / "ckpt.pt")
    assert train([f"--data_dir={data_dir}", f"--out_dir={out}", "--init_from=resume"]) == 1
    assert "novel_model.py" in capsys.readouterr().err


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save({"v": 1}, path)

    def broken_save(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        checkpoint.save({"v": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["v"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]


@pytest.mark.e2e
def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, data_dir, capsys):
    out = tmp_path / "nan"
    rc = train([f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=20", "--eval_interval=4",
                "--log_interval=1"],
               build_model=lambda cfg: NaNAfter(GPTConfig.from_dict(cfg)))
    assert rc == 1
    err = capsys.readouterr().err
    assert "NaN or inf" in err and "at iter 7" in err and "Traceback" not in err
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    assert ck["iter_num"] == 4
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    assert not (out / "final.json").exists()


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_finishes_step_checkpoints_and_resumes(tmp_path, data_dir, sig):
    out = tmp_path / "sig"
    p = subprocess.Popen([sys.executable, "baseline_model.py", TINY, f"--data_dir={data_dir}", f"--out_dir={out}",
                          "--max_iters=100000", "--eval_interval=100000"], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.time() + 120
    while not (out / "ckpt.pt").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # let it take some steps
    p.send_signal(sig)
    text, _ = p.communicate(timeout=120)
    assert p.returncode == 128 + sig, text
    assert f"stopped by {signal.Signals(sig).name}" in text and "--init_from=resume" in text
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    n = ck["iter_num"]
    assert n > 0 and f"after iter {n}:" in text
    r = run_script("baseline_model.py", TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--init_from=resume",
                   f"--max_iters={n + 3}", "--final_test=False")
    assert r.returncode == 0, r.stderr
    assert torch.load(out / "ckpt.pt", weights_only=False)["iter_num"] == n + 3


@pytest.mark.e2e
def test_eval_only_and_sample(tmp_path, data_dir):
    out = tmp_path / "ev"
    assert train([f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=30"]) == 0
    final = json.load(open(out / "final.json"))
    r = run_script("baseline_model.py", TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--eval_only=True",
                   "--init_from=resume")
    assert r.returncode == 0, r.stderr
    ev = json.load(open(out / "eval.json"))
    assert ev["test_bpc"] == pytest.approx(final["test_bpc"], abs=1e-9)  # same weights, same protocol
    assert ev["iter"] == 30
    r = run_script("baseline_model.py", TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--eval_only=True")
    assert r.returncode == 1 and "--init_from=resume" in r.stderr
    r = run_script("sample.py", f"--out_dir={out}", "--num_bytes=40", "--start=the ", "--top_k=5")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("the ") and len(r.stdout.encode()) >= 40
    r = run_script("sample.py", f"--out_dir={tmp_path / 'nothing'}")
    assert r.returncode == 1 and r.stderr.startswith("error: no checkpoint")


@pytest.mark.e2e
def test_missing_data_is_one_line_error(tmp_path):
    r = run_script("baseline_model.py", TINY, f"--data_dir={tmp_path / 'none'}", f"--out_dir={tmp_path / 'o'}")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "prepare_dataset.py" in r.stderr


@pytest.mark.e2e
def test_time_budget_stops_training(tmp_path, data_dir):
    out = tmp_path / "t"
    assert train([f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=1000000", "--max_time_s=2",
                  "--eval_interval=1000000", "--final_test=False"]) == 0
    final = json.load(open(out / "final.json"))
    assert final["stop_reason"] == "max_time_s"
    assert 2.0 <= final["train_time_s"] < 3.0 and final["iters"] < 1000000


@pytest.mark.slow
def test_ddp_two_ranks_on_cpu(tmp_path, data_dir):
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "baseline_model.py", TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=6",
                        "--eval_interval=3", "--gradient_accumulation_steps=2", "--backend=gloo"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    final = json.load(open(out / "final.json"))
    sums = final["rank_param_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    assert final["env"]["world_size"] == 2 and final["tokens"] == 6 * 2 * 4 * 64
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    assert ck["iter_num"] == 6 and len(ck["data_generator"]) == len(ck["rng"]) == 2
    assert not torch.equal(ck["data_generator"][0], ck["data_generator"][1])  # ranks draw different windows
    assert math.isfinite(final["test_bpc"])



def test_a_cpu_run_keeps_freed_memory_for_reuse(monkeypatch):
    """runtime.keep_freed_memory, which a CPU Runtime calls: glibc's mallopt with the trim threshold (-1) at 1 GiB and
    the mmap threshold (-3) at 32 MiB, a note in the run's log; a user's MALLOC_ variable stands; no glibc, no
    call. (What it buys is a benchmark's claim: docs/results/gather_cpu.md.)"""
    calls = []

    class LibC:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr("ctypes.CDLL", lambda name: LibC())
    for k in runtime.MALLOC_ENV:
        monkeypatch.delenv(k, raising=False)
    rt = runtime.Runtime(dict(device="cpu", dtype="float32", compile=False, backend="auto"))
    assert sorted(calls) == [(-3, 1 << 25), (-1, 1 << 30)]
    assert any(n.startswith("malloc: freed memory kept") for n in rt.notes)
    calls.clear()
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    rt = runtime.Runtime(dict(device="cpu", dtype="float32", compile=False, backend="auto"))
    assert calls == [] and not any(n.startswith("malloc") for n in rt.notes)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")

    def no_glibc(name):
        raise OSError(f"{name}: cannot open shared object file")
    monkeypatch.setattr("ctypes.CDLL", no_glibc)
    assert runtime.keep_freed_memory() is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc (Linux)")
def test_keep_freed_memory_is_accepted_by_this_glibc():
    """The real call in a fresh process: glibc accepts both settings (mallopt returns 1 for each)."""
    code = f"import sys; sys.path.insert(0, {ROOT!r}); import runtime; print(runtime.keep_freed_memory())"
    env = {k: v for k, v in os.environ.items() if k not in runtime.MALLOC_ENV}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.startswith("malloc: freed memory kept for reuse"), out
