"""First estimates of a full Kaggle-size run per model and card, from the product's own planning code.

For each (profile, model) it saves the model's config (no weights) to a temporary folder, resolves the
profile's settings, runs the memory plan for the card (`plan_memory`: quantization=auto's choice, checkpointing,
batch sizes) and the FLOP estimate the time budget is checked against (`preflight.estimate_hours`), for the
competition's size: 3,887 train + 3,887 test rows, 3 folds, 2 epochs, the profile's option orders. CPU only;
the README's model guide and BENCHMARKS.md quote its table.

    python bench/estimate_runs.py
"""

import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_gpu import model_config  # noqa: E402

from mcvqa.runkit import preflight  # noqa: E402
from mcvqa.core.config import resolve_config  # noqa: E402
from mcvqa.core.hardware import choose_hardware  # noqa: E402
from mcvqa.core.memory import plan_memory  # noqa: E402

CARDS = {"kaggle_t4x2": ([{"name": "Tesla T4", "capability": (7, 5), "memory_gib": 15.0}] * 2, "2x T4 (15 GiB, fp16)"),
         "colab_a100": ([{"name": "NVIDIA A100-SXM4-40GB", "capability": (8, 0), "memory_gib": 39.5}], "A100 40 GB"),
         "local_gpu": ([{"name": "NVIDIA A100-SXM4-80GB", "capability": (8, 0), "memory_gib": 80.0}], "A100 80 GB")}
RUNS = [("kaggle_t4x2", "Qwen2.5-VL-3B", []), ("kaggle_t4x2", "Qwen3-VL-8B", []), ("kaggle_t4x2", "Qwen3.5-4B", []),
        ("kaggle_t4x2", "Qwen3.5-9B", []), ("colab_a100", "Qwen2.5-VL-7B", []), ("colab_a100", "Qwen3.5-9B", []),
        ("colab_a100", "Qwen3.5-27B", []), ("local_gpu", "Qwen3.5-27B", ["micro_batch_size=16", "grad_accum_steps=1"]),
        ("kaggle_t4x2", "Gemma-4-E2B", []), ("kaggle_t4x2", "Gemma-4-E4B", []), ("colab_a100", "Gemma-4-31B", [])]
N_TRAIN = N_TEST = 3887


def estimate(profile, name, overrides, folder):
    config, _, _ = model_config(name, tiny=False)
    config.save_pretrained(folder)
    gpus, card = CARDS[profile]
    cfg = resolve_config(profile, [f"model_name_or_path={folder}", "epochs=2", *overrides], env={}, verbose=False)
    hardware = choose_hardware(gpus, dtype="float16" if profile == "kaggle_t4x2" else "auto", flash_attn_installed=False)
    try:
        cfg, plan = plan_memory(cfg, hardware, verbose=False)
    except ValueError as error:
        return f"| {name} | {card} | does not fit: {str(error).split('. Fix')[0]} | | | |"
    (low, high), _ = preflight.estimate_hours(cfg, hardware, plan, n_train=N_TRAIN, n_test=N_TEST,
                                              n_images=N_TRAIN + N_TEST, n_folds=3, workers=len(gpus))
    precision = {"nf4": "NF4 (QLoRA)", "none": "16-bit LoRA"}[plan["quantization"]]
    return (f"| {name} | {card} | {precision} | {plan['weights_gib']:.1f} GiB | micro-batch {plan['micro_batch_size']} "
            f"x {plan['grad_accum_steps']}, checkpointing {plan['gradient_checkpointing']} | {low:.1f}-{high:.1f} h |")


def main():
    print("| model | card | quantization=auto | weights + LoRA state | plan | full run, first estimate |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for k, (profile, name, overrides) in enumerate(RUNS):
            print(estimate(profile, name, overrides, pathlib.Path(tmp) / str(k)), flush=True)


if __name__ == "__main__":
    main()
