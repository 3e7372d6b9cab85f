"""## Shared-prefix option orders: a row's system, image and question run once for all its views

The option orders of one row differ only after the question (with `instruction_first` the instruction
is shared too), so the prefix runs once, its KV cache is repeated per view, and only the short
option-dependent suffixes run per view. That leans on transformers internals (the decoder's cache
keyword, rope positions: machinery/compat.py), which a release can change without an error, so the first
batch of every prediction pass is also scored view by view (`SharedPrefixScorer`), and the pass goes on
view by view, with a warning, when the two disagree. Needs cached image features (feature_cache.py).
"""

import torch
from packaging.version import Version

from ..core.memory import is_oom
from ..core.modeling import unwrap_vlm
from ..core.scoring import head_logits, letter_logits, logits_agree
from ..families.registry import family_of
from ..machinery.compat import fast_path_fix, transformers_version, warn


def _pad_rows(rows, value, width=None, left=False):
    width = width or max(len(r) for r in rows)
    return torch.stack([torch.cat([r.new_full((width - len(r),), value), r] if left else
                                  [r, r.new_full((width - len(r),), value)]) for r in rows])


def _pad_positions(rows, width, left=False):
    """[k, n, width] from per-row [k, len] position ids (Qwen's rope: k = 3; pads at 0, masked anyway)."""
    def pad(r):
        zeros = r.new_zeros((r.shape[0], width - r.shape[1]))
        return torch.cat([zeros, r] if left else [r, zeros], dim=1)

    return torch.stack([pad(r) for r in rows], dim=1)


def shared_prefix_problem(family, dtype=None):
    """Why the shared prefix is not exact for this family on this transformers, or in this compute dtype (None
    when it is)."""
    if transformers_version() < Version(family.shared_prefix_since):
        return (f"{family.name} on transformers {transformers_version()}: its shared-prefix option orders need >= "
                f"{family.shared_prefix_since} ({family.shared_prefix_before}), so each option order runs the whole "
                f"prompt (exact, ~2-3x the language-model work). Fix: pip install -U "
                f"'transformers>={family.shared_prefix_since},<6'")
    if dtype in ("float16", "bfloat16") and family.shared_prefix_not_16bit:
        return (f"{family.name}: shared-prefix option orders off in {dtype} ({family.shared_prefix_not_16bit}): each "
                "option order runs the whole prompt (exact, ~2-3x the language-model work of the test pass)")
    if dtype == "bfloat16" and family.shared_prefix_not_bf16:
        return (f"{family.name}: shared-prefix option orders off in bf16 ({family.shared_prefix_not_bf16}): each option "
                "order runs the whole prompt (exact, ~2-3x the language-model work of the test pass)")
    return None


def shared_prefix_letter_logits(model, batch, letter_ids, device, n_views):
    """Letter logits of a batch of option views where each run of `n_views` samples is one row's views,
    running the row's shared prefix (system, image, question) once and only the option-dependent
    suffixes per view. Equal to `letter_logits` up to float rounding (tested).

    Needs cached image features (feature_cache.py) and every image token inside the shared prefix.
    Returns None when a batch doesn't have that shape (the caller then uses `letter_logits`)."""
    if "image_features" not in batch or batch["input_ids"].shape[0] % n_views:
        return None
    vlm = unwrap_vlm(model)
    family = family_of(vlm.config)
    left = family.prefix_padding == "left"  # (a right pad would pass through a recurrent state: families/qwen3_5.py)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    lengths = mask.sum(1)
    n_rows = ids.shape[0] // n_views
    first = [r * n_views for r in range(n_rows)]
    # The positions the full prompt would get (3D rope for image tokens), from each row's first view:
    # the views share the prefix, which ends in text, and the suffix is text: it continues one past the
    # prefix's last position in each rope component. (Not "the largest position + 1": transformers 5.0-5.x
    # releases put an image's temporal positions past the text that follows it.)
    meta = batch.get(family.image_meta)
    positions = family.positions(vlm.model, ids[first], batch["mm_token_type_ids"][first],
                                 meta[first] if family.meta_per_sample else meta, mask[first])
    image_token = vlm.config.image_token_id
    prefix_len = []
    for r in range(n_rows):
        views = ids[r * n_views:(r + 1) * n_views]
        same = (views == views[:1]).all(0).long().cumprod(0)
        shared = int(same[:int(lengths[r * n_views:(r + 1) * n_views].min())].sum())
        first_image = int((views[0] == image_token).nonzero().max())
        if shared <= first_image:  # an image token after the shared prefix: not this path
            return None
        prefix_len.append(shared)
    prefix_ids = _pad_rows([ids[i, :c] for i, c in zip(first, prefix_len)], 0, left=left)
    prefix_mask = _pad_rows([mask[i, :c] for i, c in zip(first, prefix_len)], 0, left=left)
    prefix_types = _pad_rows([batch["mm_token_type_ids"][i, :c] for i, c in zip(first, prefix_len)], 0, left=left)
    width = prefix_ids.shape[1]
    features = [batch["image_features"][i] for i in first]
    cache = family.new_cache(vlm.config.get_text_config())
    family.decoder_forward(vlm, prefix_ids, prefix_mask,
                           _pad_positions([positions[:, r, :c] for r, c in enumerate(prefix_len)], width, left=left),
                           features, device, cache=cache, type_ids=prefix_types)
    family.expand_cache(cache, n_rows, n_views)
    starts = [prefix_len[i // n_views] for i in range(ids.shape[0])]
    suffix_ids = _pad_rows([ids[i, s:lengths[i]] for i, s in enumerate(starts)], 0)
    suffix_mask = _pad_rows([mask[i, s:lengths[i]] for i, s in enumerate(starts)], 0)
    next_pos = [positions[:, r, c - 1:c] + 1 for r, c in enumerate(prefix_len)]  # [3, 1] per row
    suffix_pos = _pad_positions([next_pos[i // n_views] + torch.arange(int(lengths[i]) - s)
                                 for i, s in enumerate(starts)], suffix_ids.shape[1])
    out = family.decoder_forward(vlm, suffix_ids, torch.cat([prefix_mask.repeat_interleave(n_views, 0), suffix_mask], 1),
                                 suffix_pos, None, device, cache=cache)
    hidden = out.last_hidden_state
    answer = batch["answer_positions"] - torch.tensor(starts)
    hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), answer.to(hidden.device)]
    return head_logits(model, hidden, torch.as_tensor(letter_ids, device=hidden.device))


def shared_or_error(model, batch, letter_ids, device, n_views):
    """The shared-prefix letter logits (None: not this batch's shape), or the exception it raised: a cache a
    release changed can fail rather than disagree (the fold's self-check, and a pass's first batch, then turn
    the path off; on a later batch of a pass an error stops it, as any other). A CUDA out-of-memory error is
    raised (the caller halves)."""
    try:
        return shared_prefix_letter_logits(model, batch, letter_ids, device, n_views)
    except Exception as error:  # noqa: BLE001 - any other failure of the fast path means: use the exact one
        if is_oom(error):
            raise
        return error


class SharedPrefixScorer:
    """A prediction pass's scorer of k option views per row (core/inference.py's `scorer`).

    Its first batch with cached features is scored both ways; from then on the shared prefix is used
    when the two agreed, else (they disagreed, or the shared path raised) every view on its own (exact, ~2-3x
    the language-model work)."""

    def __init__(self, n_views, hardware, desc="predict"):
        self.views_per_row = n_views
        self.hardware, self.desc = hardware, desc
        self.used, self.check = True, None  # check: max |difference| of the first batch's two scorings

    def exact(self, model, batch, letter_ids, device, pixel_dtype):
        return letter_logits(model, batch, letter_ids, device, pixel_dtype)

    def shared(self, model, batch, letter_ids, device, pixel_dtype):
        out = shared_prefix_letter_logits(model, batch, letter_ids, device, self.views_per_row) if self.used else None
        return out if out is not None else self.exact(model, batch, letter_ids, device, pixel_dtype)

    def __call__(self, model, batch, letter_ids, device, pixel_dtype):
        if not (self.used and self.check is None and "image_features" in batch):
            return self.shared(model, batch, letter_ids, device, pixel_dtype)
        # The first batch with cached features: both ways (a fast path a release broke can also raise).
        out = shared_or_error(model, batch, letter_ids, device, self.views_per_row)
        exact = self.exact(model, batch, letter_ids, device, pixel_dtype)
        if out is None:
            return exact
        if isinstance(out, Exception):
            problem, self.check = f"fails ({type(out).__name__}: {str(out)[:200]})", float("inf")
        else:
            ok, error, tolerance = logits_agree(out, exact, self.hardware)
            self.check = error
            if ok:
                return out
            problem = (f"disagrees with scoring each view on its own (max |difference| {error:.3g} > tolerance "
                       f"{tolerance:.3g} in the letter logits; transformers {transformers_version()})")
        warn(f"{self.desc}: the shared-prefix option-order scoring {problem}. This pass goes on view by view: exact, "
             f"but each option order runs the whole prompt, so its language model does ~2-3x the work. Fix: "
             f"{fast_path_fix()}; or tta_shared_prefix=false to skip this check.")
        self.used = False
        return exact

    def stats(self):
        return {"shared_prefix_check": self.check, "shared_prefix_used": self.used}
