# does ASCA's lead over dense survive 4x more steps? The setting of compare/cpu_quality.py
# (T=512, S=32, target sparsity 0.75, today's defaults) trained 2000 iterations of 4096 bytes instead of 500, at
# EQUAL ITERATIONS on a 2-core CPU (the runs may share it: --jobs=2). Val every 250 iterations; the test split is
# also scored at iteration 500 (test_iters: final.json's test_bpc_at_iter), so the table shows whether the gap
# moves between 500 and 2000 on the same runs. Dense and the learned choice two seeds, the nearest-blocks rule one.
#   python3 prepare_dataset.py --bundled && python3 compare.py compare/cpu_long_train.py --jobs=2
COMMON = ["--data_dir=data/excerpt", "--block_size=512", "--batch_size=8", "--eval_interval=250",
          "--eval_stride=256", "--test_iters=500"]
DENSE = ["config/train_excerpt_cpu.py"] + COMMON
ASCA = ["config/train_excerpt_cpu_novel.py"] + COMMON + [
    "--sparse_block_size=32", "--target_sparsity=0.75", "--sparsity_warmup_iters=150", "--gate_input=rotated",
    "--budget=fixed"]
RUNS = [
    ("dense", "baseline_model.py", DENSE, [1337, 1338]),
    ("learned", "novel_model.py", ASCA + ["--selector=learned"], [1337, 1338]),
    ("local", "novel_model.py", ASCA + ["--selector=local"], [1337]),
]
BUDGET = {"max_iters": 2000}
SEEDS = [1337]
OUT = "out/compare_cpu_long_train"
