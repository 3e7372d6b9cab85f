"""## Training: an explicit loop per fold, with EMA, cosine warm-up, and resume

Per fold: AdamW on the LoRA weights, transformers' cosine schedule with linear warm-up, gradient
accumulation and clipping, autocast (fp16 with a gradient scaler on T4, bf16 without one on
A100/H100). An exponential moving average (EMA) of the LoRA weights is what gets evaluated and
saved. Validation accuracy comes from the same direct-logit scorer as the submission. A checkpoint
(adapter, optimizer, scheduler, scaler, EMA, RNG state, position in the data order) is written every
`checkpoint_every_steps` optimizer steps or `checkpoint_every_minutes`, so a Kaggle session that dies
resumes where it stopped; finished folds are skipped. A CUDA out-of-memory error halves the
micro-batch for the rest of the fold (same effective batch, exact same loss): the failed attempt's
memory is freed first, and its step starts again from zero gradients. Non-finite losses skip the step
and too many in a row stop the run with the likely cause. The process group (machinery/process.py) says
which of a step's samples are this process's and sums the gradients: one process in the notebook.
"""

import contextlib
import dataclasses
import json
import math
import pathlib
import random
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from ..machinery.files import atomic_write
from ..machinery.process import process_group
from .collate import identity_views, loader_encoding, make_loader, micro_batches, shuffled_views
from .data import letter_indices
from .hardware import compute_autocast
from .inference import predict_letter_logits
from .memory import halve_on_oom
from .modeling import load_trainable_state, model_device, tower_dtype, trainable_state
from .scoring import answer_loss


@dataclasses.dataclass
class FoldContext:
    """What the stages of one fold share (torchtune's recipe style): made once per fold by pipeline.run_fold and
    handed to training, evaluation, prediction and the uncertainty gate instead of the same arguments each time.
    A fold worker (scale/) is sent the run's parts and builds its own, as run_fold does in one process."""

    processor: object
    fmt: object  # the prompt format (core/prompts.py): template settings and the answer letters' token ids
    cfg: object
    hardware: object
    feature_cache: object = None  # speed/feature_cache.py; None = off
    fold: int = 0
    fold_dir: pathlib.Path = None  # where the fold's checkpoint, best adapter and predictions go
    clock: object = None  # the run's RunClock (runkit/budget.py); None = no time budget


class LoraEma:
    """EMA of the trainable weights only. Hand-written because torch's AveragedModel deep-copies the
    whole (4-bit, multi-GB) model; here the shadow is just the LoRA tensors, in fp32."""

    def __init__(self, model, decay):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model):
        for name, param in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(param.detach().float(), 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self, model):
        """Temporarily put the EMA weights into the model (for evaluation and saving)."""
        live = trainable_state(model)
        load_trainable_state(model, self.shadow)
        try:
            yield
        finally:
            load_trainable_state(model, live)


class NonFiniteLossError(RuntimeError):
    pass


def _rng_state():
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save(obj, path):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


@dataclasses.dataclass
class FoldState:
    """Where a fold's training stands: saved in every checkpoint, so a resumed fold goes on exactly here."""

    epoch: int = 0
    step: int = 0  # optimizer steps done
    next_sample: int = 0  # position in this epoch's view order
    best_acc: float = -1.0
    evals_without_gain: int = 0
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    chunk: int = 1  # the micro-batch; an OOM halves it for the rest of the fold
    stopped_early: bool = False
    stopped_for_time: bool = False
    samples_trained: int = 0
    tokens_trained: int = 0  # this process's
    train_s: float = 0.0  # in training steps, data wait included
    eval_s: float = 0.0
    history: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class FoldTraining:
    """The objects one fold's optimizer steps use, and what its checkpoint saves."""

    model: torch.nn.Module
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    ema: object  # LoraEma or None
    state: FoldState
    checkpoint: pathlib.Path
    steps_per_epoch: int
    batch_size: int  # samples per optimizer step (all processes)
    last_save: float = 0.0  # time.time() of the last checkpoint (or of the fold's start in this process)


def start_fold(model, cfg, hardware, n_rows, fold_dir):
    """Optimizer, schedule, scaler and EMA of a fold, restored from its checkpoint when there is one."""
    group = process_group()
    params = [p for p in model.parameters() if p.requires_grad]
    group.broadcast_params(params)  # under DDP: every rank starts from rank 0's LoRA weights
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    batch_size = cfg.micro_batch_size * cfg.grad_accum_steps
    steps_per_epoch = math.ceil(n_rows / batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    scaler = torch.amp.GradScaler("cuda", enabled=hardware.use_grad_scaler)
    ema = LoraEma(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    run = FoldTraining(model, params, optimizer, scheduler, scaler, ema, FoldState(chunk=cfg.micro_batch_size),
                       pathlib.Path(fold_dir) / "checkpoint.pt", steps_per_epoch, batch_size)
    # Read on the CPU by rank 0 and sent to every rank; the optimizer moves its state to its parameters.
    ckpt = group.from_main(lambda: torch.load(run.checkpoint, weights_only=False, map_location="cpu")
                           if run.checkpoint.exists() else None)
    if ckpt is not None:
        load_trainable_state(model, ckpt["trainable"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None:
            ema.shadow = {name: value.to(model_device(model)) for name, value in ckpt["ema"].items()}
        run.state = FoldState(**ckpt["state"])
        _set_rng_state(ckpt["rng"])
    return run


def save_checkpoint(run):
    if process_group().is_main():
        _save({"trainable": trainable_state(run.model), "optimizer": run.optimizer.state_dict(),
               "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(),
               "ema": run.ema.shadow if run.ema else None, "state": dataclasses.asdict(run.state), "rng": _rng_state()},
              run.checkpoint)


def epoch_views(cfg, fold, epoch, n_rows):
    """The epoch's (row, option order) views in training order: a pure function of (seed, fold, epoch)."""
    views = shuffled_views(n_rows, cfg.seed + fold, epoch) if cfg.shuffle_options else identity_views(n_rows)
    order = np.random.default_rng([cfg.seed, fold, epoch, 7]).permutation(len(views))
    return [views[i] for i in order]


def accumulate(ctx, run, batch, weight, size):
    """Forward+backward of a step's samples in micro-batches of `size`; gradients add up in the LoRA
    weights. Returns the weighted (loss, 4-way letter log-loss) (NaN when the loss is not finite: the step
    is skipped). The letter log-loss is what evaluation reports, so the two curves can share an axis; with
    loss_over=vocab the trained loss is the full-vocabulary one, on another scale."""
    device, pixel_dtype = model_device(run.model), tower_dtype(run.model)
    n, total, letters = batch["input_ids"].shape[0], 0.0, 0.0
    for part in micro_batches(batch, size):
        with compute_autocast(ctx.hardware):
            loss, logits4 = answer_loss(run.model, part, ctx.fmt.letter_ids, device, pixel_dtype, ctx.cfg.loss_over)
        if not torch.isfinite(loss):
            return float("nan"), float("nan")
        share = weight * part["input_ids"].shape[0] / n
        run.scaler.scale(loss * share).backward()
        total += float(loss.detach()) * share
        letters += float(F.cross_entropy(logits4.float(), part["answer_index"].to(logits4.device))) * share
    return total, letters


def forward_backward(ctx, run, batch):
    """One optimizer step's forward+backward; ((loss, letter log-loss) over all processes, this process's tokens).

    The loader yields one step's samples; the process group keeps this process's slice (all of them in
    one process), weighted so that the gradient summed over processes is the mean over the step's samples
    (by samples, not processes: last steps are short). A CUDA OOM halves the micro-batch for the rest of
    the fold (accumulation keeps the effective batch) and redoes the whole step from zero gradients: the
    micro-batches before the failure, and the part of a backward it interrupted, have already added to
    the gradients, and counting them twice would change the step."""
    group, n_step = process_group(), batch["input_ids"].shape[0]
    batch = group.rank_slice(batch)
    share = batch["input_ids"].shape[0]
    losses = (0.0, 0.0)
    if share:
        if ctx.feature_cache is not None:
            with compute_autocast(ctx.hardware):  # misses are encoded with the same precision as the uncached forward
                batch = ctx.feature_cache.attach(run.model, batch)

        def say(size, smaller):
            print(f"[train] CUDA out of memory at micro-batch {size}: continuing with {smaller} "
                  f"(gradient accumulation keeps the effective batch; this step starts again)")

        tried = min(run.state.chunk, share)
        losses, fitted = halve_on_oom(lambda size: accumulate(ctx, run, batch, share / n_step, size),
                                      tried, on_retry=lambda: run.optimizer.zero_grad(set_to_none=True), say=say)
        run.state.chunk = fitted if fitted < tried else run.state.chunk
    return group.all_reduce_grads(run.params, losses), int(batch["attention_mask"].sum())


def optimizer_step(run, loss, cfg, fold):
    """Clip, step and update the EMA after a finite loss; skip the step (and count it) after a non-finite one."""
    state = run.state
    if math.isfinite(loss):
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        state.nonfinite_in_a_row = 0
        if run.ema is not None:
            run.ema.update(run.model)
    else:
        state.nonfinite_in_a_row += 1
        state.nonfinite_total += 1
        print(f"[train] fold {fold} step {state.step}: non-finite loss, step skipped "
              f"({state.nonfinite_in_a_row} in a row)")
        if state.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{state.nonfinite_in_a_row} non-finite losses in a row. Likely cause: fp16 overflow "
                "(Qwen-VL on a T4). Fix: lower learning_rate, or set dtype=float32 for this run, or use "
                "a bf16 GPU (A100/H100); check the images for extreme values too.")
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    return run.scheduler.get_last_lr()[0]


def eval_steps(steps_per_epoch, evals_per_epoch):
    """The steps of an epoch (1-based, within the epoch) after which validation runs: evenly spaced, the last at
    the epoch's end, each once. (Every `steps // evals` global steps plus the epoch's end evaluated twice in a
    row where the epoch's steps were not a multiple, and the same accuracy twice counted as "no gain".)"""
    evals = max(1, min(evals_per_epoch, steps_per_epoch))
    return {math.ceil(k * steps_per_epoch / evals) for k in range(1, evals + 1)}


# %% The loop
def train_fold(ctx, model, train_frame, val_frame, *, reserve_views=0):
    """Train one fold (resuming if a checkpoint exists); returns its result (also in DONE.json).

    `ctx`: the fold's FoldContext (its fold, fold_dir, feature cache and clock). The best EMA adapter is saved as
    `best_adapter.pt`; `DONE.json` marks the fold finished. ctx.feature_cache (speed/feature_cache.py; None = off)
    reuses the frozen tower's image features. ctx.clock (runkit/budget.py): training stops early, after an
    evaluation, when the time left would not cover `reserve_views` scored views."""
    fold, fold_dir, group = ctx.fold, pathlib.Path(ctx.fold_dir), process_group()
    fold_dir.mkdir(parents=True, exist_ok=True)
    finished = group.from_main(lambda: json.loads((fold_dir / "DONE.json").read_text())
                               if (fold_dir / "DONE.json").exists() else None)  # rank 0's disk decides
    if finished is not None:
        print(f"[train] fold {fold}: already finished, skipping ({fold_dir / 'DONE.json'})")
        return finished
    run = start_fold(model, ctx.cfg, ctx.hardware, len(train_frame), fold_dir)
    state = run.state
    if state.step:
        print(f"[train] fold {fold}: resumed at epoch {state.epoch}, step {state.step}")
    evals_at = eval_steps(run.steps_per_epoch, ctx.cfg.evals_per_epoch)
    run.last_save = time.time()
    while state.epoch < ctx.cfg.epochs and not state.stopped_early:
        train_epoch(ctx, run, train_frame, val_frame, evals_at, reserve_views=reserve_views)
    return finish_fold(run, fold, fold_dir)


def train_epoch(ctx, run, train_frame, val_frame, evals_at, *, reserve_views=0):
    """The rest of the current epoch from the checkpoint's position: its steps, its evaluations (`evals_at`,
    eval_steps) and checkpoints; ends at the epoch's end or at an early stop (state.stopped_early)."""
    cfg, fold, state, model = ctx.cfg, ctx.fold, run.state, run.model
    views = epoch_views(cfg, fold, state.epoch, len(train_frame))
    loader = make_loader(train_frame, views[state.next_sample:], ctx.processor, ctx.fmt, cfg, run.batch_size,
                         encoding=loader_encoding(ctx.feature_cache), pixel_dtype=tower_dtype(model), split="train",
                         seed=(fold, state.epoch))
    model.train()
    bar = tqdm(loader, desc=f"fold {fold} epoch {state.epoch + 1}/{cfg.epochs}", leave=False)
    tick = time.perf_counter()
    for batch in bar:
        train_step(ctx, run, batch, bar)
        state.train_s += time.perf_counter() - tick
        out_of_time = ctx.clock is not None and ctx.clock.out_of_time_for(reserve_views,
                                                                          state.train_s / state.samples_trained)
        if out_of_time or math.ceil(state.next_sample / run.batch_size) in evals_at:
            tick = time.perf_counter()
            evaluate_and_keep_best(ctx, run, val_frame)
            state.eval_s += time.perf_counter() - tick
            if stops_early(ctx, state, out_of_time):
                break
            model.train()
        if state.step % cfg.checkpoint_every_steps == 0 or time.time() - run.last_save > 60 * cfg.checkpoint_every_minutes:
            save_checkpoint(run)
            run.last_save = time.time()
        tick = time.perf_counter()
    else:
        state.epoch += 1
        state.next_sample = 0


def train_step(ctx, run, batch, bar):
    """One optimizer step on a loader batch, written into the fold's state and history."""
    state = run.state
    n_step = batch["input_ids"].shape[0]
    (loss, letter_loss), tokens = forward_backward(ctx, run, batch)
    state.next_sample += n_step
    state.step += 1
    lr = optimizer_step(run, loss, ctx.cfg, ctx.fold)
    state.history.append({"fold": ctx.fold, "step": state.step, "epoch": state.epoch, "kind": "train",
                          "loss": loss, "letter_loss": letter_loss, "lr": lr, "accuracy": None})
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
    state.samples_trained += n_step
    state.tokens_trained += tokens


def stops_early(ctx, state, out_of_time):
    """After an evaluation: whether training stops here, for the time budget or for early stopping (said why)."""
    fold, cfg = ctx.fold, ctx.cfg
    if out_of_time:
        print(f"[time] fold {fold}: training stops at step {state.step} ({ctx.clock.describe()}): the time "
              "left is needed for this fold's predictions and the submission (best adapter kept)")
        state.stopped_early = state.stopped_for_time = True
        return True
    if cfg.early_stopping_patience and state.evals_without_gain >= cfg.early_stopping_patience:
        print(f"[train] fold {fold}: no val-accuracy gain in {cfg.early_stopping_patience} evals, stopping")
        state.stopped_early = True
        return True
    return False


# %% The fold's end: validation and the best adapter
def finish_fold(run, fold, fold_dir):
    """The fold's result: printed, written as DONE.json with its history; the checkpoint is no longer needed."""
    state = run.state
    result = {"fold": fold, "best_accuracy": state.best_acc, "steps": state.step,
              "nonfinite_steps": state.nonfinite_total, "final_micro_batch": state.chunk,
              "samples_trained": state.samples_trained, "train_s": round(state.train_s, 2),
              "eval_s": round(state.eval_s, 2), "stopped_for_time": state.stopped_for_time,
              "tokens_trained": state.tokens_trained}
    print(f"[train] fold {fold}: {state.samples_trained} samples ({state.tokens_trained} tokens) in "
          f"{state.train_s:.1f} s of training steps ({state.samples_trained / max(state.train_s, 1e-9):.2f} samples/s, "
          f"data loading included), {state.eval_s:.1f} s evaluating")
    if process_group().is_main():
        pd.DataFrame(state.history).to_csv(fold_dir / "history.csv", index=False)
        (fold_dir / "DONE.json").write_text(json.dumps(result))
        run.checkpoint.unlink(missing_ok=True)
    return result


def evaluate(ctx, model, frame):
    """Validation accuracy and 4-way log-loss from direct-logit scoring (identity option order).

    Under DDP every rank scores its own row shard and all get every shard's logits back."""
    def logits_in_row_order(part):
        loader = make_loader(part, identity_views(len(part)), ctx.processor, ctx.fmt, ctx.cfg, ctx.cfg.infer_batch_size,
                             encoding=loader_encoding(ctx.feature_cache, dedupe_images=True),
                             pixel_dtype=tower_dtype(model))
        logits, rows, _ = predict_letter_logits(model, loader, ctx.fmt, ctx.hardware, desc="eval",
                                                feature_cache=ctx.feature_cache)
        return logits[np.argsort(rows, kind="stable")]

    logits = np.concatenate(process_group().map_shards(frame, logits_in_row_order))
    target = letter_indices(frame["answer"])
    logp = torch.log_softmax(torch.from_numpy(logits), dim=-1)
    loss = float(-logp[torch.arange(len(target)), torch.from_numpy(target)].mean())
    return float((logits.argmax(1) == target).mean()), loss


def evaluate_and_keep_best(ctx, run, val_frame):
    """Score the validation rows with the EMA weights; save them as best_adapter.pt when they are the best yet."""
    state, model, fold = run.state, run.model, ctx.fold
    with run.ema.applied(model) if run.ema is not None else contextlib.nullcontext():
        accuracy, loss = evaluate(ctx, model, val_frame)
        improved = accuracy > state.best_acc  # the same on every rank: evaluate gathers all shards
        if improved and process_group().is_main():
            _save(trainable_state(model), pathlib.Path(ctx.fold_dir) / "best_adapter.pt")
    state.history.append({"fold": fold, "step": state.step, "epoch": state.epoch, "kind": "eval",
                          "loss": loss, "letter_loss": loss, "lr": None, "accuracy": accuracy})
    state.best_acc = max(state.best_acc, accuracy)
    state.evals_without_gain = 0 if improved else state.evals_without_gain + 1
    print(f"[train] fold {fold} step {state.step}: val accuracy {accuracy:.4f}, val loss {loss:.4f}"
          + (" (best, saved)" if improved else ""))
