# The long-context setting at EQUAL ITERATIONS: T=4096, S=64, target sparsity 0.875, 300 iterations of
# 4096 bytes (about what dense makes in 600 s here: compare/cpu_long.py), on a 2-core CPU. Equal iterations do not
# depend on speed, so these runs may share the CPU:
#   python3 prepare_dataset.py --bundled && python3 compare.py compare/cpu_long_iters.py
# The model and protocol of compare/cpu_long.py; the sparsity ramp takes the first quarter (75 iterations), as the
# time-based ramp there does. ASCA runs the gather kernel (attn_impl='auto' picks it on the CPU at T >= 1024).
LONG = ["config/train_excerpt_cpu.py", "--data_dir=data/excerpt", "--block_size=4096", "--batch_size=1",
        "--warmup_iters=20", "--eval_interval=100", "--eval_iters=8"]
# --keep_first_block=True --local_blocks=0: ASCA's defaults before local_blocks (the sink, no forced local block)
ASCA = ["config/train_excerpt_cpu_novel.py"] + LONG[1:] + [
    "--sparse_block_size=64", "--target_sparsity=0.875", "--sparsity_warmup_iters=75", "--budget=fixed",
    "--gate_input=rotated", "--attn_impl=auto"]
RUNS = [
    ("dense_4096", "baseline_model.py", LONG),
    ("local1_nosink_0.875", "novel_model.py", ASCA + ["--local_blocks=1", "--keep_first_block=False"]),
    ("learned_0.875", "novel_model.py", ASCA + ["--keep_first_block=True", "--local_blocks=0"]),
]
BUDGET = {"max_iters": 300}
SEEDS = [1337]
OUT = "out/compare_cpu_long_iters"
