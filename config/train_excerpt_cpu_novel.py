# ASCA twin of config/train_excerpt_cpu.py (same model, data, schedule) for a 2-core CPU.
#   python novel_model.py config/train_excerpt_cpu_novel.py
include("train_excerpt_cpu.py")
out_dir = "out/excerpt_cpu_novel"
# block_size 256 with 64-byte blocks cannot reach 0.5 sparsity (the maximum is 0.37): 32-byte blocks
sparse_block_size = 32
target_sparsity = 0.5
sparsity_warmup_iters = 250
gate_dim = 32
