"""CI runs the GPU script's dry run (issues 23, 30): every step of scripts/gpu_check.sh on a CPU at tiny shapes, under
CUDA's autocast policy (runtime.cuda_autocast_on_cpu), compiled (aot_eager) at four lengths with the gate-detached
and block-indexed variants, and the profile; its test group runs the emulation through the whole model and the
start-up check. A crash of the kind the audits found (a dtype error in every attention row, the gather backward's
under CUDA's policy, a recompile limit at the third length) fails it."""
import os
import subprocess

import pytest

from helpers import ROOT


@pytest.mark.slow
def test_the_gpu_check_dry_run_passes_on_a_cpu(tmp_path):
    out = tmp_path / "dry"
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), str(out), "--dry-run"], cwd=ROOT,
                       capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    attention, steps = ((out / part / "bench.md").read_text() for part in ("attention", "steps"))
    rows = [l for l in attention.splitlines() if l.startswith("| ") and l[2].isdigit()]
    assert {l.split("|")[1].strip() for l in rows} == {"128", "256", "512", "1024"}  # four lengths, as the full run
    # the gate-detached and the block-indexed variants ran at each
    assert all(l.split("|")[9].strip() != "-" and l.split("|")[10].strip() != "-" for l in rows)
    assert "CUDA autocast policy emulated" in attention and "gather path" in attention
    step_rows = [l for l in steps.splitlines() if l.startswith("| ") and l[2].isdigit()]
    assert {l.split("|")[3].strip() for l in step_rows} == {"fixed", "adaptive"}
    assert "failed:" not in attention + steps
    log = (out / "tests.log").read_text()
    assert "FAILED" not in log and "TIMEOUT" not in log and "test group 1 (limit 400s): passed:" in log
    assert "test_mixed_precision.py::test_the_start_up_check_stops_real_faults" in log  # the emulation ran
    assert r.stdout.rstrip().splitlines()[-1].startswith("[gpu_check") and "== " in r.stdout  # the tables last
