# Smoke comparison on the tiny test config (seconds): python compare.py compare/tiny.py --out out/compare_tiny
# Needs data: python prepare_dataset.py --bundled
RUNS = [
    ("baseline", "baseline_model.py", ["config/train_tiny.py", "--data_dir=data/excerpt"]),
    ("asca", "novel_model.py", ["config/train_tiny.py", "--data_dir=data/excerpt", "--sparse_block_size=16",
                                "--target_sparsity=0.3", "--sparsity_warmup_iters=10"]),
]
BUDGET = {"max_iters": 20}
SEEDS = [1337, 1338]
OUT = "out/compare_tiny"
