# ASCA at long context (T = 8192), the twin of config/train_enwik8_long.py: where attention is most of
# the step and skipping blocks should pay.  python novel_model.py config/train_enwik8_long_novel.py
include("train_enwik8_long.py")
out_dir = "out/enwik8_long_novel"
sparse_block_size = 128  # S % 128 == 0 for FlexAttention's backward on H100/H200 (torch < 2.14.1)
target_sparsity = 0.75  # the most S=128 can skip at T=8192 (own and nearest block kept) is 0.95
sparsity_warmup_iters = 2000
keep_first_block = False  # the nearest past block instead of the sink (docs/results/cpu_quality.md)
local_blocks = 1
gate_dim = 32
attn_impl = "auto"
