# Long context (T = 8192), where attention is most of the step and ASCA should pay off.
#   python baseline_model.py config/train_enwik8_long.py
#   python novel_model.py config/train_enwik8_long.py --out_dir=out/enwik8_long_novel --target_sparsity=0.75
out_dir = "out/enwik8_long_baseline"
data_dir = "data/enwik8"
n_layer = 12
n_head = 8
n_embd = 512
block_size = 8192
batch_size = 4  # 32k tokens per step, as the 1k config
dropout = 0.0
max_iters = 20000
lr_decay_iters = 20000
warmup_iters = 1000
learning_rate = 6e-4
min_lr = 6e-5
eval_interval = 1000
eval_iters = 8
log_interval = 50
