"""## Before the first fold: what the run needs at its end, checked while it costs seconds

A Kaggle session that trains for hours and then fails on a read-only output folder, a full disk or a
time budget its predictions cannot fit in has lost the session. The stages check their own inputs up
front (the CSVs and images, `sample_submission.csv`, the tokenizer, `adapters_from`, `blend_with`);
this module checks the rest, before `start_run` writes anything into the run folder:

- the output folder and the submission's folder can be written, and their disk holds the adapters,
  the checkpoints and (if on) the image features on disk;
- an attention kernel forced in the settings is installed;
- the time budget against a first estimate of the run from FLOPs (GPU only): a budget too short for
  even one fold's predictions is refused, one shorter than the whole run is said with what to change.
"""

import importlib.util
import math
import pathlib
import shutil
import tempfile

from ..core.config import ConfigError
from ..core.inference import image_scales
from .budget import MARGIN_S

# Dense fp16/bf16 tensor-core peaks (FLOP/s) by card name; the estimate assumes a fraction of them.
PEAK_FLOPS = {"t4": 65e12, "l4": 121e12, "a10": 125e12, "v100": 125e12, "l40": 181e12, "a100": 312e12,
              "h100": 989e12, "h200": 989e12, "b200": 2250e12}
# Measured MFU of the pipeline's training and scoring on an H200 (BENCHMARKS.md) was 19-47 %; a T4 with
# bitsandbytes is assumed at 12-25 %: the range the estimate prints.
EFFICIENCY = (0.12, 0.25)
SUFFIX_TOKENS = 40  # what each extra option order scores on top of the shared prefix (options + header)
RUN_FILES_GIB = 0.25  # probabilities, histories, plots, the error analysis


def _existing_ancestor(path):
    path = pathlib.Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def _check_writable(setting, path):
    """Write and remove a temporary file where `path` is or will be; nothing is left behind."""
    folder = _existing_ancestor(path)
    if not folder.is_dir():
        raise ConfigError(f"{setting}={path}: {folder} is a file, not a folder. Fix: set {setting} to a folder path")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ConfigError(f"{setting}={path}: {folder} cannot be written ({error.strerror or error}; on Kaggle "
                          "/kaggle/input is read-only). Fix: a writable folder, e.g. output_dir=/kaggle/working/run "
                          "on Kaggle") from None
    return folder


def disk_needed_gib(cfg, plan, n_images, workers):
    """What the run writes: each fold's best adapter (fp32 LoRA weights) stays; a training fold's checkpoint
    (weights, two AdamW moments, EMA) exists twice while it is replaced atomically, one per worker at once;
    the image features when kept on disk."""
    adapter = 4 * plan["lora_params"] / 2**30
    features = n_images * plan["feature_bytes_per_image"] / 2**30 if cfg.feature_cache_on_disk else 0.0
    trains = cfg.epochs > 0 and not cfg.adapters_from
    return {"adapters": cfg.n_folds * adapter, "checkpoints": workers * 2 * 4 * adapter if trains else 0.0,
            "image features on disk": features, "run files": RUN_FILES_GIB}


def check_output(cfg, plan, n_images, workers):
    """The run folder and the submission's folder writable, with room on their disk; returns the GiB needed."""
    folder = _check_writable("output_dir", cfg.output_dir)
    if cfg.submission_path:
        _check_writable("submission_path", pathlib.Path(cfg.submission_path).parent)
    parts = disk_needed_gib(cfg, plan, n_images, workers)
    needed, free = sum(parts.values()), shutil.disk_usage(folder).free / 2**30
    if free < needed:
        listed = ", ".join(f"{name} {gib:.2f} GiB" for name, gib in parts.items() if gib)
        raise ConfigError(f"output_dir={cfg.output_dir}: {free:.2f} GiB free on its disk, the run needs about "
                          f"{needed:.2f} GiB ({listed}). Fix: free space there, another output_dir"
                          + (", or feature_cache_on_disk=false" if parts["image features on disk"] else ""))
    print(f"[preflight] output_dir={cfg.output_dir}: writable, {free:.1f} GiB free, the run writes ~{needed:.2f} GiB")
    return needed


def check_kernels(cfg):
    if cfg.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("config: attn_implementation=flash_attention_2 but flash_attn is not installed. "
                          "Fix: attn_implementation=auto (SDPA), or pip install flash-attn on an sm80+ GPU")


def estimate_hours(cfg, hardware, plan, *, n_train, n_test, n_images, n_folds, workers):
    """(low, high) hours of the whole run and (low, high) of one fold's predictions, from FLOPs at EFFICIENCY of
    the card's peak; None when the card is unknown or not a GPU. The language model costs 2 x its matmul weights
    per token forward; training a sample 2 forwards (the frozen base needs no weight gradients), 3 with gradient
    checkpointing; an extra option order its suffix over the shared prefix. Each worker's vision tower encodes
    every image once (the feature cache), in fp32 on fp16 cards (an eighth of the fp16 peak)."""
    card = hardware.gpu_name.lower()  # (longest names first: "a10" is in "a100", "l4" in "l40")
    peak = next((PEAK_FLOPS[name] for name in sorted(PEAK_FLOPS, key=len, reverse=True) if name in card), None)
    if hardware.device != "cuda" or peak is None or hardware.dtype == "float32":
        return None
    forward = 2 * plan["lm_matmul_params"] * plan["tokens_per_sample"]
    n_val = n_train / cfg.n_folds
    per_step = 3 if plan.get("gradient_checkpointing") == "on" else 2
    training = 0 if cfg.adapters_from else cfg.epochs * ((n_train - n_val) * per_step + cfg.evals_per_epoch * n_val)
    views = max(1, cfg.tta_option_views) * len(image_scales(cfg))
    view_cost = 1 + (views - 1) * SUFFIX_TOKENS / plan["tokens_per_sample"] if cfg.tta_shared_prefix else views
    predicting = (n_val + n_test) * view_cost
    tower = n_images * 2 * plan["vision_matmul_params"] * plan["patches_per_image"]
    tower_peak = peak / 8 if hardware.dtype == "float16" else peak
    waves = math.ceil(n_folds / workers)  # folds run at once, one per worker

    def hours(efficiency, work):
        return work / efficiency / 3600

    run = [hours(e, waves * (training + predicting) * forward / peak + tower / tower_peak) for e in reversed(EFFICIENCY)]
    predict = [hours(e, predicting * forward / peak) for e in reversed(EFFICIENCY)]
    return tuple(run), tuple(predict)


def check_time_budget(cfg, hardware, plan, *, n_train, n_test, n_images, n_folds, workers):
    """Refuse a budget that cannot hold one fold's predictions; say when the whole run would not fit."""
    estimate = estimate_hours(cfg, hardware, plan, n_train=n_train, n_test=n_test, n_images=n_images, n_folds=n_folds,
                              workers=workers)
    if estimate is None:
        return None
    (low, high), (predict_low, predict_high) = estimate
    basis = (f"from FLOPs at {EFFICIENCY[0]:.0%}-{EFFICIENCY[1]:.0%} of a {hardware.gpu_name}'s peak; the real pace "
             "is printed after each fold")
    print(f"[time] first estimate: {low:.1f}-{high:.1f} h for the run ({basis})")
    budget = cfg.time_budget_hours
    if not budget:
        return estimate
    if predict_low + MARGIN_S / 3600 > budget:
        raise ConfigError(f"config: time_budget_hours={budget:g} cannot hold even one fold's predictions (at least "
                          f"{predict_low:.1f} h for {n_test} test rows x {cfg.tta_option_views} option orders) and the "
                          "submission. Fix: a longer budget, tta_option_views=1, or a smaller model")
    if low > budget:
        print(f"[time] warning: even the low estimate ({low:.1f} h) exceeds time_budget_hours={budget:g}: training will "
              "stop early and later folds may be skipped (the submission is still written). To fit: epochs=1, "
              "evals_per_epoch=1, fewer folds, a smaller max_pixels or a smaller model")
    elif high > budget:
        print(f"[time] the high estimate ({high:.1f} h) exceeds time_budget_hours={budget:g}: the budget may stop "
              "training early (the submission is still written)")
    return estimate


def preflight(cfg, hardware, plan, *, n_train, n_test, n_images, n_folds, workers):
    """Every check of what the run needs at its end that its stages do not make themselves (see the top).
    n_folds: the folds this run trains; workers: how many of them run at once (1: one after the other)."""
    check_kernels(cfg)
    check_output(cfg, plan, n_images, workers)
    check_time_budget(cfg, hardware, plan, n_train=n_train, n_test=n_test, n_images=n_images, n_folds=n_folds,
                      workers=workers)
