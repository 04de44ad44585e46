# Dense baseline on full enwik8, one 80 GB GPU (bf16 + compile + flash attention).
#   python prepare_dataset.py && python baseline_model.py config/train_enwik8.py
# Set --max_time_s for an equal-compute comparison with config/train_enwik8_novel.py.
out_dir = "out/enwik8_baseline"
data_dir = "data/enwik8"
n_layer = 12
n_head = 8
n_embd = 512
block_size = 1024
batch_size = 32
gradient_accumulation_steps = 1
dropout = 0.0  # the ASCA flex path has no attention dropout; keep both models alike
max_iters = 20000  # 655M tokens, about 7 passes over the 90 MB train split
lr_decay_iters = 20000
warmup_iters = 1000
learning_rate = 6e-4
min_lr = 6e-5
weight_decay = 0.1
beta2 = 0.95
eval_interval = 1000
eval_iters = 50
log_interval = 50
