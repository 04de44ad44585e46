# where long context starts to pay. The usual recipe: train short, then extend. A dense model
# trained at T=256 (1000 iterations of 4096 bytes) continues at T=2048 (--init_from: its weights, a fresh optimizer
# and schedule; rotary positions carry over) for 400 iterations of 4096 bytes each as: dense, ASCA's default at
# target sparsity 0.875 (S=64; the attention is the dense one, the predictor starts fresh), and the nearest-blocks
# rule at the same counts. The control: the same T=256 model continued at T=256 for the same 400 iterations (the
# same total bytes). Each row is scored on the test split at its own T (block_size differs, so the table flags the
# rows as another protocol: the question is the bpc at the same bytes trained). At EQUAL ITERATIONS on a 2-core CPU.
#   python3 prepare_dataset.py --bundled && python3 compare.py compare/cpu_extend.py --jobs=2
SHORT = ["config/train_excerpt_cpu.py", "--data_dir=data/excerpt", "--block_size=256", "--batch_size=16",
         "--eval_interval=250", "--max_iters=1000"]  # its own budget; the continuations take BUDGET's
CONT = ["--init_from={run:short256}", "--warmup_iters=30", "--eval_interval=100"]
LONG = ["--block_size=2048", "--batch_size=2", "--eval_iters=16", "--eval_stride=1024"]
ASCA = ["config/train_excerpt_cpu_novel.py", "--data_dir=data/excerpt"] + CONT + LONG + [
    "--sparse_block_size=64", "--target_sparsity=0.875", "--sparsity_warmup_iters=100", "--gate_input=rotated",
    "--budget=fixed"]
RUNS = [
    ("short256", "baseline_model.py", SHORT),
    ("then256", "baseline_model.py", ["config/train_excerpt_cpu.py", "--data_dir=data/excerpt", "--block_size=256",
                                      "--batch_size=16"] + CONT),
    ("then2048_dense", "baseline_model.py", ["config/train_excerpt_cpu.py", "--data_dir=data/excerpt"] + CONT + LONG),
    ("then2048_asca", "novel_model.py", ASCA + ["--selector=learned"]),
    ("then2048_local", "novel_model.py", ASCA + ["--selector=local"]),
]
BUDGET = {"max_iters": 400}
SEEDS = [1337]
OUT = "out/compare_cpu_extend"
