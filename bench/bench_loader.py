"""The data loader alone, on the CPU (issue 5): where a `predict_views` pass waits before the GPU works.

    python bench/bench_loader.py --processor .bench_assets/Qwen2.5-VL-7B-Instruct   # on the GPU host
    python bench/bench_loader.py --processor ../shared/qwen_tokenizers/Qwen2.5-VL-7B-Instruct --n 64 --workers 0,2

For each loader the pipeline makes at test time (one view per row with no cache; the 4 option views
of a row when the feature cache already holds every image) it times the first batch (worker start-up
plus one batch) and the whole pass, per worker count and multiprocessing start method. No model, no GPU.
"""

import argparse
import dataclasses
import multiprocessing
import os
import pathlib
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench_gpu import frame_on_disk  # noqa: E402
from mcvqa.core.collate import cyclic_perms  # noqa: E402
from mcvqa.core.config import resolve_config  # noqa: E402
from mcvqa.speed.feature_cache import FeatureCache  # noqa: E402
from mcvqa.core.prompts import make_prompt_format  # noqa: E402
from mcvqa.core.collate import loader_encoding, make_loader  # noqa: E402
from transformers import AutoProcessor  # noqa: E402


def time_pass(loader):
    """(seconds to the first batch, seconds for the whole pass, batches)."""
    start = time.perf_counter()
    first, count = None, 0
    for _ in loader:
        count += 1
        if first is None:
            first = time.perf_counter() - start
    return first, time.perf_counter() - start, count


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--processor", required=True)
    parser.add_argument("--n", type=int, default=512, help="test rows")
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--batch", type=int, default=32, help="rows per batch")
    parser.add_argument("--workers", default="0,2,8")
    parser.add_argument("--contexts", default="default,fork", help="multiprocessing start methods to compare")
    args = parser.parse_args()
    print(f"[loader] python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"default start method {multiprocessing.get_start_method()}", flush=True)
    processor = AutoProcessor.from_pretrained(args.processor)
    cfg = dataclasses.replace(resolve_config("local_gpu", env={}, verbose=False), min_pixels=args.size ** 2,
                              max_pixels=args.size ** 2, infer_batch_size=args.batch)
    fmt = make_prompt_format(processor, cfg)
    with tempfile.TemporaryDirectory() as folder:
        frame = frame_on_disk(args.n, args.size, folder)
        single = [(row, (0, 1, 2, 3)) for row in range(args.n)]
        four = [(row, perm) for row in range(args.n) for perm in cyclic_perms(4)]
        # A cache that knows every image: what folds 2 and 3 see (the keys are all the loader asks for).
        warm = FeatureCache()
        for batch in make_loader(frame, single, processor, fmt, cfg, args.batch, workers=0,
                                 encoding=FeatureCache().encoding()):
            warm.store.update({key: None for key in batch["image_keys"]})
        cases = [("1 view, no cache", single, args.batch, None), ("4 views, all cached", four, 4 * args.batch, warm)]
        print("| loader | workers | start method | first batch | whole pass | per row |")
        print("|---|---|---|---|---|---|")
        for name, views, batch_size, cache in cases:
            for workers in [int(w) for w in args.workers.split(",")]:
                for context in args.contexts.split(",") if workers else ["-"]:
                    loader = make_loader(frame, views, processor, fmt, cfg, batch_size, workers=workers,
                                         encoding=loader_encoding(cache, dedupe_images=True), pixel_dtype=torch.bfloat16)
                    if context not in ("default", "-"):
                        loader.multiprocessing_context = context
                    first, total, _ = time_pass(loader)
                    print(f"| {name} | {workers} | {context} | {first * 1000:.0f} ms | {total:.2f} s | "
                          f"{total / args.n * 1000:.2f} ms |", flush=True)


if __name__ == "__main__":
    main()
