"""## 9. Inference: option-order TTA and a probability-averaged fold ensemble

Each fold's model scores every test row under several *views*: cyclic shifts of the four options
(view k shows original option (j + k) mod 4 in slot j), optionally at other pixel budgets. Each
view's probabilities are mapped back to the original letters before averaging (in probability or
log-probability). No horizontal-flip view by default: questions mention left and right, and text in
images would read backwards (sister competitions saw flip TTA hurt). Folds are then averaged in
probability (equal weights, or weighted by out-of-fold accuracy), optionally after one temperature
fitted on out-of-fold logits. The test set's collated batches are the same in every fold (only the
adapter differs): with the feature cache on, the first fold keeps them and later folds replay them.
"""

import dataclasses
import hashlib

import numpy as np
import pandas as pd
import torch
from scipy.optimize import minimize_scalar

from .collate import VqaCollator, VqaDataset, cyclic_perms, cyclic_views
from .compat import transformers_version, warn
from .config import ConfigError
from .prompts import OPTION_LETTERS
from .scoring import letter_logits, logits_agree, shared_prefix_letter_logits
from .training import compute_autocast, make_loader, predict_letter_logits, tower_dtype

PROB_COLUMNS = [f"p_{letter}" for letter in OPTION_LETTERS]


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


def pass_signature(frame, order, fmt, cfg, batch_size, max_pixels):
    """What decides a pass's collated batches: the rows' text and images, the views, the prompt format,
    the pixel range and the batch size. Two passes with one signature get identical batches."""
    columns = [c for c in ("id", "image_path", "question", *OPTION_LETTERS, "answer", "image_ok") if c in frame]
    digest = hashlib.blake2b(digest_size=16)
    digest.update(pd.util.hash_pandas_object(frame[columns], index=False).to_numpy().tobytes())
    digest.update(repr((order, fmt, cfg.model_name_or_path, cfg.min_pixels, max_pixels, batch_size,
                        cfg.blank_images)).encode())
    return digest.hexdigest()


class KeepingBatches:
    """Iterates a data loader and, once it is through, gives its batches without pixels to `keep`."""

    def __init__(self, loader, keep):
        self.loader, self.keep = loader, keep

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        return self._batches(iter(self.loader))  # iter() now: a DataLoader starts its workers here

    def _batches(self, batches):
        kept = []
        for batch in batches:
            # Copies: tensors from loader workers live in shared memory, each with an open file
            # descriptor; hundreds of kept batches would exhaust them (and a small /dev/shm).
            kept.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()
                         if k not in ("pixel_values", "pixel_rows")}
                        | {"pixel_values": torch.zeros(0, 0), "pixel_rows": torch.zeros(0, dtype=torch.long)})
            yield batch
        self.keep(kept)


def pass_batches(frame, order, processor, fmt, cfg, batch_size, max_pixels, feature_cache, pixel_dtype, reuse):
    """A pass's batches: from the data loader, or (`reuse`, feature cache on) the batches an earlier fold
    kept for this very pass. Then later folds do no image decoding, prompt rendering or tokenizing:
    the test set's inputs are the same in every fold, only the adapter differs."""
    keeping = reuse and feature_cache is not None
    if keeping:
        signature = pass_signature(frame, order, fmt, cfg, batch_size, max_pixels)
        kept = feature_cache.batches_for(signature)
        if kept is not None:
            return kept
    loader = make_loader(frame, order, processor, fmt, cfg, batch_size, max_pixels=max_pixels,
                         feature_cache=feature_cache, pixel_dtype=pixel_dtype, dedupe_images=True)
    return KeepingBatches(loader, lambda batches: feature_cache.keep_batches(signature, batches)) if keeping else loader


def predict_views(model, frame, processor, fmt, cfg, hardware, desc="test", feature_cache=None, reuse_batches=False):
    """Probabilities of every row under every view: {(scale, shift): [N, 4] in original order}.

    With a feature_cache, the option views of an image share one vision-tower pass (and later folds
    reuse it); a pixel scale is a different image to the tower, so it has its own features. With
    `reuse_batches` too, the collated batches are kept for the next fold's identical pass (the test set)."""
    n, k = len(frame), cfg.tta_option_views
    # Option orders of one row share system, image and question: batched together (row-major) they run
    # that prefix once (needs the feature cache). Otherwise views go shift by shift.
    shared = k > 1 and feature_cache is not None and cfg.tta_shared_prefix
    order = [(row, perm) for row in range(n) for perm in cyclic_perms(k)] if shared else cyclic_views(n, k)
    # Shared prefix: a batch is infer_batch_size rows (the prefix pass is as big as a single-view
    # batch; the k short suffixes per row ride along), so a fold makes k times fewer passes.
    batch_size = cfg.infer_batch_size * k if shared else cfg.infer_batch_size
    views = {}
    for scale in image_scales(cfg):
        batches = pass_batches(frame, order, processor, fmt, cfg, batch_size, int(cfg.max_pixels * scale),
                               feature_cache, tower_dtype(model), reuse_batches)
        stats = {}
        logits, rows, perms = predict_letter_logits(model, batches, fmt, hardware, desc=f"{desc} x{scale:g}",
                                                    feature_cache=feature_cache, shared_views=k if shared else 0,
                                                    stats=stats)
        check = stats["shared_prefix_check"]
        print(f"[predict] {desc} x{scale:g}: {n} rows x {k} views in {stats['wall_s']:.1f} s, "
              f"{stats['loader_wait_s']:.1f} s of it waiting for the data loader "
              + ("(batches kept from an earlier fold)" if isinstance(batches, list) else
                 f"({stats['loader_start_s']:.1f} s starting its workers)")
              + ("" if check is None else f"; shared prefix checked on the first batch (max |Δ logit| {check:.2g}"
                 + (")" if stats["shared_prefix_used"] else ", failed: view by view)")))
        probs = to_original_order(softmax(logits), perms)
        for shift in range(k):
            part = slice(shift, None, k) if shared else slice(shift * n, (shift + 1) * n)
            assert (rows[part] == np.arange(n)).all(), "views came back out of order"
            views[(scale, shift)] = probs[part]
    return views


@torch.no_grad()
def check_fast_paths(model, frame, processor, fmt, cfg, hardware, feature_cache, n_rows=2):
    """Score a few of `frame`'s rows three ways before a fold relies on the fast paths: the stock forward
    (pixels through the vision tower), the cached-feature forward, and the shared-prefix option orders.
    The last two reach transformers below its public API (compat.py); a release that changes what they
    rely on gives wrong numbers, not errors. Returns (feature_cache or None, cfg): a path that disagrees
    is switched off for the fold, with a warning that says what it costs and the fix."""
    if feature_cache is None or len(frame) == 0:
        return feature_cache, cfg
    k = min(4, max(2, cfg.tta_option_views))
    views = [(row, perm) for row in range(min(n_rows, len(frame))) for perm in cyclic_perms(k)]
    dataset = VqaDataset(frame, views, cfg.max_pixels, blank_images=cfg.blank_images,
                         bomb_limit_pixels=cfg.bomb_limit_pixels)
    collator = VqaCollator(processor, fmt, cfg.min_pixels, cfg.max_pixels, image_keys=True, pixel_dtype=tower_dtype(model))
    batch = collator([dataset[i] for i in range(len(dataset))])  # pixels for every view: no keys known
    device, ids = next(model.parameters()).device, fmt.letter_ids
    was_training = model.training
    model.eval()
    with compute_autocast(hardware):
        stock = letter_logits(model, batch, ids, device, tower_dtype(model))
        cached_batch = feature_cache.attach(model, batch)
        cached = letter_logits(model, cached_batch, ids, device, None)
        shared = shared_prefix_letter_logits(model, cached_batch, ids, device, k) if cfg.tta_shared_prefix else None
    model.train(was_training)

    def agrees(fast, exact, what, reference, cost):
        ok, error, tolerance = logits_agree(fast, exact, hardware)
        if not ok:
            warn(f"{what} gives other letter logits than {reference} on transformers {transformers_version()} (max "
                 f"|difference| {error:.3g} > tolerance {tolerance:.3g}). {cost} Fix: pip install -U "
                 "'transformers>=5.24,<6'; please report the version.")
        return ok, f"{what} = {reference} (max |Δ logit| {error:.2g}, tolerance {tolerance:.2g})"

    ok, line = agrees(cached, stock, "the cached-feature forward", "the stock forward", "Image-feature cache off for this "
                      "fold: the vision tower runs for every training step and every test-time view (a run takes "
                      "~2.5x longer).")
    if not ok:
        return None, dataclasses.replace(cfg, tta_shared_prefix=False)
    if shared is not None:
        ok, shared_line = agrees(shared, cached, "the shared-prefix option-order scoring", "scoring each view on its own",
                                 "tta_shared_prefix off for this fold: each option order runs the whole prompt "
                                 "(test-time augmentation ~2-3x longer).")
        if ok:
            line += f"; {shared_line}"
        else:
            cfg = dataclasses.replace(cfg, tta_shared_prefix=False)
    print(f"[check] {line}")
    return feature_cache, cfg


def tta_probs(views, how="prob"):
    return average_views(list(views.values()), how)


def fold_weights(cfg, oof_accuracies):
    if cfg.ensemble_weights == "equal":
        return np.full(len(oof_accuracies), 1.0 / len(oof_accuracies))
    if cfg.ensemble_weights == "oof_acc":
        acc = np.asarray(oof_accuracies, dtype=float)
        return acc / acc.sum()
    raise ConfigError(f"config: ensemble_weights must be 'equal' or 'oof_acc', got {cfg.ensemble_weights!r}")


def ensemble_folds(fold_probs, weights):
    """Weighted probability average across folds."""
    return np.tensordot(np.asarray(weights, dtype=float), np.stack(fold_probs), axes=1)


def fit_temperature(probs, targets):
    """One temperature T minimising the log-loss of softmax(log p / T) on out-of-fold rows."""
    logp = np.log(np.clip(probs, 1e-12, None))
    targets = np.asarray(targets)

    def nll(t):
        scaled = softmax(logp / t)
        return -np.log(np.clip(scaled[np.arange(len(targets)), targets], 1e-12, None)).mean()

    return float(minimize_scalar(nll, bounds=(0.05, 20.0), method="bounded").x)


def apply_temperature(probs, temperature):
    return softmax(np.log(np.clip(probs, 1e-12, None)) / temperature)


def probs_frame(ids, probs, **extra):
    frame = pd.DataFrame(probs, columns=PROB_COLUMNS)
    frame.insert(0, "id", list(ids))
    for key, value in extra.items():
        frame[key] = value
    return frame


def letters_from_probs(probs):
    return [OPTION_LETTERS[i] for i in np.asarray(probs).argmax(1)]
