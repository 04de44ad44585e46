"""
The one training loop both scripts share: `python baseline_model.py ...` and `python novel_model.py ...`
both call main(argv, kind) here, and differ only by the model kind (models.MODELS).

Read it top to bottom: the lr schedule, the run's counters, then the Trainer: build, resume, the loop (fit,
train_step, evaluate_and_save), checkpoints, finish; then the entry point. The rooms around it: train_config.py
(keys, resume rules, start-up checks), runtime.py (device, dtype, compile, DDP, signals), evaluate.py (the
bits-per-byte protocol), checkpoint.py (checkpoints and the run directory's files), trackers.py (W&B,
TensorBoard). Attention modules that own behaviour (ASCA's sparsity schedule, diagnostics, choice of blocks) expose it
through GPT's hooks (set_step, diagnostics, swap_choice, eval_notes, ...); the loop only calls and logs them, and names
no model kind.
"""
import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

import checkpoint
import configurator
import evaluate
import trackers
from checkpoint import RUN_FILES, CheckpointError, append_jsonl, data_identity, restart_incomplete
from evaluate import LN2
from models import MODELS
from prepare_dataset import ByteDataset, DataError
from runtime import LoadMeter, Runtime, StopFlag, TrainError
from train_config import (SEED_STRIDE, check_architecture, check_kind, defaults_for, types_for,
                          check_exclusive, explicit_keys, finalize_config, help_text, resume_config)

def wrap_for_training(model, compile, ddp, device_ids=None):
    """(eval forward, the DDP module or None, training forward). With DDP the wrapper is compiled, not wrapped
    around a compiled model: torch.compile's DDP optimizer then splits the graph at DDP's gradient buckets, so each
    bucket's all-reduce overlaps the rest of backward (PyTorch's notes on torch.compile with DDP).
    Eval runs the model itself (compiled on its own when compile is on): no DDP hooks, no gradient buckets."""
    fwd = torch.compile(model) if compile else model
    if not ddp:
        return fwd, None, fwd
    from torch.nn.parallel import DistributedDataParallel as DDP
    wrapped = DDP(model, device_ids=device_ids)
    return fwd, wrapped, torch.compile(wrapped) if compile else wrapped


def get_lr(it, cfg, pos=None):
    """Linear warm-up over the first warmup_iters iterations, then cosine decay to min_lr at lr_decay_iters,
    then min_lr (nanoGPT). `pos` is the position along the schedule in iterations (iteration runs: it; a time
    budget: progress * max_iters, see Trainer.schedule_position); the warm-up always counts real steps."""
    lr, min_lr = cfg["learning_rate"], cfg["min_lr"]
    pos = it if pos is None else pos
    if not cfg["decay_lr"]:
        return lr
    if it < cfg["warmup_iters"]:
        return lr * (it + 1) / (cfg["warmup_iters"] + 1)
    if pos > cfg["lr_decay_iters"]:
        return min_lr
    ratio = max(0.0, pos - cfg["warmup_iters"]) / max(1, cfg["lr_decay_iters"] - cfg["warmup_iters"])
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


# ----------------------------------------------------------------------------- small pieces of the loop

@dataclass
class Counters:
    """Where the run stands; saved in checkpoints (the first five) so resume continues exactly."""
    iter_num: int = 0
    tokens: int = 0
    train_time: float = 0.0  # seconds of training steps, without compile/warm-up and evals
    best_val: float = float("inf")
    best_iter: int = -1
    warmup_s: float = 0.0  # this process: the first step after (re)start, compile included
    eval_s: float = 0.0
    run_time: float = 0.0  # this process: training time and tokens behind tokens_per_s
    run_tokens: int = 0
    interval_time: float = 0.0  # since the last eval, for the metrics row
    interval_tokens: int = 0
    train_flops: float = 0.0  # analytic training FLOPs so far, each step at its own schedule (None: unknown)


# ----------------------------------------------------------------------------- the trainer

class Trainer:
    def __init__(self, cfg, kind, rt, ds, ckpt, build_model):
        self.cfg, self.kind, self.rt, self.ds, self.say = cfg, kind, rt, ds, rt.say
        self.out_dir = cfg["out_dir"]
        self.ckpt_path = os.path.join(self.out_dir, "ckpt.pt")
        self.best_path = os.path.join(self.out_dir, "best.pt")
        self.model_args = {k: cfg[k] for k in MODELS[kind].defaults()}
        self.model_args["vocab_size"] = 256
        self.c = Counters()
        self.data_sha256 = data_identity(ds)
        self.sched_pos = 0.0  # where the schedules stand (set_schedule); saved, so a reload runs at it
        self.load = LoadMeter()
        self.origin = None  # where the weights came from (init_from=PATH): recorded once, kept through resumes
        self.build(build_model)
        if ckpt is not None:
            self.resume(ckpt)
        elif starts_from_checkpoint(cfg):  # init_from=PATH: another run's weights, all else fresh
            try:
                text, self.origin = checkpoint.warm_start(self.model, cfg, kind, cfg["init_from"])
            except CheckpointError as e:
                raise TrainError(str(e)) from None
            self.say("init_from: " + text)

    def weights_from(self):
        """init_from as the run began, whatever resumes came since: the source checkpoint's path, or 'scratch'."""
        return self.origin["path"] if self.origin else "scratch"

    # --- build and resume
    def build(self, build_model):
        cfg, rt = self.cfg, self.rt
        for seed_fn in (torch.manual_seed, random.seed, np.random.seed):
            seed_fn(cfg["seed"] + rt.rank)
        if rt.device_type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.gen = torch.Generator().manual_seed(cfg["seed"] * SEED_STRIDE + rt.rank)  # each rank its own windows
        self.model = (build_model or MODELS[self.kind].build)(cfg).to(rt.device)
        self.optimizer = self.model.configure_optimizer(cfg["weight_decay"], cfg["learning_rate"],
                                                        (cfg["beta1"], cfg["beta2"]), rt.device_type,
                                                        cfg["optimizer"], cfg["muon_lr"], cfg["muon_momentum"],
                                                        rt.resolved["muon_ns_dtype"])
        self.fwd, self.ddp, self.train_fwd = wrap_for_training(
            self.model, rt.compile, rt.ddp, [rt.local_rank] if rt.device_type == "cuda" else None)
        self.tokens_per_iter = cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"]
        self.test_iters = parse_iters(cfg["test_iters"])
        self.grad_accum = cfg["gradient_accumulation_steps"] // rt.world_size

    def resume(self, ckpt):
        rt, c = self.rt, self.c
        try:
            self.model.load_state_dict(ckpt["model"])
        except (RuntimeError, TypeError, AttributeError) as e:
            raise TrainError(f"{self.ckpt_path}: its weights do not fit its model_args "
                             f"({checkpoint.first_line(e, 160)}); "
                             f"the file is damaged: resume from another checkpoint, or start again") from None
        c.iter_num, c.best_val = ckpt["iter_num"], ckpt["best_val_bpc"]
        self.sched_pos = checkpoint.schedule_position(ckpt)
        c.best_iter, c.tokens = ckpt.get("best_iter", -1), ckpt.get("tokens", 0)
        c.train_time = ckpt.get("train_time_s", 0.0)
        c.train_flops = ckpt.get("train_flops", None if c.tokens else 0.0)  # unknown for older checkpoints
        self.origin = ckpt.get("init_origin")
        if self.cfg["eval_only"]:
            return
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise TrainError(f"{self.ckpt_path}: its optimizer state does not fit optimizer={self.cfg['optimizer']!r} "
                             f"({str(e).splitlines()[0][:120]}); "
                             f"resume with the optimizer it was written with") from None
        if ckpt.get("scaler") is not None:
            rt.scaler.load_state_dict(ckpt["scaler"])
        gens = ckpt["data_generator"]
        if len(gens) != rt.world_size:
            self.say(f"note: checkpoint was written with {len(gens)} ranks, now {rt.world_size}: "
                     f"ranks beyond the saved ones keep their fresh seeds")
        if rt.rank < len(gens):
            try:
                self.gen.set_state(gens[rt.rank])
                checkpoint.set_rng_states(ckpt["rng"][rt.rank])
            except Exception as e:  # a damaged file: the RNG states are the last thing read
                raise TrainError(f"{self.ckpt_path}: its RNG states are damaged ({type(e).__name__}: "
                                 f"{checkpoint.first_line(e, 120)}); "
                                 f"resume from another checkpoint, or start again") from None
        if rt.master:
            self.repair_best(ckpt)
            dropped = checkpoint.drop_rows_after(os.path.join(self.out_dir, "metrics.jsonl"), c.iter_num)
            if dropped:
                self.say(f"note: metrics.jsonl held {dropped} row(s) past iter {c.iter_num}, written before the run "
                         f"stopped but not checkpointed; dropped, the resumed run measures them again")
        self.say(f"resumed from {self.ckpt_path} at iter {c.iter_num} "
                 f"(best val {c.best_val:.4f} bpc at iter {c.best_iter})")

    # --- the loop
    def fit(self):
        cfg, rt, c = self.cfg, self.rt, self.c
        self.start_iter, self.stop = c.iter_num, StopFlag()
        self.loss_sum, self.loss_n = torch.zeros((), device=rt.device), 0
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=rt.device)
        self.last_val, self.bar = None, self.progress_bar()
        try:
            self.trackers = trackers.Trackers(cfg, self.out_dir, resumed=c.iter_num > 0,
                                              say=self.say) if rt.master else None
        except trackers.TrackerError as e:
            raise TrainError(str(e)) from None
        self.startup_check()
        self.stop.install()
        try:
            while True:
                lr = self.last_lr = self.set_schedule()
                time_up = cfg["max_time_s"] > 0 and c.train_time >= cfg["max_time_s"]
                done = c.iter_num >= cfg["max_iters"] or rt.any_rank(time_up)
                resumed_here = c.iter_num == self.start_iter > 0  # already evaluated before the checkpoint
                test_now = c.iter_num in self.test_iters and not done  # the final test covers the last iteration
                if done or ((c.iter_num % cfg["eval_interval"] == 0 or test_now) and not resumed_here):
                    self.evaluate_and_save(lr, test=test_now)
                if done:
                    break
                self.train_step()
                if rt.any_rank(self.stop.signum is not None):
                    return self.stop_on_signal()
            if self.bar is not None:
                self.bar.close()
            self.stop.interrupt_now()  # the final test: Ctrl-C or SIGTERM stop it at once
            return self.finish("max_time_s" if time_up else "max_iters")
        finally:
            self.stop.restore()
            if self.trackers is not None:
                self.trackers.close()

    def train_step(self):
        """One optimizer step over grad_accum micro-batches, then the counters (account)."""
        cfg, rt = self.cfg, self.rt
        t0 = time.time()
        for micro in range(self.grad_accum):
            x, y = self.batch()
            if rt.ddp:  # sync gradients only on the last micro step
                self.ddp.require_backward_grad_sync = micro == self.grad_accum - 1
            with rt.ctx:
                _, loss = self.train_fwd(x, y)
                aux = self.model.aux_loss()  # e.g. ASCA's gate_loss; train bpc below stays the LM loss
            rt.scaler.scale((loss if aux is None else loss + aux) / self.grad_accum).backward()
            self.loss_sum += loss.detach().float()
            self.nonfinite |= ~torch.isfinite(loss.detach())
            self.loss_n += 1
        if cfg["grad_clip"] > 0:
            rt.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg["grad_clip"])
        rt.scaler.step(self.optimizer)
        rt.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.update_budgets(rt.mean_over_ranks)  # controller state moves between steps only
        self.account(t0)

    def evaluate_and_save(self, lr, test=False):
        """Val bpc, a metrics row and a checkpoint; test=True (an iteration of test_iters): the test split's bpc too,
        in the same row."""
        rt, c = self.rt, self.c
        t0 = time.time()
        self.check_finite(f"before iter {c.iter_num}")
        improved = False
        if rt.master:
            val = self.last_val = self.val_bpc()
            improved = val < c.best_val
            if improved:
                c.best_val, c.best_iter = val, c.iter_num
            row = self.metrics_row(lr, val)
            if test:
                row["test_bpc"], row["test_bytes_scored"] = self.test_bpc()
            append_jsonl(row, os.path.join(self.out_dir, "metrics.jsonl"))
            self.trackers.log(row)  # the same row, as it is written
            if self.bar is not None:
                self.bar.set_postfix_str(progress_text(row), refresh=True)
        self.save(best=rt.any_rank(improved))
        self.loss_sum.zero_()
        self.loss_n, c.interval_time, c.interval_tokens = 0, 0.0, 0
        self.model.train()
        c.eval_s += time.time() - t0

    # --- pieces of the loop
    def startup_check(self):
        """Before the first step (of this process): the path this run trains on against an independent one, on
        one batch (the model kind's startup_check); a mismatch stops the run with the way on."""
        cfg, rt = self.cfg, self.rt
        check = MODELS[self.kind].startup_check
        wanted = cfg["startup_check"] == "on" or (cfg["startup_check"] == "auto" and rt.device_type == "cuda")
        if check is None or not wanted:
            return
        t0 = time.time()
        # a training micro-batch's shape (another would make the compiled model recompile, or go dynamic), drawn
        # from its own generator: the run's data stream is not touched
        x, y = self.ds.get_batch("train", cfg["batch_size"], cfg["block_size"],
                                 torch.Generator().manual_seed(cfg["seed"]))
        r = check(self.model, self.fwd, x.to(rt.device), y.to(rt.device), rt.ctx, rt.dtype != "float32")
        if r is None:
            return
        tol = r["tol"]
        where = (f"logits {r['logits']:.2g} (tolerance {tol['logits']:g}), gradients {r['grad']:.2g} per element "
                 f"(tolerance {tol['grad']:g}" + (f"; worst: {r['worst']}" if r["worst"] else "") + f"), "
                 f"{r['grad_l2']:.2g} in L2 over {r['worst_l2']} (tolerance {tol['grad_l2']:g})")
        if rt.any_rank(not r["ok"]):
            raise TrainError(f"start-up check failed: the {r['fast']} path differs from the {r['reference']} path "
                             f"on one batch at the target sparsity by {where}, relative to their scale; this "
                             f"torch/device computes it wrongly: train with --attn_impl={r['reference']}, or skip "
                             f"the check with --startup_check=off")
        self.say(f"start-up check: the {r['fast']} path equals the {r['reference']} path on one batch at the target "
                 f"sparsity ({where}, relative to their scale; {time.time() - t0:.1f}s)")

    def schedule_position(self):
        """(position along the schedules in iterations, progress in [0, 1]). Without a time budget the
        position is the iteration. With max_time_s, progress = the larger of iterations / max_iters and
        training time / max_time_s, and the position is progress * max_iters: the lr decay and the sparsity
        warm-up then end when the budget does, however many iterations fit (ranks agree on the time)."""
        c, cfg = self.c, self.cfg
        o = self.origin
        if cfg["max_iters"] == 0 and o and o.get("model_kind") == self.kind and o.get("schedule_pos") is not None:
            # no steps: the weights are scored as they were trained, at their own schedule (an ASCA checkpoint's
            # sparsity), not at the start of this run's fresh one (dense while the sparsity warms up)
            return o["schedule_pos"], 1.0 if o.get("progress") is None else o["progress"]
        if cfg["max_time_s"] <= 0:
            return c.iter_num, c.iter_num / cfg["max_iters"] if cfg["max_iters"] else 1.0
        t = self.rt.max_over_ranks(c.train_time)
        progress = min(1.0, max(c.iter_num / cfg["max_iters"] if cfg["max_iters"] else 1.0, t / cfg["max_time_s"]))
        return progress * cfg["max_iters"], progress

    def set_schedule(self):
        pos, self.progress = self.schedule_position()
        self.sched_pos = pos
        lr = get_lr(self.c.iter_num, self.cfg, pos)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's group: muon_lr / learning_rate
        self.model.set_step(pos, self.progress)
        return lr

    def batch(self):
        x, y = self.ds.get_batch("train", self.cfg["batch_size"], self.cfg["block_size"], self.gen)
        x, y = evaluate.plant_copies(x, y, self.cfg["copy_augment"], self.cfg["copy_len"], self.gen)
        if self.rt.device_type == "cuda":
            x, y = (t.pin_memory().to(self.rt.device, non_blocking=True) for t in (x, y))
        return x, y

    def account(self, t0):
        """After a step that began at t0: the counters (its time counts as training time, except the first step
        after a (re)start, which carries compile and warm-up), the finiteness check and the progress bar."""
        cfg, rt, c = self.cfg, self.rt, self.c
        c.iter_num += 1
        c.tokens += self.tokens_per_iter
        if c.train_flops is not None:  # the step's FLOPs at the schedule it ran with (ASCA: its kept pairs)
            c.train_flops += self.tokens_per_iter * self.model.flops_per_token()
        log_now = c.iter_num % cfg["log_interval"] == 0
        if log_now:
            if rt.device_type == "cuda":
                torch.cuda.synchronize()
            self.check_finite(f"at iter {c.iter_num}")
        dt = time.time() - t0
        if c.iter_num == self.start_iter + 1:
            c.warmup_s += dt
        else:
            c.train_time += dt
            c.interval_time += dt
            c.interval_tokens += self.tokens_per_iter
            c.run_time += dt
            c.run_tokens += self.tokens_per_iter
        if self.bar is not None:
            self.bar.update(1)
            if log_now and self.loss_n:
                self.bar.set_postfix_str(progress_text({
                    "train_bpc": self.loss_sum.item() / self.loss_n / LN2, "val_bpc": self.last_val,
                    "tokens_per_s": c.interval_tokens / c.interval_time if c.interval_time else None,
                    **self.model.diagnostics()}))

    def check_finite(self, where):
        if self.rt.any_rank(bool(self.nonfinite.item())):
            raise TrainError(f"the training loss became NaN or inf ({where}); the last good checkpoint in "
                             f"{self.out_dir} was kept; lower learning_rate or warm up longer, and resume or restart")

    def metrics_row(self, lr, val):
        """One metrics.jsonl row: where the run stands, its losses and throughput, and what the model measured."""
        c, rt = self.c, self.rt
        tps = c.interval_tokens / c.interval_time if c.interval_time > 0 else None
        peak, fpt = rt.peak_flops(), self.model.flops_per_token()
        row = {"iter": c.iter_num, "tokens": c.tokens, "train_flops": c.train_flops,
               "elapsed_s": round(c.train_time, 3), "progress": round(self.progress, 6), "lr": lr,
               "train_bpc": (self.loss_sum.item() / self.loss_n / LN2) if self.loss_n else None, "val_bpc": val,
               "tokens_per_s": tps, "mfu": (fpt * tps / peak) if (tps and peak) else None, **self.load.interval()}
        row.update(self.model.diagnostics())  # the last forward's, then the val eval's means where it has them
        row.update({k: v for k, v in self.val_measured.items() if not k.startswith("kept_blocks_hist")})
        return row

    # --- evaluate (evaluate.py holds the protocol) and checkpoint
    def val_bpc(self):
        """Bits per byte on the fixed val windows; what the model measured over all of them (ASCA: the
        sparsity, which varies with content) is kept in self.val_measured."""
        bpc, self.val_measured = evaluate.val_bpc(self.model, self.fwd, self.ds, self.cfg, self.rt.device, self.rt.ctx)
        self.val_measured.update(self.recall_sample("val", self.val_measured))
        if self.ds.meta.get("synthetic", {}).get("task") == "recall":  # the task's metric on as many val episodes
            r = self.recall_task("val", self.cfg["eval_iters"] * self.cfg["batch_size"])
            self.val_measured.update(answer_acc=r["answer_acc"], answer_bpc=r["answer_bpc"])
        return bpc

    def recall_task(self, split, n_episodes=None, into=None):
        """The synthetic recall task's answers (evaluate.recall_answers) on a split's episodes, into into["recall_task"]
        where given; {} for other data."""
        if self.ds.meta.get("synthetic", {}).get("task") != "recall":
            return {}
        r = evaluate.recall_answers(self.fwd, self.ds.splits[split], self.ds.meta["align"], self.cfg["block_size"],
                                    self.cfg["batch_size"], self.rt.device, self.rt.ctx, n_episodes)
        if into is not None:
            into["recall_task"] = r
            self.say(f"recall task ({r['answers']} answers on the {split} split): accuracy {r['answer_acc']:.3f}, "
                     f"{r['answer_bpc']:.3f} bits per answer; by distance: " + ", ".join(
                         f"{b['lo']}-{b['hi']}: {b['answer_acc']:.3f}" for b in r["buckets"]
                         if b["answer_acc"] is not None))
        return r

    def recall_sample(self, split, measured):
        """A compiled evaluation measures no attention recall (it is computed outside the graph): the uncompiled
        model then measures it on a fixed sample, the split's first batch of evenly spaced windows. {} where the
        evaluation measured it, or the model has none (dense)."""
        if self.fwd is self.model or "recall" in measured or not self.model.measures_recall():
            return {}
        cfg = self.cfg
        starts = self.ds.val_windows(cfg["block_size"], cfg["batch_size"], split=split)
        with self.model.eager_paths():  # on CUDA: the gather path, not a second flex compile
            _, m = evaluate.tallied(self.model, lambda after: evaluate.eval_windows(
                self.model, self.ds.splits[split], starts, cfg["block_size"], cfg["batch_size"], self.rt.device,
                self.rt.ctx, after_forward=after))
        return {k: v for k, v in m.items() if k.startswith("recall")}

    def test_bpc(self, into=None):
        """(bpc, bytes scored) on the test split; into: a dict that gets what the model measured over the
        whole split as test_KEY (ASCA: test_sparsity, per head, kept-block histograms; it varies with content)."""
        bpc, n, measured = evaluate.test_bpc(self.model, self.fwd, self.ds, self.cfg, self.rt.device, self.rt.ctx)
        measured.update(self.recall_sample("test", measured))
        if into is not None:
            into.update({f"test_{k}": v for k, v in measured.items()})
        return bpc, n

    def copy_test(self, into):
        """The long-range copy test (evaluate.copy_test) on the test split, into into["copy_test"], if asked for."""
        cfg = self.cfg
        if cfg["copy_test_windows"] <= 0:
            return
        r = into["copy_test"] = evaluate.copy_test(self.model, self.ds.splits["test"], cfg["block_size"],
                                                   cfg["copy_len"], cfg["copy_test_windows"], cfg["batch_size"],
                                                   self.rt.device, self.rt.ctx)
        self.say(f"copy test ({r['windows']} windows, {cfg['copy_len']}-byte copies), bpc on copied bytes / the same "
                 f"bytes unplanted, per distance: " + ", ".join(f"{b['lo']}-{b['hi']}: {b['bpc_copy']:.2f}/"
                                                                 f"{b['bpc_plain']:.2f}" for b in r["buckets"]))

    def save(self, best=False):
        """ckpt.pt (and best.pt) atomically, from finite weights only: a NaN never replaces a good file."""
        rt, c = self.rt, self.c
        per_rank = rt.gather((self.gen.get_state(), checkpoint.rng_states()))  # every rank's stream and RNGs
        if rt.any_rank(not all(torch.isfinite(p).all() for p in self.model.parameters())):
            raise TrainError(f"the weights are not finite at iter {c.iter_num}; not checkpointing them: the last "
                             f"good checkpoint in {self.out_dir} was kept")
        ck = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
              "scaler": rt.scaler.state_dict() if rt.scaler.is_enabled() else None,
              "iter_num": c.iter_num, "best_val_bpc": c.best_val, "best_iter": c.best_iter,
              "config": {**self.cfg, "init_from": self.weights_from()},
              "model_args": self.model_args, "model_kind": self.kind, "init_origin": self.origin,
              "rng": [r for _, r in per_rank],
              "data_generator": [g for g, _ in per_rank], "train_time_s": c.train_time, "tokens": c.tokens,
              "train_flops": c.train_flops, "schedule_pos": float(self.sched_pos), "data_sha256": self.data_sha256,
              "env": rt.env()}
        if not rt.master:
            return
        try:
            checkpoint.save(ck, self.ckpt_path)
            if best:  # best.pt is a copy of this ckpt.pt: it holds its iter_num, checked before it is used
                checkpoint.atomic_write(self.best_path, lambda tmp: shutil.copyfile(self.ckpt_path, tmp))
        except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as a RuntimeError
            raise TrainError(f"cannot write a checkpoint in {self.out_dir}: "
                             f"{getattr(e, 'strerror', None) or checkpoint.first_line(e)}; "
                             f"the previous one is intact; "
                             f"free some space (or use another --out_dir) and resume") from None

    def best_iter_on_disk(self):
        """The iteration best.pt holds (None: no readable best.pt)."""
        if not os.path.exists(self.best_path):
            return None
        try:
            return checkpoint.load(self.best_path, require=("iter_num",))["iter_num"]
        except CheckpointError:
            return None

    def repair_best(self, ckpt):
        """A best.pt copy that failed after ckpt.pt was written (a full disk, a kill) leaves best.pt older than
        the recorded best. If the recorded best is ckpt.pt itself, copy it again; the final test checks the rest."""
        c = self.c
        if c.best_iter == ckpt["iter_num"] and self.best_iter_on_disk() != c.best_iter:
            checkpoint.atomic_write(self.best_path, lambda tmp: shutil.copyfile(self.ckpt_path, tmp))
            self.say(f"note: best.pt did not hold the best iteration {c.best_iter} (a copy was interrupted); "
                     f"copied it again from ckpt.pt")

    def stop_on_signal(self):
        self.check_finite(f"at iter {self.c.iter_num}, when the signal came")
        self.save()
        if self.bar is not None:
            self.bar.close()
        signum = self.stop.signum or signal.SIGTERM
        name = signal.Signals(self.stop.signum).name if self.stop.signum else "a signal on another rank"
        self.say(f"stopped by {name} after iter {self.c.iter_num}: checkpoint written to {self.ckpt_path}; "
                 f"continue with --init_from=resume")
        return 128 + signum

    # --- finish
    def finish(self, stop_reason):
        rt, c, cfg = self.rt, self.c, self.cfg
        final = {"model_kind": self.kind, "init_origin": self.origin, "iters": c.iter_num, "tokens": c.tokens,
                 "train_flops": c.train_flops,
                 "train_time_s": c.train_time,
                 "warmup_s": c.warmup_s, "eval_time_s": c.eval_s, "stop_reason": stop_reason,
                 "max_iters": cfg["max_iters"], "max_time_s": cfg["max_time_s"], "final_lr": self.last_lr,
                 "tokens_per_s": c.run_tokens / c.run_time if c.run_time > 0 else None,
                 "n_params": self.model.num_params(), "val_bpc": self.last_val, "best_val_bpc": c.best_val,
                 "best_iter": c.best_iter, "eval_stride": cfg["eval_stride"], "block_size": cfg["block_size"],
                 "data_dir": cfg["data_dir"], "data_sha256": self.data_sha256, "schedule_pos": self.sched_pos,
                 **self.load.summary(), "env": rt.env()}
        final.update(self.model.diagnostics())
        if rt.ddp:  # every rank checksums its own weights; equal sums show the ranks stayed in sync
            final["rank_param_checksums"] = rt.gather(float(sum(p.detach().double().sum().item()
                                                                for p in self.model.parameters())))
        if not rt.master:
            return 0
        earlier = {str(r["iter"]): r["test_bpc"] for r in checkpoint.read_jsonl(os.path.join(self.out_dir,
                                                                                           "metrics.jsonl"))
                   if r.get("test_bpc") is not None}
        if earlier:  # test_iters: the test split scored during training, by iteration
            final["test_bpc_at_iter"] = earlier
        if cfg["final_test"]:
            t0 = time.time()
            final["test_bpc"], final["test_bytes_scored"] = self.test_bpc(into=final)
            self.copy_test(into=final)  # the final weights', before best.pt may replace them
            self.recall_task("test", into=final)
            if c.best_iter not in (-1, c.iter_num) and os.path.exists(self.best_path):
                best = checkpoint.load(self.best_path, require=checkpoint.MODEL_KEYS + ("iter_num",))
                if best["iter_num"] == c.best_iter:
                    self.model.load_state_dict(best["model"])
                    self.model.set_step(checkpoint.schedule_position(best),
                                        checkpoint.schedule_progress(best, cfg["max_iters"]))
                    final["test_bpc_best_val_ckpt"], _ = self.test_bpc()
                else:  # never score or name a stale copy as the best one
                    final["best_ckpt_stale"] = f"best.pt holds iter {best['iter_num']}, not the best iter {c.best_iter}"
                    self.say(f"warning: {self.best_path} holds iter {best['iter_num']}, not the best iter "
                             f"{c.best_iter} (a copy was interrupted); not scoring it")
            final["test_eval_s"] = time.time() - t0
        checkpoint.write_json(final, os.path.join(self.out_dir, "final.json"))
        self.trackers.summary(final)
        test = f", test {final['test_bpc']:.4f} bpc" if "test_bpc" in final else ""
        tps = f"{final['tokens_per_s']:,.0f}" if final["tokens_per_s"] else "n/a"
        self.say(f"done ({stop_reason}): {c.iter_num} iters, {c.tokens:,} tokens, {c.train_time:.1f}s training "
                 f"(+{c.warmup_s:.1f}s compile/warm-up, {c.eval_s:.1f}s eval), {tps} tokens/s; val "
                 f"{self.last_val:.4f} bpc (best {c.best_val:.4f} at iter {c.best_iter}){test}. "
                 f"Wrote {self.out_dir}/final.json")
        return 0

    def eval_only(self):
        cfg, c = self.cfg, self.c
        # the checkpoint's schedule position (a time budget's, too) and progress
        self.model.set_step(self.sched_pos, checkpoint.schedule_progress({"schedule_pos": self.sched_pos},
                                                                         cfg["max_iters"]))
        if cfg["eval_selector"]:  # the mask swap: the same weights and counts, another choice of blocks
            self.model.swap_choice(cfg["eval_selector"])
            self.say(f"eval_selector={cfg['eval_selector']}: the checkpoint's weights and counts (an adaptive "
                     f"budget's from its own predictor and thresholds), this choice of blocks (no gate bias unless "
                     f"'learned')")
        if not self.rt.master:
            return 0
        val = self.val_bpc()
        measured = {}
        test, n = self.test_bpc(into=measured)
        self.copy_test(into=measured)
        self.recall_task("test", into=measured)
        out = {**measured, "iter": c.iter_num, "val_bpc": val, "test_bpc": test, "test_bytes_scored": n,
               "eval_stride": cfg["eval_stride"], "block_size": cfg["block_size"], "data_dir": cfg["data_dir"],
               "data_sha256": self.data_sha256, "schedule_pos": self.sched_pos, "env": self.rt.env(),
               "eval_selector": cfg["eval_selector"] or None}
        out.update(self.model.diagnostics())
        if self.model.eval_notes():
            out["note"] = "; ".join(self.model.eval_notes())
        checkpoint.write_json(out, os.path.join(self.out_dir, "eval.json"))
        self.say(f"checkpoint at iter {c.iter_num}: val {val:.4f} bpc, test {test:.4f} bpc "
                 f"({n:,} bytes, stride {cfg['eval_stride']}); wrote {self.out_dir}/eval.json")
        if "note" in out:
            self.say(f"note: {out['note']}")
        return 0

    def progress_bar(self):
        if not (self.rt.master and self.cfg["progress"]):
            return None
        from tqdm import tqdm
        return tqdm(total=self.cfg["max_iters"], initial=self.c.iter_num, unit="it", dynamic_ncols=True,
                    file=sys.stderr)


def progress_text(row):
    parts = []
    for key, fmt in (("train_bpc", "train {:.3f}"), ("val_bpc", "val {:.3f}"), ("tokens_per_s", "{:,.0f} tok/s"),
                     ("sparsity", "sparsity {:.2f}")):
        if row.get(key) is not None:
            parts.append(fmt.format(row[key]))
    return " | ".join(parts)


# ----------------------------------------------------------------------------- entry point

def main(argv, kind, build_model=None):
    """Entry point of a training script (kind: a name in models.MODELS). Returns the process exit code.
    build_model(cfg) -> GPT replaces the kind's builder (tests use it to inject faults)."""
    if "-h" in argv or "--help" in argv:
        print(help_text(kind))
        return 0
    cfg = configurator.resolve_or_exit(defaults_for(kind), argv, types_for(kind))
    try:
        return run(cfg, kind, explicit_keys(argv), build_model)
    except (TrainError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if os.path.exists(os.path.join(cfg["out_dir"], "ckpt.pt")):
            print(f"error: interrupted; {cfg['out_dir']}/ckpt.pt holds the last checkpoint: continue with "
                  f"--init_from=resume, or test it with --eval_only=True --init_from=resume", file=sys.stderr)
        else:
            print(f"error: interrupted before the first checkpoint; {cfg['out_dir']} holds nothing to resume: "
                  f"start the run again", file=sys.stderr)
        return 130


def parse_iters(text):
    """test_iters' comma list of iterations, as a set of ints (the config check has named any bad entry)."""
    return {int(x) for x in str(text).split(",") if x.strip()}


def starts_from_checkpoint(cfg):
    """init_from=PATH (not 'scratch' or 'resume'): a new run from another run's weights."""
    return cfg["init_from"] not in ("scratch", "resume")


def run(cfg, kind, explicit=(), build_model=None):
    rt = Runtime(cfg)
    out_dir = cfg["out_dir"]
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise TrainError(f"out_dir {out_dir} is a file, not a directory; choose another --out_dir")
    new_run = cfg["init_from"] != "resume"  # from scratch or from another run's weights
    check_exclusive(kind, explicit)
    if new_run:
        finalize_config(cfg, kind, rt)  # a bad setting is named before out_dir is created
    lock = contextlib.nullcontext()
    created = rt.master and new_run and not os.path.isdir(out_dir)
    if rt.master and (new_run or os.path.isdir(out_dir)):
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:
            raise TrainError(f"cannot create out_dir {out_dir}: {e.strerror or e}; "
                             f"choose a writable --out_dir") from None
        lock = checkpoint.RunLock(out_dir)  # one writer per run directory, before anything there is read
    with lock:
        try:
            return _run(cfg, kind, explicit, build_model, rt)
        except (TrainError, DataError, CheckpointError):
            # refused before it wrote anything: leave no empty run directory (removed while the lock is held, so
            # no other process can have started writing there)
            if created and set(os.listdir(out_dir)) <= {checkpoint.RunLock.NAME}:
                shutil.rmtree(out_dir, ignore_errors=True)
            raise


def _run(cfg, kind, explicit, build_model, rt):
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    ckpt = None
    if cfg["init_from"] == "resume":
        need = checkpoint.MODEL_KEYS + ("iter_num", "best_val_bpc",
                                        "config") if cfg["eval_only"] else checkpoint.TRAINING_KEYS
        ckpt = checkpoint.load(ckpt_path, require=need)
        check_kind(ckpt, kind, ckpt_path)  # before any other check: the clearest error comes first
        cfg = resume_config(cfg, kind, ckpt["config"], explicit, rt.say)
    cfg = finalize_config(cfg, kind, rt)
    if ckpt is not None:
        check_architecture(ckpt, kind, cfg, ckpt_path)
    elif not cfg["eval_only"]:
        if rt.master:
            restart_incomplete(cfg["out_dir"], rt.say)
        there = [f for f in RUN_FILES if os.path.lexists(os.path.join(cfg["out_dir"], f))]
        if there:
            raise TrainError(f"{cfg['out_dir']} already holds a run ({', '.join(there)}); continue it with "
                             f"--init_from=resume, or start over with another --out_dir (or delete that one first)")
    ds = ByteDataset(cfg["data_dir"])
    ds.check_block_size(cfg["block_size"])
    if ckpt is not None and ckpt.get("data_sha256") and ckpt["data_sha256"] != data_identity(ds):
        changed = sorted(k for k in ckpt["data_sha256"] if ckpt["data_sha256"][k] != (data_identity(ds) or {}).get(k))
        rt.say(f"warning: the data in {cfg['data_dir']} changed since this checkpoint was written (split "
               f"{', '.join(changed) or 'set'} differs): "
               f"its curves and test bpc will not compare with the earlier ones")
    rt.init_distributed()
    try:
        if rt.master:
            for name in checkpoint.remove_stale_temps(cfg["out_dir"]):
                rt.say(f"removed {name}, left by a process that no longer runs")
        trainer = Trainer(cfg, kind, rt, ds, ckpt, build_model)
        ckpt = None  # free memory
        env = rt.env()
        rt.say(f"{kind}: {trainer.model.num_params() / 1e6:.2f}M parameters (non-embedding), "
               f"{trainer.tokens_per_iter:,} tokens/iter, torch {torch.__version__}, {env['device']}, "
               f"world size {rt.world_size}")
        for note in rt.notes:
            rt.say("  " + note)
        rt.say("config: " + json.dumps(cfg, sort_keys=True))
        if cfg["eval_only"]:
            return trainer.eval_only()
        if rt.master:
            # the settings the run trains with, 'auto' resolved (device, dtype, compile, backend): a resumed run's
            # command may leave them 'auto', and compare.py must see the same run either way
            # init_from as the run began (a resume's 'resume' would hide where its weights came from)
            checkpoint.write_json({**cfg, **rt.resolved, "init_from": trainer.weights_from(),
                                   "init_origin": trainer.origin}, os.path.join(cfg["out_dir"], "config.json"))
        return trainer.fit()
    finally:
        rt.close()
