# The ablation: what closes ASCA's gap to dense at high sparsity? At EQUAL ITERATIONS on a 2-core CPU, the
# setting of compare/cpu_budget.py and compare/cpu_selectors.py: T=512, S=32, target sparsity 0.75, 500 iterations
# of 4096 bytes. dense, ASCA today (learned, fixed budget), the plain local rule, then each element alone:
#   python3 prepare_dataset.py --bundled && python3 compare.py compare/cpu_quality.py
# At this shape the budget is tight: 16 blocks per sequence, and 0.75 leaves about 9 past blocks beyond the sinks
# to the 15 later tiles of a sequence (the maximum with the sink is 0.819). So local_blocks=1 with the sink is out
# of reach (at most 0.710): the local-blocks row drops the sink and forces the nearest block instead.
import os

exec(open(os.path.join(os.path.dirname(__file__), "cpu_selectors.py")).read())  # DENSE, ASCA

RUNS = [
    ("dense", "baseline_model.py", DENSE),
    ("learned", "novel_model.py", ASCA + ["--selector=learned"]),  # ASCA before local_blocks: the sink, no local block
    ("local_rule", "novel_model.py", ASCA + ["--selector=local"]),
    # the nearest block instead of the sink (today's defaults, spelled out)
    ("local_blocks1_nosink", "novel_model.py", NOW + ["--local_blocks=1", "--keep_first_block=False"]),
    # its control: the same counts, the nearest blocks by rule instead of the predictor's choice for the rest
    ("local_rule_local1_nosink", "novel_model.py", NOW + ["--selector=local", "--local_blocks=1",
                                                          "--keep_first_block=False"]),
    ("gate_loss1", "novel_model.py", ASCA + ["--gate_loss=1.0"]),
    ("layers_0.6_0.8", "novel_model.py", ASCA + ["--layer_sparsity=0.6,0.8,0.8,0.8"]),
    ("compressed", "novel_model.py", ASCA + ["--compressed_branch=True"]),
    # the two elements that each gained alone together (compressed and the per-layer split did not gain)
    ("local1_nosink_gate1", "novel_model.py", NOW + ["--local_blocks=1", "--keep_first_block=False",
                                                     "--gate_loss=1.0"]),
]
BUDGET = {"max_iters": 500}
SEEDS = [1337, 1338]
OUT = "out/compare_cpu_quality"
