# ASCA on full enwik8: the same model and schedule as config/train_enwik8.py, sparse attention.
#   python novel_model.py config/train_enwik8_novel.py
out_dir = "out/enwik8_novel"
data_dir = "data/enwik8"
n_layer = 12
n_head = 8
n_embd = 512
block_size = 1024
batch_size = 32
gradient_accumulation_steps = 1
dropout = 0.0
max_iters = 20000
lr_decay_iters = 20000
warmup_iters = 1000
learning_rate = 6e-4
min_lr = 6e-5
weight_decay = 0.1
beta2 = 0.95
eval_interval = 1000
eval_iters = 50
log_interval = 50
# ASCA
sparse_block_size = 64
target_sparsity = 0.5
sparsity_warmup_iters = 2000
keep_first_block = True
gate_dim = 32
attn_impl = "auto"
