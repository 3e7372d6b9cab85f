"""GPU benchmark: direct-logit batched scoring vs the seed notebook's one-sample `generate` approach.

Full-size Qwen2.5-VL-3B architecture with random weights (sizes from the published config), the real
Qwen2.5-VL processor and tokenizer (copied from ../shared/qwen_tokenizers into .bench_assets/), Korean
prompts, 384x384 images. Prints one table; run on one H100/H200:

    python bench/bench_inference.py --processor .bench_assets/Qwen2.5-VL-7B-Instruct
"""

import argparse
import dataclasses
import sys
import time

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

sys.path.insert(0, ".")
from mcvqa.collate import VqaCollator  # noqa: E402
from mcvqa.config import resolve_config  # noqa: E402
from mcvqa.prompts import build_messages, format_user_text, make_prompt_format  # noqa: E402
from mcvqa.scoring import letter_logits  # noqa: E402

QWEN25_VL_3B = dict(
    text_config=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                     num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                     tie_word_embeddings=True),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                       window_size=112, fullatt_block_indexes=[7, 15, 23, 31], patch_size=14),
    tie_word_embeddings=True,
)


def matmul_peak_tflops():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (time.perf_counter() - t) / 1e12


def items(n, size, rng):
    out = []
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        out.append({"row": i, "perm": (0, 1, 2, 3), "image": img, "answer": -1,
                    "question": "이 그림에서 빨간색 도형은 몇 개입니까? 그림을 잘 보고 답하세요.",
                    "options": ["한 개", "두 개", "세 개", "네 개"]})
    return out


def seed_approach(model, processor, fmt, batch_items):
    """One sample at a time: processor + generate(max_new_tokens=1, output_scores=True), letters read."""
    probs = []
    for it in batch_items:
        text = processor.apply_chat_template(build_messages(format_user_text(it["question"], it["options"], fmt.instruction)),
                                             add_generation_prompt=True, tokenize=False)
        enc = processor(text=[text], images=[it["image"]], return_tensors="pt").to("cuda")
        enc["pixel_values"] = enc["pixel_values"].to(torch.bfloat16)
        out = model.generate(**enc, max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True)
        probs.append(out.scores[0][0, fmt.letter_ids].float().softmax(-1).cpu())
    return torch.stack(probs)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--processor", required=True)
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=384)
    args = parser.parse_args()
    torch.manual_seed(0)
    processor = AutoProcessor.from_pretrained(args.processor)
    cfg = resolve_config("local_gpu", env={}, verbose=False)
    cfg = dataclasses.replace(cfg, min_pixels=args.size * args.size, max_pixels=args.size * args.size)
    fmt = make_prompt_format(processor, cfg)
    config = Qwen2_5_VLConfig(**QWEN25_VL_3B, image_token_id=151655, video_token_id=151656,
                              vision_start_token_id=151652, vision_end_token_id=151653)
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16).eval()
    n_params = sum(p.numel() for p in model.parameters())
    peak = matmul_peak_tflops()
    rng = np.random.default_rng(0)
    data = items(args.n, args.size, rng)
    collator = VqaCollator(processor, fmt, cfg.min_pixels, cfg.max_pixels)
    rows = []
    with torch.no_grad():
        seed_approach(model, processor, fmt, data[:2])  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        ref = seed_approach(model, processor, fmt, data[:32])
        torch.cuda.synchronize()
        seed_rate = 32 / (time.perf_counter() - t)
        rows.append(("seed: 1 sample, generate(max_new_tokens=1)", seed_rate, None))
        batches = [collator(data[i:i + args.batch]) for i in range(0, args.n, args.batch)]
        letter_logits(model, batches[0], fmt.letter_ids, "cuda", torch.bfloat16)
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        t = time.perf_counter()
        ours_probs = []
        for i in range(0, args.n, args.batch):
            batch = collator(data[i:i + args.batch])
            ours_probs.append(letter_logits(model, batch, fmt.letter_ids, "cuda", torch.bfloat16).softmax(-1).cpu())
        torch.cuda.synchronize()
        ours_rate = args.n / (time.perf_counter() - t)
        rows.append((f"ours: batch {args.batch}, direct logits, incl. preprocessing", ours_rate, None))
        torch.cuda.synchronize()
        t = time.perf_counter()
        for batch in batches:
            letter_logits(model, batch, fmt.letter_ids, "cuda", torch.bfloat16)
        torch.cuda.synchronize()
        fwd_s = time.perf_counter() - t
        fwd_rate = args.n / fwd_s
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        patches = sum(int(b["pixel_values"].shape[0]) for b in batches)
        vis_params = sum(p.numel() for p in model.model.visual.parameters())
        flops = 2 * (n_params - vis_params) * tokens + 2 * vis_params * patches
        mfu = flops / fwd_s / 1e12 / peak
        rows.append((f"ours: forward only (batch {args.batch})", fwd_rate, mfu))
        agree = (torch.cat(ours_probs)[:32].argmax(1) == ref.argmax(1)).float().mean().item()
    print(f"\ncard {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 matmul peak {peak:.0f} TFLOP/s, "
          f"params {n_params / 1e9:.2f} B, {tokens / args.n:.0f} tokens/sample, peak mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print("| approach | samples/s | MFU |\n|---|---|---|")
    for name, rate, m in rows:
        print(f"| {name} | {rate:.1f} | {'' if m is None else f'{100 * m:.0f} %'} |")
    print(f"inference speedup: {ours_rate / seed_rate:.1f}x (forward only {fwd_rate / seed_rate:.1f}x); "
          f"argmax agreement with the seed approach: {agree:.3f}")


if __name__ == "__main__":
    main()
