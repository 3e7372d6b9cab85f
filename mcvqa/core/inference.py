"""## Inference: direct-logit a/b/c/d scoring with option-order TTA

Each fold's model scores every row under several *views*: cyclic shifts of the four options (view k
shows original option (j + k) mod 4 in slot j), optionally at other pixel budgets. A view's four letter
logits come from one forward pass (core/scoring.py), its probabilities are mapped back to the original
letters, and the views are averaged (in probability or log-probability). No horizontal-flip view:
questions mention left and right, and text in images would read backwards (sister competitions saw flip
TTA hurt). A CUDA out-of-memory error halves the batch (whole rows) for the rest of the pass instead of
losing a finished fold's predictions. With the image-feature cache on (speed/), its encoding strategy
ships no pixels for images it holds, its scorer runs a row's shared prefix once for all its option
orders, and its replay gives later folds the test set's collated batches.
"""

import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .collate import cyclic_perms, loader_encoding, make_loader, micro_batches, pixel_cap
from .config import ConfigError
from .hardware import compute_autocast
from .memory import halve_on_oom
from .modeling import model_device, tower_dtype
from .scoring import letter_logits


def to_original_order(display_probs, perms):
    """probs[i, perms[i, j]] = display_probs[i, j]: slot j showed original option perms[i, j]."""
    original = np.empty_like(display_probs)
    np.put_along_axis(original, perms, display_probs, axis=1)
    return original


def softmax(logits):
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=-1).numpy()


def average_views(view_probs, how="prob"):
    """Average a list of [N, 4] probability arrays (same rows, original letter order)."""
    stack = np.stack(view_probs)
    if how == "prob":
        return stack.mean(0)
    if how == "logprob":
        return softmax(np.log(np.clip(stack, 1e-12, None)).mean(0))
    raise ConfigError(f"config: tta_average must be 'prob' or 'logprob', got {how!r}")


def image_scales(cfg):
    """Pixel-budget multipliers of the views: 1.0 first, then any extra scales from the config."""
    extra = [float(s) for s in cfg.tta_image_scales.split(",") if s.strip()]
    return [1.0] + [s for s in extra if s != 1.0]


@torch.no_grad()
def predict_letter_logits(model, loader, fmt, hardware, *, desc="predict", feature_cache=None, scorer=None, stats=None):
    """Letter logits per view, in the loader's order: (logits [N, 4] in display order, rows, perms).

    With a feature_cache (and a loader made with its encoding), each image is encoded at most once.
    `scorer` (None: each view on its own, core/scoring.letter_logits) scores a batch whose runs of
    `scorer.views_per_row` samples are one row's option orders (speed/shared_prefix.py). A CUDA
    out-of-memory error halves the batch, in whole rows, for the rest of the pass; the logits are the same."""
    model.eval()
    logits, rows, perms = [], [], []
    device, pixel_dtype = model_device(model), tower_dtype(model)
    score_views = scorer or letter_logits
    unit = scorer.views_per_row if scorer is not None else 1  # a row's option views stay together
    limit = None  # set by the first OOM: the largest batch tried from then on

    def say(n, smaller):
        print(f"[predict] CUDA out of memory at {n // unit} rows per batch: continuing with "
              f"{smaller // unit} (same predictions; lower infer_batch_size to avoid this)")

    def score(batch):
        nonlocal limit
        n = batch["input_ids"].shape[0]
        out, fitted = halve_on_oom(lambda size: torch.cat([score_views(model, part, fmt.letter_ids, device, pixel_dtype)
                                                            for part in micro_batches(batch, size)]),
                                   min(n, limit or n), unit, say=say)
        limit = fitted if fitted < n else limit
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
            logits.append(score(batch))
        rows.append(batch["rows"])
        perms.append(batch["perms"])
    out = torch.cat(logits).cpu().numpy(), torch.cat(rows).numpy(), torch.cat(perms).numpy()
    if stats is not None:  # (the .cpu() above waited for the GPU: the wall time is the pass's)
        stats.update(wall_s=time.perf_counter() - started, loader_wait_s=waited, loader_start_s=startup,
                     views=len(out[1]), shared_prefix_check=None, shared_prefix_used=False)
        stats.update(scorer.stats() if scorer is not None else {})
    return out


def predict_views(ctx, model, frame, *, desc="test", reuse_batches=False, perms=None, scales=None, batch_rows=None):
    """Probabilities of every row under every view: {(scale, shift): [N, 4] in original order}.

    `ctx`: the fold's FoldContext (core/training.py): processor, prompt format, cfg, hardware, feature cache.
    The views: the option orders `perms` (None: the config's cyclic shifts; `shift` indexes them) at the
    pixel `scales` (None: the config's). With a feature cache, the option views of an image share one
    vision-tower pass (and later folds reuse it); a pixel scale is a different image to the tower, so it
    has its own features. With `reuse_batches` too, the collated batches are kept for the next fold's
    identical pass (the test set). `batch_rows`: rows per shared-prefix batch (None: infer_batch_size)."""
    processor, fmt, cfg, hardware, feature_cache = ctx.processor, ctx.fmt, ctx.cfg, ctx.hardware, ctx.feature_cache
    perms = cyclic_perms(cfg.tta_option_views) if perms is None else list(perms)
    n, k = len(frame), len(perms)
    # Option orders of one row share system, image and question: batched together (row-major) they run
    # that prefix once (needs the feature cache). Otherwise views go order by order.
    shared = k > 1 and feature_cache is not None and cfg.tta_shared_prefix
    order = [(row, perm) for row in range(n) for perm in perms] if shared else [(row, perm) for perm in perms
                                                                               for row in range(n)]
    # Shared prefix: a batch is infer_batch_size rows (the prefix pass is as big as a single-view
    # batch; the k short suffixes per row ride along), so a fold makes k times fewer passes.
    batch_size = (batch_rows or cfg.infer_batch_size) * k if shared else cfg.infer_batch_size
    views = {}
    for scale in scales or image_scales(cfg):
        max_pixels, pixel_dtype = pixel_cap(processor, cfg, scale), tower_dtype(model)
        if reuse_batches and feature_cache is not None:  # the test set: batches kept by the first fold, if any
            batches = feature_cache.pass_batches(frame, order, processor, fmt, cfg, batch_size=batch_size,
                                                 max_pixels=max_pixels, pixel_dtype=pixel_dtype)
        else:
            batches = make_loader(frame, order, processor, fmt, cfg, batch_size, max_pixels=max_pixels,
                                  encoding=loader_encoding(feature_cache, dedupe_images=True), pixel_dtype=pixel_dtype)
        scorer = feature_cache.view_scorer(k, hardware, f"{desc} x{scale:g}") if shared else None
        stats = {}
        logits, rows, shown = predict_letter_logits(model, batches, fmt, hardware, desc=f"{desc} x{scale:g}",
                                                    feature_cache=feature_cache, scorer=scorer, stats=stats)
        check = stats["shared_prefix_check"]
        print(f"[predict] {desc} x{scale:g}: {n} rows x {k} views in {stats['wall_s']:.1f} s, "
              f"{stats['loader_wait_s']:.1f} s of it waiting for the data loader "
              + ("(batches kept from an earlier fold)" if isinstance(batches, list) else
                 f"({stats['loader_start_s']:.1f} s starting its workers)")
              + ("" if check is None else f"; shared prefix checked on the first batch (max |Δ logit| {check:.2g}"
                 + (")" if stats["shared_prefix_used"] else ", failed: view by view)")))
        probs = to_original_order(softmax(logits), shown)  # (shown: each sample's option order)
        for shift in range(k):
            part = slice(shift, None, k) if shared else slice(shift * n, (shift + 1) * n)
            assert (rows[part] == np.arange(n)).all(), "views came back out of order"
            views[(scale, shift)] = probs[part]
    return views


def tta_probs(views, how="prob"):
    return average_views(list(views.values()), how)


def gather_views(parts):
    """Concatenate per-shard {view: [n_i, 4]} dicts, in shard order, into one {view: [N, 4]} dict."""
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
