# Tiny model for tests and smoke runs: trains a few iterations in seconds on a CPU.
n_layer = 2
n_head = 2
n_embd = 32
block_size = 64
batch_size = 4
max_iters = 20
eval_interval = 10
log_interval = 5
eval_iters = 2
warmup_iters = 2
learning_rate = 3e-3
device = "cpu"
compile = False
progress = False
