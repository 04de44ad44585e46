# Small baseline that trains on a 2-core CPU in minutes, on data made from any text file:
#   python prepare_dataset.py --input ../shared/data/enwik8_excerpt.txt --out_dir data/excerpt
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
