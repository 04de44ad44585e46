# Does the learned block choice beat a fixed rule at the same compute? At EQUAL ITERATIONS on a 2-core
# CPU, the setting of compare/cpu_budget.py: T=512, S=32, target sparsity 0.75, 500 iterations of 4096 bytes,
# the new default architecture; dense at T=512 first, then ASCA with the learned selector (today's default,
# gate_input=rotated) and the two controls at its budget, on the same kernel and without a gate bias:
#   python3 prepare_dataset.py --bundled && python3 compare.py compare/cpu_selectors.py
DENSE = ["config/train_excerpt_cpu.py", "--data_dir=data/excerpt", "--block_size=512", "--batch_size=8",
         "--eval_interval=100", "--eval_stride=256"]
# --keep_first_block=True --local_blocks=0 pin ASCA's defaults before local_blocks (the sink, no forced local block),
# with which these rows were measured
ASCA = ["config/train_excerpt_cpu_novel.py", "--data_dir=data/excerpt", "--block_size=512", "--batch_size=8",
        "--sparse_block_size=32", "--target_sparsity=0.75", "--sparsity_warmup_iters=150", "--eval_interval=100",
        "--eval_stride=256", "--gate_input=rotated", "--budget=fixed"]
OLD_SELECTION = ["--keep_first_block=True", "--local_blocks=0"]
NOW = ASCA  # today's defaults (the nearest block, no sink)
ASCA = ASCA + OLD_SELECTION
RUNS = [
    ("dense", "baseline_model.py", DENSE),
    ("learned", "novel_model.py", ASCA + ["--selector=learned"]),
    ("local", "novel_model.py", ASCA + ["--selector=local"]),
    ("random", "novel_model.py", ASCA + ["--selector=random"]),
]
BUDGET = {"max_iters": 500}
SEEDS = [1337, 1338]
OUT = "out/compare_cpu_selectors"
