# What ASCA's predictor should read with rotary positions, and whether its block-distance bias still helps,
# at equal wall-clock (150 s) on a 2-core CPU, against the dense new default:
#   python3 prepare_dataset.py --bundled && python3 compare.py compare/cpu_gate.py
# Same run directories as compare/cpu_architecture.py: runs finished there are reused.
import os

exec(open(os.path.join(os.path.dirname(__file__), "cpu_architecture.py")).read())
RUNS = [r for r in RUNS if r[0] in ("all_new", "asca_0.5")] + [
    ("asca_0.5_rotated_gate", "novel_model.py", ASCA + NEW + ["--target_sparsity=0.5", "--gate_input=rotated"]),
    ("asca_0.5_no_dist_bias", "novel_model.py", ASCA + NEW + ["--target_sparsity=0.5", "--gate_dist_bias=false"]),
]
SEEDS = [1337]
