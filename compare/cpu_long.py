# Long context at EQUAL WALL-CLOCK on a 2-core CPU: does skipping blocks buy quality once
# attention is most of the step? 600 s of training per run, on the bundled excerpt, run alone:
#   python3 prepare_dataset.py --bundled && OMP_NUM_THREADS=2 python3 compare.py compare/cpu_long.py
# Model of config/train_excerpt_cpu.py (4 layers, n_embd 256, 4 heads, rotary, QK-norm, relu2, Muon),
# 4096 bytes per step (batch 1 at T=4096, batch 16 at T=256: the bytes per step of every CPU table).
# ASCA runs the gather kernel (attn_impl='auto' picks it on the CPU at T >= 1024), S=64, fixed budget.
# max_iters is only the horizon: it is set beyond what 600 s allow, so the clock ends every run and the
# schedules (lr decay, sparsity ramp over the first quarter) follow the time (trainer.schedule_position).
# Runs cost about 600 s + 1-2 min of evaluation each (8 runs: about 100 minutes); the headline pair has two seeds.
LONG = ["config/train_excerpt_cpu.py", "--data_dir=data/excerpt", "--block_size=4096", "--batch_size=1",
        "--max_iters=1000", "--warmup_iters=20", "--eval_interval=100", "--eval_iters=8"]
ASCA = LONG[1:] + ["--sparse_block_size=64", "--sparsity_warmup_iters=250", "--budget=fixed",
                   "--gate_input=rotated", "--attn_impl=auto"]
NOW = ["config/train_excerpt_cpu_novel.py"] + ASCA  # today's defaults (the nearest block, no sink)
# --keep_first_block=True --local_blocks=0 pin ASCA's defaults before local_blocks (the sink, no forced local block),
# with which the older rows were measured
ASCA = NOW + ["--keep_first_block=True", "--local_blocks=0"]
HEADLINE = [1337, 1338]
RUNS = [
    ("dense_4096", "baseline_model.py", LONG, HEADLINE),
    ("learned_0.875", "novel_model.py", ASCA + ["--target_sparsity=0.875", "--selector=learned"], HEADLINE),
    ("local_0.875", "novel_model.py", ASCA + ["--target_sparsity=0.875", "--selector=local"]),
    ("random_0.875", "novel_model.py", ASCA + ["--target_sparsity=0.875", "--selector=random"]),
    ("learned_0.75", "novel_model.py", ASCA + ["--target_sparsity=0.75", "--selector=learned"]),
    # the best at T=512 (compare/cpu_quality.py): the nearest block instead of the sink
    ("local1_nosink_0.875", "novel_model.py", NOW + ["--target_sparsity=0.875", "--local_blocks=1",
                                                     "--keep_first_block=False"]),
    ("dense_256", "baseline_model.py", ["config/train_excerpt_cpu.py", "--data_dir=data/excerpt",
                                        "--max_iters=10000", "--eval_interval=1000"]),
]
BUDGET = {"max_time_s": 600}
SEEDS = [1337]
OUT = "out/compare_cpu_long"
