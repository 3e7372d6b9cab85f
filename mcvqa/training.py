"""## 8. Training: an explicit loop per fold, with EMA, cosine warm-up, and resume

Per fold: AdamW on the LoRA weights, transformers' cosine schedule with linear warm-up, gradient
accumulation and clipping, autocast (fp16 with a gradient scaler on T4, bf16 without one on
A100/H100). An exponential moving average (EMA) of the LoRA weights is what gets evaluated and
saved. Validation accuracy comes from the same direct-logit scorer as the submission. A checkpoint
(adapter, optimizer, scheduler, scaler, EMA, RNG state, position in the data order) is written every
`checkpoint_every_steps` optimizer steps or `checkpoint_every_minutes`, so a Kaggle session that dies
resumes where it stopped; finished folds are skipped. A CUDA out-of-memory error halves the
micro-batch for the rest of the fold (same effective batch, exact same loss): the failed attempt's
memory is freed first, and its step starts again from zero gradients. Non-finite losses skip the step
and too many in a row stop the run with the likely cause. Under `torchrun` each optimizer
step's samples are split across the ranks and their LoRA gradients summed (distributed.py): the same
step as one process, and only rank 0 writes files.
"""

import contextlib
import gc
import json
import math
import os
import pathlib
import random
import time

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from .budget import prediction_reserve_s
from .collate import VqaCollator, VqaDataset, identity_views, shuffled_views
from .compat import transformers_version, warn
from .distributed import all_reduce_grads, broadcast_params, from_main, is_main, map_shards, rank_slice, slice_rows
from .modeling import load_trainable_state, trainable_state
from .scoring import answer_loss, letter_logits, logits_agree, shared_prefix_letter_logits, unwrap_vlm


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


def micro_batches(batch, size):
    """A collated batch in consecutive chunks of at most `size` samples (images' patch rows follow their samples)."""
    n = batch["input_ids"].shape[0]
    return [slice_rows(batch, start, min(start + size, n)) for start in range(0, n, size)]


def compute_autocast(hardware):
    if hardware.device == "cuda" and hardware.dtype != "float32":
        return torch.autocast("cuda", dtype=hardware.torch_dtype)
    return contextlib.nullcontext()


def _is_oom(error):
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


OUT_OF_MEMORY = object()  # what call_or_oom returns instead of raising


def call_or_oom(function, can_retry):
    """function(), or OUT_OF_MEMORY when it ran out of CUDA memory and a smaller retry is possible.

    The retry must happen after this returns, never inside the `except` block: there the exception's
    traceback still holds the frames of the failed attempt, and with them every activation it
    allocated, so each retry would start with less free memory than the attempt that failed."""
    try:
        return function()
    except Exception as error:  # noqa: BLE001 - only OOM is handled, everything else re-raised
        if not (_is_oom(error) and can_retry):
            raise
    return OUT_OF_MEMORY


def free_memory():
    """Give the failed attempt's memory back (reference cycles first) before a smaller retry."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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


def _atomic_torch_save(obj, path):
    tmp = pathlib.Path(str(path) + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def make_loader(frame, views, processor, fmt, cfg, batch_size, max_pixels=None, workers=None, feature_cache=None,
                pixel_dtype=None, dedupe_images=False):
    """DataLoader of collated views. With a feature_cache, images it already holds are not processed
    or shipped by the workers, and with dedupe_images the views of one image in a batch share one copy
    of its pixels (not for training batches: DDP splits those by sample)."""
    max_pixels = max_pixels or cfg.max_pixels
    dataset = VqaDataset(frame, views, max_pixels, blank_images=cfg.blank_images, bomb_limit_pixels=cfg.bomb_limit_pixels)
    collator = VqaCollator(processor, fmt, cfg.min_pixels, max_pixels, image_keys=feature_cache is not None,
                           known_keys=feature_cache.known_keys() if feature_cache is not None else (),
                           dedupe_images=dedupe_images, pixel_dtype=pixel_dtype)
    workers = cfg.num_workers if workers is None else workers
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator,
                                       num_workers=workers, persistent_workers=False,
                                       pin_memory=cfg.pin_memory and torch.cuda.is_available())


@torch.no_grad()
def predict_letter_logits(model, loader, fmt, hardware, desc="predict", feature_cache=None, shared_views=0, stats=None):
    """Letter logits per view, in the loader's order: (logits [N, 4] in display order, rows, perms).

    With a feature_cache (and a loader made with it), each image is encoded at most once. With
    `shared_views` = k, each run of k samples is one row's option orders: their common prefix runs once
    (scoring.shared_prefix_letter_logits). That path leans on transformers internals, so the pass's
    first batch is also scored view by view and the pass goes on view by view, with a warning, when the
    two disagree. A CUDA out-of-memory error halves the batch (whole rows) for the rest of the pass
    instead of losing a finished fold's predictions; the logits are the same."""
    model.eval()
    logits, rows, perms = [], [], []
    device, pixel_dtype = _model_device(model), tower_dtype(model)
    unit = max(1, shared_views)  # a row's option views stay together
    state = {"views": None,  # set by the first OOM: the largest batch that is tried from then on
             "shared": shared_views, "check": None}

    def attempt(batch, shared):
        out = shared_prefix_letter_logits(model, batch, fmt.letter_ids, device, shared) if shared else None
        return out if out is not None else letter_logits(model, batch, fmt.letter_ids, device, pixel_dtype)

    def score(batch, shared):
        n = batch["input_ids"].shape[0]
        step = state["views"]
        if step is not None and n > step:  # (a chunk may lower the limit again: each chunk splits itself)
            return torch.cat([score(part, shared) for part in micro_batches(batch, step)])
        out = call_or_oom(lambda: attempt(batch, shared), can_retry=n > unit)
        if out is not OUT_OF_MEMORY:
            return out
        state["views"] = max(unit, (n // unit // 2) * unit)
        print(f"[predict] CUDA out of memory at {n // unit} rows per batch: continuing with "
              f"{state['views'] // unit} (same predictions; lower infer_batch_size to avoid this)")
        free_memory()
        return score(batch, shared)

    def checked_score(batch):
        """The first shared-prefix batch of the pass is scored both ways; later ones as the check decided."""
        out = score(batch, state["shared"])
        if state["shared"] and state["check"] is None and "image_features" in batch:
            exact = score(batch, 0)
            ok, error, tolerance = logits_agree(out, exact, hardware)
            state["check"] = error
            if not ok:
                warn(f"{desc}: the shared-prefix option-order scoring disagrees with scoring each view on its own "
                     f"(max |difference| {error:.3g} > tolerance {tolerance:.3g} in the letter logits; transformers "
                     f"{transformers_version()}). This pass goes on view by view: exact, but each option order runs the "
                     f"whole prompt, so its language model does ~2-3x the work. Fix: "
                     f"pip install -U 'transformers>=5.24,<6', or set tta_shared_prefix=false to skip this check.")
                state["shared"] = 0
                return exact
        return out

    started = time.perf_counter()
    batches = iter(loader)  # a DataLoader starts its worker processes here
    startup = waited = time.perf_counter() - started
    batches = iter(tqdm(batches, desc=desc, total=len(loader), leave=False))
    while True:
        tick = time.perf_counter()
        batch = next(batches, None)
        waited += time.perf_counter() - tick  # the main thread idle, waiting for the data loader
        if batch is None:
            break
        with compute_autocast(hardware):
            if feature_cache is not None:
                batch = feature_cache.attach(model, batch)
            # Kept on the GPU until the end: a .cpu() here would make the CPU wait for every batch
            # instead of preparing the next one while the GPU works.
            logits.append(checked_score(batch))
        rows.append(batch["rows"])
        perms.append(batch["perms"])
    out = torch.cat(logits).cpu().numpy(), torch.cat(rows).numpy(), torch.cat(perms).numpy()
    if stats is not None:  # (the .cpu() above waited for the GPU: the wall time is the pass's)
        stats.update(wall_s=time.perf_counter() - started, loader_wait_s=waited, loader_start_s=startup,
                     views=len(out[1]), shared_prefix_check=state["check"], shared_prefix_used=bool(state["shared"]))
    return out


def _model_device(model):
    return next(p for p in model.parameters()).device


def tower_dtype(model):
    return unwrap_vlm(model).model.visual.patch_embed.proj.weight.dtype


def evaluate(model, frame, processor, fmt, cfg, hardware, feature_cache=None):
    """Validation accuracy and 4-way log-loss from direct-logit scoring (identity option order).

    Under DDP every rank scores its own row shard and all get every shard's logits back."""
    def logits_in_row_order(part):
        loader = make_loader(part, identity_views(len(part)), processor, fmt, cfg, cfg.infer_batch_size,
                             feature_cache=feature_cache, pixel_dtype=tower_dtype(model), dedupe_images=True)
        logits, rows, _ = predict_letter_logits(model, loader, fmt, hardware, desc="eval", feature_cache=feature_cache)
        return logits[np.argsort(rows, kind="stable")]

    logits = np.concatenate(map_shards(frame, logits_in_row_order))
    target = frame["answer"].map("abcd".index).to_numpy()
    logp = torch.log_softmax(torch.from_numpy(logits), dim=-1)
    loss = float(-logp[torch.arange(len(target)), torch.from_numpy(target)].mean())
    return float((logits.argmax(1) == target).mean()), loss


def train_fold(model, train_frame, val_frame, processor, fmt, cfg, hardware, fold, fold_dir, feature_cache=None,
               clock=None, reserve_views=0):
    """Train one fold (resuming if a checkpoint exists); returns its history rows and best accuracy.

    The best EMA adapter is saved as `best_adapter.pt`; `DONE.json` marks the fold finished.
    feature_cache (feature_cache.py; None = off) reuses the frozen tower's image features. clock (budget.py):
    training stops early, after an evaluation, when the time left would not cover `reserve_views` scored views."""
    fold_dir = pathlib.Path(fold_dir)
    fold_dir.mkdir(parents=True, exist_ok=True)
    done = fold_dir / "DONE.json"
    finished = from_main(lambda: json.loads(done.read_text()) if done.exists() else None)  # rank 0's disk decides
    if finished is not None:
        print(f"[train] fold {fold}: already finished, skipping ({done})")
        return finished
    params = [p for p in model.parameters() if p.requires_grad]
    broadcast_params(params)  # under DDP: every rank starts from rank 0's LoRA weights
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    effective = cfg.micro_batch_size * cfg.grad_accum_steps
    steps_per_epoch = math.ceil(len(train_frame) / effective)
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    scaler = torch.amp.GradScaler("cuda", enabled=hardware.use_grad_scaler)
    ema = LoraEma(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    state = {"epoch": 0, "step": 0, "next_sample": 0, "best_acc": -1.0, "evals_without_gain": 0,
             "nonfinite_in_a_row": 0, "nonfinite_total": 0, "history": [], "chunk": cfg.micro_batch_size,
             "stopped_early": False}
    ckpt_path = fold_dir / "checkpoint.pt"
    device, pixel_dtype = _model_device(model), tower_dtype(model)
    # Read on the CPU by rank 0 and sent to every rank; the optimizer moves its state to its parameters.
    ckpt = from_main(lambda: torch.load(ckpt_path, weights_only=False, map_location="cpu")
                     if ckpt_path.exists() else None)
    if ckpt is not None:
        load_trainable_state(model, ckpt["trainable"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None:
            ema.shadow = {name: value.to(device) for name, value in ckpt["ema"].items()}
        state = ckpt["state"]
        _set_rng_state(ckpt["rng"])
        print(f"[train] fold {fold}: resumed at epoch {state['epoch']}, step {state['step']}")

    def save_checkpoint():
        if not is_main():
            return
        _atomic_torch_save({"trainable": trainable_state(model), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                            "ema": ema.shadow if ema else None, "state": state, "rng": _rng_state()}, ckpt_path)

    eval_every = max(1, steps_per_epoch // max(1, cfg.evals_per_epoch))
    last_save = time.time()

    def accumulate(batch, weight):
        """Forward+backward of a step's samples in micro-batches of state["chunk"]; gradients add up in
        the LoRA weights. Returns the weighted loss (NaN when one is not finite: the step is skipped)."""
        n, total = batch["input_ids"].shape[0], 0.0
        for part in micro_batches(batch, state["chunk"]):
            with compute_autocast(hardware):
                loss, _ = answer_loss(model, part, fmt.letter_ids, device, pixel_dtype, cfg.loss_over)
            if not torch.isfinite(loss):
                return float("nan")
            share = weight * part["input_ids"].shape[0] / n
            scaler.scale(loss * share).backward()
            total += float(loss.detach()) * share
        return total

    def run_step(batch, weight):
        """One optimizer step's forward+backward. A CUDA OOM halves the micro-batch for the rest of the fold
        (gradient accumulation keeps the effective batch) and redoes the whole step from zero gradients:
        the micro-batches before the failure, and the part of a backward it interrupted, have already
        added to the gradients, and counting them twice would change the step."""
        while True:
            chunk = min(state["chunk"], batch["input_ids"].shape[0])
            loss = call_or_oom(lambda: accumulate(batch, weight), can_retry=chunk > 1)
            if loss is not OUT_OF_MEMORY:
                return loss
            state["chunk"] = max(1, chunk // 2)
            optimizer.zero_grad(set_to_none=True)
            free_memory()
            print(f"[train] CUDA out of memory at micro-batch {chunk}: continuing with {state['chunk']} "
                  f"(gradient accumulation keeps the effective batch; this step starts again)")

    while state["epoch"] < cfg.epochs and not state["stopped_early"]:
        epoch = state["epoch"]
        views = (shuffled_views(len(train_frame), cfg.seed + fold, epoch) if cfg.shuffle_options
                 else identity_views(len(train_frame)))
        order = np.random.default_rng([cfg.seed, fold, epoch, 7]).permutation(len(views))
        remaining = [views[i] for i in order][state["next_sample"]:]
        loader = make_loader(train_frame, remaining, processor, fmt, cfg, effective, feature_cache=feature_cache,
                             pixel_dtype=pixel_dtype)
        model.train()
        bar = tqdm(loader, desc=f"fold {fold} epoch {epoch + 1}/{cfg.epochs}", leave=False)
        tick = time.perf_counter()
        for batch in bar:
            # The loader yields one optimizer step's samples; under DDP this rank keeps its slice of them.
            n_step = batch["input_ids"].shape[0]
            batch = rank_slice(batch)
            share = batch["input_ids"].shape[0]
            if feature_cache is not None and share:
                with compute_autocast(hardware):  # misses are encoded with the same precision as the uncached forward
                    batch = feature_cache.attach(model, batch)
            # run_step splits the batch into micro-batches; the weight makes the summed gradient
            # over ranks the mean over all n_step samples (by samples, not ranks: last steps are short).
            group_loss = run_step(batch, share / n_step) if share else 0.0
            group_loss = all_reduce_grads(params, group_loss)  # one process: unchanged
            state["next_sample"] += n_step
            state["step"] += 1
            if math.isfinite(group_loss):
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                state["nonfinite_in_a_row"] = 0
                if ema is not None:
                    ema.update(model)
            else:
                state["nonfinite_in_a_row"] += 1
                state["nonfinite_total"] += 1
                print(f"[train] fold {fold} step {state['step']}: non-finite loss, step skipped "
                      f"({state['nonfinite_in_a_row']} in a row)")
                if state["nonfinite_in_a_row"] >= cfg.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{state['nonfinite_in_a_row']} non-finite losses in a row. Likely cause: fp16 overflow "
                        "(Qwen-VL on a T4). Fix: lower learning_rate, or set dtype=float32 for this run, or use "
                        "a bf16 GPU (A100/H100); check the images for extreme values too.")
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            lr = scheduler.get_last_lr()[0]
            state["history"].append({"fold": fold, "step": state["step"], "epoch": epoch, "kind": "train",
                                     "loss": group_loss, "lr": lr, "accuracy": None})
            bar.set_postfix(loss=f"{group_loss:.4f}", lr=f"{lr:.2e}")
            state["samples_trained"] = state.get("samples_trained", 0) + n_step
            state["tokens_trained"] = state.get("tokens_trained", 0) + int(batch["attention_mask"].sum())  # this rank's
            state["train_s"] = state.get("train_s", 0.0) + time.perf_counter() - tick  # data wait included
            out_of_time = clock is not None and clock.out_of_time(
                prediction_reserve_s(reserve_views, state["train_s"] / state["samples_trained"]))
            if out_of_time or state["step"] % eval_every == 0 or state["next_sample"] >= len(views):
                tick = time.perf_counter()
                _evaluate_and_keep_best(model, ema, val_frame, processor, fmt, cfg, hardware, fold, fold_dir, state,
                                        feature_cache)
                state["eval_s"] = state.get("eval_s", 0.0) + time.perf_counter() - tick
                if out_of_time:
                    print(f"[time] fold {fold}: training stops at step {state['step']} ({clock.describe()}): the time "
                          "left is needed for this fold's predictions and the submission (best adapter kept)")
                    state["stopped_early"] = state["stopped_for_time"] = True
                    break
                if cfg.early_stopping_patience and state["evals_without_gain"] >= cfg.early_stopping_patience:
                    print(f"[train] fold {fold}: no val-accuracy gain in {cfg.early_stopping_patience} evals, stopping")
                    state["stopped_early"] = True
                    break
                model.train()
            if (state["step"] % cfg.checkpoint_every_steps == 0
                    or time.time() - last_save > 60 * cfg.checkpoint_every_minutes):
                save_checkpoint()
                last_save = time.time()
            tick = time.perf_counter()
        else:
            state["epoch"] += 1
            state["next_sample"] = 0
    samples, train_s, eval_s = state.get("samples_trained", 0), state.get("train_s", 0.0), state.get("eval_s", 0.0)
    result = {"fold": fold, "best_accuracy": state["best_acc"], "steps": state["step"],
              "nonfinite_steps": state["nonfinite_total"], "final_micro_batch": state["chunk"],
              "samples_trained": samples, "train_s": round(train_s, 2), "eval_s": round(eval_s, 2),
              "stopped_for_time": state.get("stopped_for_time", False)}
    tokens = state.get("tokens_trained", 0)
    result["tokens_trained"] = tokens
    print(f"[train] fold {fold}: {samples} samples ({tokens} tokens) in {train_s:.1f} s of training steps "
          f"({samples / max(train_s, 1e-9):.2f} samples/s, data loading included), {eval_s:.1f} s evaluating")
    if is_main():
        pd.DataFrame(state["history"]).to_csv(fold_dir / "history.csv", index=False)
        done.write_text(json.dumps(result))
        ckpt_path.unlink(missing_ok=True)
    return result


def _evaluate_and_keep_best(model, ema, val_frame, processor, fmt, cfg, hardware, fold, fold_dir, state,
                            feature_cache=None):
    with ema.applied(model) if ema is not None else contextlib.nullcontext():
        accuracy, loss = evaluate(model, val_frame, processor, fmt, cfg, hardware, feature_cache)
        improved = accuracy > state["best_acc"]  # the same on every rank: evaluate gathers all shards
        if improved and is_main():
            _atomic_torch_save(trainable_state(model), pathlib.Path(fold_dir) / "best_adapter.pt")
    state["history"].append({"fold": fold, "step": state["step"], "epoch": state["epoch"], "kind": "eval",
                             "loss": loss, "lr": None, "accuracy": accuracy})
    state["best_acc"] = max(state["best_acc"], accuracy)
    state["evals_without_gain"] = 0 if improved else state["evals_without_gain"] + 1
    print(f"[train] fold {fold} step {state['step']}: val accuracy {accuracy:.4f}, val loss {loss:.4f}"
          + (" (best, saved)" if improved else ""))
