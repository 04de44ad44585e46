"""
Optional live views of a run, where researchers already look: Weights & Biases (nanoGPT's `wandb_log`) and
TensorBoard. Both are off by default, and neither package is needed otherwise (requirements-extra.txt).

Every row the trainer appends to metrics.jsonl goes to each tracker as it is written: the same names (lists
such as sparsity_per_layer flattened to sparsity_per_layer/0, sparsity_per_head_per_layer/1/0: layer 1, head
0), at step = the row's iter; None values are left out, as a plot has no point for them. The config goes
once, and the final test bpc into the run's summary. Only the master rank logs.

Resume continues the same wandb run (its id is kept in out_dir/wandb_id.txt) and appends to the same
TensorBoard directory (out_dir/tb/): a resumed run re-logs no step, since the trainer writes no metrics row
for the iteration it resumes at.

wandb without internet: unless WANDB_MODE says otherwise, a run is 'online' only where wandb has an API key
(WANDB_API_KEY, or `wandb login`'s ~/.netrc entry), else 'offline', into out_dir/wandb/; send it later
with `wandb sync out_dir/wandb/offline-run-*`.
"""
import importlib
import json
import math
import os
import uuid

from checkpoint import first_line

WANDB_ID_FILE = "wandb_id.txt"


class TrackerError(Exception):
    """A tracker that cannot start: one line naming the package or setting and the fix."""


def require(cfg):
    """A one-line TrackerError before training if a tracker is on and its package is missing."""
    for key, package in (("wandb_log", "wandb"), ("tensorboard_log", "tensorboard")):
        if cfg.get(key):
            try:
                importlib.import_module(package)
            except ImportError:
                raise TrackerError(f"{key}=True needs the {package} package, which is not installed: "
                                   f"pip install {package} (see requirements-extra.txt), or drop --{key}") from None


def flatten(row, prefix=""):
    """{name: number} of a metrics row: lists and dicts become name/i keys, None and strings are left out."""
    out = {}
    for key, v in row.items():
        name = f"{prefix}{key}"
        if isinstance(v, (list, tuple)):
            out.update(flatten({str(i): x for i, x in enumerate(v)}, name + "/"))
        elif isinstance(v, dict):
            out.update(flatten(v, name + "/"))
        elif isinstance(v, bool):
            out[name] = int(v)
        elif isinstance(v, (int, float)):
            out[name] = v
    return out


def wandb_mode():
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        import netrc
        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


class WandbSink:
    def __init__(self, cfg, out_dir, resumed, say):
        import wandb
        id_path = os.path.join(out_dir, WANDB_ID_FILE)
        if os.path.exists(id_path):
            with open(id_path) as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            with open(id_path, "w") as f:
                f.write(run_id + "\n")
        mode = wandb_mode()
        self.run = wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"] or os.path.basename(
            os.path.abspath(out_dir)), id=run_id, resume="allow", dir=out_dir, config=cfg, mode=mode)
        say(f"wandb: run {run_id} ({mode})" + (f"; sync it later with `wandb sync {out_dir}/wandb/offline-run-*`"
                                               if mode == "offline" else ""))

    def log(self, flat, step):
        self.run.log(flat, step=step)

    def summary(self, flat):
        self.run.summary.update(flat)

    def close(self):
        self.run.finish()


class TensorBoardSink:
    def __init__(self, cfg, out_dir, resumed, say):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=os.path.join(out_dir, "tb"))
        if not resumed:
            self.writer.add_text("config", "```\n" + json.dumps(cfg, indent=1, sort_keys=True) + "\n```", 0)

    def log(self, flat, step):
        for name, value in flat.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # a live view: each row is on disk when it is logged

    def summary(self, flat):
        step = int(flat.get("iters", 0))
        for name, value in flat.items():
            if name.startswith("test_bpc") and math.isfinite(value):
                self.writer.add_scalar(f"final/{name}", value, step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class Trackers:
    """The trackers a config turns on (none by default): log(row) after each metrics row, close() at the end.

    A tracker that cannot start is a one-line TrackerError before training. One that fails mid-run (a network
    error inside wandb.log) is switched off with a warning and training goes on: metrics.jsonl is the record."""

    KINDS = (("wandb_log", "wandb", WandbSink), ("tensorboard_log", "TensorBoard", TensorBoardSink))

    def __init__(self, cfg, out_dir, resumed, say=print):
        self.sinks, self.say = [], say
        for key, name, sink in self.KINDS:
            if not cfg.get(key):
                continue
            try:
                self.sinks.append((name, sink(cfg, out_dir, resumed, say)))
            except Exception as e:  # wandb.init without a key or network in online mode, an unwritable log_dir, ...
                hint = (" (online mode without an API key or network: set WANDB_MODE=offline, or `wandb login`)"
                        if name == "wandb" else "")
                raise TrackerError(f"{name} could not start: {type(e).__name__}: {first_line(e)}{hint}; fix it or "
                                   f"drop --{key}") from None

    def _each(self, what, *args):
        for name, sink in list(self.sinks):
            try:
                getattr(sink, what)(*args)
            except Exception as e:
                self.sinks.remove((name, sink))
                self.say(f"warning: {name} failed ({type(e).__name__}: {first_line(e)}) and is switched off for "
                         f"the rest of the run; metrics.jsonl keeps every row")

    def log(self, row):
        if self.sinks:
            self._each("log", flatten(row), int(row["iter"]))

    def summary(self, final):
        """The final test bpc (and the rest of final.json's numbers, for wandb) once the run is done."""
        if self.sinks:
            self._each("summary", flatten(final))

    def close(self):
        self._each("close")
        self.sinks = []
