# The second setting: T=256, S=16, target sparsity 0.75, at EQUAL ITERATIONS (300 iterations of 4096 bytes,
# the setting of compare/cpu_sparsity_iters.py, where ASCA at 0.75 was 0.164 bpc behind dense) on a 2-core CPU:
#   python3 prepare_dataset.py --bundled && python3 compare.py compare/cpu_quality_t256.py
# dense, ASCA today (learned, fixed budget, gate_input=rotated: the footing of compare/cpu_quality.py), and the
# best of compare/cpu_quality.py (the nearest block instead of the sink; distillation added nothing to it).
# T=256 with S=16 has 16 blocks per sequence, as T=512 with S=32.
NEW = ["--pos_encoding=rope", "--qk_norm=true", "--mlp_act=relu2", "--tie_embeddings=false", "--optimizer=muon"]
DENSE = ["config/train_excerpt_cpu.py", "--data_dir=data/excerpt", "--eval_interval=100"] + NEW
# --keep_first_block=True --local_blocks=0: ASCA's defaults before local_blocks (the sink, no forced local block)
ASCA = ["config/train_excerpt_cpu_novel.py", "--data_dir=data/excerpt", "--eval_interval=100", "--sparse_block_size=16",
        "--target_sparsity=0.75", "--sparsity_warmup_iters=100", "--gate_input=rotated", "--budget=fixed"] + NEW
RUNS = [
    ("dense", "baseline_model.py", DENSE),
    ("learned", "novel_model.py", ASCA + ["--keep_first_block=True", "--local_blocks=0"]),
    ("local1_nosink", "novel_model.py", ASCA + ["--local_blocks=1", "--keep_first_block=False"]),
]
BUDGET = {"max_iters": 300}
SEEDS = [1337, 1338]
OUT = "out/compare_cpu_quality_t256"
