"""CI runs the GPU script's dry run (issue 23): every step of scripts/gpu_check.sh on a CPU at tiny shapes, with
bf16 autocast, compiled (aot_eager) at three lengths with the gate-detached variant, and the profile. A crash of
the kind the audit found (a dtype error in every attention row, a recompile limit at the third length) fails it."""
import os
import subprocess

import pytest

from helpers import ROOT


@pytest.mark.slow
def test_the_gpu_check_dry_run_passes_on_a_cpu(tmp_path):
    out = tmp_path / "dry"
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), str(out), "--dry-run"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    table = (out / "bench.md").read_text()
    rows = [l for l in table.splitlines() if l.startswith("| ") and l[2].isdigit()]
    attention = [l for l in rows if l.count("|") == 12]
    steps = [l for l in rows if l.count("|") == 9]
    assert {l.split("|")[1].strip() for l in attention} == {"128", "256", "512", "1024"}  # four lengths, as the full run
    # the gate-detached and the block-indexed variants ran at each
    assert all(l.split("|")[9].strip() != "-" and l.split("|")[10].strip() != "-" for l in attention)
    assert {l.split("|")[3].strip() for l in steps} == {"fixed", "adaptive"}
    assert "failed:" not in table
    log = (out / "tests.log").read_text()
    assert "FAILED" not in log and "TIMEOUT" not in log and log.count(": passed:") == 2
