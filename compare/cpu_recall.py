# Can the learned choice find what is there? The synthetic recall task (recall_task.py): records early in each
# 257-byte episode, 32 queries later, each at least 64 bytes after its record, far beyond the blocks every tile keeps
# (its own 4 bytes and the 4 before). Dense learns it; the nearest-blocks rule cannot, by construction. Every arm at the
# same counts, EQUAL ITERATIONS, a 2-layer n_embd 64 model (the task, not enwik8, is what is measured: answer accuracy
# and bits per answer by distance in final.json's recall_task; answer_acc at every evaluation in metrics.jsonl).
#   python3 prepare_dataset.py --synthetic recall --recall_variant A     # data/recall_A (and B for variant B)
#   python3 compare.py compare/cpu_recall.py --jobs=2
# Variant B: --out and DATA below (or compare/cpu_recall_b.py).
import os

VARIANT = os.environ.get("RECALL_VARIANT", "A")
COMMON = ["config/train_tiny.py", f"--data_dir=data/recall_{VARIANT}", "--block_size=256", "--n_layer=2",
          "--n_embd=64", "--n_head=2", "--batch_size=16", "--eval_interval=100", "--eval_iters=4",
          "--learning_rate=3e-3", "--warmup_iters=10", "--eval_stride=256"]
ASCA = COMMON + ["--sparse_block_size=4", "--sparsity_warmup_iters=100", "--gate_input=rotated"]
RUNS = [("dense", "baseline_model.py", COMMON),
        # dense + gate: every block kept, the learned gate bias on each (the control every sparse row stands next to)
        ("dense_gate", "novel_model.py", ASCA + ["--target_sparsity=0.0"])]
for sp in ("0.75", "0.875"):
    for sel in ("learned", "local", "task_oracle", "local_gated", "random", "pooled", "nsa"):
        RUNS.append((f"{sel}_{sp}", "novel_model.py", ASCA + [f"--target_sparsity={sp}", f"--selector={sel}"]))
BUDGET = {"max_iters": 1200}
SEEDS = [1337, 1338]
OUT = f"out/compare_cpu_recall_{VARIANT}"
