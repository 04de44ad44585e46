# ASCA against the dense model on the new footing at EQUAL ITERATIONS (300 iterations, 1.2M bytes each):
#   python3 prepare_dataset.py --bundled && python3 compare.py compare/cpu_sparsity_iters.py
# Equal wall-clock is in compare/cpu_architecture.py (its all_new and asca_* rows).
NEW = ["--pos_encoding=rope", "--qk_norm=true", "--mlp_act=relu2", "--tie_embeddings=false", "--optimizer=muon"]
# --keep_first_block=True --local_blocks=0 pin ASCA's defaults before local_blocks (the sink, no forced local block),
# with which these rows were measured
ASCA = ["config/train_excerpt_cpu_novel.py", "--data_dir=data/excerpt", "--eval_interval=100", "--sparse_block_size=16",
        "--sparsity_warmup_iters=100", "--gate_input=unrotated",  # as README's table was measured
        "--keep_first_block=True", "--local_blocks=0"]
RUNS = [
    ("dense", "baseline_model.py", ["config/train_excerpt_cpu.py", "--data_dir=data/excerpt",
                                    "--eval_interval=100"] + NEW),
    ("asca_0", "novel_model.py", ASCA + NEW + ["--target_sparsity=0.0"]),
    ("asca_0.5", "novel_model.py", ASCA + NEW + ["--target_sparsity=0.5"]),
    ("asca_0.75", "novel_model.py", ASCA + NEW + ["--target_sparsity=0.75"]),
]
BUDGET = {"max_iters": 300}
SEEDS = [1337]
OUT = "out/compare_cpu_sparsity_iters"
