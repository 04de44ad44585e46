# Does sampling the learned choice in training (explore_noise: Gumbel-top-k, which let the learned predictor find the
# recall task's records, docs/results/cpu_recall.md) cost anything on enwik8? The main job's setting (T=256, S=32,
# target sparsity 0.5, 600 iterations of 4096 bytes: main_job.sh's command), the default learned choice against the
# same with explore_noise=1.0, and dense at the same T; EQUAL ITERATIONS (OMP_NUM_THREADS=1 each, --jobs=2 allowed).
#   python3 prepare_dataset.py --bundled && python3 compare.py compare/cpu_explore.py --jobs=2
MAIN = ["config/train_excerpt_cpu_novel.py", "--data_dir=data/excerpt", "--eval_interval=150", "--gate_input=rotated"]
DENSE = ["config/train_excerpt_cpu.py", "--data_dir=data/excerpt", "--eval_interval=150"]
RUNS = [
    ("learned", "novel_model.py", MAIN),
    ("learned_explore", "novel_model.py", MAIN + ["--explore_noise=1.0"]),
    ("dense", "baseline_model.py", DENSE),
]
BUDGET = {"max_iters": 600}
SEEDS = [1337, 1338]
OUT = "out/compare_cpu_explore"
