"""Where the Qwen2.5-VL-3B pipeline spends its time on a GPU (issue 5), and its end-to-end inference rates.

    python bench/profile_tower.py --parts tower     # top CUDA kernels of one tower pass; torch.compile variants
    python bench/profile_tower.py --parts pipeline  # seed vs the pipeline's single-view pass and 3x4 ensemble
    python bench/profile_tower.py --parts sync      # one cached ensemble fold under torch.profiler: loader wait, syncs
    python bench/profile_tower.py --tiny --assets ../shared/qwen_tokenizers --n 8 --batch 4 --size 112 \
        --workers 0 --pipeline-n 8                   # CPU smoke test of the script

`pipeline` is the end-to-end measurement (512 test rows on disk as JPEG, the pipeline's own
`predict_views` with its defaults on the card: grouped attention + compiled tower, feature cache,
shared-prefix TTA), next to the seed approach measured in the same call; `bench_gpu.py` has the
forward-only, MFU, training, Qwen3-VL-8B and T4-budget rows.
"""

import argparse
import pathlib
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench_gpu import MODELS, Bench, bench_cfg, build_model, frame_on_disk, items, uncompile_vision  # noqa: E402
from mcvqa.speed.feature_cache import CachedImageEncoding  # noqa: E402
from mcvqa.core.collate import VqaCollator, cyclic_views  # noqa: E402
from mcvqa.speed.fast_vision import compile_vision_elementwise, patch_vision_attention  # noqa: E402
from mcvqa.speed.feature_cache import FeatureCache  # noqa: E402
from mcvqa.core.prompts import make_prompt_format  # noqa: E402
from mcvqa.core.collate import make_loader  # noqa: E402
from mcvqa.core.modeling import unwrap_vlm  # noqa: E402
from mcvqa.core.scoring import letter_logits  # noqa: E402
from mcvqa.core.training import FoldContext  # noqa: E402
from transformers import AutoProcessor  # noqa: E402


def tower_pass(model, batches):
    cache = FeatureCache()
    return [f.embeds for b in batches for f in cache.attach(model, b)["image_features"]]


def timed(bench, fn, repeat=3):
    fn()
    best = float("inf")
    for _ in range(repeat):
        t, out = bench.timed(fn)
        best = min(best, t)
    return best, out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--assets", default=".bench_assets")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--pipeline-n", type=int, default=512)
    parser.add_argument("--parts", default="tower,pipeline", help="tower, pipeline, sync (comma-separated)")
    parser.add_argument("--n", type=int, default=128)
    args = parser.parse_args()
    args.n_seed = 2
    bench = Bench(args)
    processor = AutoProcessor.from_pretrained(pathlib.Path(args.assets) / MODELS["Qwen2.5-VL-3B"][2])
    model = build_model("Qwen2.5-VL-3B", bench.device, bench.dtype, args.tiny)
    patch_vision_attention(model)
    cfg = bench_cfg(bench, tta_option_views=1)
    fmt = make_prompt_format(processor, cfg)
    collator = VqaCollator(processor, fmt, cfg.min_pixels, cfg.max_pixels, encoding=CachedImageEncoding())
    data = items(args.n, args.size)
    batches = [collator(data[i:i + args.batch]) for i in range(0, args.n, args.batch)]

    if "tower" in args.parts:
        tower_profile(bench, model, batches, args)
    if "pipeline" in args.parts:
        pipeline_variants(bench, model, processor, fmt, args)
    if "sync" in args.parts:
        sync_profile(bench, model, processor, fmt, args)


def sync_profile(bench, model, processor, fmt, args):
    """Where the main thread waits in an ensemble fold whose features are cached: the top CPU-side
    ops, and the Python frames that force a GPU sync (.item(), .tolist(), nonzero, device-to-host copies)."""
    import dataclasses
    from mcvqa.core.inference import predict_views

    n = args.batch * 4
    cfg4 = dataclasses.replace(bench_cfg(bench, tta_option_views=4))
    with tempfile.TemporaryDirectory() as folder:
        frame = frame_on_disk(n, args.size, folder)
        cache = FeatureCache()
        predict_views(FoldContext(processor, fmt, cfg4, bench.hardware, feature_cache=cache),
                      model, frame)  # fills the cache
        t, _ = bench.timed(lambda: predict_views(FoldContext(processor, fmt, cfg4, bench.hardware, feature_cache=cache),
                                                 model, frame))
        print(f"[sync] cached fold, {n} rows: {t:.2f} s", flush=True)
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.device == "cuda" else [])
        with profile(activities=activities, with_stack=True) as prof:
            predict_views(FoldContext(processor, fmt, cfg4, bench.hardware, feature_cache=cache), model, frame)
            bench.sync()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=45), flush=True)
    # Calls that make the CPU wait for the GPU (their Python call sites are not recorded on CUDA builds here).
    waits = ("cudaStreamSynchronize", "cudaMemcpyAsync", "cudaDeviceSynchronize", "aten::_local_scalar_dense",
             "aten::nonzero", "aten::item")
    for event in prof.key_averages():
        if event.key in waits:
            print(f"[sync] {event.key} x{event.count}, {event.cpu_time_total / 1000:.1f} ms", flush=True)


def tower_profile(bench, model, batches, args):
    visual = unwrap_vlm(model).model.visual
    with torch.no_grad():
        t_ref, ref = timed(bench, lambda: tower_pass(model, batches))
        print(f"[tower] grouped attention: {args.n / t_ref:.1f} images/s", flush=True)
        if not args.tiny:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                tower_pass(model, batches[:1])
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60), flush=True)

        # Fuse the elementwise work: the pipeline's way (norms, MLP, rotary) and whole blocks (attention too).
        variants = {"compile norms + mlp + rotary (compile_vision_elementwise)": compile_vision_elementwise,
                    "compile whole blocks": lambda m: [blk.compile(dynamic=True) for blk in visual.blocks]}
        for name, apply in variants.items():
            try:
                apply(model)
                start = time.perf_counter()
                tower_pass(model, batches[:1])
                compile_s = time.perf_counter() - start
                t, got = timed(bench, lambda: tower_pass(model, batches))
                diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(got, ref))
                scale = max(float(a.float().abs().max()) for a in ref)
                print(f"[tower] {name}: {args.n / t:.1f} images/s ({t_ref / t:.2f}x), first call {compile_s:.0f} s, "
                      f"max |diff| {diff:.3g} (values up to {scale:.3g})", flush=True)
            except Exception as error:  # a diagnostic: report and go on
                print(f"[tower] {name}: failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
            uncompile_vision(model)


def pipeline_variants(bench, model, processor, fmt, args):
    """The pipeline's single-view pass and 3-fold x 4-order ensemble under loader/batch variants."""
    import dataclasses
    from bench_gpu import seed_inference
    from mcvqa.core.inference import predict_views

    compile_vision_elementwise(model)  # the default on sm80+
    n = args.pipeline_n
    with torch.no_grad():
        data = items(66, args.size)
        seed_inference(bench, model, processor, fmt, data[:2])
        t_seed, _ = bench.timed(lambda: seed_inference(bench, model, processor, fmt, data[2:]))
    t_seed /= 2  # per 32 rows
    print(f"[pipeline] seed: {32 / t_seed:.1f} rows/s (64 rows)", flush=True)
    variants = {"default": {}, "pin_memory on": dict(pin_memory=True)}
    with tempfile.TemporaryDirectory() as folder:
        frame = frame_on_disk(n, args.size, folder)
        for name, change in variants.items():
            cfg1 = dataclasses.replace(bench_cfg(bench, tta_option_views=1), **change)
            cfg4 = dataclasses.replace(bench_cfg(bench, tta_option_views=4), **change)
            predict_views(FoldContext(processor, fmt, cfg1, bench.hardware),
                          model, frame.iloc[:args.batch], desc="warm-up")
            t1, _ = bench.timed(lambda: predict_views(FoldContext(processor, fmt, cfg1, bench.hardware), model, frame))
            cache = FeatureCache()
            folds = []
            for _ in range(3):
                t, _ = bench.timed(lambda: predict_views(FoldContext(processor, fmt, cfg4, bench.hardware,
                                                                     feature_cache=cache),
                                                         model, frame))
                folds.append(t)
            print(f"[pipeline] {name}: single pass {n / t1:.1f} rows/s ({t_seed / 32 * n / t1:.1f}x seed); ensemble "
                  f"{sum(folds):.1f} s (folds {', '.join(f'{t:.1f}' for t in folds)}) = {sum(folds) / t1:.2f}x", flush=True)

if __name__ == "__main__":
    main()
