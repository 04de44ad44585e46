"""
Train ASCA, the GPT with Adaptive Sparse Causal Attention (the loop: trainer.py, shared with baseline_model.py).

    python novel_model.py config/train_enwik8_novel.py --target_sparsity=0.75
    python novel_model.py config/train_excerpt_cpu_novel.py       # the CPU main job's model

Where ASCA lives:
- asca.py: ASCAConfig (every ASCA key) and AdaptiveSparseCausalSelfAttention, the attention this script trains;
- asca_selector.py: which past blocks each query tile keeps (the predictor, the budget, the schedule);
- asca_kernels.py: the kernels that attend over the kept blocks (reference, gather, flex).

`import novel_model` gives ASCA's names too (the same objects as asca.py's): this file only adds the entry point,
so the registry (models.py) and this script share one copy of every class.
"""
import sys

from asca import (ATTN_IMPLS, GATHER_MIN_T, STARTUP_TOL, ASCAConfig, AdaptiveSparseCausalSelfAttention,  # noqa: F401
                  BlockSelector, ContentBasedAdaptiveSparsity, GPT, Selection, TileState, build_block_mask,
                  flex_backward_problem, flex_kernel_options, gather_attention_bytes, gather_step_bytes, keep_counts,
                  make_model, max_sparsity, padded_length, startup_check)

if __name__ == "__main__":  # python novel_model.py [config/X.py ...] [--key=value ...]
    import trainer
    sys.exit(trainer.main(sys.argv[1:], "asca"))
