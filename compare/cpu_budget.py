# ASCA's adaptive budget against the fixed one, at EQUAL ITERATIONS on a 2-core CPU:
# T=512, S=32, target sparsity 0.75 (the maximum at this shape is 0.82), the new default architecture,
# 500 iterations of 4096 bytes, two seeds. Compare test bpc at the measured test sparsity.
#   python3 prepare_dataset.py --bundled && python3 compare.py compare/cpu_budget.py
# --keep_first_block=True --local_blocks=0 pin ASCA's defaults before local_blocks (the sink, no forced local block),
# with which these rows were measured
COMMON = ["config/train_excerpt_cpu_novel.py", "--data_dir=data/excerpt", "--block_size=512", "--batch_size=8",
          "--sparse_block_size=32", "--target_sparsity=0.75", "--sparsity_warmup_iters=150", "--eval_interval=100",
          "--eval_stride=256", "--gate_input=unrotated",  # as README's table was measured (the defaults then)
          "--keep_first_block=True", "--local_blocks=0"]
RUNS = [
    ("fixed", "novel_model.py", COMMON + ["--budget=fixed"]),
    ("adaptive", "novel_model.py", COMMON + ["--budget=adaptive"]),
]
BUDGET = {"max_iters": 500}
SEEDS = [1337, 1338]
OUT = "out/compare_cpu_budget"
# The first measurement (2026-11-29) showed the layer-shared threshold ends winner-take-all: in layers 1-3 one
# head kept nearly the whole budget and the others only their sink. One threshold per head holds each head
# at the target and leaves the content to move budget between tiles and sequences:
RUNS.append(("adaptive_head", "novel_model.py", COMMON + ["--budget=adaptive", "--budget_scope=head"]))
