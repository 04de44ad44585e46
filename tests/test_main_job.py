"""The README's first line, wired as a newcomer runs it (bash scripts/main_job.sh), on a tiny model: it
prepares the bundled data, trains, draws the plots, samples and reports the test bpc; a second run shows
the finished run instead of training again."""
import json
import os
import subprocess

import pytest

from helpers import ROOT

TINY_MODEL = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--batch_size=4", "--max_iters=12", "--eval_interval=6",
              "--eval_iters=2", "--eval_stride=256", "--progress=false"]


@pytest.mark.e2e
@pytest.mark.slow
def test_main_job_script_end_to_end(tmp_path):
    out = tmp_path / "main"
    env = dict(os.environ, OUT_DIR=str(out), ASCA_SKIP_SETUP="1", PYTHONUNBUFFERED="1")
    r = subprocess.run(["bash", "scripts/main_job.sh", *TINY_MODEL], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    final = json.load(open(out / "final.json"))
    assert final["iters"] == 12 and final["model_kind"] == "asca" and final["test_bpc"] < 8
    assert f"main job: test {final['test_bpc']:.3f} bits per byte" in r.stdout
    assert "--- a sample from" in r.stdout and "The history of " in r.stdout
    for name in ("attention.png", "keep_masks.png", "attention_chars.png", "bpc.png", "sparsity_per_head.png"):
        assert os.path.getsize(out / "plots" / name) > 5000, name
    r = subprocess.run(["bash", "scripts/main_job.sh", *TINY_MODEL], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and "is already trained" in r.stdout, r.stderr[-2000:]
