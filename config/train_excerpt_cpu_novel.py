# ASCA twin of config/train_excerpt_cpu.py (same model, data, schedule) for a 2-core CPU.
# block_size 256 with 64-byte blocks cannot reach 0.5 sparsity (max 0.37), so blocks are 32 bytes.
#   python novel_model.py config/train_excerpt_cpu_novel.py
out_dir = "out/excerpt_cpu_novel"
data_dir = "data/excerpt"
n_layer = 4
n_head = 4
n_embd = 256
block_size = 256
batch_size = 16
dropout = 0.0
max_iters = 1000
eval_interval = 250
log_interval = 20
eval_iters = 20
warmup_iters = 50
learning_rate = 2e-3
device = "cpu"
dtype = "float32"
compile = False
# ASCA
sparse_block_size = 32
target_sparsity = 0.5
sparsity_warmup_iters = 250
gate_dim = 32
