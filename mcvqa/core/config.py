"""## Configuration: one block of commented defaults, one profile per environment

Every setting lives in the `Config` dataclass below, with its default and why. A *profile* is a
small set of overrides for one environment: `demo` (CPU, embedded tiny model and data), `kaggle_t4x2`,
`colab_a100`, `local_gpu`; `auto` picks one from the environment (Kaggle env var, Colab, CUDA).
On top of the profile come `MCVQA_<FIELD>` environment variables, then `key=value` overrides from
the parameters cell, papermill or the command line. The resolved config is printed and saved as
`config.json` beside the run's outputs.
"""

import ast
import dataclasses
import difflib
import importlib.util
import json
import operator
import os
import pathlib
import re
import typing

from ..machinery.errors import UserError

# Before torch starts its OpenMP threads: idle threads sleep instead of spinning. On a small CPU shared
# with another torch process, spinning threads made two demo runs 10x slower (211 s vs 29 s for both,
# measured on 2 cores); alone the demo runs as fast or faster. A value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


class ConfigError(UserError, ValueError):
    """A bad setting: names the setting and the values it takes."""


@dataclasses.dataclass
class Config:
    # --- where things are -------------------------------------------------------------------------
    profile: str = "auto"
    data_dir: str = "data/demo"  # folder with train.csv, test.csv, sample_submission.csv, images
    output_dir: str = "runs/latest"  # checkpoints, probabilities, metrics, submission.csv
    model_name_or_path: str = "Qwen/Qwen2.5-VL-3B-Instruct"  # local folder (no network) or hub id
    submission_path: str = ""  # empty: <output_dir>/submission.csv
    adapters_from: str = ""  # an earlier run folder (read-only is fine): predict with its folds' adapters, no training
    blend_with: str = ""  # finished run folders, comma-separated (read-only is fine): the submission becomes this run blended with them (toolkit/blend.py)
    blend_per_type: bool = False  # blend weights per question type (types with enough out-of-fold rows)
    # An earlier run folder (read-only is fine): the training rows its out-of-fold pass got wrong, or nearly (top-2
    # probability margin below hard_row_margin), train twice here, the copy with the options in reversed order
    # (the 0.972 Gemma 4 single model's); validation and out-of-fold rows stay single.
    hard_rows_from: str = ""
    hard_row_margin: float = 0.2
    # A second competition-format folder (train.csv + images, e.g. external Korean VQA turned into four options): one
    # adapter trains on it first (first_stage_epochs; a tenth of it validates), and every fold starts from it (the
    # 0.972 Gemma 4 single model's first stage). Resumable like a fold: <output_dir>/first_stage.
    first_stage_data: str = ""
    first_stage_epochs: int = 1
    # --- what you tune: model, training, test-time augmentation -----------------------------------
    max_pixels: int = 448 * 448  # ~256 image tokens; winners gained +4.75 pp from higher resolution
    min_pixels: int = 256 * 28 * 28  # Qwen's processor upsizes smaller images to this many pixels
    max_soft_tokens: int = 280  # Gemma 4's resolution instead of max_pixels: tokens per image, 70/140/280/560/1120
    lora_r: int = 16  # LoRA rank: adapter capacity (16 is QLoRA's usual; 32-64 for more capacity, more memory)
    lora_alpha: int = 32  # LoRA scale = alpha / r; keep alpha = 2 r when changing r
    lora_dropout: float = 0.05  # dropout on the LoRA inputs; 0 trains 35-70 % faster on the T4 path (BENCHMARKS.md)
    # Language-model linear layers only: the vision tower stays frozen (see README for why). auto: the model family's
    # (attention and MLP projections; Qwen3.5 adds its DeltaNet projections: families/)
    lora_target_modules: str = "auto"
    n_folds: int = 3  # stratified by answer, grouped by image: each fold trains a model, all of them predict the test set
    folds: str = "all"  # which folds to train, e.g. "0" or "0,2"
    epochs: int = 2  # passes over each fold's training rows; 0 = zero-shot (the base model scores, nothing trained)
    learning_rate: float = 1e-4  # AdamW peak learning rate of the LoRA weights (after warm-up, cosine to 0)
    micro_batch_size: int = 2  # per step; OOM halves it and doubles accumulation
    grad_accum_steps: int = 8  # effective batch = micro_batch_size * grad_accum_steps
    warmup_ratio: float = 0.05  # cosine schedule with linear warm-up (transformers' scheduler)
    ema_decay: float = 0.999  # EMA of the LoRA weights, used for evaluation and saving; 0 = off
    shuffle_options: bool = True  # permute a-d in training, remap the label (augmentation)
    # Cross-entropy at the answer position over the whole vocabulary (plain SFT) or over a-d only
    # (what is scored; converges faster when the base has never answered with letters).
    loss_over: str = "vocab"
    weight_decay: float = 0.0  # AdamW weight decay of the LoRA weights
    max_grad_norm: float = 1.0  # gradient clipping (fp16 on a T4 needs it)
    early_stopping_patience: int = 2  # evaluations without val-accuracy gain before stopping; 0 = off
    evals_per_epoch: int = 2  # validation passes per epoch; the best one is the adapter kept
    seed: int = 42  # folds, option shuffles, LoRA initialisation: a run is reproducible
    tta_option_views: int = 4  # cyclic shifts of the options (1 = off); winners: +1.5 pp
    tta_image_scales: str = ""  # extra pixel-budget views, e.g. "0.75,1.5" (x max_pixels)
    tta_average: str = "prob"  # prob | logprob: how views are averaged
    # Extra test-time compute only for the rows the model is unsure of (gate.py); off by default: turn it on
    # where its out-of-fold report shows a gain (1st places of sister competitions: +0.2-0.6 pp).
    gate_fraction: float = 0.0  # at most this fraction of rows, the least certain, get extra views (0 = off; 0.1 = 10 %)
    gate_by: str = "margin"  # margin: top-2 probability gap | agreement: share of the views that pick the averaged letter
    gate_threshold: float = 1.0  # only rows whose score is below it are gated (1.0: the fraction alone decides)
    gate_option_orders: int = 24  # option orders of a gated row: 24 = all permutations, 1-4 = cyclic shifts
    gate_image_scale: float = 0.0  # gated rows also get views at this x max_pixels (e.g. 1.5; 0 = none)
    gate_base_model: bool = False  # gated rows also get the base model's views (adapter off), one per normal option order (the 16-1 winner's)
    # Before a fold trains, the base model scores its out-of-fold rows (one view, ~1/3 of a training pass over them):
    # rows whose label is outside its top 2 join suspect_labels.csv (the 16-1 winner's label check)
    zero_shot_label_check: bool = False
    gate_apply: str = "auto"  # auto: the submission takes the gated probabilities only if they raised the out-of-fold accuracy on the gated rows | always
    ensemble_weights: str = "equal"  # equal | oof_acc: fold weights
    temperature_scaling: bool = False  # fit one temperature on out-of-fold logits
    time_budget_hours: float = 0.0  # 0 = none; else training stops early so that predictions and the submission fit (budget.py)
    max_train_rows: int = 0  # 0 = all; a small number makes a quick smoke run
    # --- prompt -----------------------------------------------------------------------------------
    system_prompt: str = ""  # empty: the chat template's own default (Qwen2.5-VL adds one)
    instruction: str = "정답에 해당하는 선택지의 알파벳(a, b, c, d) 하나로만 답하세요."
    instruction_first: bool = True  # instruction between question and options: option-order TTA views share it in their prefix (suffix 49 -> 23 tokens per view; ensemble 3.05x -> 2.55x one pass, same demo accuracy: BENCHMARKS.md)
    max_question_tokens: int = 256  # longer questions are cut (the answer position never is)
    max_option_tokens: int = 64  # per option
    prompt_repeat: bool = False  # question and options written twice, the image once (the 0.972 Gemma 4 single model)
    # --- input checks -----------------------------------------------------------------------------
    on_bad_image: str = "error"  # error: stop listing every bad row | blank: counted blank fallback
    bomb_limit_pixels: int = 200_000_000  # larger decoded images are refused as possible decompression bombs
    blank_images: bool = False  # control experiment: every image blank (accuracy should fall to chance)
    # none | light: JPEG quality 65-80, a slight blur, a small shift and rotation (the 0.972 single model's) | custom:
    # your own `custom_image_transform` (the Data stage: edit that cell in a fork). Declared here so the feature
    # cache steps aside and a resumed run sees the change.
    image_transform: str = "none"
    image_transform_on: str = "train"  # train: training batches only | train+test: every pass (validation, test) too
    # --- engine room: precision, memory, speed, robustness (chosen per card and profile; rarely touched) ---
    # nf4: NF4 weights + double quantisation (QLoRA) | none: 16-bit weights (LoRA) | auto: the model family's choice
    # where the card's memory allows it (Qwen2/2.5/3-VL: nf4; Qwen3.5: 16-bit where it fits, else nf4; memory.py)
    quantization: str = "auto"
    dtype: str = "auto"  # auto: from the hardware (fp16 below sm80, bf16 from sm80, fp32 on CPU)
    attn_implementation: str = "auto"  # auto: flash_attention_2 where installed and supported, else sdpa
    gpu_memory_gib: float = 0.0  # 0: the card's own; less caps this process per GPU (e.g. 15 rehearses a T4 on a bigger card)
    gradient_checkpointing: str = "auto"  # auto | on | off; auto: on only when the micro-batch would not fit the GPU without it (memory.py; costs ~30% speed)
    fit_micro_batch: bool = True  # lower micro_batch_size (more accumulation) and infer_batch_size to what the GPU's memory fits (memory.py)
    infer_batch_size: int = 8  # test rows per batch (with the shared-prefix TTA each row brings its option views)
    # auto: with 2+ GPUs the folds train at once, one worker process per GPU (parallel.py); off: one after
    # the other in this process; N: at most N workers (on a CPU, N processes). Extra folds queue.
    parallel_folds: str = "auto"
    num_workers: int = 2  # data-loader processes (image decoding + processor)
    pin_memory: bool = False  # pinned data-loader batches: no faster on an H200 (BENCHMARKS.md), an extra copy per batch
    checkpoint_every_steps: int = 50  # optimizer steps between resumable checkpoints
    checkpoint_every_minutes: float = 20.0  # ...or this much wall time, whichever comes first
    max_nonfinite_steps: int = 10  # consecutive non-finite losses before stopping
    tta_shared_prefix: bool = True  # option orders of a row run system + image + question once (needs the feature cache)
    cache_image_features: bool = True  # reuse features across folds, views, epochs; off if the tower trains
    feature_cache_fp32: bool = False  # encode with autocast off, in the tower's dtype (fp32 on T4: no fp16 overflow, slower)
    feature_cache_max_gib: float = 12.0  # budget (RAM, or GPU memory when kept there); beyond it features go to disk (if on) or are recomputed
    feature_cache_on_disk: bool = False  # also write them to <output_dir>/feature_cache (a restarted session reuses them)
    feature_cache_device: str = "auto"  # cpu | cuda | auto: where features are kept (auto: the GPU when it has >= 60 GiB)
    fast_vision_attention: bool = True  # SDPA vision tower: one attention call per window length, not per window (2.4x 3B forward, BENCHMARKS.md; equal to stock, tested)
    compile_vision: str = "auto"  # auto | on | off: torch.compile the tower's norms, MLP, rotary (auto: sm80+ GPU with triton)
    # --- demo (CPU): the embedded tiny data and model ---------------------------------------------
    demo: bool = False  # build the embedded demo data and tiny model before running
    demo_family: str = "qwen2_5_vl"  # tiny model architecture for the demo: qwen2_5_vl | qwen3_vl | qwen3_5 | gemma4
    demo_hidden_size: int = 128  # tiny model width
    demo_image_size: int = 64  # demo images are drawn this size (4 image tokens at 56 px)
    demo_warmup_rows: int = 1200  # separately seeded images for the tiny base's warm-up
    demo_warmup_epochs: int = 6

    def __post_init__(self):
        for name, allowed in (("image_transform", ("none", "light", "custom")),
                              ("image_transform_on", ("train", "train+test"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"config: {name}={getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        # gradient_checkpointing also takes booleans (profiles, older config.json files): normalised to auto | on | off.
        value = str(self.gradient_checkpointing).strip().lower()
        value = {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off", "no": "off"}.get(value, value)
        if value not in ("auto", "on", "off"):
            raise ConfigError(f"config: gradient_checkpointing must be auto, on or off, got {self.gradient_checkpointing!r}")
        self.gradient_checkpointing = value
        # Settings read only at prediction time are checked here, before any training.
        choices = {"tta_average": ("prob", "logprob"), "gate_by": ("margin", "agreement"), "gate_apply": ("auto", "always"),
                   "quantization": ("auto", "nf4", "none")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"config: {name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.max_soft_tokens not in (70, 140, 280, 560, 1120):
            raise ConfigError(f"config: max_soft_tokens (Gemma 4's image tokens per image) must be 70, 140, 280, 560 or "
                              f"1120; got {self.max_soft_tokens!r}")
        if not 0 <= self.gate_fraction <= 1:
            raise ConfigError(f"config: gate_fraction is a fraction of the rows, 0 (off) to 1; got {self.gate_fraction!r}")
        if self.gate_option_orders not in (1, 2, 3, 4, 24):
            raise ConfigError(f"config: gate_option_orders must be 1-4 (cyclic shifts) or 24 (all orders); "
                              f"got {self.gate_option_orders!r}")
        if self.gate_image_scale < 0:
            raise ConfigError(f"config: gate_image_scale must be 0 (none) or a positive multiple of max_pixels; "
                              f"got {self.gate_image_scale!r}")
        if self.gate_fraction > 0 and self.gate_by == "agreement" and self.tta_option_views <= 1 \
                and not self.tta_image_scales.strip():
            raise ConfigError("config: gate_by=agreement needs 2+ views in the normal pass (one view always agrees "
                              "with itself: nothing would be gated). Fix: tta_option_views=4, or gate_by=margin")
        adds_orders = self.gate_option_orders == 24 or self.gate_option_orders > self.tta_option_views
        if self.gate_fraction > 0 and not adds_orders and self.gate_image_scale in (0, 1) and not self.gate_base_model:
            raise ConfigError(f"config: gate_fraction={self.gate_fraction:g} gives the gated rows no view beyond the "
                              f"normal pass's (gate_option_orders={self.gate_option_orders} <= tta_option_views="
                              f"{self.tta_option_views}, no gate_image_scale, no gate_base_model). Fix: gate_option_orders=24 "
                              "or gate_image_scale=1.5 or gate_base_model=true")


# Profiles: small override sets per environment, like nanoGPT's config files.
PROFILES = {
    "demo": dict(
        data_dir="data/demo", output_dir="runs/demo", model_name_or_path="",  # "": data/tiny_models/<demo_family>
        demo=True, quantization="nf4", min_pixels=56 * 56, max_pixels=56 * 56, max_soft_tokens=70,
        gradient_checkpointing=False, epochs=5, micro_batch_size=16, grad_accum_steps=1, loss_over="letters",
        learning_rate=2e-3, warmup_ratio=0.1, ema_decay=0.9, lora_r=16, lora_alpha=32, lora_dropout=0.0,
        evals_per_epoch=1, early_stopping_patience=0, num_workers=0, infer_batch_size=32,
        checkpoint_every_steps=20, max_question_tokens=64, max_option_tokens=16,
        # The demo's options never move (demo_data.py says why): nothing to shuffle or permute.
        shuffle_options=False, tta_option_views=1,
    ),
    "kaggle_t4x2": dict(
        data_dir="auto", output_dir="/kaggle/working/run", submission_path="/kaggle/working/submission.csv",
        # Micro-batch 16 x 1: the T4 path's training step is bound by kernel launches (4-bit matmuls,
        # LoRA), so bigger micro-batches are faster for the same effective batch of 16: 3B 6.0 -> 15.6
        # samples/s (BENCHMARKS.md, run 21). The memory plan (memory.py) lowers it where the card's memory
        # does not hold it (Qwen3-VL-8B on a T4: 4 x 4), and an OOM still halves it.
        # auto: the one Qwen-VL model folder attached under /kaggle/input (locate.py; no hub on Kaggle).
        model_name_or_path="auto", micro_batch_size=16, grad_accum_steps=1,
        infer_batch_size=16, num_workers=2, checkpoint_every_minutes=15.0,
        time_budget_hours=11.5,  # a Kaggle session ends at 12 h and takes /kaggle/working with it
        # Two fold workers (one per T4) each keep their own feature cache; Kaggle gives ~29 GiB of RAM.
        feature_cache_max_gib=6.0,
    ),
    "colab_a100": dict(
        data_dir="/content/drive/MyDrive/mcvqa/data", output_dir="/content/drive/MyDrive/mcvqa/runs/latest",
        # Gradient checkpointing and the micro-batch are chosen from the card's memory (memory.py): 7B at
        # 768x768 needs checkpointing on a 40 GB A100, not on an 80 GB one.
        model_name_or_path="Qwen/Qwen2.5-VL-7B-Instruct", micro_batch_size=16, grad_accum_steps=1,
        max_pixels=768 * 768, num_workers=8, infer_batch_size=16,
    ),
    # A Colab GPU below 30 GiB (the free tier's T4, an L4): the T4 recipe with Colab's Drive folders.
    "colab_t4": dict(
        data_dir="/content/drive/MyDrive/mcvqa/data", output_dir="/content/drive/MyDrive/mcvqa/runs/latest",
        model_name_or_path="Qwen/Qwen2.5-VL-3B-Instruct", micro_batch_size=16, grad_accum_steps=1,
        infer_batch_size=16, num_workers=2, feature_cache_max_gib=6.0,
    ),
    "local_gpu": dict(data_dir="data", output_dir="runs/latest", micro_batch_size=4, grad_accum_steps=4),
}
COLAB_BIG_GPU_GIB = 30  # at or above: colab_a100 (7B at 768x768); below: colab_t4 (3B at 448x448)


def _module_exists(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent package ("google") is missing
        return False


def _first_gpu():
    """(name, GiB) of GPU 0, or None."""
    import torch  # late: config must stay importable and cheap

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return props.name, props.total_memory / 2**30


def detect_environment(env=None, gpu="detect"):
    """Name the profile `auto` stands for, and why. gpu: (name, GiB) of GPU 0, None for none (tests fake it)."""
    env = os.environ if env is None else env
    if env.get("KAGGLE_KERNEL_RUN_TYPE") or env.get("KAGGLE_URL_BASE"):
        return "kaggle_t4x2", "KAGGLE_KERNEL_RUN_TYPE is set"
    gpu = _first_gpu() if gpu == "detect" else gpu
    if env.get("COLAB_RELEASE_TAG") or _module_exists("google.colab"):
        if gpu is None:
            return "demo", "running inside Google Colab without a GPU (Runtime -> Change runtime type): the CPU demo"
        name, memory = gpu
        if memory >= COLAB_BIG_GPU_GIB:
            return "colab_a100", f"running inside Google Colab on a {name} ({memory:.0f} GiB): 7B at 768x768"
        return "colab_t4", f"running inside Google Colab on a {name} ({memory:.0f} GiB < {COLAB_BIG_GPU_GIB}): 3B at 448x448"
    if gpu is not None:
        return "local_gpu", "CUDA is available outside Kaggle and Colab"
    return "demo", "no GPU found: the CPU demo is what can run here"


def _number(text):
    """A number as users write it: 602112, 768*768, 1e-4, 2**20, 0.5 (arithmetic on literals only, never code)."""
    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -value(node.operand) if isinstance(node.op, ast.USub) else value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
            return _ARITHMETIC[type(node.op)](value(node.left), value(node.right))
        raise ValueError(text)

    try:
        return value(ast.parse(str(text).strip().replace("_", ""), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError):
        raise ValueError(text) from None


_ARITHMETIC = {ast.Mult: operator.mul, ast.Add: operator.add, ast.Sub: operator.sub, ast.Div: operator.truediv,
               ast.Pow: operator.pow}


def _parse_value(field, text):
    """Turn an override string into the field's type, with a clear error naming the setting and the fix."""
    kind = field.type if isinstance(field.type, type) else typing.get_origin(field.type) or str
    if kind is bool:
        lowered = str(text).strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"config: {field.name} expects true/false, got {text!r}")
    if kind not in (int, float):
        return kind(text)
    try:
        number = _number(text)
    except ValueError:
        example = "a whole number (e.g. 602112 or 768*768)" if kind is int else "a number (e.g. 0.0001 or 1e-4)"
        raise ConfigError(f"config: {field.name} expects {example}, got {text!r}") from None
    if kind is int and number != int(number):
        raise ConfigError(f"config: {field.name} expects a whole number, got {text!r} (= {number:g}); e.g. "
                          f"{field.name}={round(number)}")
    return kind(number)


def parse_overrides(overrides):
    """Accept a dict, a list of "key=value" strings, or one string of such lines (one setting per line)."""
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    if isinstance(overrides, str):
        overrides = [line for line in overrides.splitlines() if line.strip() and not line.strip().startswith("#")]
    parsed = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"config: override {item!r} is not key=value")
        _refuse_several_on_one_line(item, value)
        parsed[key.strip()] = value.strip()
    return parsed


def _refuse_several_on_one_line(item, value):
    """`epochs=2 max_pixels=602112` on one line would make epochs the string "2 max_pixels=602112"."""
    names = {field.name for field in dataclasses.fields(Config)}
    inside = [word.partition("=")[0] for word in re.split(r"[\s,;]+", value) if "=" in word]
    if any(name in names for name in inside):
        settings = [part for part in re.split(r"[\s,;]+(?=\w+=)", item.strip()) if part]
        raise ConfigError(f"config: {item!r} holds several settings on one line; put one setting per line, e.g.\n"
                          + "\n".join(settings))


RENAMED = {"load_in_4bit": "quantization=nf4 (true) or quantization=none (false); auto: the model family's choice"}


def _unknown_setting(key, where, fields):
    if key in RENAMED:
        return ConfigError(f"config: {key} ({where}) was renamed: {RENAMED[key]}")
    close = difflib.get_close_matches(key, fields, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(close)}?" if close else f" Known settings: {', '.join(fields)}"
    return ConfigError(f"config: unknown setting {key!r} ({where}).{hint}")


def resolve_config(profile="auto", overrides=None, env=None, verbose=True, gpu="detect"):
    """Defaults < profile < MCVQA_* environment < explicit overrides. Prints what it chose."""
    env = os.environ if env is None else env
    reason = "asked for explicitly"
    if profile == "auto":
        profile, reason = detect_environment(env, gpu)
    if profile not in PROFILES:
        close = difflib.get_close_matches(str(profile), list(PROFILES), n=1)
        raise ConfigError(f"config: unknown profile {profile!r}"
                          + (f" (did you mean {close[0]}?)" if close else "")
                          + f"; choose one of {sorted(PROFILES)} or 'auto'")
    fields = {f.name: f for f in dataclasses.fields(Config)}
    values = dict(PROFILES[profile], profile=profile)
    from_env = {k[len("MCVQA_"):].lower(): (v, f"environment variable {k}") for k, v in env.items()
                if k.startswith("MCVQA_")}
    from_overrides = {k: (v, f"override {k}={v}") for k, v in parse_overrides(overrides).items()}
    for layer in (from_env, from_overrides):
        for key, (value, where) in layer.items():
            if key not in fields:
                raise _unknown_setting(key, where, list(fields))
            values[key] = _parse_value(fields[key], value) if isinstance(value, str) else value
    cfg = Config(**values)
    if verbose:
        print(f"[config] profile={profile} ({reason})")
        _print_sources(cfg, PROFILES[profile], from_env, from_overrides)
    return cfg


def _print_sources(cfg, profile_values, from_env, from_overrides):
    """Each setting not at its Config default, with where it came from. A Config default the profile sets is not
    used: say so, so that a fork edits OVERRIDES, not the default."""
    values = dataclasses.asdict(cfg)
    source = {k: "profile" for k in profile_values} | {k: "environment" for k in from_env} | \
        {k: "OVERRIDES" for k in from_overrides}
    for where in ("profile", "environment", "OVERRIDES"):
        names = [k for k, s in source.items() if s == where and k != "profile"]
        if names:
            shown = ", ".join(f"{k}={json.dumps(values[k], ensure_ascii=False)}" for k in names)
            print(f"[config] from {'the ' + cfg.profile + ' profile' if where == 'profile' else where}: {shown}")
    print("[config] a setting goes in OVERRIDES (key=value lines: they win over the profile); a Config default is "
          "used only where the profile sets nothing")


# Settings that decide what a fold's model sees: every fold of one run must share them.
PROMPT_AND_IMAGE_SETTINGS = ("model_name_or_path", "system_prompt", "instruction", "instruction_first",
                             "max_question_tokens", "max_option_tokens", "min_pixels", "max_pixels", "max_soft_tokens",
                             "prompt_repeat", "image_transform", "image_transform_on", "first_stage_data",
                             "first_stage_epochs")
# Their values in runs saved before the setting existed.
EARLIER_DEFAULTS = {"instruction_first": False}


def changed_settings(saved, cfg, names=PROMPT_AND_IMAGE_SETTINGS):
    """{setting: (saved value, current value)} for the prompt/image settings a saved config.json differs in."""
    changed = {}
    for name in names:
        before = saved.get(name, EARLIER_DEFAULTS.get(name, getattr(cfg, name)))
        if before != getattr(cfg, name):
            changed[name] = (before, getattr(cfg, name))
    return changed


def check_adapter_source(cfg, folds_frame, folds):
    """adapters_from: the earlier run must have built the same prompts and images, split train.csv into the
    same folds (else its out-of-fold rows were training rows) and saved an adapter for each of `folds`, the
    folds this run predicts; it is only read, never written."""
    source = pathlib.Path(cfg.adapters_from)
    if source.resolve() == pathlib.Path(cfg.output_dir).resolve():
        raise ConfigError(f"config: adapters_from={source} is the output_dir; set output_dir to a new folder "
                          "(the earlier run is only read)")
    if not (source / "config.json").exists() or not (source / "folds.csv").exists():
        raise ConfigError(f"config: adapters_from={source}: no config.json and folds.csv there; point it at an "
                          "earlier run's output_dir (the folder holding fold0/, fold1/, ...)")
    saved = json.loads((source / "config.json").read_text(encoding="utf-8"))
    if saved.get("epochs") == 0:
        raise ConfigError(f"config: adapters_from={source} was a zero-shot run (epochs=0): it trained no adapters. "
                          "Fix: point adapters_from at a run that trained, or run zero-shot again with epochs=0")
    missing = [fold for fold in folds if not (source / f"fold{fold}" / "best_adapter.pt").exists()]
    if missing:
        has = [fold for fold in folds if fold not in missing]
        raise ConfigError(f"config: adapters_from={source} has no fold{missing[0]}/best_adapter.pt (that run did not "
                          f"finish fold{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))}). Fix: "
                          + (f"folds={','.join(map(str, has))} (the folds it has), or " if has else "")
                          + "finish that run first")
    # The model's path may differ between sessions (another mount); its adapter's shapes are checked on loading.
    changed = changed_settings(saved, cfg, [n for n in PROMPT_AND_IMAGE_SETTINGS if n != "model_name_or_path"])
    if changed:
        listed = ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in changed.items())
        raise ConfigError(f"config: adapters_from={source} was trained with other prompt/image settings ({listed}). "
                          "Fix: set them as that run had them: " + " ".join(f"{k}={a}" for k, (a, _) in changed.items()))
    import pandas as pd  # late: config must stay cheap to import

    before = pd.read_csv(source / "folds.csv").astype({"id": str})
    now = folds_frame.astype({"id": str})
    if not before.reset_index(drop=True).equals(now.reset_index(drop=True)):
        raise ConfigError(f"config: adapters_from={source} split train.csv into other folds than this run would "
                          "(another train.csv, seed or n_folds): its out-of-fold rows would include rows its "
                          f"adapters were trained on. Fix: the same train.csv with seed={saved.get('seed')} "
                          f"n_folds={saved.get('n_folds')}")
    print(f"[resume] adapters_from={source}: same prompts, images and folds; predicting with its adapters, no training")


def check_resume(cfg, out_dir):
    """A re-run into a folder that already has folds must build the same prompts and images: otherwise the
    finished folds and the resumed ones would be ensembled across two prompt formats (e.g. after
    `instruction_first` became the default). Raises with the settings that differ and the fix."""
    path = pathlib.Path(out_dir) / "config.json"
    if not path.exists() or not any(p.is_dir() for p in pathlib.Path(out_dir).glob("fold*")):
        return
    changed = changed_settings(json.loads(path.read_text(encoding="utf-8")), cfg)
    if changed:
        listed = ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in changed.items())
        raise ConfigError(f"{path}: this run folder already has folds made with other prompt/image settings ({listed}). "
                         f"Resuming would ensemble folds that saw different prompts. Use a new output_dir, or set "
                         f"them back, e.g. " + " ".join(f"{k}={a}" for k, (a, _) in changed.items()))


def save_config(cfg, out_dir):
    """Write the resolved config beside the run's outputs, so every run can be reproduced."""
    path = pathlib.Path(out_dir) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataclasses.asdict(cfg), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
