"""
Generate bytes from a trained run (baseline or ASCA; the checkpoint says which).

    python sample.py --out_dir=out/baseline --start="The " --num_bytes=500 --temperature=0.8 --top_k=40
"""
import argparse
import math
import os
import sys

import torch

from checkpoint import CheckpointError, model_from_checkpoint


@torch.no_grad()
def generate(model, prompt: bytes, num_bytes, temperature=1.0, top_k=None, generator=None, device="cpu",
             kv_cache=True):
    """Autoregressive sampling of num_bytes bytes after `prompt` (at least one byte).

    kv_cache=True: prefill the prompt once, then one byte per step from the cached keys and values (ASCA
    chooses each tile's blocks once, at its first byte, as its training forward does): the same logits as
    a full forward over the context. Past block_size bytes the cache keeps the last block_size // 2 bytes
    and prefills them again (one full forward every block_size // 2 bytes).
    kv_cache=False: a full forward over the last block_size bytes for every byte (the sliding window).
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1 (or None), got {top_k}")
    if num_bytes < 0:
        raise ValueError(f"num_bytes must be >= 0, got {num_bytes}")
    if not prompt:
        raise ValueError("the prompt is empty: give at least one byte (the CLI's default is a newline)")
    model.eval()
    block = model.config.block_size
    context = list(prompt)
    out = []

    def prefill(tokens):
        cache = model.new_cache()
        return cache, model.forward_cached(torch.tensor([tokens], dtype=torch.long, device=device), cache)[:, -1]

    if kv_cache:
        context = context[-block:]
        cache, logits = prefill(context)
    for i in range(num_bytes):
        if not kv_cache:
            logits = model(torch.tensor([context[-block:]], dtype=torch.long, device=device))[0][:, -1]
        nxt = sample_next(logits, temperature, top_k, generator)
        out.append(nxt)
        context.append(nxt)
        if kv_cache and i + 1 < num_bytes:
            if cache.pos >= block:  # full: keep the newest half and prefill it again
                context = context[-(block // 2):]
                cache, logits = prefill(context)
            else:
                logits = model.forward_cached(torch.tensor([[nxt]], dtype=torch.long, device=device), cache)[:, -1]
    return bytes(out)


def sample_next(logits, temperature, top_k, generator):
    """One byte from logits (1, 256): temperature, optional top-k, then a draw from `generator`."""
    logits = logits.float() / temperature
    if top_k:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("inf")
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).item())


def main(argv=None):
    p = argparse.ArgumentParser(description="Sample bytes from a run's checkpoint; prints decoded text "
                                            "(invalid UTF-8 replaced).")
    p.add_argument("--out_dir", required=True, help="run directory holding ckpt.pt (or best.pt with --best)")
    p.add_argument("--best", action="store_true", help="use best.pt (best validation) instead of ckpt.pt")
    p.add_argument("--start", default="\n", help="prompt text; prefix FILE: to read it from a file")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--num_bytes", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--kv_cache", default="true", choices=("true", "false"),
                   help="decode from a KV cache (default), or re-run the whole window for every byte")
    p.add_argument("--compile", default="false", choices=("true", "false"),
                   help="compile the cached step's pure parts (GPT.compile_decoding): seconds of compile before "
                        "the first byte, then a faster step (long generations)")
    a = p.parse_args(argv)
    try:
        check_args(a)
        prompt = read_prompt(a.start)
        model, _ = model_from_checkpoint(f"{a.out_dir}/{'best' if a.best else 'ckpt'}.pt", a.device)
        model.for_sampling()  # ASCA: the gather path, nothing to compile before the first byte
        if a.compile == "true":
            model.compile_decoding()
        g = torch.Generator(device=a.device).manual_seed(a.seed)
        for i in range(a.num_samples):
            out = generate(model, prompt, a.num_bytes, a.temperature, a.top_k, g, a.device, a.kv_cache == "true")
            print((prompt + out).decode("utf-8", errors="replace"))
            if i + 1 < a.num_samples:
                print("-" * 40)
    except (CheckpointError, SampleError, ValueError) as e:  # ValueError: what a model cannot do (one line)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


class SampleError(Exception):
    pass


MIN_TEMPERATURE = 1e-4  # below it logits / temperature overflow float32 (to inf, and NaN probabilities)
MAX_SEED = 2 ** 63 - 1  # torch.Generator.manual_seed's range


def read_prompt(start):
    """The prompt's bytes: --start's text, or with FILE:PATH that file's bytes (a one-line error if the file
    is missing or empty)."""
    if not start.startswith("FILE:"):
        return start.encode("utf-8")
    path = start[5:]
    if not os.path.isfile(path):
        raise SampleError(f"--start=FILE:{path}: no such file; give FILE:PATH of a text file")
    with open(path, "rb") as f:
        prompt = f.read()
    if not prompt:
        raise SampleError(f"--start=FILE:{path} is empty: give a file with at least one byte of prompt")
    return prompt


def check_args(a):
    """One-line errors for impossible arguments, before anything loads."""
    if not (math.isfinite(a.temperature) and a.temperature >= MIN_TEMPERATURE):
        raise SampleError(f"--temperature must be a finite number >= {MIN_TEMPERATURE}, got {a.temperature}; "
                          f"for greedy decoding use --top_k=1")
    if a.top_k is not None and a.top_k < 1:
        raise SampleError(f"--top_k must be at least 1 (or left out), got {a.top_k}")
    for name in ("num_bytes", "num_samples"):
        if getattr(a, name) < (0 if name == "num_bytes" else 1):
            raise SampleError(f"--{name} must be >= {0 if name == 'num_bytes' else 1}, got {getattr(a, name)}")
    if a.compile == "true" and a.kv_cache != "true":
        raise SampleError("--compile=true compiles the cached decoding step; use it with --kv_cache=true")
    if not a.start:
        raise SampleError("--start is empty: give at least one byte of prompt (the default is a newline)")
    if not 0 <= a.seed <= MAX_SEED:
        raise SampleError(f"--seed must be in [0, 2**63 - 1], got {a.seed}")
    if a.device.lower() != a.device or not (a.device in ("cpu", "cuda") or a.device.startswith("cuda:")):
        raise SampleError(f"--device={a.device} is not one of cpu, cuda, cuda:N (lower case)")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SampleError(f"--device={a.device} but CUDA is not available here; use --device=cpu")


if __name__ == "__main__":
    sys.exit(main())
