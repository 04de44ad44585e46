"""
Train the dense GPT baseline (the model itself: gpt.py; the loop: trainer.py, shared with novel_model.py).

    python baseline_model.py config/train_enwik8.py --max_time_s=600
    python baseline_model.py config/train_excerpt_cpu.py          # the dense twin of the CPU main job

`import baseline_model` gives the model's names too (GPT, GPTConfig, make_model, ...), the same objects as gpt.py's:
this file only adds the entry point, so the registry (models.py) and this script share one copy of every class.
"""
import sys

from gpt import GPT, CausalSelfAttention, GPTConfig, Rotary, make_model  # noqa: F401  (the model's public names)

if __name__ == "__main__":  # python baseline_model.py [config/X.py ...] [--key=value ...]
    import trainer
    sys.exit(trainer.main(sys.argv[1:], "baseline"))
