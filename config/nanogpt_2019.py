# nanoGPT's 2019 model and optimizer (the defaults before 2026-11-28), one file away:
#   python baseline_model.py config/train_excerpt_cpu.py config/nanogpt_2019.py
# learned position table, no QK-norm, GELU, tied input/output embeddings, AdamW on everything.
pos_encoding = "learned"
qk_norm = False
mlp_act = "gelu"
tie_embeddings = True
optimizer = "adamw"
