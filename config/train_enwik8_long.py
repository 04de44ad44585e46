# Long context (T = 8192), where attention is most of the step and ASCA should pay off.
#   python baseline_model.py config/train_enwik8_long.py
#   python novel_model.py config/train_enwik8_long_novel.py   (its ASCA twin)
include("train_enwik8.py")
out_dir = "out/enwik8_long_baseline"
block_size = 8192
batch_size = 4  # 32k tokens per step, as the 1k config
eval_iters = 8
