"""## Direct-logit scoring: read four logits at one position

Instead of `generate`, one forward pass gives the hidden state at the answer position (the last
prompt token); only the four answer-letter rows of the LM head are applied to it, so no
[batch, sequence, vocab] tensor is ever built. Softmax over those four logits is the prediction.
Training uses the same position: its loss is cross-entropy of the LM head at the answer position
(over the full vocabulary, as plain SFT does, or over the four letters), so what is trained is what
is scored.
"""

import torch
import torch.nn.functional as F

from ..families.registry import family_of
from ..machinery.compat import model_input_names
from .config import ConfigError
from .modeling import unwrap_vlm

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw",
                    "image_position_ids")


def model_inputs(batch, device, pixel_dtype, vlm_model):
    """The batch's tensors the stock `...Model.forward` takes, on the device."""
    inputs = {k: batch[k].to(device, non_blocking=True) for k in model_input_names(vlm_model, MODEL_INPUT_KEYS)
              if k in batch}
    inputs["pixel_values"] = inputs["pixel_values"].to(pixel_dtype)
    return inputs


def answer_hidden_states(model, batch, device, pixel_dtype):
    """Final hidden state at each sample's answer position: [batch, hidden]."""
    vlm = unwrap_vlm(model)
    if "image_features" in batch:
        # Cached vision-tower outputs (feature_cache.py) instead of pixel_values; image_grid_thw and the
        # image tokens stay, so the multimodal rope positions are the ones the full forward computes.
        family = family_of(vlm.config)
        positions = family.positions(vlm.model, batch["input_ids"], batch["mm_token_type_ids"],
                                     batch.get(family.image_meta), batch["attention_mask"])
        out = family.decoder_forward(vlm, batch["input_ids"], batch["attention_mask"], positions,
                                     batch["image_features"], device, type_ids=batch["mm_token_type_ids"])
    else:
        out = vlm.model(**model_inputs(batch, device, pixel_dtype, vlm.model), use_cache=False)
    hidden = out.last_hidden_state
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, batch["answer_positions"].to(hidden.device)]


def head_logits(model, hidden, token_ids=None):
    """LM-head logits for the given rows of the vocabulary (all rows when token_ids is None), soft-capped where
    the model caps its own (Gemma: cap x tanh(logits / cap)), so letter probabilities are the model's."""
    vlm = unwrap_vlm(model)
    head = vlm.lm_head
    weight = head.weight if token_ids is None else head.weight[token_ids]
    logits = hidden.to(weight.dtype) @ weight.T
    if getattr(head, "bias", None) is not None:
        logits = logits + (head.bias if token_ids is None else head.bias[token_ids])
    cap = getattr(vlm.config.get_text_config(), "final_logit_softcapping", None)
    logits = logits.float()
    return logits if not cap else cap * torch.tanh(logits / cap)


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
        raise ConfigError(f"config: loss_over must be 'vocab' or 'letters', got {loss_over!r}")
    if loss_over == "letters":
        logits4 = head_logits(model, hidden, letters)
        return F.cross_entropy(logits4, target), logits4.detach()
    logits = head_logits(model, hidden)
    return F.cross_entropy(logits, letters[target]), logits[:, letters].detach()


def logits_agree(fast, exact, hardware):
    """(agree, max |fast - exact|, tolerance) for two scorings of the same views' letter logits.

    A fast path that reads a transformers internal wrongly gives different hidden states, so logits
    off by about their own size; float rounding of another batch shape stays far below that: 1e-3 of
    the logits' size in fp32, 5 % (plus 0.05) in fp16/bf16."""
    error = float((fast.float() - exact.float()).abs().max())
    scale = float(exact.float().abs().max())
    tolerance = 1e-4 + 1e-3 * scale if hardware.dtype == "float32" else 0.05 + 0.05 * scale
    return error <= tolerance, error, tolerance
