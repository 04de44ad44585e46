# Making the learned choice find the record (the recall task's second table): compare/cpu_recall.py's setting and
# runs, with the learned predictor changed one way at a time. The rows of cpu_recall.py it is read against: dense,
# local, learned and task_oracle at the same sparsity (same seeds, same data).
#   python3 compare.py compare/cpu_recall_fix.py --jobs=2
import os

VARIANT = os.environ.get("RECALL_VARIANT", "A")
COMMON = ["config/train_tiny.py", f"--data_dir=data/recall_{VARIANT}", "--block_size=256", "--n_layer=2",
          "--n_embd=64", "--n_head=2", "--batch_size=16", "--eval_interval=100", "--eval_iters=4",
          "--learning_rate=3e-3", "--warmup_iters=10", "--eval_stride=256"]
ASCA = COMMON + ["--sparse_block_size=4", "--sparsity_warmup_iters=100", "--gate_input=rotated",
                 "--target_sparsity=0.75"]
RUNS = [
    ("learned_0.75", "novel_model.py", ASCA + ["--selector=learned"]),  # the reference: cpu_recall.py's row
    # a block's keys summarised by their per-dimension max, not the mean: the record is one key of four
    ("learned_max_0.75", "novel_model.py", ASCA + ["--selector=learned", "--gate_key_pool=max"]),
    # the choice sampled in training (Gumbel-top-k at temperature 1): blocks the predictor scores low get kept now
    # and then, so the gate bias's gradient reaches their scores (a random draw beat the learned choice here)
    ("learned_explore_0.75", "novel_model.py", ASCA + ["--selector=learned", "--explore_noise=1.0"]),
    # the parameter-free pooled score (which finds the record: cpu_recall.py's pooled row) added to the predictor's
    ("learned_pooled_0.75", "novel_model.py", ASCA + ["--selector=learned", "--gate_pooled=True"]),
]
BUDGET = {"max_iters": 1200}
SEEDS = [1337, 1338]
OUT = f"out/compare_cpu_recall_fix_{VARIANT}"
