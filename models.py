"""
The model registry: every model kind the tools know, by the name checkpoints record (model_kind).
The trainer, train_config.py, checkpoint.py and compare.py look kinds up here (sample.py and extraction.py through
checkpoint.py); the model files hold models only, and what a kind adds to the loop is a field here or a hook of its
attention class (gpt.CausalSelfAttention's no-op defaults).

A new kind: write its config (a GPTConfig subclass) and attention class (a CausalSelfAttention subclass:
override the hooks it needs) in a module of their own, a thin training script like novel_model.py (its
__main__ calls trainer.main), and register it below. The registry imports model modules, never the scripts.
"""
from dataclasses import dataclass, fields

import asca
import gpt
from gpt import GPT


@dataclass(frozen=True)
class ModelKind:
    """What the trainer, sample.py and extraction.py need to know about a model: its config class and
    attention class (so they build it from a config or a checkpoint's model_args), and its script."""
    name: str
    config_cls: type
    attn_cls: type
    script: str
    out_dir: str  # default out_dir of its script
    startup_check: object = None  # (model, fwd, x, y, ctx, low_precision) -> dict or None: the fast path checked
    selectors: tuple = ()  # the choices of blocks eval_selector may swap in (none: the attention keeps every block)
    own_weight_keys: tuple = ()  # keys that give its weights beyond the dense GPT's their meaning: a checkpoint of
    #                              the same kind starts a run (init_from=PATH) only where they match
    warm_start_problem: object = None  # (checkpoint's model_args, cfg, path) -> a one-line reason a checkpoint of
    #                                    the same kind cannot start this run, or None

    def defaults(self):
        return {f.name: f.default for f in fields(self.config_cls) if f.name != "vocab_size"}

    def build(self, cfg):
        """The model for a dict holding (at least) this kind's config keys; others are ignored."""
        return GPT(self.config_cls.from_dict(cfg), attn_cls=self.attn_cls)


MODELS = {}  # model_kind -> ModelKind


def register(kind):
    if kind.name in MODELS:
        raise ValueError(f"model kind {kind.name!r} is registered twice")
    MODELS[kind.name] = kind
    return kind


BASELINE = register(ModelKind("baseline", gpt.GPTConfig, gpt.CausalSelfAttention,
                              "baseline_model.py", "out/baseline"))
ASCA = register(ModelKind("asca", asca.ASCAConfig, asca.AdaptiveSparseCausalSelfAttention,
                          "novel_model.py", "out/novel", startup_check=asca.startup_check, selectors=asca.SELECTORS,
                          own_weight_keys=asca.PREDICTOR_KEYS, warm_start_problem=asca.warm_start_problem))
