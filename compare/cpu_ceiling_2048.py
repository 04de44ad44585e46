# The ceiling at longer context: T=2048, S=64, target sparsity 0.875 (32 blocks; a tile keeps its own block, the
# nearest one and up to 3 more), 400 iterations of 4096 bytes at EQUAL ITERATIONS on a 2-core CPU (the runs may
# share it: OMP_NUM_THREADS=1, two at a time). Dense at T=2048, the learned choice, and every rule at the same
# counts: the nearest blocks, the oracle (the ceiling: an analysis control that saves nothing), the pooled mean-key
# gate and random blocks; and 'local_gated' (the nearest blocks with the learned gate bias: is the learned run's
# gain in its choice or in the gate's scaling of the blocks it keeps?). Every run ends with the long-range copy test
# (32 test windows per distance bucket; evaluate.copy_test), and each ASCA run logs the attention recall of its own
# choice and of the local rule's and the oracle's at the same counts.
#   python3 prepare_dataset.py --bundled && python3 compare.py compare/cpu_ceiling_2048.py
COMMON = ["--data_dir=data/excerpt", "--block_size=2048", "--batch_size=2", "--warmup_iters=30",
          "--eval_interval=100", "--eval_iters=16", "--eval_stride=1024", "--copy_test_windows=32"]
DENSE = ["config/train_excerpt_cpu.py"] + COMMON
ASCA = ["config/train_excerpt_cpu_novel.py"] + COMMON + [
    "--sparse_block_size=64", "--target_sparsity=0.875", "--sparsity_warmup_iters=100", "--budget=fixed",
    "--gate_input=rotated"]
RUNS = [
    ("dense", "baseline_model.py", DENSE),
    ("learned", "novel_model.py", ASCA + ["--selector=learned"], [1337, 1338]),
    ("local", "novel_model.py", ASCA + ["--selector=local"], [1337, 1338]),
    ("oracle", "novel_model.py", ASCA + ["--selector=oracle"], [1337, 1338]),
    ("pooled", "novel_model.py", ASCA + ["--selector=pooled"]),
    ("random", "novel_model.py", ASCA + ["--selector=random"]),
    ("local_gated", "novel_model.py", ASCA + ["--selector=local_gated"], [1337, 1338]),
    # added 2026-12-04: a smaller S (32: 64 blocks, a late tile keeps about 8), the learned choice
    # and the nearest blocks with the learned gate. (Two forced nearest blocks at S=64 cannot reach 0.875.)
    ("learned_s32", "novel_model.py", ASCA + ["--selector=learned", "--sparse_block_size=32"], [1337, 1338]),
    ("local_gated_s32", "novel_model.py", ASCA + ["--selector=local_gated", "--sparse_block_size=32"], [1337, 1338]),
    # added later the same day: the pooled affinity as one more input to the predictor's scores
    # (gate_pooled, its weight learned per head), and distillation toward the oracle's target (gate_loss=1.0: the KL to
    # the first query's dense block mass, after the 100-iteration ramp from dense)
    ("learned_pooled", "novel_model.py", ASCA + ["--selector=learned", "--gate_pooled=True"], [1337, 1338]),
    ("learned_distill", "novel_model.py", ASCA + ["--selector=learned", "--gate_loss=1.0"], [1337, 1338]),
    # and the learned choice biased toward near blocks (rank_distance_cost=0.1 per block between: the trained
    # learned_s1337's candidate scores spread by 0.1-0.5 within a tile, so a block 5 blocks farther needs 1-2 spreads)
    ("learned_near", "novel_model.py", ASCA + ["--selector=learned", "--rank_distance_cost=0.1"], [1337, 1338]),
]
BUDGET = {"max_iters": 400}
SEEDS = [1337]
OUT = "out/compare_cpu_ceiling_2048"
