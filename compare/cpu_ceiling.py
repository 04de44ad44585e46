# is there anything for a learned choice to find at T=512? At EQUAL ITERATIONS on a 2-core CPU, the
# setting of compare/cpu_quality.py (T=512, S=32, target sparsity 0.75, 500 iterations of 4096 bytes, today's
# defaults: the nearest block kept, no sink): dense, the learned choice, and every rule at the same counts: the
# nearest blocks, random blocks, the pooled mean-key gate (no parameters) and the oracle (the first query's dense
# block mass: the ceiling, an analysis control that saves nothing). Each ASCA run's evaluations log the attention
# recall of its own choice and of the local rule's and the oracle's at the same counts. local_gated: the nearest
# blocks with the learned gate bias on them.
#   python3 prepare_dataset.py --bundled && python3 compare.py compare/cpu_ceiling.py
import os

exec(open(os.path.join(os.path.dirname(__file__), "cpu_selectors.py")).read())  # DENSE, NOW

RUNS = [
    ("dense", "baseline_model.py", DENSE),
    ("learned", "novel_model.py", NOW + ["--selector=learned"]),
    ("local", "novel_model.py", NOW + ["--selector=local"]),
    ("pooled", "novel_model.py", NOW + ["--selector=pooled"]),
    ("oracle", "novel_model.py", NOW + ["--selector=oracle"]),
    ("random", "novel_model.py", NOW + ["--selector=random"]),
    # added 2026-12-04 after the T=2048 table (cpu_ceiling_2048.py): the nearest blocks with the learned gate bias
    ("local_gated", "novel_model.py", NOW + ["--selector=local_gated"]),
]
BUDGET = {"max_iters": 500}
SEEDS = [1337, 1338]
OUT = "out/compare_cpu_ceiling"
