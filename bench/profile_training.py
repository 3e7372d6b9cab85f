"""Where the kaggle_t4x2 training step spends its time: the product's own `train_fold` on a full-size
random-weight Qwen2.5-VL-3B under the T4 settings (15 GiB cap, fp16, NF4), image features already cached
(as in every fold after the first), timed for a few setting variants, then one torch.profiler table.

    python bench/profile_training.py --variants "default;gradient_checkpointing=off micro_batch_size=2 grad_accum_steps=8"
"""

import argparse
import dataclasses
import gc
import pathlib
import shutil
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_profiles import CARD, build_model_folder, load_like_the_product, make_competition  # noqa: E402
from mcvqa.core.collate import identity_views  # noqa: E402
from mcvqa.speed.feature_cache import make_feature_cache  # noqa: E402
from mcvqa.core.collate import loader_encoding, make_loader  # noqa: E402
from mcvqa.core.hardware import compute_autocast  # noqa: E402
from mcvqa.core.modeling import tower_dtype  # noqa: E402
from mcvqa.core.training import FoldContext, train_fold  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="Qwen2.5-VL-3B")
    parser.add_argument("--profile", default="kaggle_t4x2")
    parser.add_argument("--variants", default="default", help="';'-separated override sets ('default': none)")
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--work", default="/tmp/bench_profiles")
    parser.add_argument("--assets", default=str(ROOT / ".bench_assets"))
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--torch-profile", action="store_true")
    args = parser.parse_args()
    work = pathlib.Path(args.work)
    data = make_competition(work / "data", max(192, args.rows + 32), 16)
    model_dir = build_model_folder(args.model, pathlib.Path(args.assets), work / "models" / args.model, args.tiny)
    base = [f"data_dir={data}", f"model_name_or_path={model_dir}", "epochs=1", "evals_per_epoch=1",
            "checkpoint_every_steps=100000", f"max_train_rows={args.rows + 16}", *([] if args.tiny else CARD[args.profile])]
    if args.tiny:
        base += ["num_workers=0", "min_pixels=3136", "max_pixels=12544"]
    for k, variant in enumerate(args.variants.split(";")):
        extra = [] if variant.strip() == "default" else variant.split()
        cfg, hardware, train, processor, fmt, model = load_like_the_product(args.profile, base + extra)
        cache = make_feature_cache(cfg, model, hardware, verbose=False)
        part, val = train.iloc[:args.rows].reset_index(drop=True), train.iloc[args.rows:].reset_index(drop=True)
        with torch.no_grad(), compute_autocast(hardware):  # every image encoded once, as folds 1-2 find them
            for batch in make_loader(part, identity_views(len(part)), processor, fmt, cfg, 16, encoding=loader_encoding(cache),
                                     pixel_dtype=tower_dtype(model)):
                cache.attach(model, batch)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        shutil.rmtree(work / f"prof_{k}", ignore_errors=True)
        shutil.rmtree(work / "prof_torch", ignore_errors=True)
        result = train_fold(FoldContext(processor, fmt, cfg, hardware, feature_cache=cache, fold=0,
                                        fold_dir=work / f"prof_{k}"),
                            model, part, val)
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        print(f"[bench] variant {variant!r}: checkpointing {cfg.gradient_checkpointing}, micro {cfg.micro_batch_size} x "
              f"{cfg.grad_accum_steps}: {result['samples_trained'] / result['train_s']:.2f} samples/s "
              f"({result['train_s']:.1f} s), peak {peak:.2f} GiB, micro-batch at the end {result['final_micro_batch']}",
              flush=True)
        if args.torch_profile and k == 0:
            activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                                   if torch.cuda.is_available() else [])
            with torch.profiler.profile(activities=activities) as prof:
                started = time.perf_counter()
                train_fold(FoldContext(processor, fmt, dataclasses.replace(cfg, evals_per_epoch=0), hardware,
                                       feature_cache=cache, fold=1, fold_dir=work / "prof_torch"),
                           model, part.iloc[:48], val.iloc[:4])
            print(f"[bench] profiled 48 samples in {time.perf_counter() - started:.1f} s")
            sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=sort, row_limit=22, max_name_column_width=60))
        del model, cache, result
        gc.collect()  # the peft model holds reference cycles: the next variant's load needs its memory back
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
