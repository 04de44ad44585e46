# ASCA on full enwik8: the same model, data and schedule as the dense baseline, sparse attention.
#   python novel_model.py config/train_enwik8_novel.py
include("train_enwik8.py")
out_dir = "out/enwik8_novel"
# 128-byte blocks: FlexAttention's backward on an H100/H200 with torch < 2.14.1 needs S % 128 == 0
# (asca_kernels.flex_backward_problem); at T=1024 the most S=128 can skip is 0.66 of the causal pairs (own and
# nearest block kept)
sparse_block_size = 128
target_sparsity = 0.5
sparsity_warmup_iters = 2000
keep_first_block = False  # the nearest past block instead of the sink (docs/results/cpu_quality.md)
local_blocks = 1
gate_dim = 32
attn_impl = "auto"
