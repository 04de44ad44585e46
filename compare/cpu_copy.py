# retrieval to learn. T=1024, S=32, target sparsity 0.875 (32 blocks: a late tile keeps its own block,
# the nearest one and about 2 more), 400 iterations of 4096 bytes at EQUAL ITERATIONS on a 2-core CPU, with copies
# planted in the training windows (copy_augment), so that retrieving a source pays. Every run ends with the
# long-range copy test (32 test windows per distance bucket): bpc on copied bytes next to the same bytes unplanted.
# Rows: dense, the learned choice, the nearest blocks (which cannot reach a source beyond them, by construction)
# and the oracle (the ceiling; saves nothing), with every training window holding a 256-byte copy (a quarter of its
# bytes); and dense with half the windows holding a 64-byte copy (3% of the bytes), the first setting tried.
#   python3 prepare_dataset.py --bundled && python3 compare.py compare/cpu_copy.py --jobs=2
COMMON = ["--data_dir=data/excerpt", "--block_size=1024", "--batch_size=4", "--warmup_iters=30",
          "--eval_interval=100", "--eval_iters=16", "--eval_stride=512", "--copy_test_windows=32"]
STRONG = ["--copy_augment=1.0", "--copy_len=256"]
DENSE = ["config/train_excerpt_cpu.py"] + COMMON
ASCA = ["config/train_excerpt_cpu_novel.py"] + COMMON + [
    "--sparse_block_size=32", "--target_sparsity=0.875", "--sparsity_warmup_iters=100", "--budget=fixed",
    "--gate_input=rotated"]
RUNS = [
    ("dense", "baseline_model.py", DENSE + STRONG),
    ("learned", "novel_model.py", ASCA + STRONG + ["--selector=learned"]),
    ("local", "novel_model.py", ASCA + STRONG + ["--selector=local"]),
    ("oracle", "novel_model.py", ASCA + STRONG + ["--selector=oracle"]),
    ("dense_weak", "baseline_model.py", DENSE + ["--copy_augment=0.5"]),
]
BUDGET = {"max_iters": 400}
SEEDS = [1337]
OUT = "out/compare_cpu_copy"
