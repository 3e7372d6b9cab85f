"""GPU benchmark: 2 folds one after the other vs in parallel (one worker per GPU); sharded vs one-GPU inference.

Runs the generated notebook's own code cells as a script (from a folder where the mcvqa package is not
importable, as on Kaggle), once with `parallel_folds=off` and once with `parallel_folds=auto`, on the
demo data and a mid-size Qwen2.5-VL with random weights (the real Qwen2.5-VL processor from
.bench_assets/), then checks that inference sharded over the GPUs gives the same probabilities as one
GPU. Run on a machine with 2+ GPUs from the repo root:

    python bench/bench_parallel.py --processor .bench_assets/Qwen2.5-VL-7B-Instruct --work /tmp/bench
"""

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, ".")
from mcvqa.core.config import Config  # noqa: E402
from mcvqa.demo.demo_data import generate_demo_dataset  # noqa: E402
from mcvqa.core.hardware import detect_hardware  # noqa: E402
from mcvqa.core.inference import predict_views  # noqa: E402
from mcvqa.core.modeling import load_model_for_training, load_processor, load_trainable_state  # noqa: E402
from mcvqa.scale.parallel import worker_slots  # noqa: E402
from mcvqa.scale.sharded import predict_views_sharded  # noqa: E402
from mcvqa.pipeline import load_competition  # noqa: E402
from mcvqa.core.prompts import make_prompt_format  # noqa: E402
from mcvqa.core.training import FoldContext  # noqa: E402

# A mid-size Qwen2.5-VL: the 3B's widths with fewer layers (about 1.4 B parameters), random weights.
MID_QWEN25_VL = dict(
    text_config=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=12,
                     num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                     tie_word_embeddings=True),
    vision_config=dict(depth=8, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                       window_size=112, fullatt_block_indexes=[3, 7], patch_size=14),
    tie_word_embeddings=True,
)


def build_model(processor_dir, out_dir):
    from transformers import AutoProcessor, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    out_dir = pathlib.Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(**MID_QWEN25_VL, image_token_id=151655, video_token_id=151656,
                              vision_start_token_id=151652, vision_end_token_id=151653)
    with torch.device("cuda"):
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    print(f"[bench] model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, random weights")
    model.save_pretrained(out_dir)
    AutoProcessor.from_pretrained(processor_dir).save_pretrained(out_dir)
    del model
    torch.cuda.empty_cache()
    return out_dir


def notebook_script(profile, overrides):
    """The generated notebook's code cells as one script (papermill's parameter injection, no display cell)."""
    notebook = json.loads(pathlib.Path("Kaggle_AllInOne_Pro.ipynb").read_text(encoding="utf-8"))  # no nbformat needed
    sources = ["".join(c["source"]) if isinstance(c["source"], list) else c["source"]
               for c in notebook["cells"] if c["cell_type"] == "code"]
    cells = [s for s in sources if "IPython" not in s]
    params = f"PROFILE = {profile!r}\nOVERRIDES = {overrides!r}"
    return "\n\n".join([cells[0], params] + cells[1:]) + "\n"


def run_notebook(work, name, profile, overrides):
    script = work / f"{name}.py"
    script.write_text(notebook_script(profile, overrides), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCVQA_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                        if p and pathlib.Path(p).resolve() != pathlib.Path.cwd().resolve())
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, script.name], cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        print(f"<{name}> {line}", end="", flush=True)
    if proc.wait():
        raise SystemExit(f"{name} failed with exit code {proc.returncode}")
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--processor", required=True)
    parser.add_argument("--work", default="/tmp/bench_parallel")
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    work = pathlib.Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"[bench] {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    t = time.perf_counter()
    data_dir = generate_demo_dataset(work / "data", n_train=args.n_train, n_test=args.n_test, image_size=112, seed=0)
    model_dir = build_model(args.processor, work / "model")
    print(f"[bench] data and model ready in {time.perf_counter() - t:.1f} s")
    common = [f"data_dir={data_dir}", f"model_name_or_path={model_dir}", "n_folds=2", f"epochs={args.epochs}",
              "micro_batch_size=8", "grad_accum_steps=2", "gradient_checkpointing=false", "num_workers=4",
              "infer_batch_size=16", "tta_option_views=2", "evals_per_epoch=1", "early_stopping_patience=0",
              "checkpoint_every_steps=100000"]
    wall = {}
    for name, setting in (("sequential", "off"), ("parallel", "auto")):
        overrides = "\n".join(common + [f"output_dir={work / name}", f"parallel_folds={setting}"])
        wall[name] = run_notebook(work, name, "local_gpu", overrides)
        metrics = json.loads((work / name / "metrics.json").read_text())
        print(f"[bench] {name}: wall {wall[name]:.1f} s (flow runtime_s {metrics['runtime_s']}), "
              f"fold accuracy {metrics['fold_accuracy']}")
    seq = np.loadtxt(work / "sequential" / "test_probs_ensemble.csv", delimiter=",", skiprows=1, usecols=(1, 2, 3, 4))
    par = np.loadtxt(work / "parallel" / "test_probs_ensemble.csv", delimiter=",", skiprows=1, usecols=(1, 2, 3, 4))
    print(f"[bench] ensemble test probabilities, parallel vs sequential: max |diff| {np.abs(seq - par).max():.3g}, "
          f"argmax agreement {(seq.argmax(1) == par.argmax(1)).mean():.3f}")

    # Sharded vs one-GPU inference with fold 0's adapter. Batch 1: every sample is computed alone, so a
    # shard's numbers must equal one GPU's exactly; the default batch shows what padding changes alone.
    cfg = Config(**json.loads((work / "sequential" / "config.json").read_text()))
    hardware = detect_hardware(cfg, verbose=False)
    _, test, _, _ = load_competition(cfg)
    adapter = work / "sequential" / "fold0" / "best_adapter.pt"
    model = load_model_for_training(cfg, hardware)
    load_trainable_state(model, torch.load(adapter))
    processor = load_processor(cfg)
    fmt = make_prompt_format(processor, cfg)
    single = {}
    for batch in (1, cfg.infer_batch_size):
        torch.cuda.synchronize()
        t = time.perf_counter()
        single[batch] = predict_views(FoldContext(processor, fmt, dataclasses.replace(cfg, infer_batch_size=batch),
                                                  hardware),
                                      model, test, desc=f"one GPU, batch {batch}")
        print(f"[bench] one-GPU inference, batch {batch}: {time.perf_counter() - t:.1f} s for {len(test)} rows x "
              f"{len(single[batch])} views")
    del model
    torch.cuda.empty_cache()
    t = time.perf_counter()
    sharded = predict_views_sharded(test, dataclasses.replace(cfg, infer_batch_size=1), hardware, adapter,
                                    slots=worker_slots(hardware, torch.cuda.device_count()), log_dir=work / "shard_logs")
    print(f"[bench] sharded inference, batch 1, {torch.cuda.device_count()} GPUs: {time.perf_counter() - t:.1f} s "
          f"(worker start and model load included)")
    exact = all(np.array_equal(sharded[k], single[1][k]) for k in single[1])
    diff = max(float(np.abs(sharded[k] - single[1][k]).max()) for k in single[1])
    agree = min(float((sharded[k].argmax(1) == single[1][k].argmax(1)).mean()) for k in single[1])
    pad = max(float(np.abs(single[cfg.infer_batch_size][k] - single[1][k]).max()) for k in single[1])
    print(f"[bench] sharded vs one GPU (batch 1): identical={exact}, max |diff| {diff:.3g}, argmax agreement {agree:.3f}")
    print(f"[bench] for scale: one GPU batch {cfg.infer_batch_size} vs batch 1: max |diff| {pad:.3g}")
    print(f"[bench] SUMMARY sequential {wall['sequential']:.1f} s, parallel {wall['parallel']:.1f} s, "
          f"speed-up {wall['sequential'] / wall['parallel']:.2f}x")


if __name__ == "__main__":
    main()
