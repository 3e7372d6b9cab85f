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

from .feature_cache import encoder_outputs

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")


def unwrap_vlm(model):
    """The `...ForConditionalGeneration` under any peft wrapper (LoRA layers stay active)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def model_inputs(batch, device, pixel_dtype):
    inputs = {k: batch[k].to(device) for k in MODEL_INPUT_KEYS if k in batch}
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
