"""
One command per results table: run a list of training runs under one budget and N seeds, one after
another on one device, then write comparison.md and overlay plots with the mean and spread per run and
the difference to the first run.

    python compare.py compare/cpu_budget.py                   # the spec file says what to run
    python compare.py compare/cpu_budget.py --seeds 1337 --out out/try   # override its seeds or out dir
    python compare.py compare/cpu_budget.py --report_only     # rebuild the table from finished runs

A spec file is Python (like config files) assigning:
    RUNS = [("name", "novel_model.py", ["config/X.py", "--key=value", ...]), ...]  # the first is the reference
    #        a 4th element, a list of seeds, runs that row on those seeds only (SEEDS for the others)
    BUDGET = {"max_time_s": 150}   or   {"max_iters": 1000}  # --key=value added to every run (unless it sets it)
    SEEDS = [1337, 1338]
    OUT = "out/compare_cpu_budget"                            # runs go to OUT/NAME_sSEED, the table to OUT
An argument may name an earlier row's checkpoint of the same seed as {run:NAME}, e.g. "--init_from={run:short}"
(a run that starts from another's weights): that row finishes first, whatever --jobs.
Finished runs (final.json present) are not run again, interrupted ones resume, so re-running the command
continues where it stopped. Each run directory keeps the command it was run with (compare_run.json): a
finished run whose command differs from the spec now is flagged, never silently counted as the new one
(delete it to run it again). Runs that differ from the first run in eval stride, block size or budget are
flagged in the table; runs scored on different test sets (the split's sha256, as each run recorded it)
are refused. Throughput measured while other processes used the CPU is flagged as contended. One
compare.py writes an OUT at a time (a lock). A relative OUT in a spec is under this repository; --out is
relative to where you run it.
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys
import time

import configurator
import extraction
import checkpoint
from checkpoint import CheckpointError, RunLock
from models import MODELS
from runtime import CONTENDED_CORES, resolve_auto
from train_config import defaults_for, key_declarations, types_for, with_legacy

ROOT = os.path.dirname(os.path.abspath(__file__))
PROTOCOL_KEYS = ("test set", "eval_stride", "block_size", "budget")


class CompareError(Exception):
    pass


def load_spec(path):
    if not os.path.isfile(path):
        raise CompareError(f"spec file {path} not found (see compare/*.py for examples)")
    ns = {"__file__": os.path.abspath(path)}  # a spec may build on another: exec(open(...).read())
    try:
        with open(path) as f:
            exec(compile(f.read(), path, "exec"), ns)  # one namespace: the spec's functions see its names
    except Exception as e:
        raise CompareError(f"spec file {path} failed to run: {type(e).__name__}: {e}") from None
    runs, budget = ns.get("RUNS"), ns.get("BUDGET")
    if not runs or not isinstance(runs, list) or not all(
            isinstance(r, tuple) and len(r) in (3, 4) and isinstance(r[0], str) and isinstance(r[1], str)
            and isinstance(r[2], list) and all(isinstance(a, str) for a in r[2]) for r in runs):
        raise CompareError(f"{path}: RUNS must be a non-empty list of (name, script, [args]) tuples of strings "
                           f"(optionally with a 4th element, that row's list of seeds)")
    seeds = check_seeds(ns.get("SEEDS", [1337]), path)
    runs = [(r[0], r[1], r[2], check_seeds(r[3], f"{path}: run {r[0]!r}") if len(r) == 4 else None) for r in runs]
    names = [r[0] for r in runs]
    if len(set(names)) != len(names):
        raise CompareError(f"{path}: run names must differ, got {names}")
    for i, r in enumerate(runs):
        for dep in depends_on(r[2]):
            if dep not in names[:i]:
                raise CompareError(f"{path}: run {r[0]!r} names {{run:{dep}}}, which is not a row before it; "
                                   f"list {dep!r} first")
            if run_seeds({"seeds": seeds}, r[3]) != run_seeds({"seeds": seeds}, runs[names.index(dep)][3]):
                raise CompareError(f"{path}: run {r[0]!r} starts from {dep!r}, so both need the same seeds")
    for name in names:
        if not name or name.startswith(".") or not all(ch.isalnum() or ch in "._-" for ch in name):
            raise CompareError(f"{path}: run name {name!r} must be letters, digits, '.', '_' or '-' (it names a "
                               f"directory), such as 'asca_0.5'")
    if not isinstance(budget, dict) or not budget or set(budget) - {"max_time_s", "max_iters"}:
        raise CompareError(f"{path}: BUDGET must be a dict of max_time_s and/or max_iters, got {budget!r}")
    out = ns.get("OUT") or os.path.join("out", "compare_" + os.path.splitext(os.path.basename(path))[0])
    if not isinstance(out, str) or not out.strip():
        raise CompareError(f"{path}: OUT must be a directory name such as 'out/compare_x', got {out!r}")
    return {"runs": runs, "budget": budget, "seeds": seeds,
            "out": os.path.join(ROOT, out)}  # a spec's OUT, like its configs and data, is under the repository


RUN_REF = re.compile(r"\{run:([A-Za-z0-9._-]+)\}")


def depends_on(args):
    """The rows whose checkpoints these arguments name ({run:NAME})."""
    return [m for a in args for m in RUN_REF.findall(a)]


def with_run_paths(args, out, seed):
    """args with each {run:NAME} replaced by that row's ckpt.pt for this seed."""
    return [RUN_REF.sub(lambda m: os.path.join(run_dir(out, m.group(1), seed), "ckpt.pt"), a) for a in args]


def run_seeds(spec, own):
    """The seeds of one row: its own list, else the spec's (or --seeds')."""
    return spec["seeds"] if own is None or spec.get("seeds_overridden") else own


def check_seeds(seeds, where):
    if not isinstance(seeds, (list, tuple)) or not seeds or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in seeds):
        raise CompareError(f"{where}: SEEDS must be a non-empty list of whole numbers >= 0, such as [1337, 1338]; "
                           f"got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise CompareError(f"{where}: seeds {list(seeds)} repeat one; each seed is one run, a repeated one would "
                           f"be counted twice")
    return list(seeds)


def run_dir(out, name, seed):
    return os.path.join(out, f"{name}_s{seed}")


RUN_RECORD = "compare_run.json"  # in each run directory: the command it was run with


def run_command(spec, script, args, seed):
    """What one (run, seed) is, as stored with it: the script, its arguments, the budget (less the keys its
    arguments set: a row may have its own, such as the pre-training row of compare/cpu_extend.py) and the seed."""
    own = {a[2:].split("=", 1)[0] for a in args if a.startswith("--") and "=" in a}
    return {"script": script, "args": list(args),
            "budget": [f"--{k}={v}" for k, v in spec["budget"].items() if k not in own], "seed": seed}


def stored_command(d):
    """The command run directory d was run with (None: run by an older compare.py, or not by compare.py)."""
    try:
        with open(os.path.join(d, RUN_RECORD)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def config_drift(d, script, args, budget, seed):
    """What a run is, beyond its command: the settings the command resolves to with TODAY's defaults, against
    the settings it trained with (its config.json). A default changed since (local_blocks and
    keep_first_block) makes an unchanged command another run, so a finished one must not be counted as it.
    Returns the differing keys as 'key: then -> now', or None where d has no config.json (judged by its
    command alone). A key the run predates counts as its old behaviour (the config class's LEGACY); keys
    the trainer derives (None in the command: min_lr, lr_decay_iters, eval_stride) follow the keys compared."""
    try:
        with open(os.path.join(d, "config.json")) as f:
            then = json.load(f)
    except (OSError, ValueError):
        return None
    kind = next((k for k, m in MODELS.items() if m.script == os.path.basename(script)), None)
    if kind is None or not isinstance(then, dict):
        return None
    argv = [a if a.startswith("--") or os.path.isabs(a) else os.path.join(ROOT, a) for a in args]
    try:
        now = configurator.resolve(defaults_for(kind), [*argv, *budget, f"--seed={seed}"], types_for(kind))
    except configurator.ConfigError as e:
        return [f"its command no longer resolves ({e})"]
    then, decls = with_legacy(then, kind), key_declarations(kind)
    # 'auto' (device, dtype, compile, backend) as this machine resolves it, on both sides: the trainer records the
    # resolved values, and a resumed run whose command left them 'auto' is the same run
    now = {**now, **resolve_auto(now)}
    try:
        then = {**then, **resolve_auto({**now, **then})}
    except (KeyError, TypeError, AttributeError):  # a config.json too old or odd to resolve: compared as written
        pass
    for side in (now, then):  # a checkpoint by its real path: a spec's {run:NAME} is absolute, a command's may not be
        if side.get("init_from") not in (None, "scratch", "resume"):
            side["init_from"] = os.path.realpath(side["init_from"])
    if then.get("init_from") in (None, "resume") and "init_origin" not in then:
        then["init_from"] = now.get("init_from")  # a config.json from before origins were recorded: not judged
    drift = []
    for key, value in now.items():
        old = then.get(key, value)  # a key added since, without a legacy value: its default is the old way
        if decls[key].compared and value is not None and old != value:
            drift.append(f"{key}: {old!r} -> {value!r}")
    return drift


def counted(d, spec, script, args, seed):
    """(True, '') if finished run d is this row's seed as the spec and today's defaults say; else (False, why).
    With a config.json the settings decide, so pinning a changed default in the spec (--key=old) keeps old
    runs; without one, the command."""
    want = run_command(spec, script, args, seed)
    have = stored_command(d)
    drift = config_drift(d, script, with_run_paths(args, spec["out"], seed), want["budget"], seed)
    if drift is None or (have is not None and have["script"] != want["script"]):
        return (True, "") if have is None or have == want else (False, "run with another command")
    if drift:
        why = "run with another command" if have is not None and have != want else "run under other defaults"
        return False, f"{why} ({'; '.join(drift[:4])}{'; ...' if len(drift) > 4 else ''})"
    why = source_problem(d, spec, args, seed)
    return (False, why) if why else (True, "")


def source_problem(d, spec, args, seed, started=True):
    """Why a row that starts from another row's checkpoint ({run:NAME}) cannot count for this seed, or None: its
    source run is unfinished or not counted itself, or (started: d has begun) the source's ckpt.pt is not the file
    d's weights came from (its sha256, as d recorded it)."""
    origin = None
    if started:
        try:
            with open(os.path.join(d, "config.json")) as f:
                origin = json.load(f).get("init_origin")
        except (OSError, ValueError, AttributeError):
            pass
    for dep in depends_on(args):
        row = next((r for r in spec["runs"] if r[0] == dep), None)
        src = run_dir(spec["out"], dep, seed)
        if row is None:
            continue
        if not finished(src):
            return f"its source row {dep} has not finished for seed {seed}"
        ok, why = counted(src, spec, row[1], row[2], seed)
        if not ok:
            return f"its source row {dep} is not counted ({why})"
        if started and isinstance(origin, dict) and origin.get("sha256") != checkpoint.sha256_of(
                os.path.join(src, "ckpt.pt")):
            return f"its weights came from a checkpoint of {dep} that has been replaced since"
    return None


def finished(d):
    """A final.json that is the run's latest word (not one a resumed run has gone past)."""
    if not os.path.exists(os.path.join(d, "final.json")):
        return False
    try:
        return extraction.Run(d).final is not None
    except extraction.ExtractError:
        return False


def execute(spec, log=print, jobs=1):
    """Train every (run, seed) not finished yet, `jobs` at a time (in the spec's order; with jobs > 1 each run gets
    OMP_NUM_THREADS = cores // jobs unless it is set: for equal-iteration specs, whose bpc does not depend on
    speed); returns the number that failed."""
    failed, todo = 0, []
    for name, script, args, own in spec["runs"]:
        for seed in run_seeds(spec, own):
            d = run_dir(spec["out"], name, seed)
            want = run_command(spec, script, args, seed)
            if finished(d):
                ok, why = counted(d, spec, script, args, seed)
                if not ok:
                    log(f"compare: {d} is finished but was {why}; flagged in the table, not counted: delete {d} "
                        f"to run it again")
                else:
                    log(f"compare: {d} is finished; kept")
                continue
            if os.path.exists(os.path.join(d, "ckpt.pt")):
                ok, why = counted(d, spec, script, args, seed)
                if not ok:
                    log(f"compare: {d} was started but {why}; flagged, not resumed: delete {d} to run it again")
                    failed += 1
                    continue
            resume = ["--init_from=resume"] if os.path.exists(os.path.join(d, "ckpt.pt")) else []
            cmd = [sys.executable, os.path.join(ROOT, script), *with_run_paths(args, spec["out"], seed),
                   *want["budget"], f"--seed={seed}", f"--out_dir={d}", "--progress=False", *resume]
            todo.append((name, seed, d, want, cmd, depends_on(args)))
    env = dict(os.environ)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    running = []  # (name, seed, process, log file)

    def wait_until_fewer_than(limit):
        nonlocal failed
        while len(running) >= limit:
            for r in [r for r in running if r[2].poll() is not None]:
                running.remove(r)
                name, seed, proc, f = r
                f.close()
                if proc.returncode != 0:
                    failed += 1
                    log(f"compare: {name} seed {seed} failed (exit {proc.returncode}); see {f.name}")
            if len(running) >= limit:
                time.sleep(0.5)

    try:
        for name, seed, d, want, cmd, deps in todo:
            wait_until_fewer_than(jobs)
            while any(r[0] in deps and r[1] == seed for r in running):  # a run starting from another's checkpoint
                wait_until_fewer_than(len(running))
            args = next(r[2] for r in spec["runs"] if r[0] == name)
            why = source_problem(d, spec, args, seed, started=os.path.exists(os.path.join(d, "ckpt.pt")))
            if deps and why:
                log(f"compare: {name} seed {seed} not started: {why}; flagged in the table")
                failed += 1
                continue
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, RUN_RECORD), "w") as f:
                json.dump(want, f)
            log("compare: " + " ".join(cmd[1:]))
            # append: a resumed run's log keeps the lines of the runs before it
            f = open(os.path.join(spec["out"], f"{name}_s{seed}.log"), "a")
            running.append((name, seed, subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env),
                            f))
        wait_until_fewer_than(1)
    except KeyboardInterrupt:
        stop_runs(running)
        raise CompareError("interrupted; each run started so far checkpointed (or had not reached its first "
                           "checkpoint): run the same command again to continue") from None
    return failed


def stop_runs(running, grace=300):
    """Ctrl-C reached compare: each trainer still running gets SIGTERM (it finishes its step and checkpoints; after
    the terminal's SIGINT a second SIGINT would abort it) and compare waits for it, ignoring further Ctrl-C."""
    import signal
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for _, _, proc, _ in running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, _, proc, f in running:
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
            f.close()
    finally:
        signal.signal(signal.SIGINT, previous)


def mean_sd(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None)


def fmt(m, sd, spec):
    if m is None:
        return "n/a"
    return format(m, spec) + (f" ± {format(sd, spec.lstrip('+'))}" if sd is not None else "")


def protocol(run):
    c = run.config
    test, block, stride = run.test_set()
    budget = ", ".join(f"{k}={c.get(k)}" for k in ("max_time_s", "max_iters"))
    return {"test set": test, "training data": run.training_data(), "eval_stride": stride, "block_size": block,
            "budget": budget}


def contended(run):
    load = (run.final or {}).get("other_cpu_load")
    return load is not None and load > CONTENDED_CORES


PROBES = ("test_recall", "test_recall_local", "test_recall_oracle", "copy_test")  # the recall and copy instruments
# what a run cost, per seed in comparison.json (extraction.py --frontier): analytic FLOPs, tokens, measured tokens/s
COMPUTE = ("train_flops", "tokens", "tokens_per_s", "block_size", "test_sparsity")


def probe_table(groups):
    """The instruments' table, where a run has them: attention recall of its own choice and of the local rule's and
    the oracle's at the same counts, and the copy test's bpc on copied bytes / the same bytes unplanted per
    distance bucket (mean over seeds); [] where no run has them."""
    have = [(name, runs) for name, _, _, runs, _, _ in groups if any(k in r.final for r in runs for k in PROBES)]
    if not have:
        return []
    buckets = sorted({(x["lo"], x["hi"]) for _, runs in have for r in runs  # every run's (copy lengths may differ)
                      for x in r.final.get("copy_test", {}).get("buckets", [])})
    head = ["run", "recall (own)", "recall (local rule)", "recall (oracle)"] + [f"copy {lo}-{hi}" for lo, hi in buckets]
    out = ["", "Attention recall (test pass) and the copy test (bpc on copied bytes / the same bytes unplanted, per "
               "distance in bytes):", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in have:
        cells = [fmt(*mean_sd([r.final.get(k) for r in runs]), ".3f") for k in PROBES[:3]]
        for lo, hi in buckets:
            got = [b for r in runs for b in r.final.get("copy_test", {}).get("buckets", [])
                   if (b["lo"], b["hi"]) == (lo, hi)]
            copy, plain = (mean_sd([b[k] for b in got])[0] for k in ("bpc_copy", "bpc_plain"))
            cells.append(f"{copy:.2f} / {plain:.2f}" if got else "n/a")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


def report(spec):
    """comparison.md and compare_*.png in spec['out'] from the finished runs; returns the table's path."""
    groups = []
    for name, script, args, own in spec["runs"]:
        runs, changed = [], []
        for seed in run_seeds(spec, own):
            d = run_dir(spec["out"], name, seed)
            if finished(d):
                ok, why = counted(d, spec, script, args, seed)
                if ok:
                    runs.append(extraction.Run(d))
                else:
                    changed.append((extraction.Run(d), why))
        groups.append((name, script, args, runs, changed, len(run_seeds(spec, own))))
    if not groups[0][3]:
        raise CompareError(f"the reference run {groups[0][0]} has no finished seed in {spec['out']} run with "
                           f"this spec's command; run the comparison first")
    ref_protocol = protocol(groups[0][3][0])
    other_tests = sorted({f"{r.name} ({protocol(r)['test set']})" for g in groups for r in g[3]
                          if protocol(r)["test set"] != ref_protocol["test set"]})
    if other_tests:
        raise CompareError(f"these runs were scored on another test set than {groups[0][3][0].name} "
                           f"({ref_protocol['test set']}): {', '.join(other_tests)}; the data was split again "
                           f"since: delete those run directories to re-run them, or compare them in another OUT")
    ref_by_seed = {r.config.get("seed"): r.final.get("test_bpc") for r in groups[0][3]}
    lines = ["# Comparison", "",
             f"Command: `python compare.py {spec.get('path', 'SPEC')}`; budget {spec['budget']}, seeds {spec['seeds']} "
             f"(where a row names its own, those). "
             f"Mean ± sample standard deviation over the finished seeds; differences are to `{groups[0][0]}`, "
             f"paired by seed.", "",
             "| run | command | seeds | iters | test bpc | test bpc - first | best val bpc | tokens/s | sparsity | "
             "protocol differs from first |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for name, script, args, runs, changed, n_seeds in groups:
        f = [r.final for r in runs]
        test = mean_sd([x.get("test_bpc") for x in f])
        # paired by seed: the same seed draws the same batches, so its difference is the cleaner estimate
        diffs = [r.final["test_bpc"] - ref_by_seed[r.config.get("seed")] for r in runs
                 if r.final.get("test_bpc") is not None and ref_by_seed.get(r.config.get("seed")) is not None]
        differs = sorted({k for r in runs for k, v in protocol(r).items() if v != ref_protocol[k]})
        diff = fmt(*mean_sd(diffs), "+.4f") if not differs else "not comparable"
        tps = fmt(*mean_sd([x.get("tokens_per_s") for x in f]), ",.0f")
        busy = [r.name for r in runs if contended(r)]
        if busy:
            tps += " (contended)"
            notes.append(f"{', '.join(busy)}: other processes used more than {CONTENDED_CORES} cores on average "
                         f"while it trained (final.json other_cpu_load); its tokens/s (and, at equal wall-clock, its "
                         f"bpc) are not comparable")
        unrecorded = [r.name for r in runs if stored_command(r.path) is None]
        if unrecorded:
            notes.append(f"{', '.join(unrecorded)}: run before compare.py stored commands; its command is assumed")
        if changed:
            kinds = sorted({why.split(" (")[0] for _, why in changed})
            differs.append(f"{len(changed)} finished seed(s) {' or '.join(kinds)}, not counted")
            notes += [f"{r.name}: finished, but {why}, against the spec and defaults now (compare_run.json, "
                      f"config.json); delete it to run it again" for r, why in changed]
        lines.append(f"| {name} | `{script} {' '.join(args)}` | {len(runs)}/{n_seeds} | "
                     f"{fmt(*mean_sd([x.get('iters') for x in f]), '.0f')} | {fmt(*test, '.4f')} | {diff} | "
                     f"{fmt(*mean_sd([x.get('best_val_bpc') for x in f]), '.4f')} | "
                     f"{tps} | "
                     f"{fmt(*mean_sd([x.get('test_sparsity', x.get('sparsity')) for x in f]), '.3f')} | "
                     f"{', '.join(f'**{k}**' for k in differs) or '-'} |")
    lines += probe_table(groups)
    lines += ["", "Protocol of the first run: " + "; ".join(f"{k} {v}" for k, v in ref_protocol.items()) + ".",
              "Test bpc: every byte of the test split scored once (sliding windows, stride eval_stride); tokens/s "
              "excludes evaluation and compile/warm-up; sparsity: measured over the whole test split (older runs: "
              "its last batch)."] + (["", "Flagged:"] + [f"- {n}" for n in notes] if notes else [])
    os.makedirs(spec["out"], exist_ok=True)
    path = os.path.join(spec["out"], "comparison.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    # the same rows with every counted seed's test bpc, for figures (extraction.py --headline)
    summary = {"title": os.path.basename(spec.get("path", "comparison")), "command": f"python3 compare.py "
               f"{spec.get('path', 'SPEC')}", "budget": spec["budget"], "date": time.strftime("%Y-%m-%d"),
               "rows": [{"name": name, "seeds": [r.config.get("seed") for r in runs],
                         "test_bpc": [r.final.get("test_bpc") for r in runs],
                         **{k: [r.final.get(k) for r in runs] for k in COMPUTE},
                         "contended": [contended(r) for r in runs],
                         **{k: [r.final.get(k) for r in runs] for k in PROBES if any(k in r.final for r in runs)}}
                        for name, _, _, runs, _, _ in groups]}
    checkpoint.write_json(summary, os.path.join(spec["out"], "comparison.json"))
    plot(groups, spec["out"])
    return path


def plot(groups, out):
    plt = extraction.plt_module()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    later = []  # every val bpc after a run's first evaluation: the y range (the untrained ~8 bpc flattens the rest)
    for i, (name, _, _, runs, _, _) in enumerate(groups):
        color = colors[i % len(colors)]
        for j, r in enumerate(runs):
            for ax, x in zip(axes[:2], ("tokens", "elapsed_s")):
                xs, ys = r.series("val_bpc", x)
                ax.plot(xs, ys, "-", color=color, alpha=0.7, lw=1, label=name if j == 0 else None)
                later += list(ys[1:])
        m, sd = mean_sd([r.final.get("test_bpc") for r in runs])
        if m is not None:
            axes[2].errorbar([i], [m], yerr=[sd or 0], fmt="o", color=color, capsize=4)
    if later:
        lo, hi = min(later), max(later)
        pad = 0.05 * (hi - lo) or 0.05
        for ax in axes[:2]:
            ax.set_ylim(lo - pad, hi + pad)
    axes[0].set_xlabel("tokens (bytes) trained")
    axes[1].set_xlabel("training wall-clock (s, excl. eval and compile)")
    for ax in axes[:2]:
        ax.set_ylabel("validation bits per byte")
        ax.legend(fontsize=7)
    axes[2].set_xticks(range(len(groups)), [g[0] for g in groups], rotation=20, fontsize=7)
    axes[2].set_ylabel("test bits per byte (mean ± sd over seeds)")
    fig.suptitle("validation curves per seed (y from each run's second evaluation), and test bpc", fontsize=9)
    return extraction.save(fig, os.path.join(out, "compare_runs.png"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="a spec file such as compare/cpu_budget.py")
    p.add_argument("--seeds", type=int, nargs="+", help="override the spec's SEEDS")
    p.add_argument("--out", help="override the spec's OUT directory")
    p.add_argument("--report_only", action="store_true", help="only rebuild the table and plots")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once (default 1). Only for equal-iteration "
                   "specs: side by side, each run's tokens/s (and an equal-wall-clock budget) are not comparable")
    a = p.parse_args(argv)
    try:
        spec = load_spec(a.spec)
        spec["path"] = a.spec
        if a.jobs < 1:
            raise CompareError(f"--jobs={a.jobs} must be at least 1")
        if a.jobs > 1 and "max_time_s" in spec["budget"]:
            raise CompareError(f"--jobs={a.jobs} runs trained side by side: their speed, and so an equal-wall-clock "
                               f"budget (this spec's max_time_s), depends on each other; run this spec with --jobs=1")
        if a.seeds:
            spec["seeds"], spec["seeds_overridden"] = check_seeds(a.seeds, "--seeds"), True
        if a.out:
            spec["out"] = os.path.abspath(a.out)
        if os.path.exists(spec["out"]) and not os.path.isdir(spec["out"]):
            raise CompareError(f"OUT {spec['out']} is a file, not a directory; give another --out")
        os.makedirs(spec["out"], exist_ok=True)
        with RunLock(spec["out"], what="--out"):  # two compare.py into one OUT would train every run twice at once
            failed = 0 if a.report_only else execute(spec, jobs=a.jobs)
            path = report(spec)
        print(open(path).read())
        print(f"wrote {path} and {os.path.join(spec['out'], 'compare_runs.png')}")
        return 1 if failed else 0
    except (CompareError, extraction.ExtractError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: cannot write {e.filename or 'the OUT directory'}: {e.strerror or e}; choose a writable --out "
              f"(or free some space)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
