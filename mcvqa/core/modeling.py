"""## Model: the checkpoint in 4 or 16 bits, LoRA adapters on its language model

`AutoModelForImageTextToText` loads any family (families/: Qwen2/2.5/3-VL, Qwen3.5) from a local folder
(no network call: Kaggle often has none) or a hub id. With `quantization=nf4` the language model's linear
layers are stored as 4-bit NF4 with double quantisation (QLoRA) and compute in the hardware's dtype; with
`none` they stay 16-bit (LoRA); `auto` is the family's choice, planned for the card by memory.py (Qwen3.5:
16-bit where it fits, as 4 bits cost it more accuracy). The vision tower is left unquantised and frozen
(its features barely need adapting for this task, and freezing it lets inference cache them). LoRA
adapters go on the language model's projections the family names. On fp16 hardware (T4) the vision
tower keeps fp32 weights and runs outside autocast, which avoids the known fp16 overflow of Qwen-VL
vision towers.
"""

import functools
import importlib.util
import os
import warnings

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

from ..families.registry import family_of
from ..machinery.errors import UserError

def is_local_model(name_or_path):
    return os.path.isdir(name_or_path)


class ModelFolderError(UserError, ValueError):
    """A model folder the run cannot use (no processor, a broken tokenizer): names the folder and the fix."""


def load_processor(cfg):
    """The checkpoint's processor (tokenizer, chat template, image processor), its tokenizer checked against the
    model's vocabulary: before the first fold, not when the first prediction comes out wrong."""
    name = cfg.model_name_or_path
    try:
        processor = AutoProcessor.from_pretrained(name, local_files_only=is_local_model(name))
    except (OSError, ValueError) as error:
        raise ModelFolderError(f"model_name_or_path={name}: no processor could be built from this folder "
                               f"({type(error).__name__}: {str(error).splitlines()[0][:300]}). Fix: point it at the "
                               "model's own folder (config.json, tokenizer and preprocessor files, weights)") from None
    check_tokenizer(processor.tokenizer, name)
    return processor


def check_tokenizer(tokenizer, name):
    """A tokenizer far smaller than the model's embedding is a broken one: transformers builds one silently
    from a folder without tokenizer.json (a 33-token Qwen3.5 tokenizer, every word unknown)."""
    config = checkpoint_config(name)
    vocab = getattr(getattr(config, "text_config", config), "vocab_size", None) or getattr(config, "vocab_size", None)
    if vocab and len(tokenizer) < vocab // 2:
        raise ModelFolderError(f"model_name_or_path={name}: its tokenizer has {len(tokenizer)} tokens but the model "
                               f"{vocab} embedding rows: the tokenizer files are missing or broken (tokenizer.json "
                               "above all). Fix: copy the model's tokenizer.json (and tokenizer_config.json) into the "
                               "folder, or use the complete model folder")


def unwrap_vlm(model):
    """The `...ForConditionalGeneration` under any peft wrapper (LoRA layers stay active)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def vision_tower(model):
    """The frozen vision tower (`model.visual` of a `Qwen*VLModel`, `model.vision_tower` of Gemma 4's)."""
    vlm = unwrap_vlm(model)
    return getattr(vlm.model, family_of(vlm.config).vision_attr)


def frozen_towers(model):
    """The family's towers the checkpoint has: the vision tower, and for Gemma 4 what maps its output into the
    language model (embed_vision) and the E2B/E4B audio tower with its projection."""
    vlm = unwrap_vlm(model)
    towers = (getattr(vlm.model, name, None) for name in family_of(vlm.config).tower_modules)
    return [tower for tower in towers if tower is not None]


def tower_dtype(model):
    """The dtype the tower's patch embedding computes in: what pixel_values are cast to."""
    return next(vision_tower(model).parameters()).dtype


def tower_device(model):
    return next(vision_tower(model).parameters()).device


def model_device(model):
    return next(model.parameters()).device


@functools.lru_cache(maxsize=None)
def checkpoint_config(name_or_path):
    """The checkpoint's config.json, read once (the family, the tokenizer check and the memory plan ask it)."""
    return AutoConfig.from_pretrained(name_or_path, local_files_only=is_local_model(name_or_path))


def model_family(name_or_path):
    """The family (families/) of the checkpoint cfg.model_name_or_path names, from its config.json alone."""
    return family_of(checkpoint_config(name_or_path))


def lora_targets(cfg):
    """The LoRA target regex: the setting, or with `auto` the model family's."""
    return model_family(cfg.model_name_or_path).lora_targets if cfg.lora_target_modules == "auto" \
        else cfg.lora_target_modules


def saved_in_4bit(name_or_path):
    """Whether the folder is saved pre-quantised by bitsandbytes in 4 bits (e.g. a `...-bnb-4bit` download)."""
    quantization = getattr(checkpoint_config(name_or_path), "quantization_config", None) or {}
    if not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    return quantization.get("quant_method") == "bitsandbytes" and bool(quantization.get("load_in_4bit"))


def uses_nf4(cfg):
    """Whether the language model is stored in NF4: a folder saved in 4 bits always is; else the setting, or with
    `auto` (not planned for a card: tests, the CPU) the family's choice."""
    if saved_in_4bit(cfg.model_name_or_path):
        return True
    if cfg.quantization == "auto":
        return model_family(cfg.model_name_or_path).quantization == "nf4"
    return cfg.quantization == "nf4"


def load_base_model(cfg, hardware, device=None):
    """The frozen base model, NF4 where `uses_nf4`, placed wholly on one device."""
    device = device or ("cuda:0" if hardware.device == "cuda" else "cpu")
    family = model_family(cfg.model_name_or_path)
    attention = family.attn_implementation(checkpoint_config(cfg.model_name_or_path), hardware.attn_implementation)
    if attention != hardware.attn_implementation:
        print(f"[model] {family.name}: attention per part {attention} ({family.attention_why})")
    # use_kernels=False: transformers 5.25 kernelizes by default (5.24 did not), fetching kernel code from the Hub at load
    # time (its `kernels` package is a dependency now): an offline Kaggle session stops there ("kernels-community/
    # activation could not verify publisher trust status", BENCHMARKS.md run 40), and remote code is not what was
    # tested. Every supported release (5.0 on) takes the keyword.
    kwargs = dict(dtype=hardware.torch_dtype, attn_implementation=attention, use_kernels=False,
                  device_map={"": device}, local_files_only=is_local_model(cfg.model_name_or_path))
    prequantised = saved_in_4bit(cfg.model_name_or_path)  # its own quantization_config wins over one passed here
    if uses_nf4(cfg) and not prequantised:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=hardware.torch_dtype,
            # Quantising the vision tower costs accuracy and saves little memory; lm_head is read at 4 rows;
            # the family's small gate projections (Qwen3.5's) gain nothing from 4 bits.
            llm_int8_skip_modules=[*family.vision_modules, "lm_head", *family.kbit_skip],
        )
    model = AutoModelForImageTextToText.from_pretrained(cfg.model_name_or_path, **kwargs)
    model.requires_grad_(False)
    if prequantised:
        # Its unquantised weights (embeddings, norms, the towers) keep the dtype they were saved in (bf16 mostly),
        # whatever dtype was asked: on a T4 the tied embedding and LM head would then compute in bf16, which it lacks.
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
                param.data = param.data.to(hardware.torch_dtype)
    for module in model.modules():
        # bitsandbytes repacks CPU 4-bit weights for fast inference on the first eval-mode forward and
        # never unpacks them; a later training forward then fails on biased layers (q/k/v_proj).
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
        # A folder saved in 4 bits brings the compute dtype it was saved with (bf16 mostly): a T4 has no bf16. Its
        # weights also dequantise to the dtype they were saved from: bf16 rounding in every layer (on the CPU the
        # shared-prefix check then saw 5e-3 where fp32 gives 5e-7), and on a T4 bf16 first, then fp16.
        if prequantised and hasattr(module, "compute_dtype"):
            module.compute_dtype = hardware.torch_dtype
            state = getattr(getattr(module, "weight", None), "quant_state", None)
            if state is not None:
                state.dtype = hardware.torch_dtype
    return model


def add_lora(model, cfg, hardware):
    """k-bit preparation, gradient checkpointing and LoRA adapters on the language model."""
    checkpointing = cfg.gradient_checkpointing != "off"  # "auto" unplanned (memory.py not run): on, the safe side
    if uses_nf4(cfg):
        # The frozen embedding and LM head keep 16 bits where the family says so: fp32 doubles GiBs (Qwen3.5's
        # 248k rows), and even the moment of upcasting them ran a T4's memory out (BENCHMARKS.md, run 32).
        keep = embedding_tables(model) if model_family(cfg.model_name_or_path).embeddings_16bit else set()
        model = prepare_for_kbit_training(model, checkpointing, keep_16bit=keep)
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    # k-bit preparation upcasts every non-quantised weight to fp32. Keep that for the vision tower only
    # where fp16 could overflow; on bf16/fp32 hardware give it back its compute dtype (speed, memory).
    vision_dtype = torch.float32 if hardware.dtype == "float16" else hardware.torch_dtype
    for tower in frozen_towers(model):
        tower.to(vision_dtype)
        if hardware.dtype == "float16":
            run_without_autocast(tower)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=lora_targets(cfg), bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        # peft (0.21) reads transformers' deprecated `is_gradient_checkpointing` (a FutureWarning per fold on
        # transformers >= 5.25): theirs, harmless, and not the user's to fix.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
        return get_peft_model(model, lora)


def embedding_tables(model):
    """The language model's embedding tables and LM head (Gemma 4's per-layer table too: 2.35 B rows x width in
    E2B, 9.4 GB in fp32): frozen lookups that k-bit preparation would upcast."""
    family = family_of(model.config)
    tables = {m for name, m in model.named_modules() if isinstance(m, torch.nn.Embedding) and not family.in_towers(name)}
    return tables | {model.get_input_embeddings(), model.get_output_embeddings()}


def prepare_for_kbit_training(model, checkpointing, keep_16bit=()):
    """peft's `prepare_model_for_kbit_training` (the base frozen, fp32 for every 16-bit weight it did not
    quantise, non-reentrant gradient checkpointing), except that the weights of the modules in keep_16bit
    stay as they are: peft upcasts every one, which it offers no way around (tests compare the two)."""
    keep = {id(param) for module in keep_16bit for param in module.parameters()}
    for param in model.parameters():
        param.requires_grad = False
        if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit" \
                and id(param) not in keep:
            param.data = param.data.to(torch.float32)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def run_without_autocast(module):
    """Make `module` compute in its own weights' dtype even inside an fp16 autocast region.

    fp32 weights alone are not enough on a T4: the training loop's autocast would still run the
    tower's matmuls in fp16, where Qwen-VL vision activations overflow. With the image-feature cache
    this fp32 pass happens once per image."""
    inner = module.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        device_type = next(module.parameters()).device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return inner(*args, **kwargs)

    module.forward = forward
    return module


def load_model_for_training(cfg, hardware, device=None):
    model = add_lora(load_base_model(cfg, hardware, device), cfg, hardware)
    model.print_trainable_parameters()
    return model


def describe_kernels(family, hardware):
    """The family's optional CUDA kernels (Qwen3.5's DeltaNet), found or not, and what their absence costs."""
    if not family.kernels:
        return None
    names = ", ".join(pip for _, pip, _ in family.kernels)
    if hardware.device != "cuda":
        return f"[model] {family.name}: on the CPU its linear-attention layers run transformers' torch loop ({names}: CUDA only)"
    missing = [(pip, what) for module, pip, what in family.kernels if importlib.util.find_spec(module) is None]
    if not missing:
        return f"[model] {family.name}: {names} found: their CUDA kernels run its linear-attention layers"
    return (f"[model] {family.name}: " + ", ".join(f"{pip} not installed ({what})" for pip, what in missing)
            + ": transformers runs its torch loop there instead, correct but slower (a training step 1.22 s without "
            "flash-linear-attention against 0.70 s with it in transformers issue #48718). Fix, on an sm80+ GPU: "
            "pip install " + " ".join(pip for pip, _ in missing) + " (on Hopper, flash-linear-attention 0.6 trains only "
            "with Triton >= 3.7.1: BENCHMARKS.md, run 35)")


def trainable_state(model):
    """The LoRA weights only (what a checkpoint and the EMA hold), detached copies on the CPU."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state):
    params = dict(model.named_parameters())
    missing = [name for name in state if name not in params]
    if missing:
        raise KeyError(f"checkpoint has weights the model lacks: {missing[:3]}...")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
