"""
One command per results table: run a list of training runs under one budget and N seeds, one after
another on one device, then write comparison.md and overlay plots with the mean and spread per run and
the difference to the first run.

    python compare.py compare/cpu_excerpt.py                   # the spec file says what to run
    python compare.py compare/cpu_excerpt.py --seeds 1337 --out out/try   # override its seeds or out dir
    python compare.py compare/cpu_excerpt.py --report_only     # rebuild the table from finished runs

A spec file is Python (like config files) assigning:
    RUNS = [("name", "novel_model.py", ["config/X.py", "--key=value", ...]), ...]  # the first is the reference
    BUDGET = {"max_time_s": 150}   or   {"max_iters": 1000}  # --key=value added to every run
    SEEDS = [1337, 1338]
    OUT = "out/compare_cpu_excerpt"                            # runs go to OUT/NAME_sSEED, the table to OUT
Finished runs (final.json present) are not run again, interrupted ones resume, so re-running the command
continues where it stopped. Runs that differ from the first run in test data, eval stride, block size or
budget are flagged in the table instead of being compared silently.
"""
import argparse
import json
import math
import os
import subprocess
import sys

import extraction

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
    if not runs or not all(isinstance(r, tuple) and len(r) == 3 for r in runs):
        raise CompareError(f"{path}: RUNS must be a non-empty list of (name, script, [args]) tuples")
    names = [r[0] for r in runs]
    if len(set(names)) != len(names):
        raise CompareError(f"{path}: run names must differ, got {names}")
    if not isinstance(budget, dict) or not budget or set(budget) - {"max_time_s", "max_iters"}:
        raise CompareError(f"{path}: BUDGET must be a dict of max_time_s and/or max_iters, got {budget!r}")
    return {"runs": runs, "budget": budget, "seeds": list(ns.get("SEEDS", [1337])),
            "out": ns.get("OUT") or os.path.join("out", "compare_" + os.path.splitext(os.path.basename(path))[0])}


def run_dir(out, name, seed):
    return os.path.join(out, f"{name}_s{seed}")


def execute(spec, log=print):
    """Train every (run, seed) not finished yet, one after another; returns the number that failed."""
    failed = 0
    budget = [f"--{k}={v}" for k, v in spec["budget"].items()]
    for name, script, args in spec["runs"]:
        for seed in spec["seeds"]:
            d = run_dir(spec["out"], name, seed)
            if os.path.exists(os.path.join(d, "final.json")):
                log(f"compare: {d} is finished; kept")
                continue
            resume = ["--init_from=resume"] if os.path.exists(os.path.join(d, "ckpt.pt")) else []
            cmd = [sys.executable, os.path.join(ROOT, script), *args, *budget, f"--seed={seed}", f"--out_dir={d}",
                   "--progress=False", *resume]
            log("compare: " + " ".join(cmd[1:]))
            with open(os.path.join(spec["out"], f"{name}_s{seed}.log"), "w") as f:
                rc = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
            if rc != 0:
                failed += 1
                log(f"compare: {name} seed {seed} failed (exit {rc}); see {f.name}")
    return failed


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
    c, f = run.config, run.final or {}
    test, block, stride = run.test_set()
    budget = ", ".join(f"{k}={c.get(k)}" for k in ("max_time_s", "max_iters"))
    return {"test set": test, "eval_stride": stride, "block_size": block, "budget": budget}


def report(spec):
    """comparison.md and compare_*.png in spec['out'] from the finished runs; returns the table's path."""
    groups = []
    for name, script, args in spec["runs"]:
        runs = []
        for seed in spec["seeds"]:
            d = run_dir(spec["out"], name, seed)
            if os.path.exists(os.path.join(d, "final.json")):
                runs.append(extraction.Run(d))
        groups.append((name, script, args, runs))
    if not groups[0][3]:
        raise CompareError(f"the reference run {groups[0][0]} has no finished seed in {spec['out']}; run the comparison first")
    ref_protocol = protocol(groups[0][3][0])
    ref_by_seed = {r.config.get("seed"): r.final.get("test_bpc") for r in groups[0][3]}
    lines = ["# Comparison", "",
             f"Command: `python compare.py {spec.get('path', 'SPEC')}`; budget {spec['budget']}, seeds {spec['seeds']}. "
             f"Mean ± sample standard deviation over the finished seeds; differences are to `{groups[0][0]}`, "
             f"paired by seed.", "",
             "| run | command | seeds | iters | test bpc | test bpc - first | best val bpc | tokens/s | sparsity | "
             "protocol differs from first |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, script, args, runs in groups:
        f = [r.final for r in runs]
        test = mean_sd([x.get("test_bpc") for x in f])
        # paired by seed: the same seed draws the same batches, so its difference is the cleaner estimate
        diffs = [r.final["test_bpc"] - ref_by_seed[r.config.get("seed")] for r in runs
                 if r.final.get("test_bpc") is not None and ref_by_seed.get(r.config.get("seed")) is not None]
        differs = sorted({k for r in runs for k, v in protocol(r).items() if v != ref_protocol[k]})
        diff = fmt(*mean_sd(diffs), "+.4f") if not differs else "not comparable"
        lines.append(f"| {name} | `{script} {' '.join(args)}` | {len(runs)}/{len(spec['seeds'])} | "
                     f"{fmt(*mean_sd([x.get('iters') for x in f]), '.0f')} | {fmt(*test, '.4f')} | {diff} | "
                     f"{fmt(*mean_sd([x.get('best_val_bpc') for x in f]), '.4f')} | "
                     f"{fmt(*mean_sd([x.get('tokens_per_s') for x in f]), ',.0f')} | "
                     f"{fmt(*mean_sd([x.get('test_sparsity', x.get('sparsity')) for x in f]), '.3f')} | "
                     f"{', '.join(f'**{k}**' for k in differs) or '-'} |")
    lines += ["", "Protocol of the first run: " + "; ".join(f"{k} {v}" for k, v in ref_protocol.items()) + ".",
              "Test bpc: every byte of the test split scored once (sliding windows, stride eval_stride); tokens/s "
              "excludes evaluation and compile/warm-up; sparsity: measured over the whole test split (older runs: "
              "its last batch)."]
    os.makedirs(spec["out"], exist_ok=True)
    path = os.path.join(spec["out"], "comparison.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    plot(groups, spec["out"])
    return path


def plot(groups, out):
    plt = extraction.plt_module()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, _, _, runs) in enumerate(groups):
        color = colors[i % len(colors)]
        for j, r in enumerate(runs):
            for ax, x in zip(axes[:2], ("tokens", "elapsed_s")):
                ax.plot(*r.series("val_bpc", x), "-", color=color, alpha=0.7, lw=1, label=name if j == 0 else None)
        m, sd = mean_sd([r.final.get("test_bpc") for r in runs])
        if m is not None:
            axes[2].errorbar([i], [m], yerr=[sd or 0], fmt="o", color=color, capsize=4)
    axes[0].set_xlabel("tokens (bytes) trained")
    axes[1].set_xlabel("training wall-clock (s, excl. eval and compile)")
    for ax in axes[:2]:
        ax.set_ylabel("validation bits per byte")
        ax.legend(fontsize=7)
    axes[2].set_xticks(range(len(groups)), [g[0] for g in groups], rotation=20, fontsize=7)
    axes[2].set_ylabel("test bits per byte (mean ± sd over seeds)")
    fig.suptitle("validation curves per seed, and test bpc", fontsize=9)
    return extraction.save(fig, os.path.join(out, "compare_runs.png"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="a spec file such as compare/cpu_excerpt.py")
    p.add_argument("--seeds", type=int, nargs="+", help="override the spec's SEEDS")
    p.add_argument("--out", help="override the spec's OUT directory")
    p.add_argument("--report_only", action="store_true", help="only rebuild the table and plots")
    a = p.parse_args(argv)
    try:
        spec = load_spec(a.spec)
        spec["path"] = a.spec
        if a.seeds:
            spec["seeds"] = a.seeds
        if a.out:
            spec["out"] = a.out
        os.makedirs(spec["out"], exist_ok=True)
        failed = 0 if a.report_only else execute(spec)
        path = report(spec)
        print(open(path).read())
        print(f"wrote {path} and {os.path.join(spec['out'], 'compare_runs.png')}")
        return 1 if failed else 0
    except (CompareError, extraction.ExtractError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
