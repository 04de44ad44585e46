"""Throughput of a bare forward/backward/AdamW loop on the baseline model, without trainer.py:
the yardstick for the trainer's own overhead (compare with the tokens/s in final.json).

    python scripts/bench_plain_loop.py --data_dir data/excerpt       # CPU config of config/train_excerpt_cpu.py
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gpt  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--data_dir", default="data/excerpt")
p.add_argument("--steps", type=int, default=40)
p.add_argument("--batch_size", type=int, default=16)
p.add_argument("--block_size", type=int, default=256)
a = p.parse_args()
torch.manual_seed(0)
model = gpt.make_model(n_layer=4, n_head=4, n_embd=256, block_size=a.block_size)
opt = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu")
data = np.memmap(os.path.join(a.data_dir, "train.bin"), dtype=np.uint8, mode="r")
times = []
for step in range(a.steps):
    t0 = time.perf_counter()
    ix = torch.randint(len(data) - a.block_size - 1, (a.batch_size,)).tolist()
    x = torch.from_numpy(np.stack([data[i:i + a.block_size] for i in ix]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + a.block_size] for i in ix]).astype(np.int64))
    _, loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t0)
tok = a.batch_size * a.block_size
print(f"plain loop: {tok / statistics.median(times[5:]):,.0f} tokens/s "
      f"(median of {len(times) - 5} steps after 5 warm-up), "
      f"torch {torch.__version__}, {torch.get_num_threads()} threads")
