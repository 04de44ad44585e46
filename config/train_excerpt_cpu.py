# Small baseline that trains on a 2-core CPU in minutes, on the enwik8 excerpt shipped in assets/ (or on data
# made from any text file with prepare_dataset.py --input FILE --out_dir data/NAME):
#   python prepare_dataset.py --bundled                  # -> data/excerpt
#   python baseline_model.py config/train_excerpt_cpu.py
out_dir = "out/excerpt_cpu_baseline"
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
