# the main job's setting (T=256, S=32, target sparsity 0.5, 600 iterations of 4096 bytes: main_job.sh's
# command) with the learned choice (the default) and with the nearest blocks carrying the learned gate bias
# (selector=local_gated), which beat the learned choice at T=2048 and 0.875 (docs/results/cpu_ceiling_2048.md);
# EQUAL ITERATIONS on a 2-core CPU (two at a time, OMP_NUM_THREADS=1: the bpc does not depend on it).
#   python3 prepare_dataset.py --bundled && python3 compare.py compare/cpu_main_selector.py --jobs=2
MAIN = ["config/train_excerpt_cpu_novel.py", "--data_dir=data/excerpt", "--eval_interval=150", "--gate_input=rotated"]
DENSE = ["config/train_excerpt_cpu.py", "--data_dir=data/excerpt", "--eval_interval=150"]
RUNS = [
    ("dense", "baseline_model.py", DENSE),  # the control at the same T (added 2026-12-04 20:50 UTC)
    ("learned", "novel_model.py", MAIN),
    ("local_gated", "novel_model.py", MAIN + ["--selector=local_gated"]),
    # and the learned choice with a cost of 0.1 per block between in its ranking (rank_distance_cost), which beat both
    # at T=2048 and 0.875 (added 2026-12-04 19:46 UTC)
    ("learned_near", "novel_model.py", MAIN + ["--rank_distance_cost=0.1"]),
]
BUDGET = {"max_iters": 600}
SEEDS = [1337]
OUT = "out/compare_cpu_main_selector"
