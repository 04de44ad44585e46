"""
One declaration per config key: its default and type, the value a run or checkpoint from before the key existed
ran with, and how a resume, a checkpoint loaded elsewhere and compare.py treat it. Every list the tools use is
derived from the declarations (the model configs' runtime_keys / legacy / device_defaults / shape_keys,
train_config's TRAIN_DEFAULTS, types_for, with_legacy, and the resume rule in resume_config), never written out a
second time.

Model keys are dataclass fields of GPTConfig / ASCAConfig declared with key(default, ...); the training loop's keys
are Key(...) entries of train_config.TRAIN_KEYS.
"""
from dataclasses import dataclass, field, fields

NO_LEGACY = object()  # the key's default is also what runs from before it ran with (or the key is as old as they)


@dataclass(frozen=True)
class Key:
    default: object
    type: type = None  # the value's type where the default (None, 'auto') does not say it
    legacy: object = NO_LEGACY  # what a run or checkpoint from before this key existed ran with
    # on resume: 'checkpoint' (the checkpoint's value unless --key=value overrides it; a model key that changes the
    # weights must then match them), 'free' (a model key a resume may change: it leaves the weights alone), or
    # 'this_run' (always this command's: where and how this process runs)
    resume: str = "checkpoint"
    device: bool = False  # describes the device a run used: reset to its default when a checkpoint loads elsewhere
    shape: bool = False  # defines the weights' shapes: a checkpoint's model_args must hold it
    compared: bool = True  # compare.py counts a finished run only if it trained with the value its command gives
    choices: tuple = None  # the allowed values (validate names them in its one-line error)
    excludes: tuple = ()  # keys that say the same thing another way: a command giving this key and one of them fails
    help: str = ""  # one line for --help and the usage table: what the key does, and what 'auto', None or 0 mean

    def __post_init__(self):
        if self.resume not in ("checkpoint", "free", "this_run"):
            raise ValueError(f"resume={self.resume!r} must be one of checkpoint, free, this_run")


def key(default, **rules):
    """A config dataclass field declared with its rules (Key's fields)."""
    return field(default=default, metadata={"key": Key(default, **rules)})


def declarations(config_cls):
    """{name: Key} of a config dataclass; a field declared without key() has only its default."""
    return {f.name: f.metadata.get("key", Key(f.default)) for f in fields(config_cls)}


def legacy_values(decls):
    """{name: value} that runs from before each key ran with, for the keys whose default changed that."""
    return {k: d.legacy for k, d in decls.items() if d.legacy is not NO_LEGACY}


def with_legacy(saved, decls):
    """`saved` (a run's config or a checkpoint's model_args) with each key it predates set to the value runs of its
    time ran with: the one place where old runs and checkpoints get their meaning (the trainer's resume, checkpoint
    loading and compare.py all call it)."""
    return {**{k: v for k, v in legacy_values(decls).items() if k not in saved}, **saved}
