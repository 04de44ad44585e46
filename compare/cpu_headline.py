# The headline rows of compare/cpu_architecture.py with a second seed: nanoGPT's model, the new default, and
# ASCA on the new footing at sparsity 0 / 0.5 / 0.75, at equal wall-clock (150 s each) on a 2-core CPU:
#   python3 prepare_dataset.py --bundled && python3 compare.py compare/cpu_headline.py
# Same run directories as compare/cpu_architecture.py: runs finished there are reused.
import os

exec(open(os.path.join(os.path.dirname(__file__), "cpu_architecture.py")).read())
RUNS = [r for r in RUNS if r[0] in ("old_nanogpt", "all_new", "asca_0", "asca_0.5", "asca_0.75")]
SEEDS = [1337, 1338]
