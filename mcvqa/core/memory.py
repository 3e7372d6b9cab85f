"""## Memory plan: gradient checkpointing, micro-batch and inference batch from the card's memory

A profile names one model and pixel budget, but the card decides what fits: Qwen2.5-VL-7B at 768x768
trains at micro-batch 8 on an 80 GB card without gradient checkpointing and not at all on a 40 GB one.
Before the first fold the plan estimates, from the checkpoint's config alone (no weights loaded), the
memory of the 4-bit weights with everything k-bit training keeps in fp32, and the activations of one
training sample with and without gradient checkpointing. Then, on the GPU:

- `gradient_checkpointing=auto` turns checkpointing on only when the micro-batch's activations would
  not fit without it (it costs ~30 % speed);
- `fit_micro_batch` lowers the micro-batch (more accumulation: the same effective batch) until the
  estimate fits, and lowers `infer_batch_size` until one batch's KV cache of all its option views fits.

Every choice is printed with its numbers. The estimate is deliberately generous (ACTIVATION_MARGIN);
what it misses, the out-of-memory back-off (`halve_on_oom`, one helper for training and prediction)
catches: the failed attempt's memory is freed first, then the batch is halved and tried again.
"""

import dataclasses
import gc
import math
import re

import torch
from transformers import AutoModelForImageTextToText

from ..families.registry import family_of
from .config import ConfigError
from .modeling import checkpoint_config, embedding_tables, lora_targets, model_family, saved_in_4bit

TEXT_TOKENS = 160  # template + Korean question + instruction + four options, typical (the image dominates)
# Measured peak over estimated activations (Qwen2.5-VL-3B, fp16, 4-bit, 384x384, checkpointing, micro-batch 32,
# 15 GiB cap, BENCHMARKS.md "T4 budget"): 0.22 GiB per sample against 0.12 estimated.
ACTIVATION_MARGIN = 2.0
HEADROOM_GIB = 1.0  # CUDA context, cuBLAS workspace, allocator fragmentation
LORA_COPIES = 5  # weight, gradient, two AdamW moments, EMA shadow: fp32 each


def _meta_model(cfg):
    """The model's modules without weights (sizes only), from its config.json."""
    config = checkpoint_config(cfg.model_name_or_path)
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config), config


def _language_linears(model):
    """The language model's linear layers, LM head excluded: (name, module) pairs."""
    family = family_of(model.config)
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and not family.in_towers(name) and not name.endswith("lm_head")]


def _quantised_linears(model, family):
    """What NF4 stores in 4 bits: the language model's linear layers but the family's small gates."""
    return [(name, module) for name, module in _language_linears(model)
            if not set(name.split(".")) & set(family.kbit_skip)]


def lora_parameters(model, cfg):
    """LoRA weights the run trains: r * (in + out) per targeted linear layer."""
    targets = lora_targets(cfg)
    return sum(cfg.lora_r * (module.in_features + module.out_features)
               for name, module in _language_linears(model) if re.fullmatch(targets, name))


def lm_matmul_parameters(model):
    """Weights of the language model's matmuls, LM head excluded: 2 x this many FLOPs per token forward."""
    return sum(module.in_features * module.out_features for _, module in _language_linears(model))


def vision_matmul_parameters(model):
    """Weights of the vision tower's matmuls (patch merger included): 2 x this many FLOPs per patch."""
    family = family_of(model.config)
    return sum(module.in_features * module.out_features for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and family.in_towers(name) and "audio" not in name)


def weight_gib(model, cfg, hardware, nf4):
    """Memory of the loaded, LoRA-wrapped model. With nf4: NF4 language-model linears (0.5 byte + ~4 % for the
    quantisation constants per weight), fp32 for every other weight k-bit training upcasts (norms, biases, the
    embeddings and untied LM head unless the family gives them back 16 bits); without: every weight in the
    compute dtype. The vision tower in fp32 on fp16 cards, else in the compute dtype; the LoRA weights with
    their gradient, AdamW moments and EMA."""
    family = model_family(cfg.model_name_or_path)
    compute = 4 if hardware.dtype == "float32" else 2
    other = 4 if nf4 else compute  # k-bit preparation upcasts what it does not quantise
    quantised = {id(module.weight) for _, module in _quantised_linears(model, family)}
    embeddings = {id(p) for m in embedding_tables(model) for p in m.parameters()}
    total, seen = 0.0, set()
    for name, param in model.named_parameters():
        if id(param) in seen:  # tied embeddings count once
            continue
        seen.add(id(param))
        if family.in_towers(name):
            total += param.numel() * (4 if hardware.dtype == "float16" else compute)
        elif id(param) in quantised and nf4:
            total += param.numel() * 0.52
        elif id(param) in embeddings and family.embeddings_16bit:
            total += param.numel() * compute
        else:
            total += param.numel() * other
    return (total + lora_parameters(model, cfg) * 4 * LORA_COPIES) / 2**30


def tokens_per_sample(config, cfg):
    return family_of(config).image_token_budget(cfg, config.vision_config)[0] + TEXT_TOKENS


def feature_bytes_per_image(config, cfg):
    """A cached image's features: one hidden-size vector per image token (plus Qwen3-VL's deepstack levels), in
    16 bits (fp32 with feature_cache_fp32)."""
    vision = config.vision_config
    levels = 1 + len(getattr(vision, "deepstack_visual_indexes", None) or ())
    image_tokens = family_of(config).image_token_budget(cfg, vision)[0]
    return image_tokens * config.text_config.hidden_size * levels * (4 if cfg.feature_cache_fp32 else 2)


def activation_gib(config, tokens, checkpointing, bytes_per_value):
    """One training sample's activations: with checkpointing each decoder layer keeps its input and one
    layer at a time is recomputed (and back-propagated); without, every layer keeps ~14 hidden-size and
    5 intermediate-size values per token (attention, norms, MLP, LoRA inputs)."""
    text = config.text_config
    layers, hidden, inner = text.num_hidden_layers, text.hidden_size, _mlp_width(text)
    one_layer = tokens * (14 * hidden + 5 * inner) * bytes_per_value
    kept = layers * tokens * hidden * bytes_per_value + 2 * one_layer if checkpointing else layers * one_layer
    return ACTIVATION_MARGIN * kept / 2**30


def _mlp_width(text):
    """The MLP's inner width per token: dense, or MoE's routed experts plus its shared one."""
    dense = getattr(text, "intermediate_size", None)
    if dense:
        return dense
    return text.moe_intermediate_size * text.num_experts_per_tok + getattr(text, "shared_expert_intermediate_size", 0)


def kv_cache_gib_per_row(config, family, tokens, views, bytes_per_value):
    """Shared-prefix prediction: a row's prefix cache, repeated once per option view, plus one layer's
    activations. The cache: keys and values of the layers that keep them (all of them but Qwen3.5's linear
    ones), and the fixed per-sequence state of the others."""
    text = config.text_config
    kv = family.kv_bytes_per_token(text, bytes_per_value) * tokens
    one_layer = tokens * (4 * text.hidden_size + 2 * _mlp_width(text)) * bytes_per_value
    cache = kv + family.state_bytes(text)
    return (cache * (1 + views) + ACTIVATION_MARGIN * one_layer) / 2**30  # (the cache's size is exact)


def _largest_fitting(limit, fits):
    """limit if it fits, else the largest power of two below it that does (at least 1)."""
    if fits(limit):
        return limit
    size = 2 ** int(math.log2(max(1, limit - 1)))
    while size > 1 and not fits(size):
        size //= 2
    return size


def choose_quantization(cfg, family, model, config, hardware):
    """(nf4 | none, why): the setting, or with `auto` the family's choice. A family that prefers 16 bits
    (Qwen3.5: larger quantisation error in 4 bits) gets them where the 16-bit weights and one checkpointed
    training sample fit the card; else NF4. On the CPU (RAM, not GPU memory) the family's choice as is."""
    if saved_in_4bit(cfg.model_name_or_path):
        if cfg.quantization == "none":
            raise ConfigError(f"config: quantization=none, but {cfg.model_name_or_path} is saved in 4 bits "
                              "(bitsandbytes): it cannot train 16-bit. Fix: quantization=auto, or the 16-bit checkpoint")
        return "nf4", "the folder is saved in 4 bits (bitsandbytes): QLoRA"
    if cfg.quantization != "auto":
        return cfg.quantization, f"quantization={cfg.quantization} set"
    if family.quantization == "nf4":
        return "nf4", f"the {family.name} family trains QLoRA: 4-bit weights"
    if hardware.device != "cuda":
        return "none", f"{family.name} trains 16-bit LoRA where it fits (on the CPU: RAM)"
    bytes_per_value = 4 if hardware.dtype == "float32" else 2
    need = weight_gib(model, cfg, hardware, nf4=False) + HEADROOM_GIB + \
        activation_gib(config, tokens_per_sample(config, cfg), True, bytes_per_value)
    if need <= hardware.gpu_memory_gib:
        return "none", (f"{family.name} trains 16-bit LoRA (4-bit QLoRA loses more accuracy on it): ~{need:.1f} GiB "
                        f"for the 16-bit weights and one sample fit the {hardware.gpu_memory_gib:g} GiB")
    return "nf4", (f"{family.name} prefers 16-bit LoRA, but its 16-bit weights and one sample need ~{need:.1f} GiB, "
                   f"more than the {hardware.gpu_memory_gib:g} GiB: NF4 (QLoRA)")


def _fit_micro_batch(cfg, per_sample, free, say):
    """(micro-batch, accumulation steps): with fit_micro_batch, the largest micro-batch whose activations
    (`per_sample` GiB each) fit the `free` GiB, the accumulation raised to keep the effective batch."""
    micro, accum = cfg.micro_batch_size, cfg.grad_accum_steps
    if cfg.fit_micro_batch:
        fitted = _largest_fitting(micro, lambda m: m * per_sample <= free)
        if fitted < micro:
            accum = math.ceil(micro * cfg.grad_accum_steps / fitted)
            say(f"[memory]   micro-batch {micro} -> {fitted} (x {accum} accumulation, same effective batch of "
                f"{micro * cfg.grad_accum_steps}): {micro} x {per_sample:.2f} GiB would exceed {free:.1f} GiB")
            micro = fitted
    return micro, accum


def plan_memory(cfg, hardware, verbose=True):
    """cfg with quantization (auto resolved), gradient_checkpointing on/off, and micro_batch_size /
    grad_accum_steps / infer_batch_size fitted to the GPU's memory (hardware.gpu_memory_gib, a cap included).
    Returns (cfg, plan dict)."""
    say = print if verbose else (lambda *_: None)
    model, config = _meta_model(cfg)
    family = model_family(cfg.model_name_or_path)
    quantization, why = choose_quantization(cfg, family, model, config, hardware)
    say(f"[memory] {quantization}: {why}")
    cfg = dataclasses.replace(cfg, quantization=quantization)
    # (The sizes preflight.py checks the disk and the time budget against.)
    sizes = {"quantization": quantization, "lora_params": lora_parameters(model, cfg),
             "lm_matmul_params": lm_matmul_parameters(model), "tokens_per_sample": tokens_per_sample(config, cfg),
             "feature_bytes_per_image": feature_bytes_per_image(config, cfg),
             "vision_matmul_params": vision_matmul_parameters(model),
             "patches_per_image": family.image_token_budget(cfg, config.vision_config)[1]}
    if hardware.device != "cuda":
        choice = "off" if cfg.gradient_checkpointing == "auto" else cfg.gradient_checkpointing
        say(f"[memory] on the CPU: gradient checkpointing {choice} (RAM, not GPU memory, holds the activations)")
        return dataclasses.replace(cfg, gradient_checkpointing=choice), {"device": "cpu", "gradient_checkpointing": choice,
                                                                         **sizes}
    bytes_per_value = 4 if hardware.dtype == "float32" else 2
    weights = weight_gib(model, cfg, hardware, nf4=quantization == "nf4")
    free = hardware.gpu_memory_gib - weights - HEADROOM_GIB
    tokens = sizes["tokens_per_sample"]
    with_ckpt = activation_gib(config, tokens, True, bytes_per_value)
    without = activation_gib(config, tokens, False, bytes_per_value)
    micro = cfg.micro_batch_size
    say(f"[memory] {hardware.gpu_memory_gib:g} GiB per GPU; estimated {weights:.1f} GiB for the model "
        f"({'4-bit weights, fp32 copies' if quantization == 'nf4' else '16-bit weights'}, LoRA + optimizer), {free:.1f} "
        f"GiB left; a {tokens}-token sample ({tokens - TEXT_TOKENS} image tokens + ~{TEXT_TOKENS} text) needs ~{without:.2f} GiB of "
        f"activations without gradient checkpointing, ~{with_ckpt:.2f} GiB with it")
    if free <= 0:
        raise ConfigError(f"config: {cfg.model_name_or_path} needs ~{weights:.1f} GiB for its weights alone, more than "
                          f"this GPU's {hardware.gpu_memory_gib:g} GiB. Fix: a smaller model (e.g. Qwen2.5-VL-3B-Instruct)"
                          + (", or quantization=nf4" if quantization != "nf4" else ""))
    checkpointing = cfg.gradient_checkpointing
    if checkpointing == "auto":
        checkpointing = "off" if micro * without <= free else "on"
        say(f"[memory]   gradient checkpointing {checkpointing}: micro-batch {micro} needs ~{micro * without:.1f} GiB "
            f"without it, {'within' if checkpointing == 'off' else 'over'} the {free:.1f} GiB left")
    per_sample = with_ckpt if checkpointing == "on" else without
    micro, accum = _fit_micro_batch(cfg, per_sample, free, say)
    infer = cfg.infer_batch_size
    if cfg.fit_micro_batch:
        views = cfg.tta_option_views if cfg.tta_shared_prefix else 1
        row = kv_cache_gib_per_row(config, family, tokens, views, bytes_per_value)
        fitted = _largest_fitting(infer, lambda b: b * row <= free)
        if fitted < infer:
            say(f"[memory]   infer_batch_size {infer} -> {fitted}: a row with {views} option views needs ~{row:.2f} GiB")
            infer = fitted
    say(f"[memory]   plan: gradient checkpointing {checkpointing}, micro-batch {micro} x {accum} accumulation, "
        f"infer_batch_size {infer} (~{weights + micro * per_sample + HEADROOM_GIB:.1f} GiB in training)")
    plan = {"gpu_memory_gib": hardware.gpu_memory_gib, "weights_gib": round(weights, 2), "free_gib": round(free, 2),
            "activation_gib_per_sample": round(per_sample, 3),
            "gradient_checkpointing": checkpointing, "micro_batch_size": micro, "grad_accum_steps": accum,
            "infer_batch_size": infer, **sizes}
    return dataclasses.replace(cfg, gradient_checkpointing=checkpointing, micro_batch_size=micro,
                               grad_accum_steps=accum, infer_batch_size=infer), plan


def is_oom(error):
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
        if not (is_oom(error) and can_retry):
            raise
    return OUT_OF_MEMORY


def free_memory():
    """Give the failed attempt's memory back (reference cycles first) before a smaller retry."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def halve_on_oom(attempt, size, unit=1, on_retry=None, say=None):
    """(attempt(size), the size that fitted): a CUDA out-of-memory error frees the failed attempt's memory,
    calls on_retry() (e.g. to zero partly accumulated gradients), says say(size, smaller) and tries again
    with half the size, a multiple of `unit` and at least `unit`. At `unit` an OOM is raised as is."""
    while True:
        out = call_or_oom(lambda: attempt(size), can_retry=size > unit)
        if out is not OUT_OF_MEMORY:
            return out, size
        smaller = max(unit, (size // unit // 2) * unit)
        if on_retry is not None:
            on_retry()
        free_memory()
        if say is not None:
            say(size, smaller)
        size = smaller
