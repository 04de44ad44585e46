# ASCA on full enwik8: the same model, data and schedule as the dense baseline, sparse attention.
#   python novel_model.py config/train_enwik8_novel.py
include("train_enwik8.py")
out_dir = "out/enwik8_novel"
sparse_block_size = 64
target_sparsity = 0.5
sparsity_warmup_iters = 2000
keep_first_block = True
gate_dim = 32
attn_impl = "auto"
