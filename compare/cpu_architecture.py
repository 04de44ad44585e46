# The architecture table, one change at a time from nanoGPT's 2019 model, then all together,
# and ASCA on the new footing, at equal wall-clock (150 s of training each) on a 2-core CPU:
#   python3 prepare_dataset.py --bundled && python3 compare.py compare/cpu_architecture.py
# Model and batch of config/train_excerpt_cpu.py (4 layers, n_embd 256, 4 heads, T=256, batch 16);
# max_iters=1000 is the horizon the schedules are laid out on (about what 150 s allow).
OLD = ["--pos_encoding=learned", "--qk_norm=false", "--mlp_act=gelu", "--tie_embeddings=true", "--optimizer=adamw"]
NEW = ["--pos_encoding=rope", "--qk_norm=true", "--mlp_act=relu2", "--tie_embeddings=false", "--optimizer=muon"]
BASE = ["config/train_excerpt_cpu.py", "--data_dir=data/excerpt", "--eval_interval=250"]


def change(i):
    """OLD with its i-th setting replaced by NEW's."""
    return OLD[:i] + [NEW[i]] + OLD[i + 1:]


# --keep_first_block=True --local_blocks=0 pin ASCA's defaults before local_blocks (the sink, no forced local block),
# with which these rows were measured
ASCA = ["config/train_excerpt_cpu_novel.py", "--data_dir=data/excerpt", "--eval_interval=250",
        "--sparse_block_size=16",  # S=16: T=256 reaches 0.75 (S=32 tops out at 0.65)
        "--gate_input=unrotated",  # what README's tables were measured with (the default was unrotated then)
        "--keep_first_block=True", "--local_blocks=0"]
RUNS = [
    ("old_nanogpt", "baseline_model.py", BASE + OLD),
    ("rope", "baseline_model.py", BASE + change(0)),
    ("qk_norm", "baseline_model.py", BASE + change(1)),
    ("relu2", "baseline_model.py", BASE + change(2)),
    ("untied", "baseline_model.py", BASE + change(3)),
    ("muon", "baseline_model.py", BASE + change(4)),
    ("all_new", "baseline_model.py", BASE + NEW),
    ("all_but_qk_norm", "baseline_model.py", BASE + NEW[:1] + OLD[1:2] + NEW[2:]),
    ("rope_muon", "baseline_model.py", BASE + NEW[:1] + OLD[1:4] + NEW[4:]),
    ("asca_0", "novel_model.py", ASCA + NEW + ["--target_sparsity=0.0"]),
    ("asca_0.5", "novel_model.py", ASCA + NEW + ["--target_sparsity=0.5"]),
    ("asca_0.75", "novel_model.py", ASCA + NEW + ["--target_sparsity=0.75"]),
]
BUDGET = {"max_time_s": 150, "max_iters": 1000}
SEEDS = [1337, 1338]
OUT = "out/compare_cpu_architecture"
