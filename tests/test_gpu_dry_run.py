"""CI runs the GPU script's dry run: every step of scripts/gpu_check.sh on a CPU at tiny shapes, under CUDA's autocast
policy (runtime.cuda_autocast_on_cpu), compiled (aot_eager) at four lengths with the gate-detached and block-indexed
variants, and the profile; its test group runs the emulation through the whole model and the start-up check. A crash
of the kind the audits found (a dtype error in every attention row, the gather backward's under CUDA's policy, a
recompile limit at the third length) fails it. The script's shape is checked too: each mode's limits fit one device
call (10 minutes; a test group 8), every test id it names exists, and its output folder holds at most 8 files."""
import os
import re
import subprocess
import tarfile

import pytest

from helpers import ROOT

SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
CALL_S = 600  # the device tool's cap on one command
START_S = 20  # torch import, nvidia-smi, the environment line, packing


def limits(*mode):
    r = subprocess.run(["bash", SCRIPT, "/tmp/unused", *mode], capture_output=True, text=True,
                       env=dict(os.environ, GPU_CHECK_LIMITS="print"))
    assert r.returncode == 0, r.stderr
    return [int(x) for x in r.stdout.split()]


@pytest.mark.parametrize("mode", [("--quick",), ("--tests", "1"), ("--tests", "2"), ("--tests", "3"),
                                  ("--tests", "4"), ("--bench",)])
def test_each_mode_fits_one_device_call_by_construction(mode):
    lim = limits(*mode)
    assert len(lim) == 3 and sum(lim) + START_S <= CALL_S - 20, lim  # 20 s to spare
    if mode[0] == "--tests":
        assert lim[0] <= 480 and lim[1:] == [0, 0]  # a test group within 8 minutes
    if mode[0] == "--quick":
        assert all(x >= 170 for x in lim)  # each above the cold compiles it covers
    assert sum(limits("--dry-run")) <= 240  # the CPU rehearsal: under 4 minutes


def test_a_bad_test_group_is_one_line():
    r = subprocess.run(["bash", SCRIPT, "/tmp/unused", "--tests", "7"], capture_output=True, text=True)
    assert r.returncode == 2 and "--tests takes a group number, 1 to 4" in r.stderr


def test_every_test_the_script_names_exists():
    """A renamed CUDA test would silently drop out of the device run: every id in the groups collects here."""
    text = open(SCRIPT).read()
    n = re.search(r'^N=(\S+)', text, re.M).group(1)
    ids = []
    for group in re.findall(r'^(?:GROUP\d|DRY_TESTS)="([^"]+)"', text, re.M):
        ids += [t.replace("$N", n) for t in group.split()]
    assert len(ids) >= 16
    r = subprocess.run(["python3", "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *ids], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


@pytest.mark.slow
def test_the_gpu_check_dry_run_passes_on_a_cpu(tmp_path):
    out = tmp_path / "dry"
    r = subprocess.run(["bash", SCRIPT, str(out), "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["gpu_check.tar.gz", "summary.md"]  # the return channel's 8 files, with room
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = tar.getnames()
        attention, steps = (tar.extractfile(f"./{part}/bench.md").read().decode() for part in ("attention", "steps"))
        log = tar.extractfile("./tests.log").read().decode()
    assert "./tests/tests.log" in names and "./attention/bench.json" in names and "./env.txt" in names
    rows = [line for line in attention.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert {line.split("|")[1].strip() for line in rows} == {"128", "256", "512", "1024"}  # four lengths
    # the gate-detached and the block-indexed variants ran at each
    assert all(line.split("|")[9].strip() != "-" and line.split("|")[10].strip() != "-" for line in rows)
    assert "CUDA autocast policy emulated" in attention and "gather path" in attention
    step_rows = [line for line in steps.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert {line.split("|")[3].strip() for line in step_rows} == {"fixed", "adaptive"}
    assert all(line.split("|")[5].strip() != "-" for line in step_rows)  # ASCA's step timed in each
    assert "failed:" not in attention + steps
    assert "FAILED" not in log and "TIMEOUT" not in log and "tests (limit 120s): passed:" in log
    assert "test_mixed_precision.py::test_the_start_up_check_stops_real_faults" in log  # the emulation ran
    summary = (out / "summary.md").read_text()
    assert "## attention" in summary and "## steps" in summary and "tests (limit" in summary  # one screen holds it
    assert r.stdout.rstrip().splitlines()[-1].startswith("[gpu_check") and "## attention" in r.stdout  # tables last
