"""
Bit-for-bit fingerprint of short fixed-seed CPU training runs, to show that a refactor changes no behaviour:
run it before and after the change and compare the two files (they must be identical).

    python3 scripts/fingerprint.py --out /tmp/before.json     # on the old commit
    python3 scripts/fingerprint.py --out /tmp/after.json      # on the new one
    cmp /tmp/before.json /tmp/after.json
    python3 scripts/fingerprint.py --extra=--muon_ns_dtype=bfloat16 --out /tmp/x.json   # a key added to every case

Each case trains the tiny model (config/train_tiny.py) for 20 iterations on the first 400 KB of the bundled
excerpt (split into a temporary directory), evaluating every 5, then resumes it for 10 more. The fingerprint is
every metrics row (losses as Python floats, exact), the test bpc, and a sha256 of the final weights (under
their pre-refactor names, legacy_names) and of the optimizer state. Timing fields are left out (they change from
run to run).
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TINY = ["config/train_tiny.py", "--eval_interval=5", "--final_test=True",
        "--eval_stride=32", "--eval_iters=1"]
NOVEL = TINY + ["--block_size=128", "--sparse_block_size=16", "--target_sparsity=0.5", "--sparsity_warmup_iters=8",
                "--gate_input=rotated"]
CASES = {
    "dense": ("baseline_model.py", TINY),
    "dense_nanogpt": ("baseline_model.py", TINY + ["--pos_encoding=learned", "--qk_norm=false", "--mlp_act=gelu",
                                                   "--tie_embeddings=true", "--optimizer=adamw", "--dropout=0.1"]),
    "asca_reference": ("novel_model.py", NOVEL + ["--attn_impl=reference"]),
    "asca_gather": ("novel_model.py", NOVEL + ["--attn_impl=gather"]),
    "asca_adaptive": ("novel_model.py", NOVEL + ["--attn_impl=reference", "--budget=adaptive", "--dropout=0.1"]),
    "asca_adaptive_gather": ("novel_model.py", NOVEL + ["--attn_impl=gather", "--budget=adaptive",
                                                        "--budget_scope=head"]),
    "asca_local": ("novel_model.py", NOVEL + ["--attn_impl=gather", "--selector=local"]),
    "asca_random": ("novel_model.py", NOVEL + ["--attn_impl=reference", "--selector=random"]),
    "asca_unrotated_learned_pos": ("novel_model.py", NOVEL + ["--attn_impl=reference", "--gate_input=unrotated",
                                                              "--gate_dist_bias=false"]),
}
TIMING = {"elapsed_s", "tokens_per_s", "mfu", "other_cpu_load"}
# measurements added after the first fingerprints (no_grad diagnostics that change no weight or loss): left out, so
# a fingerprint from before them still compares
ADDED = ("recall", "train_flops")


def tree_digest(obj, h=None):
    """sha256 over a nested structure of dicts, lists and tensors (keys sorted, tensors by their bytes)."""
    import torch
    top = h is None
    h = h or hashlib.sha256()
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(repr(k).encode())
            tree_digest(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            tree_digest(v, h)
    elif torch.is_tensor(obj):
        h.update(str(obj.dtype).encode() + repr(tuple(obj.shape)).encode())
        h.update(obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        h.update(repr(obj).encode())
    return h.hexdigest() if top else None


def run_case(name, script, args, tmp, extra_args=()):
    import torch
    out = os.path.join(tmp, name)
    base = [sys.executable, os.path.join(ROOT, script), *args, *extra_args, f"--data_dir={os.path.join(tmp, 'data')}",
            f"--out_dir={out}", "--seed=1337"]
    for extra in (["--max_iters=20"], ["--max_iters=30", "--init_from=resume"]):
        r = subprocess.run(base + extra, cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        if r.returncode:
            raise SystemExit(f"{name} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    rows = [{k: v for k, v in json.loads(line).items() if k not in TIMING and not k.startswith(ADDED)}
            for line in open(os.path.join(out, "metrics.jsonl"))]
    final = json.load(open(os.path.join(out, "final.json")))
    ck = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=False)
    return {"metrics": rows, "test_bpc": final.get("test_bpc"), "test_sparsity": final.get("test_sparsity"),
            "weights": tree_digest(legacy_names(ck["model"])), "optimizer": tree_digest(ck["optimizer"])}


def legacy_names(sd):
    """The weights under their names before the selector had its own module: attn.selector.X was
    attn.X. Fingerprints from both sides of that change then compare; the tensors are what is compared."""
    return {k.replace(".attn.selector.", ".attn."): v for k, v in sd.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write the fingerprint here (default: stdout)")
    p.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    p.add_argument("--extra", action="append", default=[], metavar="--KEY=VALUE",
                   help="a training argument added to every case (repeatable)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        import lzma
        src = os.path.join(tmp, "excerpt.txt")
        with lzma.open(os.path.join(ROOT, "assets", "enwik8_excerpt.txt.xz")) as f, open(src, "wb") as g:
            g.write(f.read(400_000))
        subprocess.run([sys.executable, os.path.join(ROOT, "prepare_dataset.py"), "--input", src, "--out_dir",
                        os.path.join(tmp, "data")], check=True, capture_output=True)
        fp = {name: run_case(name, *CASES[name], tmp, a.extra) for name in a.cases}
    text = json.dumps(fp, indent=1, sort_keys=True) + "\n"
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
        print(f"wrote {a.out} ({len(fp)} cases)")
    else:
        print(text)


if __name__ == "__main__":
    main()
