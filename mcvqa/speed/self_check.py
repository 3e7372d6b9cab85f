"""## Self-check of the fast paths: each fold compares them with the stock forward first

The cached-feature forward and the shared-prefix option orders reach transformers below its public API
(machinery/compat.py); a release that changes what they rely on gives wrong numbers, not errors (5.18-5.23
ignored the decoder's cache keyword, so every suffix ran without its prefix). Before a fold relies on
them, a few of its rows are scored three ways; a path that disagrees is switched off for the fold with
a warning that says what that costs and the fix.
"""

import dataclasses

import torch

from ..core.collate import VqaCollator, VqaDataset, cyclic_perms, pixel_cap
from ..core.hardware import compute_autocast
from ..core.modeling import model_device, tower_dtype, unwrap_vlm
from ..core.scoring import letter_logits, logits_agree
from ..families.registry import family_of
from ..machinery.compat import fast_path_fix, transformers_version, warn
from .feature_cache import CachedImageEncoding
from .shared_prefix import shared_or_error, shared_prefix_problem


@torch.no_grad()
def check_fast_paths(ctx, model, frame, *, n_rows=2):
    """Score a few of `frame`'s rows three ways before a fold (`ctx`, its FoldContext) relies on the fast paths:
    the stock forward (pixels through the vision tower), the cached-feature forward, and the shared-prefix option
    orders. The last two reach transformers below its public API (compat.py); a release that changes what they
    rely on gives wrong numbers, not errors. Returns (ctx.feature_cache or None, ctx.cfg): a path that disagrees
    is switched off for the fold, with a warning that says what it costs and the fix."""
    processor, fmt, cfg, hardware, feature_cache = ctx.processor, ctx.fmt, ctx.cfg, ctx.hardware, ctx.feature_cache
    if feature_cache is None or len(frame) == 0:
        return feature_cache, cfg
    k = min(4, max(2, cfg.tta_option_views))
    views = [(row, perm) for row in range(min(n_rows, len(frame))) for perm in cyclic_perms(k)]
    max_pixels = pixel_cap(processor, cfg)
    dataset = VqaDataset(frame, views, max_pixels, blank_images=cfg.blank_images,
                         bomb_limit_pixels=cfg.bomb_limit_pixels)
    collator = VqaCollator(processor, fmt, cfg.min_pixels, max_pixels, encoding=CachedImageEncoding(),
                           pixel_dtype=tower_dtype(model))
    batch = collator([dataset[i] for i in range(len(dataset))])  # pixels for every view: no keys known
    device, ids = model_device(model), fmt.letter_ids
    problem = shared_prefix_problem(family_of(unwrap_vlm(model).config), hardware.dtype) if cfg.tta_shared_prefix \
        else None
    if problem:  # known not exact on this release: not tried, said once per fold
        print(f"[check] {problem}")
        cfg = dataclasses.replace(cfg, tta_shared_prefix=False)
    was_training = model.training
    model.eval()
    with compute_autocast(hardware):
        stock = letter_logits(model, batch, ids, device, tower_dtype(model))
        cached_batch = feature_cache.attach(model, batch)
        cached = letter_logits(model, cached_batch, ids, device, None)
        shared = shared_or_error(model, cached_batch, ids, device, k) if cfg.tta_shared_prefix else None
    model.train(was_training)

    def agrees(fast, exact, what, reference, cost):
        ok, error, tolerance = logits_agree(fast, exact, hardware)
        if not ok:
            warn(f"{what} gives other letter logits than {reference} on transformers {transformers_version()} (max "
                 f"|difference| {error:.3g} > tolerance {tolerance:.3g}). {cost} Fix: {fast_path_fix()}.")
        return ok, f"{what} = {reference} (max |Δ logit| {error:.2g}, tolerance {tolerance:.2g})"

    ok, line = agrees(cached, stock, "the cached-feature forward", "the stock forward", "Image-feature cache off for this "
                      "fold: the vision tower runs for every training step and every test-time view (a run takes "
                      "~2.5x longer).")
    if not ok:
        return None, dataclasses.replace(cfg, tta_shared_prefix=False)
    shared_off = "tta_shared_prefix off for this fold: each option order runs the whole prompt (test-time " \
                 "augmentation ~2-3x longer)."
    if isinstance(shared, Exception):  # a release whose cache the path cannot use: off, with the error said
        warn(f"the shared-prefix option-order scoring failed on transformers {transformers_version()} "
             f"({type(shared).__name__}: {shared}). {shared_off} Please report the version.")
        cfg, shared = dataclasses.replace(cfg, tta_shared_prefix=False), None
    if shared is not None:
        ok, shared_line = agrees(shared, cached, "the shared-prefix option-order scoring", "scoring each view on its own",
                                 shared_off)
        if ok:
            line += f"; {shared_line}"
        else:
            cfg = dataclasses.replace(cfg, tta_shared_prefix=False)
    print(f"[check] {line}")
    return feature_cache, cfg
