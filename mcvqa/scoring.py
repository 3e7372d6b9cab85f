"""## 7. Direct-logit scoring: read four logits at one position

Instead of `generate`, one forward pass gives the hidden state at the answer position (the last
prompt token); only the four answer-letter rows of the LM head are applied to it, so no
[batch, sequence, vocab] tensor is ever built. Softmax over those four logits is the prediction.
Training uses the same position: its loss is cross-entropy of the LM head at the answer position
(over the full vocabulary, as plain SFT does, or over the four letters), so what is trained is what
is scored.
"""

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import DynamicCache

from .feature_cache import encoder_outputs

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")


def unwrap_vlm(model):
    """The `...ForConditionalGeneration` under any peft wrapper (LoRA layers stay active)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def model_inputs(batch, device, pixel_dtype):
    inputs = {k: batch[k].to(device, non_blocking=True) for k in MODEL_INPUT_KEYS if k in batch}
    if "image_features" in batch:
        # Cached vision-tower outputs (feature_cache.py) replace pixel_values; image_grid_thw and the
        # image tokens stay, so the multimodal rope positions are unchanged.
        inputs["mm_encoder_outputs"] = {"image": encoder_outputs(batch["image_features"], device)}
    else:
        inputs["pixel_values"] = inputs["pixel_values"].to(pixel_dtype)
    return inputs


def answer_hidden_states(model, batch, device, pixel_dtype):
    """Final hidden state at each sample's answer position: [batch, hidden]."""
    vlm = unwrap_vlm(model)
    out = vlm.model(**model_inputs(batch, device, pixel_dtype), use_cache=False)
    hidden = out.last_hidden_state
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, batch["answer_positions"].to(hidden.device)]


def head_logits(model, hidden, token_ids=None):
    """LM-head logits for the given rows of the vocabulary (all rows when token_ids is None)."""
    head = unwrap_vlm(model).lm_head
    weight = head.weight if token_ids is None else head.weight[token_ids]
    logits = hidden.to(weight.dtype) @ weight.T
    if getattr(head, "bias", None) is not None:
        logits = logits + (head.bias if token_ids is None else head.bias[token_ids])
    return logits.float()


def letter_logits(model, batch, letter_ids, device, pixel_dtype):
    """[batch, 4] float32 logits of a, b, c, d at the answer position."""
    hidden = answer_hidden_states(model, batch, device, pixel_dtype)
    return head_logits(model, hidden, torch.as_tensor(letter_ids, device=hidden.device))


def answer_loss(model, batch, letter_ids, device, pixel_dtype, loss_over="vocab"):
    """Cross-entropy at the answer position; also returns the letter logits for accuracy."""
    hidden = answer_hidden_states(model, batch, device, pixel_dtype)
    letters = torch.as_tensor(letter_ids, device=hidden.device)
    target = batch["answer_index"].to(hidden.device)
    if (target < 0).any():
        raise ValueError("answer_loss: batch has rows without an answer (answer_index -1)")
    if loss_over not in ("vocab", "letters"):
        raise ValueError(f"config: loss_over must be 'vocab' or 'letters', got {loss_over!r}")
    if loss_over == "letters":
        logits4 = head_logits(model, hidden, letters)
        return F.cross_entropy(logits4, target), logits4.detach()
    logits = head_logits(model, hidden)
    return F.cross_entropy(logits, letters[target]), logits[:, letters].detach()


def _pad_rows(rows, value, width=None):
    width = width or max(len(r) for r in rows)
    return torch.stack([torch.cat([r, r.new_full((width - len(r),), value)]) for r in rows])


def _pad_positions(rows, width):
    """[3, n, width] from per-row [3, len] position ids (pads at 0, masked anyway)."""
    return torch.stack([torch.cat([r, r.new_zeros((r.shape[0], width - r.shape[1]))], dim=1) for r in rows], dim=1)


def shared_prefix_letter_logits(model, batch, letter_ids, device, n_views):
    """Letter logits of a batch of option views where each run of `n_views` samples is one row's views,
    running the row's shared prefix (system, image, question) once and only the option-dependent
    suffixes per view. Equal to `letter_logits` up to float rounding (tested).

    Needs cached image features (feature_cache.py) and every image token inside the shared prefix.
    Returns None when a batch doesn't have that shape (the caller then uses `letter_logits`)."""
    if "image_features" not in batch or batch["input_ids"].shape[0] % n_views:
        return None
    vlm = unwrap_vlm(model)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    lengths = mask.sum(1)
    n_rows = ids.shape[0] // n_views
    first = [r * n_views for r in range(n_rows)]
    # The positions the full prompt would get (3D rope for image tokens), from each row's first view:
    # the views share the prefix, and the suffix is text, which continues at the prefix's largest
    # position + 1 in all three rope components (Qwen's get_rope_index rule for text after an image).
    positions, _ = vlm.model.get_rope_index(ids[first], batch["mm_token_type_ids"][first], batch["image_grid_thw"][first],
                                            attention_mask=mask[first])
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
    prefix_ids = _pad_rows([ids[i, :c] for i, c in zip(first, prefix_len)], 0)
    prefix_mask = _pad_rows([mask[i, :c] for i, c in zip(first, prefix_len)], 0)
    width = prefix_ids.shape[1]
    features = [batch["image_features"][i] for i in first]
    cache = DynamicCache()
    vlm.model(input_ids=prefix_ids.to(device), attention_mask=prefix_mask.to(device),
              position_ids=_pad_positions([positions[:, r, :c] for r, c in enumerate(prefix_len)], width).to(device),
              mm_encoder_outputs={"image": encoder_outputs(features, device)}, cache=cache, use_cache=True)
    cache.batch_repeat_interleave(n_views)
    starts = [prefix_len[i // n_views] for i in range(ids.shape[0])]
    suffix_ids = _pad_rows([ids[i, s:lengths[i]] for i, s in enumerate(starts)], 0)
    suffix_mask = _pad_rows([mask[i, s:lengths[i]] for i, s in enumerate(starts)], 0)
    next_pos = [positions[:, r, :c].max() + 1 for r, c in enumerate(prefix_len)]
    suffix_pos = _pad_positions([(next_pos[i // n_views] + torch.arange(int(lengths[i]) - s)).expand(3, -1)
                                 for i, s in enumerate(starts)], suffix_ids.shape[1])
    out = vlm.model(input_ids=suffix_ids.to(device),
                    attention_mask=torch.cat([prefix_mask.repeat_interleave(n_views, 0), suffix_mask], 1).to(device),
                    position_ids=suffix_pos.to(device), cache=cache, use_cache=True)
    hidden = out.last_hidden_state
    answer = batch["answer_positions"] - torch.tensor(starts)
    hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), answer.to(hidden.device)]
    return head_logits(model, hidden, torch.as_tensor(letter_ids, device=hidden.device))
