# Can sparse attention hold dense's quality past early training? Table 1 of the match-dense study: the setting of
# compare/cpu_long_train.py (T=512, S=32, batch 8, 2000 iterations of 4096 bytes, 1.8 epochs of the excerpt's train
# split) with the arms that match dense elsewhere, at EQUAL ITERATIONS on a 2-core CPU (--jobs=2 side by side):
# - dense, and dense + gate (ASCA at target_sparsity=0: every block kept, the learned gate bias on each past block);
# - the default learned choice and local_gated at 0.75;
# - one dense (+ gate) layer, the last, with the others at 0.75, against uniform 0.5625: equal attention FLOPs;
# - keep_tokens=256 (an absolute budget: a tile keeps at most 256 keys; 0.28 of the pairs skipped at T=512);
# - dense_from=0.9 (sparse at 0.75, dense for the last 10% of the iterations: a training-cost saving only);
# - NSA's three gated branches (selector=nsa) at 0.75.
# Val every 250 iterations; the test split also at 500 (final.json's test_bpc_at_iter).
#   python3 prepare_dataset.py --bundled && python3 compare.py compare/cpu_match_dense.py --jobs=2
#   python3 compare.py compare/cpu_match_dense.py --jobs=2 --seeds 1337     # one seed of every arm first
COMMON = ["--data_dir=data/excerpt", "--block_size=512", "--batch_size=8", "--eval_interval=250",
          "--eval_stride=256", "--test_iters=500"]
DENSE = ["config/train_excerpt_cpu.py"] + COMMON
ASCA = ["config/train_excerpt_cpu_novel.py"] + COMMON + [
    "--sparse_block_size=32", "--sparsity_warmup_iters=150", "--gate_input=rotated", "--budget=fixed"]
RUNS = [
    ("dense", "baseline_model.py", DENSE, [1337, 1338, 1339]),
    ("dense_gate", "novel_model.py", ASCA + ["--target_sparsity=0.0"], [1337, 1338, 1339]),
    # NSA's branches: blocks chosen by the compressed branch's attention at 0.75, a window of the own and the nearest
    # block, the compressed tokens, gated; it computes more pairs than the 0.75 rows (the window's twice): its
    # train_flops say how many. (On the recall task its choice finds what the learned predictor does not.)
    ("nsa_0.75", "novel_model.py", ASCA + ["--target_sparsity=0.75", "--selector=nsa"]),
    ("dense_last", "novel_model.py", ASCA + ["--target_sparsity=0.5625", "--layer_sparsity=0.75,0.75,0.75,0"]),
    ("dense_from_0.9", "novel_model.py", ASCA + ["--target_sparsity=0.75", "--dense_from=0.9"]),
    ("learned", "novel_model.py", ASCA + ["--target_sparsity=0.75"], [1337, 1338, 1339]),
    ("keep_256", "novel_model.py", ASCA + ["--keep_tokens=256"]),
    ("local_gated", "novel_model.py", ASCA + ["--target_sparsity=0.75", "--selector=local_gated"]),
    ("uniform_0.5625", "novel_model.py", ASCA + ["--target_sparsity=0.5625"]),
]
BUDGET = {"max_iters": 2000}
SEEDS = [1337, 1338]
OUT = "out/compare_cpu_match_dense"
