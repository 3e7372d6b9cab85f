"""GPU benchmark for issue 5: image-feature cache, grouped vision attention, training step, T4 budget.

Full-size Qwen2.5-VL-3B and Qwen3-VL-8B architectures with random weights (sizes from the published
configs), the real processors (copied from ../shared/qwen_tokenizers into .bench_assets/), Korean
prompts, 384x384 images. Two parts, meant to run at the same time on two GPUs:

    python bench/bench_gpu.py --part main   # (a) inference, (b) ensemble cost, (c) training, (d) Qwen3-VL-8B
    python bench/bench_gpu.py --part t4     # (e) T4 budget: 15 GiB cap, fp16, 4-bit NF4, largest micro-batch
    python bench/bench_gpu.py --part ensemble --n-pipeline 512,2048  # (b) alone: the ensemble variants, per test size
    python bench/bench_gpu.py --part forward --models Qwen3-VL-8B     # (a)/(d) forward and tower rows alone

`--tiny` runs the same code on the CPU with tiny models (a smoke test of the script, no numbers).
Random weights: speed and memory are what is measured, never accuracy.
"""

import argparse
import dataclasses
import gc
import json
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np
import pandas as pd
import torch
from PIL import Image
from transformers import (AutoProcessor, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen3VLConfig,
                          Qwen3VLForConditionalGeneration)

try:  # Qwen3.5 (transformers >= 5.2); the Qwen-VL rows still run on an older one
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration
except ImportError:
    Qwen3_5Config = Qwen3_5ForConditionalGeneration = None
try:  # Gemma 4 (transformers >= 5.5)
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration
except ImportError:
    Gemma4Config = Gemma4ForConditionalGeneration = None

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from mcvqa.speed.feature_cache import CachedImageEncoding  # noqa: E402
from mcvqa.core.collate import VqaCollator  # noqa: E402
from mcvqa.core.config import resolve_config  # noqa: E402
from mcvqa.speed.fast_vision import compile_vision_elementwise, patch_vision_attention, unpatch_vision_attention  # noqa: E402
from mcvqa.speed.feature_cache import FeatureCache  # noqa: E402
from mcvqa.core.hardware import choose_hardware, describe_gpus  # noqa: E402
from mcvqa.core.inference import predict_views  # noqa: E402
from mcvqa.core.modeling import load_model_for_training  # noqa: E402
from mcvqa.core.prompts import build_messages, format_user_text, make_prompt_format  # noqa: E402
from mcvqa.core.modeling import unwrap_vlm  # noqa: E402
from mcvqa.core.scoring import answer_loss, letter_logits  # noqa: E402
from mcvqa.core.training import FoldContext  # noqa: E402
from bench_gemma4 import GEMMA4_MODELS, gemma4_sizes  # noqa: E402

SPECIAL = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
# Published sizes: Qwen/Qwen2.5-VL-3B-Instruct and Qwen/Qwen3-VL-8B-Instruct config.json.
MODELS = {
    "Qwen2.5-VL-3B": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, "Qwen2.5-VL-7B-Instruct", dict(
        text_config=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                         num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                         tie_word_embeddings=True),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                           window_size=112, fullatt_block_indexes=[7, 15, 23, 31], patch_size=14),
        tie_word_embeddings=True)),
    # Qwen/Qwen2.5-VL-7B-Instruct config.json: the colab_a100 profile's model.
    "Qwen2.5-VL-7B": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, "Qwen2.5-VL-7B-Instruct", dict(
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                         tie_word_embeddings=False),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           window_size=112, fullatt_block_indexes=[7, 15, 23, 31], patch_size=14),
        tie_word_embeddings=False)),
    "Qwen3-VL-8B": (Qwen3VLConfig, Qwen3VLForConditionalGeneration, "Qwen3-VL-4B-Instruct", dict(
        text_config=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                         rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                          "mrope_interleaved": True}, tie_word_embeddings=False),
        vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                           patch_size=16, num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24],
                           hidden_act="gelu_pytorch_tanh"),
        tie_word_embeddings=False)),
}
SPECIAL_QWEN35 = dict(image_token_id=248056, video_token_id=248057, vision_start_token_id=248053,
                      vision_end_token_id=248054)


def qwen35(hidden, intermediate, layers, heads, kv_heads, value_heads, tied, vision):
    """A Qwen3.5 dense checkpoint's config: 3 Gated DeltaNet layers to 1 full-attention layer, 248k vocabulary.

    Text sizes: Qwen/Qwen3.5-0.8B config.json (../shared/qwen_tokenizers), and the published 4B / 9B / 27B text
    configs (hidden, intermediate, layers, heads: also THUDM/slime scripts/models/qwen3.5-27B.sh). Configs of
    the real checkpoints quoted in public code confirm the rest: a Qwen3.5-4B fine-tune (Chandra: DeltaNet
    value heads 32, vision depth 24 / width 1024 / MLP 4096 / 16 heads), an NVFP4 Qwen3.5-9B (value heads 32,
    vision 27 / 1152 / 4304 / 16, untied), Qwen3.5-27B / Qwen3.6-27B (value heads **48**, not 32; vision
    27 / 1152 / 4304 / 16, untied). The vision towers are still the least certain part (they change the
    weights by < 0.5 B): the 4B's is Qwen3-VL-4B's, the 9B's and 27B's Qwen3-VL-8B's, without deepstack.
    `dtype` stays out of text_config and pad_token_id unset, as the published configs have them."""
    text = dict(vocab_size=248320, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=256,
                linear_num_key_heads=16, linear_num_value_heads=value_heads, linear_key_head_dim=128,
                linear_value_head_dim=128, linear_conv_kernel_dim=4, max_position_embeddings=262144,
                layer_types=(["linear_attention"] * 3 + ["full_attention"]) * (layers // 4),
                rope_parameters={"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
                                 "mrope_section": [11, 11, 10], "mrope_interleaved": True},
                tie_word_embeddings=tied)
    depth, width, inner, vheads = vision
    return dict(text_config=text,
                vision_config=dict(depth=depth, hidden_size=width, intermediate_size=inner, num_heads=vheads,
                                   out_hidden_size=hidden, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                                   num_position_embeddings=2304, deepstack_visual_indexes=[],
                                   hidden_act="gelu_pytorch_tanh"),
                tie_word_embeddings=tied, **SPECIAL_QWEN35)


# The processor is Qwen3.5-0.8B's (the whole family shares the tokenizer and the image processor).
MODELS.update({
    name: (Qwen3_5Config, Qwen3_5ForConditionalGeneration, "Qwen3.5-0.8B", qwen35(*sizes))
    for name, sizes in {
        # hidden, MLP, layers, heads, kv heads, DeltaNet value heads, tied, vision (depth, width, MLP, heads)
        "Qwen3.5-0.8B": (1024, 3584, 24, 8, 2, 16, True, (12, 768, 3072, 12)),  # its config.json, vision included
        "Qwen3.5-4B": (2560, 9216, 32, 16, 4, 32, True, (24, 1024, 4096, 16)),
        "Qwen3.5-9B": (4096, 12288, 32, 16, 4, 32, False, (27, 1152, 4304, 16)),
        "Qwen3.5-27B": (5120, 17408, 64, 24, 4, 48, False, (27, 1152, 4304, 16)),
    }.items()})
# Gemma 4 (bench_gemma4.py: sizes, where they come from, the bench tokenizer): E2B, E4B share a processor asset,
# the 31B has its own (its template's empty thought channel). The sizes are built by gemma4_sizes(name, tiny).
MODELS.update({name: (Gemma4Config, Gemma4ForConditionalGeneration, asset, None)
               for name, (_, _, _, asset) in GEMMA4_MODELS.items()})
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
TINY_VISION = {"Qwen2.5-VL-3B": dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                                     fullatt_block_indexes=[1, 3]),
               "Qwen2.5-VL-7B": dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                                     fullatt_block_indexes=[1, 3]),
               "Qwen3-VL-8B": dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                                   deepstack_visual_indexes=[0, 1, 2])}
TINY_VISION.update({name: dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
                    for name in MODELS if name.startswith("Qwen3.5")})
# Qwen3.5 tiny: one DeltaNet and one full-attention layer; head_dim 32 x partial rotary 0.25 = 8 rotary dims
# (mrope_section sums to 4); 2 key / 4 value DeltaNet heads of 16 (the 4B's 1:2), or 2 / 2 (the 0.8B's 1:1).
TINY_QWEN35 = dict(head_dim=32, layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                   linear_key_head_dim=16, linear_value_head_dim=16)
QUESTION = "이 그림에서 빨간색 도형은 몇 개입니까? 그림을 잘 보고 답하세요."
OPTIONS = ["한 개", "두 개", "세 개", "네 개"]


# ------------------------------------------------------------------------------------------ helpers
class Bench:
    def __init__(self, args):
        self.args = args
        self.device = "cpu" if args.tiny else "cuda"
        self.dtype = torch.float32 if args.tiny else torch.bfloat16
        self.hardware = (choose_hardware([], flash_attn_installed=False) if args.tiny
                         else choose_hardware(describe_gpus(), flash_attn_installed=False))
        self.rows = []
        self.results = {}

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn):
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - start, out

    def row(self, section, name, rate, unit="samples/s", mfu=None, note=""):
        self.rows.append((section, name, rate, unit, mfu, note))
        print(f"[bench] {section} | {name} | {rate:.2f} {unit}" + (f" | MFU {100 * mfu:.1f} %" if mfu is not None else "")
              + (f" | {note}" if note else ""), flush=True)


def model_config(name, tiny):
    config_cls, model_cls, processor_name, sizes = MODELS[name]
    if config_cls is None:
        family, floor = ("Gemma 4", "5.5.2") if name in GEMMA4_MODELS else ("Qwen3.5", "5.2")
        raise SystemExit(f"{name}: this transformers ({__import__('transformers').__version__}) has no {family} "
                         f"(needs >= {floor})")
    if name in GEMMA4_MODELS:
        # The attention is left to transformers: "sdpa" set here would reach the audio tower, which has none.
        return config_cls(**gemma4_sizes(name, tiny)), model_cls, processor_name
    sizes = json.loads(json.dumps(sizes))
    if tiny:
        text = sizes["text_config"]
        ratio = text.get("linear_num_value_heads", 0) // max(text.get("linear_num_key_heads", 1), 1)
        text.update(TINY_TEXT)
        text["head_dim"] = 16
        if "mrope_section" in text["rope_parameters"]:
            text["rope_parameters"]["mrope_section"] = [2, 3, 3]
        if "layer_types" in text:  # Qwen3.5
            text.update(TINY_QWEN35, num_hidden_layers=len(TINY_QWEN35["layer_types"]),
                        linear_num_value_heads=TINY_QWEN35["linear_num_key_heads"] * ratio)
            text["rope_parameters"]["mrope_section"] = [2, 1, 1]
        sizes["vision_config"].update(TINY_VISION[name])
    config = config_cls(**{**SPECIAL, **sizes})
    config._attn_implementation = "sdpa"
    return config, model_cls, processor_name


def build_model(name, device, dtype, tiny):
    config, model_cls, _ = model_config(name, tiny)
    torch.manual_seed(0)
    with torch.device(device):
        model = model_cls(config).to(dtype).eval()
    model.requires_grad_(False)
    return model


def matmul_peak_tflops(device, dtype):
    if device != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (time.perf_counter() - t) / 1e12


def items(n, size, seed=0, answers=False):
    rng = np.random.default_rng(seed)
    return [{"row": i, "perm": (0, 1, 2, 3), "image": Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)),
             "answer": int(i % 4) if answers else -1, "question": QUESTION, "options": list(OPTIONS)} for i in range(n)]


def frame_on_disk(n, size, folder, seed=0):
    """A test.csv-like frame whose images are JPEG files (what the pipeline's data loader reads)."""
    rows = []
    for it in items(n, size, seed):
        path = pathlib.Path(folder) / f"img{it['row']}.jpg"
        it["image"].save(path, quality=90)
        rows.append({"id": f"t{it['row']}", "image_path": str(path), "question": QUESTION, "a": OPTIONS[0],
                     "b": OPTIONS[1], "c": OPTIONS[2], "d": OPTIONS[3], "image_ok": True})
    return pd.DataFrame(rows)


def linear_params(module):
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def lm_flops(model, batches):
    """Forward FLOPs of the language model: 2 x linear params per token + causal attention (half of s^2)."""
    vlm = unwrap_vlm(model)
    text = vlm.config.text_config
    lin = linear_params(vlm.model.language_model)
    width = text.num_attention_heads * (getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
    total = 0
    for b in batches:
        for s in b["attention_mask"].sum(1).tolist():
            total += 2 * lin * s + 2 * text.num_hidden_layers * s * s * width
    return total


def vision_flops(model, batches):
    """Forward FLOPs of the vision tower: linear layers per patch (merger per merged token) + attention."""
    visual = unwrap_vlm(model).model.visual
    vcfg = visual.config
    merger = linear_params(visual.merger) + sum(linear_params(m) for m in getattr(visual, "deepstack_merger_list", []))
    lin = linear_params(visual) - merger
    full = set(getattr(vcfg, "fullatt_block_indexes", range(vcfg.depth)))
    window = (vcfg.window_size // vcfg.patch_size) ** 2 if hasattr(vcfg, "window_size") else None
    total = 0
    for b in batches:
        for p in b["image_grid_thw"].prod(1).tolist():
            attn = sum(4 * p * (p if (i in full or window is None) else min(window, p)) * vcfg.hidden_size
                       for i in range(vcfg.depth))
            total += 2 * lin * p + 2 * merger * p // 4 + attn
    return total


def seed_inference(bench, model, processor, fmt, batch_items):
    """The seed notebook's way: one sample at a time, processor + generate(max_new_tokens=1, output_scores)."""
    probs = []
    for it in batch_items:
        text = processor.apply_chat_template(build_messages(format_user_text(it["question"], it["options"], fmt.instruction,
                                                                                  fmt.instruction_first)),
                                             add_generation_prompt=True, tokenize=False)
        enc = processor(text=[text], images=[it["image"]], return_tensors="pt").to(bench.device)
        enc["pixel_values"] = enc["pixel_values"].to(bench.dtype)
        out = model.generate(**enc, max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True)
        probs.append(out.scores[0][0, fmt.letter_ids].float().softmax(-1).cpu())
    return torch.stack(probs)


def bench_cfg(bench, model_dir="", **changes):
    cfg = resolve_config("local_gpu", env={}, verbose=False)
    size = bench.args.size * bench.args.size
    return dataclasses.replace(cfg, min_pixels=size, max_pixels=size, num_workers=bench.args.workers,
                               infer_batch_size=bench.args.batch, model_name_or_path=model_dir, **changes)


def uncompile_vision(model):
    """Undo compile_vision_elementwise (the bench compares with and without it on one model)."""
    for module in model.modules():
        module._compiled_call_impl = None
        vars(module).pop("_mcvqa_rotary", None)


def free(*objects):
    """Release GPU memory (the caller must drop its own references first)."""
    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------- (a), (b), (d)
def inference_rows(bench, name, processor, peak, with_pipeline=True):
    args = bench.args
    model = build_model(name, bench.device, bench.dtype, args.tiny)
    n_params = sum(p.numel() for p in model.parameters())
    cfg = bench_cfg(bench)
    fmt = make_prompt_format(processor, cfg)
    data = items(args.n, args.size)
    section = f"(a) inference {name}" if name.startswith("Qwen2.5") else f"(d) inference {name}"
    with torch.no_grad():
        seed_inference(bench, model, processor, fmt, data[:2])  # warm-up
        seed_s, _ = bench.timed(lambda: seed_inference(bench, model, processor, fmt, data[:args.n_seed]))
        seed_rate = args.n_seed / seed_s
        bench.row(section, "seed: 1 sample, processor + generate(max_new_tokens=1)", seed_rate)

        collator = VqaCollator(processor, fmt, cfg.min_pixels, cfg.max_pixels, encoding=CachedImageEncoding())
        batches = [collator(data[i:i + args.batch]) for i in range(0, args.n, args.batch)]
        tokens = sum(int(b["attention_mask"].sum()) for b in batches) / args.n
        lm_f, vis_f = lm_flops(model, batches), vision_flops(model, batches)

        def forward_all(bs):
            return [letter_logits(model, b, fmt.letter_ids, bench.device, bench.dtype) for b in bs]

        forward_all(batches[:1])
        if bench.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t, ref = bench.timed(lambda: forward_all(batches))
        bench.row(section, f"ours: batch {args.batch}, forward only, vision tower run (no cache)", args.n / t,
                  mfu=(lm_f + vis_f) / t / 1e12 / peak)
        uncached_rate = args.n / t
        patched = patch_vision_attention(model)
        forward_all(batches[:1])
        t_fast, fast = bench.timed(lambda: forward_all(batches))
        diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(fast, ref))
        bench.row(section, f"ours: batch {args.batch}, forward only, grouped vision attention ({patched} layers)",
                  args.n / t_fast, mfu=(lm_f + vis_f) / t_fast / 1e12 / peak, note=f"max |logit diff| vs stock {diff:.3g}")
        compile_vision_elementwise(model)
        t_compile, _ = bench.timed(lambda: forward_all(batches[:1]))
        t_comp, comp = bench.timed(lambda: forward_all(batches))
        diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(comp, ref))
        bench.row(section, f"ours: batch {args.batch}, forward only, grouped attention + compiled norms/MLP/rotary (default)",
                  args.n / t_comp, mfu=(lm_f + vis_f) / t_comp / 1e12 / peak,
                  note=f"max |logit diff| vs stock {diff:.3g}; first batch (compiling) {t_compile:.1f} s")
        bench.results[name + " fwd_default"] = args.n / t_comp
        uncompile_vision(model)
        unpatch_vision_attention(model)

        cache = FeatureCache()
        t_enc, cached_batches = bench.timed(lambda: [cache.attach(model, b) for b in batches])
        bench.row(section, "vision tower alone (filling the cache), stock attention", args.n / t_enc, unit="images/s",
                  mfu=vis_f / t_enc / 1e12 / peak)
        patch_vision_attention(model)
        cache_fast = FeatureCache()
        [cache_fast.attach(model, b) for b in batches[:1]]
        cache_fast = FeatureCache()
        t_enc_fast, _ = bench.timed(lambda: [cache_fast.attach(model, b) for b in batches])
        bench.row(section, "vision tower alone, grouped vision attention", args.n / t_enc_fast, unit="images/s",
                  mfu=vis_f / t_enc_fast / 1e12 / peak)
        compile_vision_elementwise(model)
        [FeatureCache().attach(model, b) for b in batches[:1]]
        t_enc_comp, _ = bench.timed(lambda: [FeatureCache().attach(model, b) for b in batches])
        bench.row(section, "vision tower alone, grouped attention + compiled norms/MLP/rotary (default)", args.n / t_enc_comp,
                  unit="images/s", mfu=vis_f / t_enc_comp / 1e12 / peak)
        uncompile_vision(model)
        unpatch_vision_attention(model)
        forward_all(cached_batches[:1])
        t_cached, got = bench.timed(lambda: forward_all(cached_batches))
        diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(got, ref))
        bench.row(section, f"ours: batch {args.batch}, forward only, cached image features", args.n / t_cached,
                  mfu=lm_f / t_cached / 1e12 / peak, note=f"max |logit diff| vs uncached {diff:.3g}")
        on_gpu = FeatureCache(device=bench.device)  # feature_cache_device=auto on a card of 60 GiB or more
        gpu_batches = [on_gpu.attach(model, b) for b in batches]
        forward_all(gpu_batches[:1])
        t_gpu, got = bench.timed(lambda: forward_all(gpu_batches))
        diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(got, ref))
        bench.row(section, f"ours: batch {args.batch}, forward only, cached image features kept on the GPU", args.n / t_gpu,
                  mfu=lm_f / t_gpu / 1e12 / peak, note=f"max |logit diff| vs uncached {diff:.3g}")
        del gpu_batches, on_gpu
        peak_mem = torch.cuda.max_memory_allocated() / 2**30 if bench.device == "cuda" else 0.0
    bench.results[name] = dict(params_b=n_params / 1e9, tokens=tokens, seed=seed_rate, fwd=uncached_rate,
                               fwd_cached=args.n / t_cached, fwd_cached_on_gpu=args.n / t_gpu, peak_mem_gib=peak_mem)
    print(f"[bench] {name}: {n_params / 1e9:.2f} B params, {tokens:.0f} tokens/sample, "
          f"{batches[0]['image_grid_thw'][0].tolist()} patch grid, peak {peak_mem:.1f} GiB", flush=True)
    if with_pipeline:
        # The pipeline's defaults on this card (run_fold): grouped attention, compiled elementwise work.
        patch_vision_attention(model)
        compile_vision_elementwise(model)
        pipeline_rows(bench, model, processor, fmt, section, seed_rate)
    return model


def pipeline_rows(bench, model, processor, fmt, section, seed_rate):
    """The pipeline's own predict_views (JPEG decoding, collation in DataLoader workers, batching)."""
    args = bench.args
    n = int(str(args.n_pipeline).split(",")[0])
    with tempfile.TemporaryDirectory() as folder:
        frame = frame_on_disk(n, args.size, folder)
        cfg1 = bench_cfg(bench, tta_option_views=1)
        predict_views(FoldContext(processor, fmt, cfg1, bench.hardware), model, frame.iloc[:args.batch], desc="warm-up")
        t_single, _ = bench.timed(lambda: predict_views(FoldContext(processor, fmt, cfg1, bench.hardware),
                                                        model, frame))
        bench.row(section, f"ours: predict_views, {n} rows, 1 view, no cache (JPEG decode + collate in workers)", n / t_single)
        bench.results["inference_speedup"] = (n / t_single) / seed_rate
        cache = FeatureCache()
        predict_views(FoldContext(processor, fmt, cfg1, bench.hardware, feature_cache=cache), model, frame)
        t_hit, _ = bench.timed(lambda: predict_views(FoldContext(processor, fmt, cfg1, bench.hardware,
                                                                 feature_cache=cache),
                                                     model, frame))
        bench.row(section, f"ours: predict_views, {n} rows, 1 view, features already cached", n / t_hit)
        bench.results["inference_speedup_cached"] = (n / t_hit) / seed_rate

        ensemble_rows(bench, model, processor, frame, t_single)


LAST = dict(instruction_first=False)  # the instruction after the options (the default before run 14)
ENSEMBLE_VARIANTS = {  # key: (what, settings, keep test batches across folds, features on the GPU)
    "ensemble_cost_unshared": ("every view in full, instruction last", dict(LAST, tta_shared_prefix=False), False, False),
    "ensemble_cost_loader_each_fold": ("shared prefix, loader every fold, features in RAM, instruction last "
                                       "(run 10's default)", LAST, False, False),
    "ensemble_cost_ram": ("shared prefix, batches kept across folds, features in RAM, instruction last", LAST, True, False),
    "ensemble_cost_instruction_last": ("shared prefix, batches kept, features on the GPU, instruction last", LAST,
                                       True, True),
    "ensemble_cost": ("shared prefix, batches kept, features on the GPU, instruction first (the defaults on this card)",
                      {}, True, True),
}


def ensemble_rows(bench, model, processor, frame, t_single, variants=tuple(ENSEMBLE_VARIANTS)):
    """(b) 3 folds x 4 option orders through the pipeline's predict_views, one empty cache per run (the
    ensemble pays for every image once), as run_fold calls it, per variant of ENSEMBLE_VARIANTS."""
    n = len(frame)
    reference = None
    for key in variants:
        what, changes, reuse, on_gpu = ENSEMBLE_VARIANTS[key]
        cfg4 = bench_cfg(bench, tta_option_views=4, **changes)
        fmt = make_prompt_format(processor, cfg4)

        def ensemble():
            cache = FeatureCache(device=bench.device if on_gpu else "cpu")
            for fold in range(3):  # 3 folds (one model here: the cost per fold is the same)
                t_fold, views = bench.timed(lambda: predict_views(FoldContext(processor, fmt, cfg4, bench.hardware,
                                                                              feature_cache=cache),
                                                                  model, frame, reuse_batches=reuse))
                print(f"[bench] {key} fold {fold}: {t_fold:.2f} s", flush=True)
            return cache, views

        t_ens, (cache, views) = bench.timed(ensemble)
        if key == "ensemble_cost" and bench.device == "cuda" and bench.args.profile_fold:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                predict_views(FoldContext(processor, fmt, cfg4, bench.hardware, feature_cache=cache),
                              model, frame, reuse_batches=True)
                torch.cuda.synchronize()
            averages = prof.key_averages()
            print(averages.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50))
            print(averages.table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=50), flush=True)
        diff = ""  # the same prompt scored another way must give the same probabilities (up to bf16 padding noise)
        if reference is None or reference[0] != cfg4.instruction_first:
            reference = (cfg4.instruction_first, key, views)
        else:
            diff = f"; max |prob diff| vs {reference[1]} {max(np.abs(views[v] - reference[2][v]).max() for v in views):.2g}"
        bench.row("(b) ensemble", f"3 folds x 4 option views, {what} ({n} rows)", n / t_ens,
                  note=f"{cache.encoded} images encoded for {12 * n} views; {t_ens / t_single:.2f}x one single-view "
                       f"pass{diff}")
        bench.results[key] = t_ens / t_single
        bench.results[key.replace("cost", "s")] = t_ens
    bench.results["single_s"] = t_single


def ensemble_only(bench, processor):
    """--part ensemble: the pipeline's inference alone on Qwen2.5-VL-3B with its defaults on the card
    (grouped + compiled tower): the seed rate, then per --n-pipeline size one single-view pass and the
    3-fold x 4-order ensemble (every variant for the first size, the default for the others)."""
    args = bench.args
    model = build_model("Qwen2.5-VL-3B", bench.device, bench.dtype, args.tiny)
    cfg1 = bench_cfg(bench, tta_option_views=1)
    fmt = make_prompt_format(processor, cfg1)
    data = items(args.n, args.size)
    with torch.no_grad():
        seed_inference(bench, model, processor, fmt, data[:2])  # warm-up
        seed_s, _ = bench.timed(lambda: seed_inference(bench, model, processor, fmt, data[:args.n_seed]))
    seed_rate = args.n_seed / seed_s
    bench.row("(b) ensemble", "seed: 1 sample, processor + generate(max_new_tokens=1)", seed_rate)
    patch_vision_attention(model)
    compile_vision_elementwise(model)
    sizes = [int(n) for n in str(args.n_pipeline).split(",")]
    for i, n in enumerate(sizes):
        with tempfile.TemporaryDirectory() as folder:
            frame = frame_on_disk(n, args.size, folder)
            predict_views(FoldContext(processor, fmt, cfg1, bench.hardware),
                          model, frame.iloc[:args.batch], desc="warm-up")
            t_single, _ = bench.timed(lambda: predict_views(FoldContext(processor, fmt, cfg1, bench.hardware),
                                                            model, frame))
            bench.row("(b) ensemble", f"one single-view pass, {n} rows, no cache (pipeline)", n / t_single,
                      note=f"{n / t_single / seed_rate:.1f}x the seed")
            variants = args.variants.split(",") if args.variants != "all" else tuple(ENSEMBLE_VARIANTS)
            ensemble_rows(bench, model, processor, frame, t_single, variants if i == 0 else ("ensemble_cost",))
            results = {k: bench.results.pop(k) for k in list(bench.results) if str(k).startswith(("ensemble_", "single_s"))}
            bench.results[f"{n} rows"] = dict(results, inference_speedup=n / t_single / seed_rate)


# ------------------------------------------------------------------------------------------- (c)
def training_rows(bench, model, processor):
    from peft import LoraConfig, get_peft_model

    args = bench.args
    cfg = bench_cfg(bench)
    fmt = make_prompt_format(processor, cfg)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=cfg.lora_target_modules,
                                             bias="none", task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    collator = VqaCollator(processor, fmt, cfg.min_pixels, cfg.max_pixels, encoding=CachedImageEncoding())
    data = items(args.n_train, args.size, seed=1, answers=True)
    section = "(c) training Qwen2.5-VL-3B"

    # Seed loop: batch 1, accumulation 4, causal-LM loss over the full vocabulary at every position.
    singles = [collator([it]) for it in data[:args.n_seed_train]]

    def seed_loop(batches):
        for i, b in enumerate(batches):
            inputs = {k: b[k].to(bench.device) for k in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw")}
            inputs["pixel_values"] = b["pixel_values"].to(bench.device, bench.dtype)
            loss = model(**inputs, labels=inputs["input_ids"]).loss / 4
            loss.backward()
            if (i + 1) % 4 == 0:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

    seed_loop(singles[:4])
    t_seed, _ = bench.timed(lambda: seed_loop(singles))
    seed_rate = len(singles) / t_seed
    bench.row(section, "seed: batch 1, accumulation 4, full-vocab loss over the full sequence", seed_rate)

    # Ours: micro-batches, loss from the answer position only (4 rows of the head read), cached features.
    micro = args.train_micro
    groups = [collator(data[i:i + micro]) for i in range(0, args.n_train, micro)]
    cache = FeatureCache()
    cached_groups = [cache.attach(model, g) for g in groups]

    def our_loop(batches, accum=2):
        for i, b in enumerate(batches):
            loss, _ = answer_loss(model, b, fmt.letter_ids, bench.device, bench.dtype)
            (loss / accum).backward()
            if (i + 1) % accum == 0:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

    for label, batches in (("no cache", groups), ("cached image features", cached_groups)):
        our_loop(batches[:2])
        t, _ = bench.timed(lambda: our_loop(batches))
        bench.row(section, f"ours: micro-batch {micro} x accumulation 2, answer-position loss, {label}", args.n_train / t)
        bench.results[f"train_{label}"] = args.n_train / t
    bench.results["training_speedup"] = bench.results["train_cached image features"] / seed_rate
    bench.results["train_seed"] = seed_rate
    model.unload()


# ------------------------------------------------------------------------------------------- (e)
def t4_budget(bench, name, processor_dir):
    """kaggle_t4x2 profile under a 15 GiB cap: fp16, 4-bit NF4 weights, LoRA, gradient checkpointing."""
    args = bench.args
    folder = pathlib.Path(tempfile.mkdtemp(prefix="bench_model_"))
    if bench.device == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0)  # the full-precision random model is built uncapped
    model = build_model(name, bench.device, torch.float16 if not args.tiny else torch.float32, args.tiny)
    model.save_pretrained(folder)
    del model
    free()
    hardware = (choose_hardware([], flash_attn_installed=False) if args.tiny
                else choose_hardware(describe_gpus(), dtype="float16", flash_attn_installed=False))
    cfg = dataclasses.replace(resolve_config("kaggle_t4x2", env={}, verbose=False), model_name_or_path=str(folder),
                              min_pixels=args.size * args.size, max_pixels=args.size * args.size)
    cap = 15 * 2**30
    if bench.device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(cap / total)
        torch.cuda.reset_peak_memory_stats()
    model = load_model_for_training(cfg, hardware)
    shutil.rmtree(folder)
    loaded = torch.cuda.memory_allocated() / 2**30 if bench.device == "cuda" else 0.0
    processor = AutoProcessor.from_pretrained(processor_dir)
    fmt = make_prompt_format(processor, cfg)
    collator = VqaCollator(processor, fmt, cfg.min_pixels, cfg.max_pixels, encoding=CachedImageEncoding())
    autocast = (torch.autocast("cuda", dtype=torch.float16) if bench.device == "cuda"
                else torch.autocast("cpu", enabled=False))
    out = {"loaded_gib": loaded}
    print(f"[t4] {name}: model loaded (4-bit NF4 LM, fp32 vision tower, LoRA) {loaded:.2f} GiB", flush=True)

    def probe(kind, sizes, step, cached):
        best = None
        for size in sizes:
            batch = collator(items(size, args.size, seed=size, answers=kind.startswith("train")))
            try:
                if cached:  # steady state: features already in the cache (encoded in an earlier epoch/fold)
                    with torch.no_grad(), autocast:
                        batch = cache.attach(model, batch)
                if bench.device == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                t, _ = bench.timed(lambda: step(batch))
                peak = torch.cuda.max_memory_allocated() / 2**30 if bench.device == "cuda" else 0.0
                best = (size, peak, size / t)
                print(f"[t4] {name} {kind}: batch {size} fits, peak {peak:.2f} GiB, {size / t:.1f} samples/s (H200)", flush=True)
            except torch.OutOfMemoryError:
                print(f"[t4] {name} {kind}: batch {size} out of memory under the 15 GiB cap", flush=True)
                model.zero_grad(set_to_none=True)
                break
            finally:
                del batch
                gc.collect()
        out[kind] = best
        return best

    cache = FeatureCache()
    model.train()

    def train_step(batch):
        with autocast:
            loss, _ = answer_loss(model, batch, fmt.letter_ids, bench.device, torch.float32)
        loss.backward()
        model.zero_grad(set_to_none=True)

    sizes = [1, 2] if args.tiny else [1, 2, 4, 8, 16, 32, 64]
    probe("train, no cache", sizes, train_step, False)
    probe("train, cached features", sizes, train_step, True)
    model.eval()

    def infer(batch):
        with torch.no_grad(), autocast:
            letter_logits(model, batch, fmt.letter_ids, bench.device, torch.float32)

    isizes = [2, 4] if args.tiny else [4, 8, 16, 32, 64, 128]
    probe("inference, no cache", isizes, infer, False)
    probe("inference, cached features", isizes, infer, True)
    bench.results[f"t4 {name}"] = out
    del model, cache
    free()


# --------------------------------------------------------------------------------------------- main
def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["main", "t4", "ensemble", "forward"], default="main")
    parser.add_argument("--models", default="Qwen2.5-VL-3B,Qwen3-VL-8B", help="--part forward: which models")
    parser.add_argument("--assets", default=".bench_assets")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test of the script with tiny models")
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--n-seed", type=int, default=32)
    parser.add_argument("--n-train", type=int, default=128)
    parser.add_argument("--n-seed-train", type=int, default=32)
    parser.add_argument("--train-micro", type=int, default=16)
    parser.add_argument("--n-pipeline", default="512", help="test rows of the pipeline and ensemble rows (--part ensemble: "
                        "a comma-separated list of sizes)")
    parser.add_argument("--variants", default="all", help="--part ensemble: ENSEMBLE_VARIANTS keys for the first size")
    parser.add_argument("--profile-fold", action="store_true", help="torch.profiler tables of one cached ensemble fold")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--skip-8b", action="store_true")
    parser.add_argument("--t4-models", default="Qwen2.5-VL-3B,Qwen3-VL-8B")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    bench = Bench(args)
    assets = pathlib.Path(args.assets)
    missing = [m[2] for n, m in MODELS.items() if n not in GEMMA4_MODELS  # the parts here run Qwen models only
               and not (assets / m[2] / "tokenizer_config.json").exists()]
    if missing:
        raise SystemExit(f"{assets}: processors {sorted(set(missing))} missing. Fix: python bench/bench_profiles.py "
                         "--prepare (copies them from ../shared/qwen_tokenizers), then carry .bench_assets")
    started = time.time()
    if bench.device == "cuda":
        print(f"[bench] {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    import transformers
    print(f"[bench] transformers {transformers.__version__}, part {args.part}", flush=True)
    if args.part == "forward":  # (a)/(d) forward and tower rows alone, per model
        peak = matmul_peak_tflops(bench.device, bench.dtype)
        print(f"[bench] bf16 matmul peak {peak:.0f} TFLOP/s", flush=True)
        for name in args.models.split(","):
            free(inference_rows(bench, name, AutoProcessor.from_pretrained(assets / MODELS[name][2]), peak,
                                with_pipeline=False))
    elif args.part == "t4":
        for name in args.t4_models.split(","):
            t4_budget(bench, name, assets / MODELS[name][2])
    elif args.part == "ensemble":
        ensemble_only(bench, AutoProcessor.from_pretrained(assets / MODELS["Qwen2.5-VL-3B"][2]))
        for n, r in bench.results.items():
            print(f"{n}: inference speedup {r['inference_speedup']:.1f}x, ensemble cost {r['ensemble_cost']:.2f}x "
                  f"({', '.join(f'{k} {v:.2f}x' for k, v in r.items() if k.startswith('ensemble_cost_'))})")
    else:
        peak = matmul_peak_tflops(bench.device, bench.dtype)
        bench.results["peak_tflops"] = peak
        print(f"[bench] bf16 matmul peak {peak:.0f} TFLOP/s", flush=True)
        processor = AutoProcessor.from_pretrained(assets / MODELS["Qwen2.5-VL-3B"][2])
        model = inference_rows(bench, "Qwen2.5-VL-3B", processor, peak)
        training_rows(bench, model, processor)
        del model
        free()
        if not args.skip_8b:
            processor3 = AutoProcessor.from_pretrained(assets / MODELS["Qwen3-VL-8B"][2])
            free(inference_rows(bench, "Qwen3-VL-8B", processor3, peak, with_pipeline=False))
        r = bench.results
        print(f"\ninference speedup: {r['inference_speedup']:.1f}x (pipeline, 1 view, no cache; "
              f"{r['inference_speedup_cached']:.1f}x with cached features)")
        print(f"training speedup: {r['training_speedup']:.1f}x")
        print(f"ensemble cost: {r['ensemble_cost']:.1f}x")
    print("| section | approach | rate | MFU | note |\n|---|---|---|---|---|")
    for section, name, rate, unit, mfu, note in bench.rows:
        print(f"| {section} | {name} | {rate:.1f} {unit} | {'' if mfu is None else f'{100 * mfu:.1f} %'} | {note} |")
    print(json.dumps(bench.results, default=str))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"rows": bench.rows, "results": bench.results}, default=str, indent=1))
    print(f"[bench] part {args.part} done in {time.time() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
